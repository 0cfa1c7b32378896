"""Start real ranks of a script on this machine, as torchrun would, and end only them.

Each rank is its own process (gloo over 127.0.0.1), with RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous in its
environment, following the pattern of DeepSpeed's DistributedTest. Every rank is started in a new session, so on
a time-out the caller kills exactly the process groups it started. The tests and the benchmarks launch with it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "pretrain" / "main.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world_size, port, extra=None):
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        # The venv's ninja first, always: torch's JIT cache is keyed by the ninja that built it.
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    env.pop("WANDB_API_KEY", None)
    env.update(extra or {})
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def start_ranks(args, world_size, log_dir, extra_env=None, script=MAIN):
    port = free_port()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world_size):
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(script), *map(str, args)],
                    cwd=REPO,
                    env=rank_env(rank, world_size, port, extra_env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
                log,
            )
        )
    return procs


def wait_ranks(procs, log_dir, timeout=600):
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_ranks(procs)
        raise
    finally:
        for _, log in procs:
            log.close()
    return [RankResult(r, p.returncode, (Path(log_dir) / f"rank{r}.log").read_text()) for r, (p, _) in enumerate(procs)]


def stop_ranks(procs, sig=signal.SIGKILL):
    for proc, _ in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # the rank's own session: only what this harness started
            except ProcessLookupError:
                pass
            proc.wait()
