"""fp16 dynamic loss scaling on CPU ranks (see fp16_on_cpu.py for why the accelerator is patched)."""

import json

from tests.distributed import REPO, read_metrics, start_ranks, train_args, translation_args, wait_ranks

STEPS = 16
HERE = REPO / "tests" / "pretrain"


def test_overflowing_steps_are_skipped_and_the_scale_lowered(tmp_path):
    config = json.loads((REPO / "ds_configs" / "fp16_zero1.json").read_text())
    config["fp16"].update(initial_scale_power=24, hysteresis=1)  # scaled by 2^24 the gradients overflow fp16 (max 65504)
    ds = tmp_path / "fp16.json"
    ds.write_text(json.dumps(config))
    args = train_args(tmp_path, "zero1.json", "tiny-gpt.json", STEPS)
    args[1] = ds
    procs = start_ranks(args, 2, tmp_path / "logs", script=HERE / "fp16_on_cpu.py")
    for r in wait_ranks(procs, tmp_path / "logs"):
        assert r.returncode == 0, r.output[-4000:]
    scale = read_metrics(tmp_path / "run", "train/loss_scale")
    skipped = read_metrics(tmp_path / "run", "train/skipped_steps")
    losses = read_metrics(tmp_path / "run")
    print("loss scale per step", scale, "skipped", skipped)
    assert scale[1] < 2.0**24  # the first step overflowed and halved the scale
    assert all(scale[s + 1] <= scale[s] for s in range(1, STEPS))
    assert 1 <= skipped[STEPS] < STEPS - 3  # some steps skipped, then it trains
    assert losses[STEPS] < losses[1]


def test_translation_trains_with_loss_scaling(tmp_path, pair_data):
    """The encoder-decoder under fp16 (ZeRO-1, 2 ranks): scaled, stepped, and learning."""
    args = translation_args(tmp_path, pair_data, "fp16_zero1.json", "tiny-transformer.json", 20)
    procs = start_ranks(args, 2, tmp_path / "logs", script=HERE / "fp16_on_cpu.py")
    for r in wait_ranks(procs, tmp_path / "logs"):
        assert r.returncode == 0, r.output[-4000:]
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, 21))
    assert read_metrics(tmp_path / "run", "train/loss_scale")[20] > 1
    assert sum(losses[s] for s in (18, 19, 20)) < 0.9 * sum(losses[s] for s in (1, 2, 3)), losses
