"""Benchmarks run outside CI; their smoke mode runs here so they cannot rot."""

import os
import re
import subprocess
import sys

from tests.distributed import REPO, free_port


def test_engine_overhead_smoke():
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "bench.engine_overhead", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = re.search(r"^tiny zero0-fp32: (\d+\.\d+)$", proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) > 0
