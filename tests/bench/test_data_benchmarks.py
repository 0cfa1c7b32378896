"""The data benchmarks' smoke modes run here so they cannot rot: each prints its ratios last."""

import os
import re
import subprocess
import sys

from tests.distributed import REPO, free_port


def run_smoke(module):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", module, "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def ratios(stdout):
    """name -> ratio from the lines after the last 'ratios' heading."""
    tail = stdout[stdout.rindex("\nratios") :]
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([\w-]+): (\d+\.\d+)$", tail, re.M)}


def test_preprocess_throughput_smoke():
    out = run_smoke("bench.preprocess_throughput")
    found = ratios(out)
    assert set(found) == {"lm", "pairs"} and all(r > 0 for r in found.values()), out
    assert re.search(r"^lm +1 +\d+\.\d+ +[\d,]+$", out, re.M), out


def test_dataloader_smoke():
    out = run_smoke("bench.dataloader")
    found = ratios(out)
    assert set(found) == {"lm", "lm-blend-2", "pairs"} and all(r > 0 for r in found.values()), out
    assert re.search(r"^tiny-gpt step .*: \d+\.\d steps/s", out, re.M), out
