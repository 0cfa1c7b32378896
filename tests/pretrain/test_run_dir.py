"""A run directory is never overwritten or shared: starts into a used one, two runs at once, and resumes that do
not fit the saved run are refused with one line before anything of the run is touched (pretrain/run_dir.py)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from models import load_model_config
from pretrain import run_dir
from switchyard.errors import ConfigError
from tests.distributed import REPO, read_metrics, run_ranks, start_ranks, stop_ranks, train_args, wait_ranks

MODELS = REPO / "models" / "configs"


def snapshot(directory):
    """Every file under ``directory`` with its SHA-256: equal snapshots mean nothing was written, moved or removed."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def errors(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def refused(results, text):
    """Every rank exited 2, rank 0 printed exactly one error line holding ``text``, and no traceback."""
    assert [r.returncode for r in results] == [2] * len(results), results[0].output[-3000:]
    lines = errors(results[0])
    assert len(lines) == 1 and text in lines[0], results[0].output[-3000:]
    assert all("Traceback" not in r.output for r in results)
    return lines[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 1-rank ZeRO-1 run with checkpoints at steps 2 and 4; tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("saved_run")
    run_ranks(train_args(tmp, "zero1.json", "tiny-gpt.json", 4, "--save_interval", 2, save_dir=tmp / "run"), 1, tmp / "logs")
    return tmp / "run"


@pytest.fixture
def run(saved_run, tmp_path):
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def launch(tmp_path, run, *extra, ds_config="zero1.json", model="tiny-gpt.json", steps=6, world_size=1, name="logs"):
    return run_ranks(train_args(tmp_path, ds_config, model, steps, *extra, save_dir=run), world_size, tmp_path / name, check=False)


# --- the start rule, on directories made by hand -----------------------------------------------------


def test_what_holds_a_run(tmp_path):
    assert run_dir.what_run_it_holds(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "slurm").mkdir()  # a job's records before its first step
    assert run_dir.what_run_it_holds(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')  # cut by a kill
    assert run_dir.what_run_it_holds(tmp_path) == "metrics to step 7"
    (tmp_path / "global_step5").mkdir()
    assert run_dir.what_run_it_holds(tmp_path) == "checkpoints global_step5 and metrics to step 7"


def test_resume_without_latest_names_the_checkpoints_and_does_not_advise_starting_over(tmp_path):
    for step in (3, 12):
        (tmp_path / f"global_step{step}").mkdir()
    with pytest.raises(ConfigError) as e:
        run_dir.check_start(str(tmp_path), resume=True, replace_run=False)
    assert "holds checkpoints global_step12, global_step3" in str(e.value)
    assert f"echo global_step12 > {tmp_path / 'latest'}" in str(e.value)
    assert "drop --resume" not in str(e.value)


def test_resume_of_a_run_that_never_saved_points_to_replace_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")
    with pytest.raises(ConfigError, match="saved no checkpoint .metrics to step 3.*pass --replace_run"):
        run_dir.check_start(str(tmp_path), resume=True, replace_run=False)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"", b"global_step"])
def test_latest_that_names_no_checkpoint_is_one_line(tmp_path, content):
    (tmp_path / "global_step4").mkdir()
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(ConfigError, match=f"does not name a checkpoint .*echo global_step4 > {tmp_path / 'latest'}"):
        run_dir.check_start(str(tmp_path), resume=True, replace_run=False)


def test_save_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run_dir.check_save_dir(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="cannot be created: .* is a file"):
        run_dir.check_save_dir(str(tmp_path / "file" / "run"))
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="no write permission"):
            run_dir.check_save_dir(str(tmp_path / "ro" / "run"))


def test_replace_run_moves_exactly_the_run_files(tmp_path):
    for name in ("global_step2", "global_step4.partial", "global_step2_universal", "wandb", "slurm"):
        (tmp_path / name).mkdir()
    for name in ("latest", "metrics.jsonl", "run_config.json", "zero_to_fp32.py", "my_tokenizer.model"):
        (tmp_path / name).write_text(name)
    moved = run_dir.move_run_aside(str(tmp_path))
    assert sorted(os.listdir(moved)) == [
        "global_step2",
        "global_step2_universal",
        "global_step4.partial",
        "latest",
        "metrics.jsonl",
        "run_config.json",
        "wandb",
        "zero_to_fp32.py",
    ]
    assert sorted(os.listdir(tmp_path)) == ["my_tokenizer.model", "replaced", "slurm"]
    assert run_dir.what_run_it_holds(tmp_path) is None


