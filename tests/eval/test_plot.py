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


def synthetic_run(path, model):
    """A run logged every 2 steps whose windows took 0.5, 1 and 2 s a step (training seconds 1, 3 and 7 at steps
    2, 4, 6), validated at steps 3 (between two log steps), 4 and 6; run_config.json records ``model``."""
    path.mkdir()
    records = [
        {"step": step, "train/loss": 5.0 - step / 10, "perf/step_time_s": step_time, "perf/tokens_per_s": tokens_per_s}
        for step, step_time, tokens_per_s in [(2, 0.5, 100.0), (4, 1.0, 50.0), (6, 2.0, 25.0)]
    ]
    records += [{"step": step, "val/loss": loss} for step, loss in [(3, 4.5), (4, 4.25), (6, 4.0)]]
    records.sort(key=lambda r: r["step"])
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "run_config.json").write_text(json.dumps({"model": model}))
    return path


def test_seconds_axis_is_training_seconds_from_the_logged_step_times(tmp_path):
    from eval.plot import read_series, x_values

    # A Switch run of 2 expert-parallel ranks: the table counts all of its experts, as one process holds them.
    model = {**json.loads((REPO / "models" / "configs" / "tiny-switch.json").read_text()), "expert_parallel_size": 2}
    run = synthetic_run(tmp_path / "switch-run", model)
    series = read_series(run)
    assert list(x_values([3, 4, 6], series, run, "seconds")) == [2.0, 3.0, 7.0]  # step 3: halfway through 1..3 s
    assert x_values([3, 4, 6], series, run, "steps") == [3, 4, 6]
    out, table = tmp_path / "val.png", tmp_path / "runs.md"
    proc, result = plot(run, "--x", "seconds", "--panels", "val/loss", "--output", out, "--table", table)
    assert proc.returncode == 0, proc.stderr
    assert result == {"output": str(out), "x": "seconds", "points": {"switch-run": {"val/loss": 3}}, "table": str(table)}
    assert matplotlib.image.imread(out).shape[:2] == (420, 660)  # one panel: 5.5 x 3.5 inches at 120 dpi
    total, active = expected_counts(model)
    assert total > active  # 4 experts in one layer, one active per token
    # tokens/s over the run: (100 x 1 s + 50 x 2 s + 25 x 4 s) / 7 s
    assert table.read_text().splitlines()[2] == f"| switch-run | {total:,} | {active:,} | 4.0000 | 6 | 7.0 | 43 |"


def expected_counts(model):
    from models import build_model, config_from_dict

    return build_model(config_from_dict({k: v for k, v in model.items() if k != "expert_parallel_size"})).param_counts()


def test_seconds_need_logged_step_times_and_panels_known_metrics(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 5.0}) + "\n")
    proc, _ = plot(run, "--x", "seconds", "--output", tmp_path / "c.png")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {run} logged no perf/step_time_s, so it has no training seconds; plot it with --x steps"]
    proc, _ = plot(run, "--panels", "val/los", "--output", tmp_path / "c.png")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --panels takes a comma-separated list of train/loss, val/loss, train/lr, perf/tokens_per_s; got 'val/los'"
    ]
    assert not (tmp_path / "c.png").exists()
