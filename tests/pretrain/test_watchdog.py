"""A rank that stops, fails or keeps the others waiting ends the whole job, named, within its bound
(pretrain/watchdog.py); SIGTERM to the deepspeed runner reaches the ranks. Real ranks on gloo; the NCCL
side is the same process-group timeout and watchdog, documented in the README."""

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pretrain.run_dir import damage
from pretrain.watchdog import EXIT_PEER_FAILED
from tests.distributed import REPO, free_port, read_metrics, start_ranks, stop_ranks, train_args, wait_ranks
from tests.pretrain.test_launchers import launcher_command, launcher_env

HERE = Path(__file__).resolve().parent
HEARTBEAT = 6


def wait_for_step(run, step, alive, timeout=300):
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").exists() or max(read_metrics(run), default=0) < step:
        assert time.monotonic() < deadline and alive(), "the run ended or hung before its first steps"
        time.sleep(0.1)


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_latest_intact(run):
    tag = (run / "latest").read_text()
    assert damage(str(run), tag) is None


def launch(launcher, args):
    cmd = launcher_command(launcher, free_port())
    return subprocess.Popen(
        [*map(str, cmd), str(REPO / "pretrain" / "main.py"), *map(str, args)],
        cwd=REPO,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def rank_pids(launcher_proc):
    tree = psutil.Process(launcher_proc.pid).children(recursive=True)
    ranks = {int(p.environ()["RANK"]): p.pid for p in tree if p.cmdline()[-1:] and "pretrain/main.py" in p.cmdline()[2] and "RANK" in p.environ()}
    return ranks, [launcher_proc.pid] + [p.pid for p in tree]


def gone_within(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_stopped_rank_ends_every_process_under_the_launcher(tmp_path, launcher):
    """SIGSTOP rank 1: rank 0's watchdog names it and ends; the launcher then ends rank 1 (SIGKILL reaches a
    stopped process; the launchers escalate to it after their 30 s grace)."""
    run = tmp_path / "run"
    proc = launch(launcher, train_args(tmp_path, "zero1.json", "tiny-gpt.json", 100000, "--save_interval", 2, "--heartbeat_timeout_s", HEARTBEAT))
    pids = []
    try:
        wait_for_step(run, 3, lambda: proc.poll() is None)
        ranks, pids = rank_pids(proc)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        output, _ = proc.communicate(timeout=HEARTBEAT + 60)
        assert gone_within(pids, 10), "a process of the job is still running"
        print(f"{launcher}: every process gone {time.monotonic() - stopped:.0f} s after the stop")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    (line,) = [line for line in error_lines(output) if "stopped answering" in line]
    assert line.startswith("error: rank 0: rank 1 stopped answering (no heartbeat for")
    assert_latest_intact(run)


def test_a_stopped_rank_0_is_found_through_the_store_it_serves(tmp_path):
    run = tmp_path / "run"
    procs = start_ranks(
        train_args(tmp_path, "zero0.json", "tiny-gpt.json", 100000, "--heartbeat_timeout_s", HEARTBEAT, save_dir=run), 2, tmp_path / "logs"
    )
    try:
        wait_for_step(run, 3, lambda: all(p.poll() is None for p, _ in procs))
        os.kill(procs[0][0].pid, signal.SIGSTOP)
        procs[1][0].wait(timeout=HEARTBEAT * 2 + 30)
    finally:
        stop_ranks(procs)
    results = wait_ranks(procs, tmp_path / "logs")
    assert results[1].returncode == EXIT_PEER_FAILED
    (line,) = error_lines(results[1].output)
    assert line.startswith("error: rank 1: ") and ("rank 0 stopped answering" in line or "rendezvous store" in line), line


def test_a_failing_rank_ends_the_others_at_once(tmp_path):
    """An exception on rank 1 (as a CUDA OOM would be): rank 0 ends within a beat, long before any timeout."""
    env = {"SWITCHYARD_TEST_FAULT": "raise:1:3"}
    procs = start_ranks(train_args(tmp_path, "zero1.json", "tiny-gpt.json", 1000), 2, tmp_path / "logs", env, script=HERE / "faulty_rank.py")
    results = wait_ranks(procs, tmp_path / "logs", timeout=240)  # the default bounds are 300 s and 60 min
    assert [r.returncode for r in results] == [EXIT_PEER_FAILED, 1]
    assert "RuntimeError: injected failure at step 3" in results[1].output
    (line,) = error_lines(results[0].output)
    assert line.startswith("error: rank 0: rank 1 failed: RuntimeError: injected failure at step 3")


def test_a_collective_that_waits_past_the_timeout_fails_the_job(tmp_path):
    """Rank 1 alive but away (beating, not reducing) for 120 s; the bound is 0.1 minutes: rank 0's ZeRO-1 gradient
    reduction (a group DeepSpeed made, which would otherwise wait torch's 30 minutes) fails after it, and both end."""
    env = {"SWITCHYARD_TEST_FAULT": "sleep:1:3:120"}
    started = time.monotonic()
    procs = start_ranks(
        train_args(tmp_path, "zero1.json", "tiny-gpt.json", 1000, "--distributed_timeout_minutes", 0.1),
        2,
        tmp_path / "logs",
        env,
        script=HERE / "faulty_rank.py",
    )
    results = wait_ranks(procs, tmp_path / "logs", timeout=110)
    assert time.monotonic() - started < 110
    assert [r.returncode for r in results] == [1, EXIT_PEER_FAILED], results[0].output[-2000:]
    assert "Timed out" in results[0].output
    (line,) = error_lines(results[1].output)
    assert line.startswith("error: rank 1: rank 0 failed: ")


def test_rank_0_hashing_a_checkpoint_longer_than_the_collective_bound_ends_nothing(tmp_path):
    """Rank 0 hashes each checkpoint 10 s longer than it takes (what a multi-GB checkpoint on a GPU node is), on save
    and on resume, with collectives bounded at 0.1 minutes: rank 1 waits in the store, not in a collective, so both
    runs finish; with a barrier there, rank 1's wait would time out at 6 s."""
    env = {"SWITCHYARD_TEST_FAULT": "slow_hash:0:0:10"}
    run = tmp_path / "run"
    bound = ["--distributed_timeout_minutes", 0.1, "--save_interval", 2]
    for max_steps, resume in ((2, []), (3, ["--resume"])):
        procs = start_ranks(
            train_args(tmp_path, "zero1.json", "tiny-gpt.json", max_steps, *bound, *resume, save_dir=run),
            2,
            tmp_path / f"logs{max_steps}",
            env,
            script=HERE / "faulty_rank.py",
        )
        results = wait_ranks(procs, tmp_path / f"logs{max_steps}", timeout=240)
        assert [r.returncode for r in results] == [0, 0], results[1].output[-2000:]
    assert "resumed from step 2" in results[0].output
    assert (run / "latest").read_text() == "global_step3"
    assert_latest_intact(run)


def test_sigterm_to_the_deepspeed_runner_reaches_the_ranks(tmp_path):
    """The runner forwards nothing on one node: the ranks notice it is gone, save and exit 75 like on SIGTERM."""
    run = tmp_path / "run"
    proc = launch("deepspeed", train_args(tmp_path, "zero1.json", "tiny-gpt.json", 100000))
    try:
        wait_for_step(run, 3, lambda: proc.poll() is None)
        _, pids = rank_pids(proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert gone_within(pids, 60), "the ranks train on without their runner"
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    log = (run / "metrics.jsonl").read_text()
    saved = int((run / "latest").read_text().removeprefix("global_step"))
    assert saved == max(read_metrics(run)) and saved >= 3 and log
    assert_latest_intact(run)
