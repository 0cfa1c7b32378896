"""python -m pretrain.preprocess_pairs: parallel text and JSON Lines pairs -> PREFIX.src/.tgt token files
(and PREFIX.refs.jsonl), read back by PairDataset; bad input is one line and exit 2, nothing written."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pretrain.data.indexed import IndexedTokens
from pretrain.data.pairs import PairDataset, TokenBudgetBatches
from pretrain.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from pretrain.preprocess_pairs import main, preprocess_pairs
from pretrain.tokenizer import train
from tests.distributed import REPO

SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared corpora ({SHARED}) are absent")

GERMAN = ["Ein Hund läuft.", "", "Zwei Kinder spielen im Park.", "Eine Frau liest ein Buch am Fenster.", "Ja."]
ENGLISH = ["A dog runs.", "(blank source)", "Two children play in the park.", "A woman reads a book by the window.", "Yes."]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def decoded(pairs, side, i, tokenizer=ByteTokenizer()):
    ids = (pairs.src if side == "src" else pairs.tgt)(i).tolist()
    assert ids[-1] == tokenizer.eos_id
    return tokenizer.decode(ids[:-1])


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pretrain.preprocess_pairs", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc


def test_parallel_text_round_trips_and_blank_pairs_are_dropped_from_both_sides(tmp_path, capsys):
    src, tgt = write_lines(tmp_path / "train.de", GERMAN), write_lines(tmp_path / "train.en", ENGLISH)
    preprocess_pairs(source=src, target=tgt, output_prefix=str(tmp_path / "out"), workers=1)
    pairs = PairDataset(tmp_path / "out")
    kept = [i for i, line in enumerate(GERMAN) if line]
    assert len(pairs) == len(kept)
    assert [decoded(pairs, "src", j) for j in range(len(pairs))] == [GERMAN[i] for i in kept]
    assert [decoded(pairs, "tgt", j) for j in range(len(pairs))] == [ENGLISH[i] for i in kept]
    assert pairs.src_lengths.tolist() == [len(GERMAN[i].encode()) + 1 for i in kept]
    assert not (tmp_path / "out.refs.jsonl").exists()  # parallel text: the target file is the reference
    report = capsys.readouterr().out
    assert "4 pairs (1 with a blank side dropped)" in report and "MB/s" in report and "tokens/s" in report


def test_output_does_not_depend_on_workers_or_chunk_size(tmp_path):
    src = write_lines(tmp_path / "s.txt", [f"source sentence {i} " * (i % 7 + 1) for i in range(300)])
    tgt = write_lines(tmp_path / "t.txt", [f"target {i}" for i in range(300)])
    preprocess_pairs(source=src, target=tgt, output_prefix=str(tmp_path / "one"), workers=1)
    preprocess_pairs(source=src, target=tgt, output_prefix=str(tmp_path / "two"), workers=2, chunk_chars=500)
    for side in ("src", "tgt"):
        assert (tmp_path / f"one.{side}.bin").read_bytes() == (tmp_path / f"two.{side}.bin").read_bytes()
        one, two = IndexedTokens(tmp_path / f"one.{side}"), IndexedTokens(tmp_path / f"two.{side}")
        assert one.offsets.tolist() == two.offsets.tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_separate_tokenizers_are_recorded_per_side(tmp_path):
    src = write_lines(tmp_path / "s.txt", GERMAN * 40)
    tgt = write_lines(tmp_path / "t.txt", ENGLISH * 40)
    train(str(tgt), per_line=True, vocab_size=40, model_type="char", output=str(tmp_path / "en"), num_threads=1)
    preprocess_pairs(
        source=src, target=tgt, output_prefix=str(tmp_path / "out"), src_tokenizer="bytes", tgt_tokenizer=str(tmp_path / "en.model"), workers=1
    )
    pairs = PairDataset(tmp_path / "out")
    english = SentencePieceTokenizer(str(tmp_path / "en.model"))
    assert pairs.src_tokenizer_spec == {"type": "bytes"} and pairs.tgt_tokenizer_spec == english.spec
    assert decoded(pairs, "tgt", 1, english) == ENGLISH[2] and decoded(pairs, "src", 1) == GERMAN[2]


def test_json_lines_train_on_the_first_reference_and_keep_all_for_evaluation(tmp_path):
    records = [
        {"dialogue": ["#A#: Hi.", "#B#: Hello."], "summary": "A greets B.", "extra": ["B answers.", "They meet."]},
        {"dialogue": "#A#: Bye.", "summary": "A leaves.", "extra": []},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    preprocess_pairs(jsonl=path, source_field="dialogue", target_field="summary,extra", output_prefix=str(tmp_path / "d"), workers=1)
    pairs = PairDataset(tmp_path / "d")
    assert decoded(pairs, "src", 0) == "#A#: Hi.\n#B#: Hello." and decoded(pairs, "tgt", 0) == "A greets B."
    refs = [json.loads(line) for line in (tmp_path / "d.refs.jsonl").read_text().splitlines()]
    assert refs == [["A greets B.", "B answers.", "They meet."], ["A leaves."]]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path):
    src, tgt = write_lines(tmp_path / "a.de", GERMAN), write_lines(tmp_path / "a.en", ENGLISH[:3])
    code, errors, proc = run_cli("--source", src, "--target", tgt, "--output_prefix", tmp_path / "x")
    assert code == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert f"--source {src} has 5 lines but --target {tgt} has 3" in errors[0]

    (tmp_path / "b.en").write_bytes("ok\n".encode() * 3 + b"caf\xe9\n" + b"fine\n")
    code, errors, proc = run_cli("--source", src, "--target", tmp_path / "b.en", "--output_prefix", tmp_path / "x")
    assert code == 2 and len(errors) == 1 and f"{tmp_path / 'b.en'} line 4 is not UTF-8" in errors[0], proc.stderr

    (tmp_path / "c.jsonl").write_text(json.dumps({"dialogue": "x", "summary": "y"}) + "\n" + json.dumps({"dialogue": "x"}) + "\n")
    code, errors, proc = run_cli(
        "--jsonl", tmp_path / "c.jsonl", "--source_field", "dialogue", "--target_field", "summary", "--output_prefix", tmp_path / "x"
    )
    assert code == 2 and len(errors) == 1 and "c.jsonl line 2 has no field 'summary' (it has 'dialogue'); pass --target_field" in errors[0], (
        proc.stderr
    )

    code, errors, _ = run_cli("--source", src, "--output_prefix", tmp_path / "x")
    assert code == 2 and "needs both --source FILE and --target FILE" in errors[0]
    assert not list(tmp_path.glob("x*"))


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--tokenizer", "{text}"], "tokenizer {text} is not a sentencepiece model; pass a .model file written by python -m pretrain.tokenizer"),
        (["--src_tokenizer", "bytes", "--tgt_tokenizer", "{text}"], "tokenizer {text} is not a sentencepiece model"),
        (["--tokenizr", "bytes"], "unknown flag --tokenizr (did you mean --tokenizer?); pretrain.preprocess_pairs takes --source, --target, --jsonl"),
    ],
)
def test_a_text_file_as_tokenizer_or_a_misspelled_flag_is_one_line(tmp_path, capsys, flags, expected):
    src, tgt = write_lines(tmp_path / "a.de", GERMAN), write_lines(tmp_path / "a.en", ENGLISH)
    with pytest.raises(SystemExit) as exited:
        main(["--source", str(src), "--target", str(tgt), "--output_prefix", str(tmp_path / "x"), *(flag.format(text=src) for flag in flags)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2
    assert len(errors) == 1 and errors[0].startswith("error: " + expected.format(text=src)), errors
    assert not list(tmp_path.glob("x*"))


@needs_shared
def test_multi30k_validation_pairs_batch_by_token_budget(tmp_path):
    raw = SHARED / "multi30k" / "raw"
    preprocess_pairs(source=raw / "val.de", target=raw / "val.en", output_prefix=str(tmp_path / "val"), workers=2)
    pairs = PairDataset(tmp_path / "val")
    lines = (raw / "val.de").read_text(encoding="utf-8").splitlines()
    assert len(pairs) == len(lines) == 1014 and decoded(pairs, "src", 0) == lines[0]
    batches = TokenBudgetBatches(pairs, max_tokens=2048, max_positions=256, pad_id=0, bos_id=ByteTokenizer.eos_id, seed=0)
    assert batches.skipped == int(((pairs.src_lengths > 256) | (pairs.tgt_lengths > 256)).sum())
    rng = np.random.default_rng(0)  # baseline: batches of the same sizes drawn in random order
    shuffled = np.split(rng.permutation(len(pairs)), np.cumsum([len(b) for b in batches.all_batches])[:-1])
    real = pairs.src_lengths.sum() + pairs.tgt_lengths.sum()
    random_padding = 1 - real / sum(len(b) * (pairs.src_lengths[b].max() + pairs.tgt_lengths[b].max()) for b in shuffled)
    print(f"multi30k val, bytes, max_tokens 2048: padding {batches.padding_fraction:.3f} vs {random_padding:.3f} at random")
    assert batches.padding_fraction < random_padding / 2


@needs_shared
def test_dialogsum_test_set_keeps_three_references_from_the_command_line(tmp_path):
    path = SHARED / "dialogsum" / "dialogsum.test.jsonl"
    code, errors, proc = run_cli(
        "--jsonl",
        path,
        "--source_field",
        "dialogue",
        "--target_field",
        "summary1,summary2,summary3",
        "--output_prefix",
        tmp_path / "test",
        "--workers",
        2,
    )  # through fire: NAME1,NAME2,NAME3
    assert code == 0 and not errors, proc.stderr[-2000:]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    refs = [json.loads(line) for line in (tmp_path / "test.refs.jsonl").read_text().splitlines()]
    pairs = PairDataset(tmp_path / "test")
    assert len(pairs) == len(refs) == len(records) == 500
    assert refs[7] == [records[7][f"summary{k}"] for k in (1, 2, 3)] and decoded(pairs, "tgt", 7) == records[7]["summary1"]
    assert decoded(pairs, "src", 7) == records[7]["dialogue"]
