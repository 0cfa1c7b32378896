"""Smoke modes of the performance benchmarks: a few steps on real ranks, and the printed tables parse.

No timing thresholds: the figures depend on the machine; what is checked is that the benchmarks run
end to end and report a finite, positive ratio for every case.
"""

import math
import os
import re
import subprocess
import sys

from tests.distributed import REPO


def run_bench(module):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the benchmark starts its own ranks
    proc = subprocess.run([sys.executable, "-m", module, "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def ratios(stdout):
    """name -> ratio from the lines after the last 'ratios' heading."""
    tail = stdout[stdout.rindex("\nratios") + 1 :].splitlines()[1:]
    found = {}
    for line in tail:
        match = re.match(r"^(.+?): (\S+?)( \(.*\))?$", line)
        assert match, f"unparsable ratio line {line!r}"
        found[match.group(1)] = float(match.group(2))
    return found


def assert_finite_positive(found):
    for name, value in found.items():
        assert math.isfinite(value) and value > 0, f"{name}: {value}"


def test_switch_vs_dense_smoke():
    stdout = run_bench("bench.switch_vs_dense")
    table = re.findall(r"^(dense|switch-8) +([12]) +(\S+) +(\S+)$", stdout, re.M)
    assert sorted((name, ranks) for name, ranks, _, _ in table) == [("dense", "1"), ("dense", "2"), ("switch-8", "1"), ("switch-8", "2")]
    assert all(float(ms) > 0 and float(tps) > 0 for _, _, ms, tps in table)
    # The profile found the Switch layer's parts: a router on every world size, an all-to-all only with EP 2.
    profile = {
        (m.group(1), m.group(2)): [float(v) for v in m.group(3).split()]
        for m in re.finditer(r"^(dense|switch-8) +([12]) +((?:\S+ +){7}\S+)$", stdout, re.M)
    }
    router, all_to_all = 2, 3  # columns after the step: forward, router, all-to-all, ...
    assert profile[("switch-8", "1")][router] > 0 and profile[("switch-8", "2")][router] > 0
    assert profile[("switch-8", "1")][all_to_all] == 0 and profile[("switch-8", "2")][all_to_all] > 0
    assert profile[("dense", "1")][router] == 0
    found = ratios(stdout)
    assert set(found) == {"switch-8 on 1 rank(s)", "switch-8 on 2 rank(s)"}
    assert_finite_positive(found)


def test_zero_memory_smoke():
    stdout = run_bench("bench.zero_memory")
    # precision, stage, formula, added on each rank, peak on each rank, RSS before the model (GiB)
    rows = [line.split() for line in stdout.splitlines() if re.match(r"fp32 +\d ", line)]
    assert [row[1] for row in rows] == ["0", "3"] and all(len(row) == 8 for row in rows)
    assert all(float(value) > 0 for row in rows for value in row[2:])
    formula = {row[1]: float(row[2]) for row in rows}
    assert formula["3"] < formula["0"]  # ZeRO-3 divides every model state over the 2 ranks
    found = ratios(stdout)
    assert set(found) == {"fp32 zero0", "fp32 zero3"}
    assert_finite_positive(found)