# --- the lock ---------------------------------------------------------------------------------------


def write_lock(directory, **holder):
    (directory / run_dir.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then", **holder}))


def test_a_live_holder_is_named_and_a_second_lock_refused(tmp_path):
    first = run_dir.RunLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(ConfigError, match=f"in use by another run .host {os.uname().nodename}, pid {os.getpid()}"):
            run_dir.RunLock(str(tmp_path)).acquire()
    finally:
        first.release()
    assert not (tmp_path / run_dir.LOCK).exists()
    run_dir.RunLock(str(tmp_path)).acquire().release()  # free again


def test_a_lock_whose_pid_is_gone_is_named_and_taken_over(tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, host=os.uname().nodename, pid=gone.pid)
    lock = run_dir.RunLock(str(tmp_path)).acquire()
    assert f"left by a run that is gone (host {os.uname().nodename}, pid {gone.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / run_dir.LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_a_live_pid_on_another_host_holds_until_its_heartbeat_stops(tmp_path, capsys):
    write_lock(tmp_path)
    with pytest.raises(ConfigError, match="in use by another run .host elsewhere, pid 1, started then, last heartbeat 0 s ago"):
        run_dir.RunLock(str(tmp_path)).acquire()
    silent = time.time() - run_dir.LOCK_STALE_AFTER_S - 5
    os.utime(tmp_path / run_dir.LOCK, (silent, silent))
    run_dir.RunLock(str(tmp_path)).acquire().release()
    assert "no heartbeat for 30" in capsys.readouterr().out


def test_an_earlier_attempt_of_the_same_slurm_job_is_gone(tmp_path, monkeypatch, capsys):
    write_lock(tmp_path, slurm_job_id="77", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(ConfigError, match="Slurm job 77"):  # the same attempt: another launch inside the job
        run_dir.RunLock(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_dir.RunLock(str(tmp_path)).acquire().release()
    assert "attempt 0 of this Slurm job, now requeued" in capsys.readouterr().out


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "LOCK_HEARTBEAT_S", 0.05)
    lock = run_dir.RunLock(str(tmp_path)).acquire()
    try:
        old = time.time() - 100
        os.utime(tmp_path / run_dir.LOCK, (old, old))
        time.sleep(0.5)
        assert time.time() - (tmp_path / run_dir.LOCK).stat().st_mtime < 10
    finally:
        lock.release()


# --- whole launches ------------------------------------------------------------------------------------


def test_a_fresh_start_into_a_used_directory_is_refused_touching_nothing(tmp_path, run):
    before = snapshot(run)
    line = refused(launch(tmp_path, run), "already holds a run (checkpoints global_step4, global_step2 and metrics to step 4)")
    assert "pass --resume to continue it, --replace_run" in line
    assert snapshot(run) == before


def test_replace_run_starts_over_with_the_old_run_kept_apart(tmp_path, run):
    before = snapshot(run)
    results = run_ranks(train_args(tmp_path, "zero1.json", "tiny-gpt.json", 3, "--replace_run", save_dir=run), 1, tmp_path / "l")
    moved = next((run / "replaced").iterdir())
    assert f"the previous run in {run} is now in {moved}" in results[0].output
    assert snapshot(moved) == before  # the old run whole, as it was
    assert sorted(read_metrics(run)) == [1, 2, 3] and (run / "latest").read_text() == "global_step3"
    assert sorted(p.name for p in run.glob("global_step*")) == ["global_step3"]


def test_a_second_run_into_a_directory_in_use_is_refused_on_every_rank(tmp_path):
    run = tmp_path / "run"
    first = start_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 100000, save_dir=run), 1, tmp_path / "first")
    try:
        deadline = time.monotonic() + 120
        while run_dir.metrics_steps(run) is None:  # training
            assert time.monotonic() < deadline and first[0][0].poll() is None, (tmp_path / "first" / "rank0.log").read_text()
            time.sleep(0.1)
        holder = json.loads((run / run_dir.LOCK).read_text())
        metrics_before = (run / "metrics.jsonl").read_text()
        # --replace_run would otherwise move the running run's files away
        results = launch(tmp_path, run, "--replace_run", ds_config="zero0.json", world_size=2, name="second")
        refused(results, f"is in use by another run (host {holder['host']}, pid {holder['pid']}")
        assert not (run / "replaced").exists()
        assert (run / "metrics.jsonl").read_text().startswith(metrics_before)
        assert first[0][0].poll() is None  # the first run trains on
    finally:
        stop_ranks(first)
        wait_ranks(first, tmp_path / "first")


