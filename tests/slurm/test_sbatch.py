"""The real slurm/*.sbatch scripts on a one-host Slurm cluster (tests/slurm/cluster.py).

Jobs are submitted as a user would, with sbatch options overriding the scripts' #SBATCH lines for
this host: one node, 2 tasks, and the CPU switch --gpus-per-node=0 (CPU ranks, gloo).
"""

import json
import os
import re
import subprocess
import time

import psutil
import pytest

from tests.distributed import REPO

TRAIN = REPO / "slurm" / "train.sbatch"
EVAL = REPO / "slurm" / "eval.sbatch"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
PREFIX = f"sy-test-{os.getpid()}"


@pytest.fixture(autouse=True)
def remove_job_logs():
    """Job logs go to slurm/logs/ in the repository, as for users; the tests' own are removed after them."""
    yield
    for log in (REPO / "slurm" / "logs").glob(f"{PREFIX}-*.out"):
        log.unlink()


def submit(cluster, script, name, *args, ntasks=2, gpus=0, env=None):
    options = [
        f"--job-name={PREFIX}-{name}",
        f"--partition={cluster.partition}",
        "--nodes=1",
        f"--ntasks-per-node={ntasks}",
        f"--gpus-per-node={gpus}",
        "--cpus-per-task=1",
        "--time=10",
    ]
    return cluster.sbatch(script, *args, options=options, env=env, cwd=REPO)


def train_env(run_dir):
    return {
        "DS_CONFIG": "ds_configs/zero1.json",
        "MODEL_CONFIG": "models/configs/tiny-gpt.json",
        "RUN_DIR": str(run_dir),
        "SWITCHYARD_TEST_API_TOKEN": "not-for-the-record",
    }


