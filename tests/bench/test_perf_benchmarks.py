"""Smoke modes of the performance benchmarks: a few steps on real ranks, and the printed tables parse.

No timing thresholds: the figures depend on the machine; what is checked is that the benchmarks run
end to end and report a finite, positive ratio for every case.
"""

import json
import math
import os
import re
import subprocess
import sys

from bench.switch_vs_dense import TARGETS
from tests.distributed import REPO


def run_bench(module, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the benchmark starts its own ranks
    proc = subprocess.run([sys.executable, "-m", module, "--smoke", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
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
    report = json.loads(stdout.strip().splitlines()[-1])
    expected = {"zero2-4096": {"1", "2"}, "zero0-nanogpt": {"1"}}  # the smoke's cases and their world sizes
    assert {case: set(worlds) for case, worlds in report["step_ms"].items()} == expected
    for case, worlds in report["step_ms"].items():
        for ranks, models in worlds.items():
            assert set(models) == {"dense", "switch-8"}
            assert all(math.isfinite(ms) and ms > 0 for ms in models.values())
            ratio = report["ratios"][case][ranks]["switch-8"]
            assert_finite_positive({f"{case} {ranks} {name}": value for name, value in ratio.items()})
            if ranks == "1":  # one process: the tokens/s ratio by process CPU time
                assert "tokens_per_s_cpu" in ratio
    # Every target reported, with a verdict where its case ran (the smoke runs no 32-expert model).
    targets = {(t["case"], t["model"], t["ranks"]): t for t in report["targets"]}
    assert set(targets) == {(case, model, ranks) for case, model, ranks, _, _ in TARGETS}
    for (case, model, ranks), target in targets.items():
        if model == "switch-8":
            assert isinstance(target["met"], bool) and math.isfinite(target["value"]) and target["value"] > 0
        else:
            assert target["met"] is None and target["value"] is None
    # The profile found the Switch layer's parts: a router on every world size, an all-to-all only with EP 2.
    profile = report["profile"]["zero2-4096"]
    assert profile["1"]["switch-8"]["router"] > 0 and profile["2"]["switch-8"]["router"] > 0
    assert profile["1"]["switch-8"]["experts"] > 0
    assert profile["1"]["switch-8"]["all-to-all"] == 0 and profile["2"]["switch-8"]["all-to-all"] > 0
    assert profile["1"]["dense"]["router"] == 0 and profile["1"]["dense"]["experts"] == 0
    assert all(profile["1"]["switch-8"][part] > 0 for part in ("forward", "backward", "optimizer", "step"))
    # The readable ratio lines before the JSON hold the same cases.
    lines = [line for line in stdout.splitlines() if re.match(r"^\S+ switch-8 on [12] rank\(s\): step ", line)]
    assert len(lines) == 3


def test_zero_memory_smoke_with_activation_checkpointing():
    """The bench's --checkpoint_activations reaches the model it measures (the memory saved: BENCHMARKS.md section 3)."""
    stdout = run_bench("bench.zero_memory", "--stages", "0", "--checkpoint_activations", "1")
    assert re.search(r"^GPT d_model 64, .*, checkpoint_activations 1$", stdout, re.M), stdout[-2000:]
    rows = [line.split() for line in stdout.splitlines() if re.match(r"fp32 +\d ", line)]
    assert [row[1] for row in rows] == ["0"] and all(float(value) > 0 for value in rows[0][2:])


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