def test_resume_with_other_weights_is_refused_and_the_record_kept(tmp_path, run):
    before = snapshot(run)
    config = json.loads((MODELS / "tiny-gpt.json").read_text())
    (tmp_path / "wider.json").write_text(json.dumps({**config, "d_model": 128}))
    line = refused(
        run_ranks(
            [
                "--ds_config",
                REPO / "ds_configs" / "zero1.json",
                "--model_config",
                tmp_path / "wider.json",
                *train_args(tmp_path, "zero1.json", "tiny-gpt.json", 6, "--resume", save_dir=run)[4:],
            ],
            1,
            tmp_path / "l",
            check=False,
        ),
        "the model config changes what the saved weights are (d_model 64 -> 128",
    )
    assert str(run / "run_config.json") in line
    refused(launch(tmp_path, run, "--resume", ds_config="zero2.json", name="l2"), "saved with ZeRO stage 1 and this launch has 2")
    assert snapshot(run) == before


def test_resume_with_changed_training_settings_says_so_and_records_them(tmp_path, run):
    results = run_ranks(train_args(tmp_path, "zero1.json", "tiny-gpt-dropout.json", 5, "--resume", save_dir=run), 1, tmp_path / "l")
    assert "notice: resuming with changed training settings: dropout 0.0 -> 0.1" in results[0].output
    assert "resumed from step 4" in results[0].output
    assert json.loads((run / "run_config.json").read_text())["model"]["dropout"] == 0.1


def test_a_resume_that_fails_to_load_leaves_the_run_record_as_it_was(tmp_path, run):
    """Every checkpoint damaged: one line naming each, after the engine is built; run_config.json is not rewritten."""
    for tag in ("global_step2", "global_step4"):
        shard = next((run / tag).glob("*optim_states.pt"))
        shard.write_bytes(b"")
    record = (run / "run_config.json").read_bytes()
    line = refused(launch(tmp_path, run, "--resume", "--seed", "99"), "every checkpoint in")
    assert "global_step4: " in line and "global_step2: " in line
    assert (run / "run_config.json").read_bytes() == record


def test_model_config_fields_that_a_resume_may_change():
    """Training settings are marked in the families' configs; everything else is part of the weights."""
    from models.registry import config_to_dict, resume_differences

    switch = load_model_config(str(MODELS / "tiny-switch.json"))
    recorded = {**config_to_dict(switch), "capacity_factor": 2.0, "aux_loss_coef": 0.1, "num_experts": 8}
    weights, settings = resume_differences(recorded, switch)
    assert weights == [("num_experts", 8, switch.num_experts)]
    assert sorted(name for name, _, _ in settings) == ["aux_loss_coef", "capacity_factor"]
    assert resume_differences({"family": "gpt"}, switch)[0] == [("family", "gpt", "switch")]


class PickledByGetattr:
    """Pickles as ``getattr(owner, name)``: how Python 3.11.0-3.11.4 pickle an enum member (Debian 12's 3.11.2
    writes DeepSpeed's ZeroStageEnum into every ZeRO optimizer file so); this Python pickles it by value."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_an_enum_member_pickled_by_name_loads_and_no_other_getattr_does(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pretrain.run_dir import UnsafeCheckpoint, safe_load

    torch.save({"zero_stage": PickledByGetattr(ZeroStageEnum, "optimizer_states")}, tmp_path / "optim_states.pt")
    assert safe_load(tmp_path / "optim_states.pt")["zero_stage"] is ZeroStageEnum.optimizer_states
    torch.save({"x": PickledByGetattr(LossScaler, "__init__")}, tmp_path / "hostile.pt")  # an allowed class, not an enum
    with pytest.raises(UnsafeCheckpoint, match="asks to run builtins.getattr"):
        safe_load(tmp_path / "hostile.pt")