def train_steps(run_dir):
    """Steps of the training records in metrics.jsonl, in the order they were written."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in records if "train/loss" in r]


def job_log(cluster, job_id, name):
    path = REPO / "slurm" / "logs" / f"{PREFIX}-{name}-{job_id}.out"
    assert cluster.job(job_id)["StdOut"] == str(path)  # named by job name and id
    return path.read_text()


def test_sbatch_trains_on_two_ranks_and_records_the_run(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    job_id = submit(slurm_cluster, TRAIN, "train", "--max_steps", 4, "--save_interval", 2, "--log_interval", 1, env=train_env(run))
    job = slurm_cluster.wait_job(job_id, lambda j: j["JobState"] in FINAL_STATES, 300, "the end")
    log = job_log(slurm_cluster, job_id, "train")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "2 tasks, CPU ranks (gloo)" in log and "rank 0 of 2" in log

    assert train_steps(run) == [1, 2, 3, 4]
    assert (run / "latest").read_text().strip() == "global_step4" and (run / "global_step2").is_dir()
    record = run / "slurm" / f"{job_id}-restart0"
    command = (record / "command.sh").read_text()
    assert command.startswith(f"cd {REPO} && srun ") and "slurm/launch_rank.sh pretrain/main.py --ds_config ds_configs/zero1.json" in command
    assert "--resume" not in command
    commit = (record / "git.txt").read_text().splitlines()[0]
    # The checkout's commit at submission: HEAD now, or one before it if a commit landed meanwhile.
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO).returncode == 0, commit
    assert (record / "zero1.json").read_bytes() == (REPO / "ds_configs" / "zero1.json").read_bytes()
    assert (record / "tiny-gpt.json").exists() and "#SBATCH --signal=USR1@" in (record / "job.sbatch").read_text()
    env = json.loads((record / "env.json").read_text())
    assert env["SLURM_JOB_ID"] == str(job_id) and env["SWITCHYARD_TEST_API_TOKEN"] == "<redacted>"
    assert (env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"], env["SRUN_CPUS_PER_TASK"]) == ("", "1", "1")  # the CPU switch
    assert "not-for-the-record" not in (record / "env.json").read_text() + (record / "scontrol_show_job.txt").read_text()
    print(f"job {job_id}: 4 steps on 2 ranks in {time.monotonic() - start:.0f} s")


def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """USR1 to the job's steps (what --signal=USR1@120 sends before the time limit): the ranks save and
    exit 75, the script requeues the job, and the same job resumes from that checkpoint and finishes."""
    run = tmp_path / "run"
    start = time.monotonic()
    job_id = submit(slurm_cluster, TRAIN, "requeue", "--max_steps", 100, "--log_interval", 1, "--eval_interval", 0, env=train_env(run))
    deadline = time.monotonic() + 300
    while max(train_steps(run), default=0) < 3:  # training, with the ranks' signal handlers installed
        assert time.monotonic() < deadline and slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), job_log(
            slurm_cluster, job_id, "requeue"
        )[-4000:]
        time.sleep(0.2)
    slurm_cluster.client("scancel", "--signal=USR1", str(job_id))  # job steps only, not the batch shell
    signalled = time.monotonic()
    job = slurm_cluster.wait_job(job_id, lambda j: int(j["Restarts"]) >= 1 or j["JobState"] in FINAL_STATES, 120, "a requeue")
    assert int(job["Restarts"]) == 1, job_log(slurm_cluster, job_id, "requeue")[-4000:]
    job = slurm_cluster.wait_job(job_id, lambda j: j["JobState"] in FINAL_STATES, 300, "the end")
    log = job_log(slurm_cluster, job_id, "requeue")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]

    assert log.count("ranks stopped for requeue after saving (exit 75)") == 1
    assert f"job {job_id} (restart 1)" in log  # the same log, appended to by the requeued run
    saved = int(re.search(r"resumed from step (\d+)", log).group(1))
    assert 3 <= saved < 100
    # The first run logged steps 1..saved, the requeued one saved+1..100: no step twice, none from 0.
    assert train_steps(run) == list(range(1, 101))
    assert "--resume" not in (run / "slurm" / f"{job_id}-restart0" / "command.sh").read_text()
    assert "--resume" in (run / "slurm" / f"{job_id}-restart1" / "command.sh").read_text()
    assert (run / "latest").read_text().strip() == "global_step100"
    print(
        f"job {job_id}: USR1 after step {saved}, requeued, resumed from step {saved}, finished step 100; "
        f"{signalled - start:.0f} s to the signal, {time.monotonic() - signalled:.0f} s from it to the end"
    )


def test_a_job_requeued_before_its_first_checkpoint_starts_over(slurm_cluster, tmp_path):
    """Ranks SIGKILLed before any checkpoint (no save, the lock left behind), then the job requeued: the new
    attempt starts from step 1, with the first attempt's metrics moved into RUN_DIR/replaced/, not mixed in."""
    run = tmp_path / "run"
    job_id = submit(slurm_cluster, TRAIN, "early", "--max_steps", 100000, "--log_interval", 1, "--eval_interval", 0, env=train_env(run))

    def wait_for_steps(n, what, replaced=False):
        deadline = time.monotonic() + 300
        while len(train_steps(run)) < n or replaced and not (run / "replaced").exists():
            assert time.monotonic() < deadline and slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), (
                f"{what}:\n" + job_log(slurm_cluster, job_id, "early")[-4000:]
            )
            time.sleep(0.2)

    wait_for_steps(3, "the first attempt's steps")
    for rank in psutil.process_iter():  # SIGKILL the ranks themselves (as the kernel's OOM killer would): nothing saved
        try:
            if "pretrain/main.py" in " ".join(rank.cmdline()) and rank.environ().get("SLURM_JOB_ID") == str(job_id):
                rank.kill()
        except psutil.Error:
            pass
    slurm_cluster.wait_job(job_id, lambda j: j["JobState"] in FINAL_STATES, 120, "the killed attempt's end")
    first_attempt = train_steps(run)
    assert not (run / "latest").exists() and (run / "run.lock").exists(), job_log(slurm_cluster, job_id, "early")[-3000:]
    slurm_cluster.client("scontrol", "requeue", str(job_id))
    slurm_cluster.wait_job(job_id, lambda j: int(j["Restarts"]) >= 1, 120, "the requeue")
    wait_for_steps(3, "the second attempt's steps", replaced=True)
    slurm_cluster.client("scancel", str(job_id))
    slurm_cluster.wait_job(job_id, lambda j: j["JobState"] in FINAL_STATES, 120, "the end")
    log = job_log(slurm_cluster, job_id, "early")
    assert "--replace_run" in (run / "slurm" / f"{job_id}-restart1" / "command.sh").read_text()
    assert "attempt 0 of this Slurm job, now requeued); taking it over" in log
    assert train_steps(run)[:3] == [1, 2, 3]  # from step 1, alone in metrics.jsonl
    (replaced,) = (run / "replaced").iterdir()
    assert train_steps(replaced) == first_attempt and first_attempt[:3] == [1, 2, 3]


def test_eval_script_runs_python_m_eval_cmd_with_its_arguments(slurm_cluster):
    """No eval command exists yet: the job must run `python -m eval.CMD ARGS` and fail as Python does."""
    job_id = submit(slurm_cluster, EVAL, "eval", "no_such_command", "--split", "val", ntasks=1)
    job = slurm_cluster.wait_job(job_id, lambda j: j["JobState"] in FINAL_STATES, 120, "the end")
    log = job_log(slurm_cluster, job_id, "eval")
    assert "+ srun slurm/launch_rank.sh -m eval.no_such_command --split val" in log
    assert "No module named eval.no_such_command" in log
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "1:0"), log


def test_gpu_job_is_refused_unless_it_has_one_rank_per_gpu(slurm_cluster, tmp_path):
    """The cluster's 2 stand-in GPUs: a job granted them runs the GPU branch, which checks the counts."""
    job_id = submit(slurm_cluster, TRAIN, "gpus", ntasks=1, gpus=2, env=train_env(tmp_path / "run"))
    job = slurm_cluster.wait_job(job_id, lambda j: j["JobState"] in FINAL_STATES, 120, "the end")
    log = job_log(slurm_cluster, job_id, "gpus")
    assert "error: 1 tasks but 2 GPUs per node; set --ntasks-per-node to the GPU count" in log
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), log
    assert not (tmp_path / "run").exists()  # refused before any rank started
