"""python -m pretrain.tokenizer: sentencepiece models from text files, JSON Lines fields and datasets."""

import json
import os
import subprocess
import sys

import pytest

from pretrain.data.lm_dataset import read_documents
from pretrain.data.tokenizer import SentencePieceTokenizer
from pretrain.tokenizer import main, train
from tests.distributed import REPO

SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared corpora ({SHARED}) are absent")


def head(source, path, n_bytes=None, n_lines=None):
    """A small slice of a shared corpus, cut at a line end."""
    with open(source, encoding="utf-8") as f:
        lines = f.readlines()
    if n_lines is not None:
        lines = lines[:n_lines]
    text = "".join(lines)
    if n_bytes is not None:
        text = text[: text.rindex("\n", 0, n_bytes) + 1]
    path.write_text(text, encoding="utf-8")
    return path


@needs_shared
def test_bpe_on_tinyshakespeare_round_trips(tmp_path):
    corpus = head(SHARED / "tinyshakespeare" / "input.txt", tmp_path / "shakespeare.txt", n_bytes=100_000)
    train(str(corpus), vocab_size=320, character_coverage=1.0)
    tok = SentencePieceTokenizer(tmp_path / "shakespeare.bpe320.model")  # saved beside the data
    assert tok.vocab_size == 320 and (tmp_path / "shakespeare.bpe320.vocab").is_file()
    assert [tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id(), tok.eos_id] == [0, 1, 2, 3, 3]
    documents = [text for text, _ in read_documents(corpus)]
    ids = [tok.encode(text) for text in documents]
    assert [tok.decode(i) for i in ids] == documents  # newlines and runs of spaces included
    assert 1 not in {t for doc in ids for t in doc}  # no <unk>: every character is covered
    chars_per_token = sum(map(len, documents)) / sum(map(len, ids))
    assert chars_per_token > 1.8  # merges learned (a byte-level tokenizer has 1.0)


@needs_shared
@pytest.mark.parametrize("model_type", ["unigram", "char"])
def test_language_tags_stay_whole(tmp_path, model_type):
    """User-defined symbols (language tags for translation) get the ids after the specials and are never split."""
    raw = SHARED / "multi30k" / "raw"
    en = head(raw / "train.en", tmp_path / "train.en", n_lines=1500)
    de = head(raw / "train.de", tmp_path / "train.de", n_lines=1500)
    train(str(en), str(de), per_line=True, model_type=model_type, vocab_size=400, user_defined_symbols="<2en>,<2de>", output=str(tmp_path / "m30k"))
    tok = SentencePieceTokenizer(tmp_path / "m30k.model")
    assert [tok.sp.piece_to_id("<2en>"), tok.sp.piece_to_id("<2de>")] == [4, 5]
    ids = tok.encode("<2de>Zwei Hunde spielen im Schnee.")
    assert tok.sp.id_to_piece(ids[:2]) == ["▁", "<2de>"]  # sentencepiece's dummy prefix, then the tag in one piece
    assert tok.decode(ids) == "<2de>Zwei Hunde spielen im Schnee."
    if model_type == "char":
        assert all(len(tok.sp.id_to_piece(i)) == 1 for i in ids[2:])


def test_json_lines_field_and_saved_dataset_give_the_same_tokenizer(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"record {i}: the {'quick brown fox' if i % 2 else 'lazy dog'} number {i * 7}" for i in range(300)]
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(tmp_path / "saved")
    train(str(jsonl), field="body", vocab_size=100, num_threads=1)
    train(dataset=str(tmp_path / "saved"), field="body", vocab_size=100, num_threads=1)
    from_file, from_dataset = (SentencePieceTokenizer(tmp_path / f"{name}.bpe100.model").sp for name in ("records", "saved"))
    assert [from_file.id_to_piece(i) for i in range(100)] == [from_dataset.id_to_piece(i) for i in range(100)]


@pytest.mark.parametrize(
    "name,content,args,expected",
    [
        ("empty.txt", b"", [], "data file {path} is empty"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), [], "data file {path} line 1 is not UTF-8"),
        ("rows.jsonl", b'{"text": "a"}\n{"body": "b"}\n', [], "data file {path} line 2 has no field 'text'"),
        ("ok.txt", b"abc\n", ["--vocab_size", "5000"], "sentencepiece refused to train: Vocabulary size too high (5000)"),
        ("ok.txt", b"abc\n", ["--model_type", "word"], "--model_type must be bpe, unigram or char"),
        (
            "ok.txt",
            b"abc\n",
            ["--vocab_size", "0"],
            "--vocab_size must be an integer of at least 5 (the 4 special pieces, 0 --user_defined_symbols and one learned piece), got 0",
        ),
        ("ok.txt", b"abc\n", ["--vocab_size", "-3"], "--vocab_size must be an integer of at least 5"),
        (
            "ok.txt",
            b"abc\n",
            ["--vocab_size", "6", "--user_defined_symbols", "<a>,<b>"],
            "--vocab_size must be an integer of at least 7 (the 4 special pieces, 2 --user_defined_symbols",
        ),
        (
            "ok.txt",
            b"abc\n",
            ["--vocab_size", "6", "--num_threads", "0"],
            "sentencepiece refused to train: it needs num_threads >= 1 && num_threads <= 1024; change --num_threads",
        ),
        (
            "ok.txt",
            b"abc\n",
            ["--vocab_szie", "50"],
            "unknown flag --vocab_szie (did you mean --vocab_size?); pretrain.tokenizer takes --dataset, --dataset_config",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, name, content, args, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        main([str(path), *args])
    errors = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2
    assert len(errors) == 1 and errors[0].startswith("error: " + expected.format(path=path)), errors
    assert not list(tmp_path.glob("*.model"))


def test_command_line_trains_offline_from_a_local_dataset_folder(tmp_path):
    """`python -m pretrain.tokenizer --dataset DIR` loads a folder of JSON Lines through datasets.load_dataset,
    with the network switched off."""
    pytest.importorskip("datasets")
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [{"text": f"line {i} of a small corpus about {'cats' if i % 3 else 'dogs'}"} for i in range(200)]
    (folder / "part0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.tokenizer", "--dataset", str(folder), "--vocab_size", "40", "--model_type", "unigram"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and (tmp_path / "corpus.unigram40.model").is_file()
    tok = SentencePieceTokenizer(tmp_path / "corpus.unigram40.model")
    assert tok.decode(tok.encode("line 7 of a small corpus about cats")) == "line 7 of a small corpus about cats"
