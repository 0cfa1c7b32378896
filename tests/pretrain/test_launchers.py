"""The same entry point under the deepspeed launcher and torchrun, 2 CPU ranks each, with W&B offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import REPO, free_port, read_metrics, train_args

BIN = Path(sys.executable).parent


def launcher_env():
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_API_KEY"):
        env.pop(key, None)
    return env


def launcher_command(launcher, port):
    """2 ranks on this machine under ``launcher`` ("deepspeed" or "torchrun"), rendezvous on 127.0.0.1:port."""
    if launcher == "deepspeed":
        return [BIN / "deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [BIN / "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_launcher_runs_two_ranks(tmp_path, launcher):
    cmd = launcher_command(launcher, free_port())
    args = train_args(tmp_path, "zero1.json", "tiny-switch.json", 4, "--wandb_project", "switchyard-test", "--eval_interval", 2)
    proc = subprocess.Popen(
        [*map(str, cmd), str(REPO / "pretrain" / "main.py"), *map(str, args)],
        cwd=REPO,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise
    assert proc.returncode == 0, output[-4000:]
    run = tmp_path / "run"
    assert sorted(read_metrics(run)) == [1, 2, 3, 4]
    assert sorted(read_metrics(run, "val/loss")) == [2, 4]
    assert "moe/layer0/dropped_fraction" in (run / "metrics.jsonl").read_text()
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_a_busy_master_port_is_one_line_under_the_deepspeed_launcher(tmp_path):
    """Rank 0 cannot serve the rendezvous store: it refuses in one line, and the launcher ends rank 1."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cmd = launcher_command("deepspeed", port)
        args = train_args(tmp_path, "zero1.json", "tiny-gpt.json", 4)
        proc = subprocess.run(
            [*map(str, cmd), str(REPO / "pretrain" / "main.py"), *map(str, args)],
            cwd=REPO,
            env=launcher_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert errors == [
        f"error: the rendezvous port {port} on 127.0.0.1 is in use by another process; pick a free one (deepspeed --master_port P, or MASTER_PORT=P)"
    ]
