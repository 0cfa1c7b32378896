"""scripts/switch_curves.sh end to end at its SMOKE size (dense and two Switch models on a slice of PTB, plots and
table), and its one-line refusals: no data, steps that would repeat training data."""

import json
import os
import re
import subprocess
import sys

import matplotlib.image
import pytest

from tests.distributed import REPO

SCRIPT = REPO / "scripts" / "switch_curves.sh"
PTB = REPO.parent / "shared" / "data" / "ptb"

needs_ptb = pytest.mark.skipif(not (PTB / "ptb.train.txt").is_file(), reason="../shared/data/ptb is not in this checkout's parent")


def run_script(tmp_path, **env):
    full_env = dict(
        os.environ, SMOKE="1", OUT=str(tmp_path / "out"), PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # each training run is a world of one of its own
    full_env.update(env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


@needs_ptb
def test_smoke_trains_every_model_and_writes_plots_and_table(tmp_path):
    proc = run_script(tmp_path, EXPERTS="2 32", SWITCH_CONFIG='{"capacity_factor": 1.5}')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("val_loss_vs_steps.png", "val_loss_vs_seconds.png"):
        assert matplotlib.image.imread(out / name).shape[:2] == (420, 660)
    rows = [line.split("|")[1:-1] for line in (out / "results.md").read_text().splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["dense", "switch-2", "switch-32"]
    by_name = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows}
    for name, (params, active, val_loss, steps, seconds, tokens_per_s) in by_name.items():
        assert steps == "8" and float(val_loss) > 0 and float(seconds) > 0 and float(tokens_per_s.replace(",", "")) > 0, name
    # Same FLOPs per token: the Switch models' active parameters are within the router's of the dense model's.
    active = {name: int(cells[1].replace(",", "")) for name, cells in by_name.items()}
    params = {name: int(cells[0].replace(",", "")) for name, cells in by_name.items()}
    assert 0 < active["switch-2"] - active["dense"] < 1000 and active["switch-32"] - active["dense"] < 10_000
    assert params["dense"] < params["switch-2"] < params["switch-32"]
    # SWITCH_CONFIG reached the Switch models' configs only.
    assert '"capacity_factor": 1.5' in (out / "configs" / "switch-32.json").read_text()
    assert "capacity_factor" not in (out / "configs" / "dense.json").read_text()
    # Every model starts from the same init distribution.
    assert all(json.loads(path.read_text())["init_scale"] == 0.1 for path in (out / "configs").glob("*.json"))
    assert re.search(r"^8 steps x 4 x 32 tokens = 1,024 of the [\d,]+ training tokens \(0\.\d\d epochs\)$", proc.stdout, re.M)


def test_missing_data_is_one_line(tmp_path):
    proc = run_script(tmp_path, DATA=str(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}/ptb.train.txt does not exist; put Penn Treebank in ../shared/data/ptb "
        "(../shared/data/README.md) or point DATA at a folder with ptb.train.txt and ptb.valid.txt"
    ]
    assert not (tmp_path / "out").exists()


@needs_ptb
def test_steps_that_would_repeat_data_are_refused(tmp_path):
    proc = run_script(tmp_path, STEPS="100000")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"error: STEPS=100000 x 4 sequences of 32 tokens would repeat training data: the [\d,]+-token training set "
        r"holds [\d,]+ sequences; use STEPS <= \d+",
        lines[0],
    ), lines
    assert not list((tmp_path / "out").glob("dense"))  # refused before any training
