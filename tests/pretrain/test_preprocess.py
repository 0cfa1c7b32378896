"""python -m pretrain.preprocess: text -> PREFIX.bin/.idx with worker processes, and training on the result."""

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import pretrain.preprocess
from models import load_model_config
from pretrain.data.indexed import IndexedTokens, IndexedWriter
from pretrain.data.lm_dataset import read_text_tokens
from pretrain.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, tokenizer_for_data
from pretrain.preprocess import chunks, main, preprocess
from pretrain.tasks.lm import LanguageModelingTask
from pretrain.tokenizer import train
from switchyard.errors import ConfigError
from tests.distributed import MAIN, REPO, read_metrics, run_ranks

SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared corpora ({SHARED}) are absent")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """60 KB of Tiny Shakespeare and a BPE tokenizer of 320 pieces (tiny-gpt's vocab_size) trained on it."""
    if not SHARED.is_dir():
        pytest.skip(f"the shared corpora ({SHARED}) are absent")
    folder = tmp_path_factory.mktemp("shakespeare")
    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    corpus = folder / "shakespeare.txt"
    corpus.write_text(text[: text.rindex("\n") + 1])
    train(str(corpus), vocab_size=320, character_coverage=1.0, num_threads=1)
    return SimpleNamespace(corpus=corpus, model=folder / "shakespeare.bpe320.model", folder=folder)


def test_two_workers_write_the_same_files_as_one(shakespeare, tmp_path):
    for workers in (1, 2):
        preprocess(
            str(shakespeare.corpus), tokenizer=str(shakespeare.model), output_prefix=str(tmp_path / f"w{workers}"), workers=workers, chunk_chars=4000
        )  # ~15 chunks, so both workers take turns
    for suffix in ("bin", "idx"):
        assert (tmp_path / f"w1.{suffix}").read_bytes() == (tmp_path / f"w2.{suffix}").read_bytes()
    data = IndexedTokens(tmp_path / "w2")
    tok = SentencePieceTokenizer(shakespeare.model)
    assert data.tokens.dtype == np.uint16 and data.tokenizer_spec == tok.spec
    assert data.footer["num_docs"] == len(shakespeare.corpus.read_text().split("\n\n"))
    first = data.tokens[data.offsets[0] : data.offsets[1]].tolist()
    assert first[-1] == tok.eos_id and tok.decode(first[:-1]) == shakespeare.corpus.read_text().split("\n\n")[0] + "\n\n"


def test_reading_stays_a_few_chunks_ahead_of_writing(tmp_path, monkeypatch):
    """Memory is bounded by the chunk size: Pool.imap alone would read the whole corpus ahead of the workers."""
    made, made_when_written = [], []

    def counted_chunks(documents, chunk_chars):
        for chunk in chunks(documents, chunk_chars):
            made.append(chunk)
            yield chunk

    def add(self, tokens, lengths):
        made_when_written.append(len(made))
        write(self, tokens, lengths)

    write = IndexedWriter.add
    monkeypatch.setattr(pretrain.preprocess, "chunks", counted_chunks)
    monkeypatch.setattr(IndexedWriter, "add", add)
    (tmp_path / "c.txt").write_text("".join(f"paragraph {i}\n\n" for i in range(300)))
    preprocess(str(tmp_path / "c.txt"), workers=2, chunk_chars=1)  # one document per chunk
    assert len(made) == len(made_when_written) == 300
    # written result i: at most i + 1 results done, 2 per worker in flight, 1 chunk waiting for a slot
    assert max(n - i for i, n in enumerate(made_when_written)) <= 1 + 2 * 2 + 1


def test_bytes_preprocessed_equal_what_training_tokenizes_from_text(shakespeare, tmp_path):
    preprocess(str(shakespeare.corpus), output_prefix=str(tmp_path / "b"), workers=2, chunk_chars=10_000)
    data = IndexedTokens(tmp_path / "b.bin")
    assert data.tokens.tolist() == read_text_tokens(shakespeare.corpus, ByteTokenizer()).tolist()
    assert set(data.tokens[data.offsets[1:] - 1].tolist()) == {256}  # every document ends with EOS


def test_json_lines_field_one_document_per_record(tmp_path):
    records = [{"id": i, "summary": f"summary {i}", "dialogue": "..."} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    preprocess(str(tmp_path / "d.jsonl"), field="summary", workers=1)  # output beside the input: d.bin, d.idx
    data = IndexedTokens(tmp_path / "d")
    assert data.footer["num_docs"] == 30 and data.footer["source"]["field"] == "summary"
    assert ByteTokenizer().decode(data.tokens[data.offsets[7] : data.offsets[8]]) == "summary 7"


@pytest.mark.parametrize(
    "name,content,extra,expected",
    [
        ("empty.txt", b"", [], "data file {path} is empty"),
        ("latin1.txt", b"fine\n\nstill fine\n\n" * 50 + "caf\u00e9\n".encode("latin-1"), [], "data file {path} line 201 is not UTF-8"),
        ("rows.jsonl", b'{"text": "a"}\n' * 40 + b'{"body": "b"}\n', [], "data file {path} line 41 has no field 'text'"),
        ("ok.txt", b"abc\n", ["--tokenizer", "missing.model"], "tokenizer missing.model does not exist"),
        ("ok.txt", b"abc\n", ["--output_prefix", "/nonexistent/x"], "--output_prefix /nonexistent/x: its directory does not exist"),
        ("ok.txt", b"abc\n", ["--tokenizer", "{path}"], "tokenizer {path} is not a sentencepiece model"),
        ("ok.txt", b"abc\n", ["--tokenzier", "bytes"], "unknown flag --tokenzier (did you mean --tokenizer?)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, name, content, extra, expected):
    """Reading happens in the main process while two workers encode: the error still surfaces as one line."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        main([str(path), "--workers", "2", "--chunk_chars", "20", *(arg.format(path=path) for arg in extra)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exited.value.code == 2
    assert len(errors) == 1 and errors[0].startswith("error: " + expected.format(path=path)), errors
    assert sorted(os.listdir(tmp_path)) == [name]  # no .bin/.idx, not even under a temporary name


@needs_shared
def test_command_line_reports_throughput(tmp_path):
    lines = (SHARED / "ptb" / "ptb.train.txt").read_text().splitlines(keepends=True)[:3000]
    (tmp_path / "ptb.txt").write_text("".join(lines))
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.preprocess", str(tmp_path / "ptb.txt"), "--per_line", "--workers", "2", "--chunk_chars", "20000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MB/s" in proc.stdout and "tokens/s" in proc.stdout, proc.stdout
    data = IndexedTokens(tmp_path / "ptb")
    assert data.footer["num_docs"] == 3000 and data.footer["source"]["per_line"] is True


def test_the_tokenizer_comes_from_the_index_and_a_different_one_is_refused(shakespeare, tmp_path):
    preprocess(str(shakespeare.corpus), tokenizer=str(shakespeare.model), output_prefix=str(tmp_path / "c"), workers=1)
    idx = str(tmp_path / "c.idx")
    spec = IndexedTokens(tmp_path / "c").tokenizer_spec
    assert tokenizer_for_data(None, {idx: spec}).spec == spec
    assert tokenizer_for_data(str(shakespeare.model), {idx: spec}).spec == spec
    moved = tmp_path / "shakespeare.bpe320.model"  # the tokenizer moved along with the data
    moved.write_bytes(shakespeare.model.read_bytes())
    assert tokenizer_for_data(None, {idx: {**spec, "path": "/gone/shakespeare.bpe320.model"}}).spec["path"] == str(moved)
    train(str(shakespeare.corpus), vocab_size=300, output=str(tmp_path / "other"), num_threads=1)
    for given in (str(tmp_path / "other.model"), "bytes"):
        with pytest.raises(ConfigError, match=re.escape(f"{idx} was made with tokenizer {shakespeare.model} (sha256 ")):
            tokenizer_for_data(given, {idx: spec})
    with pytest.raises(ConfigError, match="preprocess training and validation data with one tokenizer"):
        tokenizer_for_data(None, {idx: spec, "val.idx": {"type": "bytes"}})


def lm_task(**args):
    defaults = dict(
        tokenizer=None,
        seq_len=None,
        val_data=None,
        val_fraction=0.05,
        seed=1,
        train_data_weights=None,
        model_config=str(REPO / "models" / "configs" / "tiny-gpt.json"),
    )
    args = SimpleNamespace(**{**defaults, **args, "train_data": [args["train_data"]]})
    return LanguageModelingTask(args, load_model_config(args.model_config), SimpleNamespace(pipeline_stages=1, sequence_parallel_size=1))


def test_lm_task_reads_a_prefix_memory_mapped(shakespeare, tmp_path):
    prefix = tmp_path / "c"
    preprocess(str(shakespeare.corpus), tokenizer=str(shakespeare.model), output_prefix=str(prefix), workers=1)
    task = lm_task(train_data=str(prefix), val_data=str(prefix) + ".bin")  # a bare prefix and PREFIX.bin
    assert task.tokenizer.spec["path"] == str(shakespeare.model)
    assert isinstance(task.train.tokens, np.memmap) and task.train.tokens.dtype == np.uint16
    assert task.train[0].tolist() == task.train.tokens[:65].tolist()
    small = json.loads((REPO / "models" / "configs" / "tiny-gpt.json").read_text()) | {"vocab_size": 300}
    (tmp_path / "small.json").write_text(json.dumps(small))
    with pytest.raises(ConfigError, match="tokenizer has 320 ids but model config"):  # the model-config check still applies
        lm_task(train_data=str(prefix), model_config=str(tmp_path / "small.json"))
    with pytest.raises(ConfigError, match="was made with tokenizer .* not bytes; drop --tokenizer"):
        lm_task(train_data=str(prefix), tokenizer="bytes")  # an explicit tokenizer must be the data's


def test_training_runs_on_a_preprocessed_prefix(shakespeare, tmp_path):
    prefix = tmp_path / "shakespeare"
    preprocess(str(shakespeare.corpus), tokenizer=str(shakespeare.model), output_prefix=str(prefix), workers=2)
    args = [
        "--ds_config",
        REPO / "ds_configs" / "zero0.json",
        "--model_config",
        REPO / "models" / "configs" / "tiny-gpt.json",
        "--train_data",
        f"{prefix}.bin",
        "--max_steps",
        3,
        "--save_dir",
        tmp_path / "run",
        "--log_interval",
        1,
    ]
    run_ranks(args, 1, tmp_path / "logs")
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert losses[1] == pytest.approx(math.log(320), rel=0.1)  # starts near uniform over the 320 pieces
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())["tokenizer"]
    assert recorded == SentencePieceTokenizer(shakespeare.model).spec


def test_main_refuses_a_tokenizer_the_data_was_not_made_with(shakespeare, tmp_path):
    prefix = tmp_path / "c"
    preprocess(str(shakespeare.corpus), tokenizer=str(shakespeare.model), output_prefix=str(prefix), workers=1)
    train(str(shakespeare.corpus), vocab_size=300, output=str(tmp_path / "other"), num_threads=1)
    args = [
        "--ds_config",
        REPO / "ds_configs" / "zero0.json",
        "--model_config",
        REPO / "models" / "configs" / "tiny-gpt.json",
        "--train_data",
        f"{prefix}.bin",
        "--tokenizer",
        tmp_path / "other.model",
        "--max_steps",
        1,
        "--save_dir",
        tmp_path / "run",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(MAIN), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [
        f"error: {prefix}.idx was made with tokenizer {shakespeare.model} "
        f"(sha256 {SentencePieceTokenizer(shakespeare.model).sha256[:12]}), not {tmp_path / 'other.model'} "
        f"(sha256 {SentencePieceTokenizer(tmp_path / 'other.model').sha256[:12]}); "
        f"drop --tokenizer to use the one it was made with"
    ]
