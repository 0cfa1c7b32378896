"""A Switch run resumed at another world and expert-parallel size (pretrain/reshard.py under ZeRO 1-2, DeepSpeed's own
load under ZeRO-0) continues as the uninterrupted run at the new size does, with the same global batch; what cannot
be converted is refused in one line, before any model is built."""

import json
import shutil

import pytest
import torch

from pretrain.run_dir import damage, safe_load
from tests.distributed import REPO, read_metrics, run_ranks, train_args

MODEL = "tiny-switch.json"
STEPS, STOPPED = 5, 3  # the runs save at step 3 (where the resumed ones start) and 5
RELATIVE = 1e-5


def ds_config(directory, stage, ep_size):
    """ds_configs/moe_ep2_zero2.json at ZeRO stage ``stage`` and expert-parallel size ``ep_size``."""
    config = json.loads((REPO / "ds_configs" / "moe_ep2_zero2.json").read_text())
    config["zero_optimization"]["stage"] = stage
    config["moe"]["expert_parallel_size"] = ep_size
    path = directory / f"moe_ep{ep_size}_zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(ZeRO stage, ranks, expert-parallel size) -> the run directory of STEPS steps at those sizes, each run once."""
    runs = {}

    def run(stage, world, ep_size):
        if (stage, world, ep_size) not in runs:
            tmp = tmp_path_factory.mktemp(f"zero{stage}-{world}ranks-ep{ep_size}")
            args = train_args(tmp, ds_config(tmp, stage, ep_size), MODEL, STEPS, "--save_interval", STOPPED, save_dir=tmp / "run")
            run_ranks(args, world, tmp / "logs")
            runs[stage, world, ep_size] = tmp / "run"
        return runs[stage, world, ep_size]

    return run


def stopped_at(run, directory):
    """A copy of ``run`` as it was once it had saved step STOPPED: what a run stopped there leaves."""
    copy = directory / "run"
    shutil.copytree(run, copy)
    for tag in copy.glob("global_step*"):
        if int(tag.name.removeprefix("global_step")) > STOPPED:
            shutil.rmtree(tag)
    (copy / "latest").write_text(f"global_step{STOPPED}")
    metrics = copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(line for line in lines if json.loads(line).get("step", 0) <= STOPPED))
    return copy


def assert_same_state(resumed, expected):
    """``resumed`` (what a checkpoint file holds) is ``expected``, its tensors within RELATIVE of each tensor's
    largest value."""
    if torch.is_tensor(expected) and expected.is_floating_point():
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(resumed, expected, rtol=0, atol=RELATIVE * scale)
    elif torch.is_tensor(expected):
        assert torch.equal(resumed, expected)
    elif isinstance(expected, dict):
        assert resumed.keys() == expected.keys()
        for key in expected:
            assert_same_state(resumed[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(resumed) == len(expected)
        for a, b in zip(resumed, expected):
            assert_same_state(a, b)
    elif isinstance(expected, float):
        assert resumed == pytest.approx(expected, rel=RELATIVE)
    elif hasattr(expected, "__dict__"):  # DeepSpeed's loss scaler, fragment addresses
        assert type(resumed) is type(expected)
        assert_same_state(vars(resumed), vars(expected))
    else:
        assert resumed == expected


def resume(tmp_path, saved, stage, world, ep_size):
    run = stopped_at(saved, tmp_path)
    args = train_args(tmp_path, ds_config(tmp_path, stage, ep_size), MODEL, STEPS, "--resume", "--save_interval", STOPPED, save_dir=run)
    results = run_ranks(args, world, tmp_path / "logs")
    assert f"resumed from step {STOPPED} ({STOPPED * 8} samples consumed)" in results[0].output  # the same global batches follow
    return run


def assert_continues_as(run, expected):
    """``run``'s losses after the resume are ``expected``'s, and so are its last checkpoint's optimizer files: Adam's
    moments and step, and under ZeRO 1-2 the fp32 masters, partition by partition, each optimizer group's flat tensor
    within RELATIVE of its largest value. (Not each weight within its own largest: Adam moves a weight whose
    gradient is near 0 by about the learning rate whatever its sign, so the runs at different sizes, whose sums
    round differently, part by 1e-6 on the smallest biases in two steps.)"""
    losses, reference = read_metrics(run), read_metrics(expected)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(STOPPED + 1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=RELATIVE), (step, losses[step], reference[step])
    last = f"global_step{STEPS}"
    files = sorted(p.name for p in (expected / last).glob("*optim_states.pt"))
    assert files and files == sorted(p.name for p in (run / last).glob("*optim_states.pt"))
    for name in files:
        assert_same_state(safe_load(run / last / name), safe_load(expected / last / name))
    assert damage(run, f"global_step{STOPPED}") is None  # the conversion wrote nothing into the checkpoint


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("saved_world, world", [(2, 1), (1, 2)], ids=["2-ranks-ep2-to-1-rank", "1-rank-to-2-ranks-ep2"])
def test_switch_run_resumes_at_another_world_and_expert_parallel_size(tmp_path, uninterrupted, stage, saved_world, world):
    """Expert-parallel size = ranks: 2 experts on each of 2 ranks, or all 4 on one. Compared with the run that had
    the new sizes all along: its losses, and at the end its masters and Adam state, partition by partition."""
    run = resume(tmp_path, uninterrupted(stage, saved_world, saved_world), stage, world, world)
    assert_continues_as(run, uninterrupted(stage, world, world))
    for step, ep_size in ((STOPPED, saved_world), (STEPS, world)):  # what the next resume plans by (pretrain/ds_config.plan_resume)
        assert json.loads((run / f"global_step{step}" / "manifest.json").read_text())["expert_parallel_size"] == ep_size


def test_zero0_switch_run_resumes_at_another_data_parallel_size_as_saved(tmp_path, uninterrupted):
    """ZeRO-0 at the same expert-parallel size: DeepSpeed's own load (each rank reads its expert-parallel rank's
    optimizer file, expp_rank_R_*, which holds that rank's experts whole)."""
    run = resume(tmp_path, uninterrupted(0, 2, 1), 0, 1, 1)
    assert_continues_as(run, uninterrupted(0, 1, 1))


def test_zero0_switch_run_at_another_expert_parallel_size_is_refused_before_any_model_is_built(tmp_path, uninterrupted):
    run = stopped_at(uninterrupted(0, 2, 1), tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = train_args(tmp_path, ds_config(tmp_path, 0, 2), MODEL, STEPS, "--resume", save_dir=run)
    results = run_ranks(args, 2, tmp_path / "logs", check=False)
    assert [r.returncode for r in results] == [2, 2], results[0].output[-3000:]
    errors = [line for line in results[0].output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, results[0].output[-3000:]
    assert "ZeRO-0 checkpoint of this 'switch' model was saved with expert-parallel size 1 and this launch has 2" in errors[0]
    assert errors[0].endswith("launch with moe.expert_parallel_size 1")
    assert "Traceback" not in results[0].output and "built:" not in results[0].output
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
