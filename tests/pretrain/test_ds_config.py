"""The learning-rate schedule follows the run (pretrain/ds_config.py resolve_schedule): "auto" is the first launch's
--max_steps, a resume keeps the recorded length and says so in one line, --extend_schedule stretches it; checked on
the learning rate real runs log."""

import json
import math
import shutil

import pytest

from models.registry import ConfigError
from pretrain.ds_config import resolve_schedule
from tests.distributed import read_metrics, run_ranks, train_args

LR, WARMUP, COS_MIN = 0.001, 10, 0.1  # ds_configs/zero0.json's optimizer and scheduler


def cosine_lr(step, total):
    """The learning rate DeepSpeed's WarmupCosineLR logs after optimizer step ``step`` (1-based) past the warm-up."""
    progress = min(1.0, (step - WARMUP) / (total - WARMUP))
    return LR * (COS_MIN + (1 - COS_MIN) * (1 + math.cos(math.pi * progress)) / 2)


def test_auto_follows_max_steps_and_a_resume_keeps_or_extends_it(tmp_path):
    run = tmp_path / "run"
    first = run_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 14, save_dir=run), 1, tmp_path / "l1")
    lrs = read_metrics(run, "train/lr")
    assert lrs[14] == LR * COS_MIN and lrs[13] > LR * COS_MIN  # the minimum exactly at --max_steps
    assert json.loads((run / "run_config.json").read_text())["deepspeed"]["scheduler"]["params"]["total_num_steps"] == 14
    assert "notice: " not in first[0].output
    shutil.copytree(run, tmp_path / "extended")

    kept = run_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 18, "--resume", save_dir=run), 1, tmp_path / "l2")
    notices = [line for line in kept[0].output.splitlines() if "learning-rate schedule" in line]
    assert notices == [
        "notice: the learning-rate schedule keeps its recorded length of 14 steps (run_config.json) and "
        "--max_steps is 18: steps 15-18 train at the schedule's final learning rate (cos_min_ratio x lr); "
        "pass --extend_schedule to stretch it to 18"
    ]
    assert [read_metrics(run, "train/lr")[s] for s in range(15, 19)] == [LR * COS_MIN] * 4

    extended = tmp_path / "extended"
    output = run_ranks(
        train_args(tmp_path, "zero0.json", "tiny-gpt.json", 18, "--resume", "--extend_schedule", save_dir=extended), 1, tmp_path / "l3"
    )[0].output
    assert "the learning-rate schedule is stretched from its recorded 14 steps to 18" in output
    lrs = read_metrics(extended, "train/lr")
    assert all(math.isclose(lrs[s], cosine_lr(s, 18), rel_tol=1e-9) for s in range(15, 19))  # the 18-step cosine
    assert lrs[15] > LR * COS_MIN and lrs[18] == LR * COS_MIN
    assert json.loads((extended / "run_config.json").read_text())["deepspeed"]["scheduler"]["params"]["total_num_steps"] == 18


def schedule(total, kind="WarmupCosineLR"):
    return {"scheduler": {"type": kind, "params": {"total_num_steps": total, "warmup_num_steps": 10}}}


def test_what_the_schedule_cannot_do_is_one_line_and_a_fixed_length_is_kept():
    with pytest.raises(
        ConfigError,
        match=r"^--extend_schedule: DeepSpeed config d.json fixes scheduler.params.total_num_steps "
        r"at 100; set it to \"auto\"",
    ):
        resolve_schedule(schedule(100), "d.json", 200, True, schedule(100)["scheduler"], True)
    with pytest.raises(
        ConfigError,
        match=r"^--extend_schedule lengthens the learning-rate schedule, and --max_steps 50 is "
        r"shorter than its recorded 100 steps; drop --extend_schedule",
    ):
        resolve_schedule(schedule("auto"), "d.json", 50, True, schedule(100), True)
    with pytest.raises(ConfigError, match=r"^--extend_schedule: DeepSpeed config d.json has no scheduler"):
        resolve_schedule({}, "d.json", 50, True, {}, True)
    config, notice = resolve_schedule(schedule(100, "WarmupDecayLR"), "d.json", 150, False, None, False)
    assert config == schedule(100, "WarmupDecayLR")
    assert notice == (
        "notice: DeepSpeed config d.json fixes the learning-rate schedule at 100 steps and --max_steps is 150: "
        "the learning rate reaches 0 at step 101 and stays there: the steps after it change no weights; "
        'set scheduler.params.total_num_steps to "auto" to make it follow --max_steps'
    )
    assert resolve_schedule(schedule(100), "d.json", 100, False, None, False) == (schedule(100), None)
