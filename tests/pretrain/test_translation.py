"""Translation task: label-smoothed cross entropy, batches from token-budget pair data, and real 2-rank
training of the tiny dense and Switch encoder-decoders under ZeRO 0-3 and bf16 (the loss decreases)."""
import subprocess
import sys

import pytest
import torch

from pretrain.tasks.translation import IGNORE, label_smoothed_cross_entropy
from tests.distributed import MAIN, REPO, rank_env, read_metrics, run_ranks, translation_args

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


@pytest.mark.parametrize("ds_config,model_config", [
    ("zero0.json", "tiny-transformer.json"),
    ("zero1.json", "tiny-transformer.json"),
    ("zero2.json", "tiny-transformer.json"),
    ("zero3.json", "tiny-transformer.json"),
    ("bf16_zero1.json", "tiny-transformer.json"),
    ("moe_ep2_zero2.json", "tiny-switch-transformer.json"),
])
def test_two_ranks_train_and_the_loss_decreases(tmp_path, pair_data, ds_config, model_config):
    results = run_ranks(translation_args(tmp_path, pair_data, ds_config, model_config, 30), 2, tmp_path / "logs")
    log = results[0].output
    assert "translation data" in log and "skipped" in log and "padding fraction" in log
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < 0.8 * first, (first, last)
    assert read_metrics(tmp_path / "run", "val/loss")[30] < first
    if "switch" in model_config:
        assert read_metrics(tmp_path / "run", "train/aux_loss")[30] > 0
    assert (tmp_path / "run" / "latest").is_file()


def run_main(args, tmp_path):
    return subprocess.run([sys.executable, str(MAIN), *map(str, args)], cwd=REPO, env=rank_env(0, 1, 29500),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("change,message", [
    ({"--model_config": REPO / "models" / "configs" / "tiny-gpt.json"}, "needs an encoder-decoder model"),
    ({"--label_smoothing": "1.5"}, "--label_smoothing must be in [0, 1)"),
    ({"--seq_len": "1000"}, "longer than the model's 64 positions"),
])
def test_bad_translation_setups_are_one_line(tmp_path, pair_data, change, message):
    args = translation_args(tmp_path, pair_data, "zero0.json", "tiny-transformer.json", 1)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = run_main(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
