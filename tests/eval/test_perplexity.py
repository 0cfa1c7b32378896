"""python -m eval.perplexity: windows, the figures and their formulas, 2 ranks = 1 rank, the three inputs agree."""

import json
import math
import os
import subprocess
import sys

import pytest

from eval.perplexity import evaluate, windows
from pretrain.data.lm_dataset import read_documents
from pretrain.preprocess import preprocess
from switchyard.errors import ConfigError
from tests.distributed import CORPUS, REPO, start_ranks, wait_ranks

FIGURES = ("loss", "perplexity", "tokens", "bytes", "words", "bits_per_byte", "word_perplexity")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """The last 30 kB of Tiny Shakespeare, from a paragraph start (about 250 documents, 30k byte tokens)."""
    corpus = CORPUS.read_text()
    tail = corpus[corpus.index("\n\n", len(corpus) - 30_000) + 2 :]
    path = tmp_path_factory.mktemp("text") / "tail.txt"
    path.write_text(tail)
    return path


def cli(*args):
    """One plain process, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    return subprocess.run([sys.executable, "-m", "eval.perplexity", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "num_targets,context,stride", [(1000, 64, 64), (1000, 64, 16), (1000, 64, 1), (64, 64, 8), (30, 64, 64), (65, 64, 64), (130, 64, 48)]
)
def test_windows_score_every_target_once_with_full_context(num_targets, context, stride):
    spans = windows(num_targets, context, stride)
    length = min(context, num_targets)
    scored = [t for start, n in spans for t in range(start + length - n + 1, start + length + 1)]
    assert scored == list(range(1, num_targets + 1))  # targets 1..N of stream[0..N], each once, in order
    assert all(start >= 0 and start + length <= num_targets for start, _ in spans)
    # after the first window every target sees at least context - stride tokens before it
    assert all(length - n >= context - stride for _, n in spans[1:])


def test_cli_prints_json_last_and_figures_follow_their_formulas(trained, text, tmp_path):
    run = trained("dense")
    proc = cli(run, "--text", text, "--output", tmp_path / "ppl.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "ppl.json").read_text()) == result
    assert "perplexity: 100%" in proc.stderr  # the progress bar
    assert (result["run_dir"], result["tag"], result["context"], result["stride"]) == (str(run), "global_step100", 64, 64)

    documents = [doc for doc, _ in read_documents(text)]
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    assert result["bytes"] == n_bytes
    assert result["words"] == sum(len(doc.split()) for doc in documents)
    assert result["tokens"] == n_bytes + len(documents)  # byte tokenizer: every byte and each document's EOS
    total_nll = result["loss"] * result["tokens"]
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(total_nll / (n_bytes * math.log(2)), rel=1e-12)
    assert result["word_perplexity"] == pytest.approx(math.exp(total_nll / result["words"]), rel=1e-12)
    assert 1.0 < result["loss"] < math.log(257)  # trained 100 steps: well below uniform over bytes


@pytest.mark.parametrize("name", ["dense", "switch", "llama_moe"])
def test_two_ranks_match_one_rank(trained, text, tmp_path, name):
    run = trained(name)
    one = cli(run, "--text", text, "--batch_size", 4)
    assert one.returncode == 0, one.stderr[-3000:]
    script = REPO / "eval" / "perplexity.py"
    results = wait_ranks(start_ranks([run, "--text", text, "--batch_size", 4], 2, tmp_path / "logs", script=script), tmp_path / "logs", timeout=300)
    assert [r.returncode for r in results] == [0, 0], results[0].output[-3000:]
    expected = json.loads(one.stdout.strip().splitlines()[-1])
    got = json.loads(results[0].output.strip().splitlines()[-1])  # rank 0 prints, last
    assert '"loss"' not in results[1].output
    print(f"{name}: 1 rank {expected['loss']!r}, 2 ranks {got['loss']!r}")
    assert {k: got[k] for k in ("tokens", "bytes", "words")} == {k: expected[k] for k in ("tokens", "bytes", "words")}
    for key in FIGURES:
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key


def test_sliding_window_gives_more_context_and_lower_loss(trained, text):
    run = trained("dense")
    apart = evaluate(run, text=text, context=16)
    sliding = evaluate(run, text=text, context=16, stride=4)
    print(f"context 16: non-overlapping loss {apart['loss']}, stride 4 loss {sliding['loss']}")
    assert sliding["tokens"] == apart["tokens"]  # the same tokens, each scored once
    assert sliding["loss"] <= apart["loss"]


def test_text_tokens_and_dataset_inputs_agree(trained, text, tmp_path):
    """The same documents as a text file, preprocessed tokens and a save_to_disk dataset: the same figures."""
    import datasets

    run = trained("dense")
    from_text = evaluate(run, text=text)
    preprocess(str(text), output_prefix=str(tmp_path / "tail"), workers=1)
    from_tokens = evaluate(run, tokens=tmp_path / "tail")
    datasets.Dataset.from_dict({"text": [doc for doc, _ in read_documents(text)]}).save_to_disk(tmp_path / "ds")
    from_dataset = evaluate(run, dataset=str(tmp_path / "ds"), split="validation")
    assert from_tokens["loss"] == from_text["loss"] and from_tokens["tokens"] == from_text["tokens"]
    assert "bytes" not in from_tokens  # no text, so no per-byte or per-word figures
    assert {k: from_dataset[k] for k in FIGURES} == {k: from_text[k] for k in FIGURES}


def test_refusals(trained, text, tmp_path):
    proc = cli(tmp_path / "missing", "--text", text)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: run directory {tmp_path / 'missing'} does not exist; pass the --save_dir of a pretrain/main.py run"
    ]
    run = trained("dense")
    with pytest.raises(ConfigError, match="--stride must be in"):
        evaluate(run, text=text, stride=65)
    with pytest.raises(ConfigError, match="one of --text FILE, --tokens PREFIX or --dataset"):
        evaluate(run)


def test_a_translation_run_is_refused_before_its_weights_are_read(translation_run, text):
    with pytest.raises(
        ConfigError,
        match=f"eval.perplexity of {translation_run} needs a decoder model .family 'gpt' or "
        f"'llama' or 'llama_moe' or 'switch'.; this one is a 'transformer' encoder-decoder model",
    ):
        evaluate(translation_run, text=text)
