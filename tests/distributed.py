"""Start real ranks of pretrain/main.py on this machine, as torchrun would, and end only them.

Each rank is its own process (gloo over 127.0.0.1), with RANK/WORLD_SIZE/LOCAL_RANK and the
rendezvous in its environment, following the pattern of DeepSpeed's DistributedTest. Every
rank is started in a new session, so on a time-out the harness kills exactly the process
groups it started.
"""
import json
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
CORPUS = REPO / "data" / "tinyshakespeare.txt"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world_size, port, extra=None):
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
               WANDB_MODE="offline", WANDB_SILENT="true",
               # The venv's ninja first, always: torch's JIT cache is keyed by the ninja that built it.
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
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
        procs.append((subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO,
                                       env=rank_env(rank, world_size, port, extra_env),
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
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


def run_ranks(args, world_size, log_dir, extra_env=None, timeout=600, check=True):
    results = wait_ranks(start_ranks(args, world_size, log_dir, extra_env), log_dir, timeout)
    if check:
        for r in results:
            assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}"
    return results


def train_args(tmp_path, ds_config, model_config, max_steps, *extra, save_dir=None):
    return ["--ds_config", REPO / "ds_configs" / ds_config, "--model_config", REPO / "models" / "configs" / model_config,
            "--train_data", CORPUS, "--max_steps", max_steps, "--save_dir", save_dir or tmp_path / "run", *extra]


def translation_args(tmp_path, pair_data, ds_config, model_config, steps, *extra):
    train, val, _ = pair_data
    return ["--task", "translation", "--ds_config", REPO / "ds_configs" / ds_config,
            "--model_config", REPO / "models" / "configs" / model_config, "--train_data", train, "--val_data", val,
            "--max_steps", steps, "--save_dir", tmp_path / "run", "--eval_interval", steps, *extra]


def bleu_args(pair_data, beam=4):
    """Validation BLEU flags on the toy pair's validation text (tests/conftest.py writes it beside the data)."""
    directory = pair_data[0].parent
    return ["--bleu_src", directory / "pairs2.src", "--bleu_ref", directory / "pairs2.tgt", "--bleu_beam", beam]


def read_metrics(save_dir, key="train/loss"):
    """step -> value of ``key`` from DIR/metrics.jsonl (the last record of a step wins, as after a resume)."""
    values = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    return values
