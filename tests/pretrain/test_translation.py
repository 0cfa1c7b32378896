"""Translation task: label-smoothed cross entropy, batches from token-budget pair data, and real 2-rank
training of the tiny dense and Switch encoder-decoders under ZeRO 0-3 and bf16 (the loss decreases)."""

import json
import subprocess
import sys

import pytest
import torch

from pretrain.preprocess_pairs import preprocess_pairs
from pretrain.tasks.translation import IGNORE, label_smoothed_cross_entropy
from pretrain.tokenizer import train as train_tokenizer
from tests.distributed import MAIN, REPO, bleu_args, rank_env, read_metrics, run_ranks, translation_args


def test_label_smoothing_matches_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 4, IGNORE], [6, IGNORE, IGNORE]])
    lprobs = logits.log_softmax(-1)
    real = targets != IGNORE
    nll = -lprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[real]
    uniform = -lprobs.mean(-1)[real]
    for e in (0.0, 0.1, 0.3):
        expected = ((1 - e) * nll + e * uniform).mean()
        torch.testing.assert_close(label_smoothed_cross_entropy(logits, targets, e), expected)


@pytest.mark.parametrize(
    "ds_config,model_config",
    [
        ("zero0.json", "tiny-transformer.json"),
        ("zero1.json", "tiny-transformer.json"),
        ("zero2.json", "tiny-transformer.json"),
        ("zero3.json", "tiny-transformer.json"),
        ("bf16_zero1.json", "tiny-transformer.json"),
        ("moe_ep2_zero2.json", "tiny-switch-transformer.json"),
    ],
)
def test_two_ranks_train_and_the_loss_decreases(tmp_path, pair_data, ds_config, model_config):
    """... and validation BLEU runs: each rank translates half the dev set, in step with the other (expert
    parallelism's all-to-all and ZeRO-3's gathers run inside every forward)."""
    results = run_ranks(translation_args(tmp_path, pair_data, ds_config, model_config, 30, *bleu_args(pair_data, beam=2)), 2, tmp_path / "logs")
    log = results[0].output
    assert "translation data" in log and "skipped" in log and "padding fraction" in log
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < 0.8 * first, (first, last)
    assert read_metrics(tmp_path / "run", "val/loss")[30] < first
    assert 0.0 <= read_metrics(tmp_path / "run", "val/bleu")[30] <= 100.0
    if "switch" in model_config:
        assert read_metrics(tmp_path / "run", "train/aux_loss")[30] > 0
    assert (tmp_path / "run" / "latest").is_file()


def run_main(args, tmp_path):
    return subprocess.run(
        [sys.executable, str(MAIN), *map(str, args)], cwd=REPO, env=rank_env(0, 1, 29500), capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--model_config": REPO / "models" / "configs" / "tiny-gpt.json"}, "needs an encoder-decoder model"),
        ({"--label_smoothing": "1.5"}, "--label_smoothing must be in [0, 1)"),
        ({"--seq_len": "1000"}, "longer than the model's 64 positions"),
        ({"--bleu_src": "VAL_SRC", "--bleu_ref": REPO / "README.md"}, "they must be line-aligned"),
    ],
)
def test_bad_translation_setups_are_one_line(tmp_path, pair_data, change, message):
    args = translation_args(tmp_path, pair_data, "zero0.json", "tiny-transformer.json", 1)
    val_src = pair_data[0].parent / "pairs2.src"
    assert_refused_with_one_line(args, {f: val_src if v == "VAL_SRC" else v for f, v in change.items()}, message, tmp_path)


def assert_refused_with_one_line(args, change, message, tmp_path):
    """pretrain/main.py with ``args`` and each flag of ``change`` set (replaced or added) exits 2 with one
    line naming ``message``."""
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = run_main(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def pairs_with_a_tokenizer_each(tmp_path_factory, pair_data):
    """The toy pair preprocessed with a sentencepiece model trained on each side alone: (train, val, model config
    with separate vocabularies, source and target .model)."""
    directory, out = pair_data[0].parent, tmp_path_factory.mktemp("separate")
    for side, vocab_size in (("src", 31), ("tgt", 30)):  # at most 31 pieces for one side's 24 words
        train_tokenizer(directory / f"pairs1.{side}", per_line=True, vocab_size=vocab_size, output=str(out / side), num_threads=1)
    for split, seed in (("train", 1), ("val", 2)):
        preprocess_pairs(
            source=str(directory / f"pairs{seed}.src"),
            target=str(directory / f"pairs{seed}.tgt"),
            src_tokenizer=str(out / "src.model"),
            tgt_tokenizer=str(out / "tgt.model"),
            output_prefix=str(out / split),
            workers=1,
        )
    config = json.loads((REPO / "models" / "configs" / "tiny-transformer.json").read_text())
    config.update(share_all_embeddings=False, vocab_size=48, tgt_vocab_size=40)
    (out / "separate.json").write_text(json.dumps(config))
    return out / "train", out / "val", out / "separate.json", out / "src.model", out / "tgt.model"


def test_a_tokenizer_for_each_side_trains_and_translates(tmp_path, pair_data, pairs_with_a_tokenizer_each):
    train, val, config, src_model, tgt_model = pairs_with_a_tokenizer_each
    args = translation_args(tmp_path, (train, val, None), "zero1.json", "tiny-transformer.json", 100, *bleu_args(pair_data))
    args[args.index("--model_config") + 1] = config
    run_ranks(args, 1, tmp_path / "logs")
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["src_tokenizer"]["path"] == str(src_model) and run_config["tokenizer"]["path"] == str(tgt_model)
    logged = read_metrics(tmp_path / "run", "val/bleu")[100]
    directory = pair_data[0].parent
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.bleu",
            tmp_path / "run",
            "--src",
            directory / "pairs2.src",
            "--ref",
            directory / "pairs2.tgt",
            "--beam",
            "4",
            "--hyp_output",
            tmp_path / "hyps.txt",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Sources encoded with the source tokenizer, outputs decoded with the target's, in training and in eval.bleu.
    assert result["bleu"] == pytest.approx(logged, abs=1e-9) and result["bleu"] > 5, (result, logged)
    words = " ".join((tmp_path / "hyps.txt").read_text().split()).split()
    assert words and all(w.startswith("v") for w in words)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--model_config": REPO / "models" / "configs" / "tiny-transformer.json"}, "set share_all_embeddings to false"),
        ({"--tokenizer": "TGT"}, "drop --tokenizer"),
    ],
)
def test_a_tokenizer_for_each_side_refuses_a_shared_setup(tmp_path, pairs_with_a_tokenizer_each, change, message):
    train, val, config, _, tgt_model = pairs_with_a_tokenizer_each
    args = translation_args(tmp_path, (train, val, None), "zero0.json", "tiny-transformer.json", 1)
    args[args.index("--model_config") + 1] = config
    assert_refused_with_one_line(args, {f: tgt_model if v == "TGT" else v for f, v in change.items()}, message, tmp_path)
