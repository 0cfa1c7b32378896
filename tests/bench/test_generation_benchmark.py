"""bench/generation.py's smoke mode runs here so the benchmark cannot rot."""

import os
import re
import subprocess
import sys

from tests.distributed import REPO


def test_generation_benchmark_smoke():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.generation", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = re.search(r"^tiny greedy: (\d+\.\d+)$", proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) > 0
    assert proc.stdout.rstrip().splitlines()[-1] == ratio.group(0)  # the ratio is the last line
