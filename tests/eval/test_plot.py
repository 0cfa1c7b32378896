"""python -m eval.plot: every logged point of every run is drawn; torn last lines and missing runs are handled."""

import json
import subprocess
import sys

import matplotlib.image

from tests.distributed import REPO, read_metrics


def plot(*args):
    proc = subprocess.run([sys.executable, "-m", "eval.plot", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None)


def test_two_runs_into_one_png(trained, tmp_path):
    real = trained("dense")
    killed = tmp_path / "killed"  # a run killed while appending its metrics: the torn last line is ignored
    killed.mkdir()
    # Steps 1-5, then a resume from step 3 logs 4-7 again: one point per step, the resumed one.
    records = [{"step": s, "train/loss": 5.0 - s / 10, "train/lr": 1e-3, "perf/tokens_per_s": 900.0 + s} for s in [1, 2, 3, 4, 5, 4, 5, 6, 7]]
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "train/lo')
    out = tmp_path / "curves.png"
    proc, result = plot(real, killed, "--output", out, "--smooth", 3)
    assert proc.returncode == 0, proc.stderr
    expected = {key: len(read_metrics(real, key)) for key in ("train/loss", "val/loss", "train/lr", "perf/tokens_per_s")}
    assert expected["train/loss"] > 0 and expected["val/loss"] > 0
    assert result["points"] == {"dense": expected, "killed": {"train/loss": 7, "val/loss": 0, "train/lr": 7, "perf/tokens_per_s": 7}}
    assert matplotlib.image.imread(out).shape[:2] == (840, 1320)  # 11 x 7 inches at 120 dpi
    assert not list(tmp_path.glob("*.tmp.png"))


def test_a_directory_without_metrics_is_one_line(tmp_path):
    proc, _ = plot(tmp_path, "--output", tmp_path / "c.png")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'metrics.jsonl'} does not exist; pass the --save_dir of a pretrain/main.py run"]
    assert not (tmp_path / "c.png").exists()
