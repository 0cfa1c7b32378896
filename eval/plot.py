"""Training curves of one or more runs from their metrics.jsonl, as a PNG (for users without W&B, or a paper).

    python -m eval.plot RUN_DIR [RUN_DIR ...] --output curves.png [--smooth 20]
    python -m eval.plot RUN_DIR [RUN_DIR ...] --x seconds --panels val/loss --output val_loss_vs_seconds.png
    python -m eval.plot RUN_DIR [RUN_DIR ...] --table runs.md     # + a markdown table of each run's outcome

Four panels (or the --panels chosen) against the optimizer step, or with --x seconds against training
seconds: training loss, validation loss, learning rate and tokens/s; one line per run, labelled with its
directory name. Training seconds are the sum of the logged step times (perf/step_time_s over each
log window), so validation, checkpoints and the start-up before step 1 are not in them, and a run's
curve does not depend on how often it validated; a point logged between two log steps is placed by
linear interpolation. --smooth N draws the training loss and tokens/s as a trailing mean over N logged
points, the raw values faint behind it. --table writes one row per run: parameters and parameters active
per token (counted on the model its run_config.json records), the last validation loss, training seconds,
and tokens/s over them. Prints one JSON object last: the output path and how many points each panel drew per run.
"""

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt
import numpy as np

from eval.cli import fail, fire_command, print_result, write_atomically

PANELS = (
    ("train/loss", "training loss", True),
    ("val/loss", "validation loss", False),
    ("train/lr", "learning rate", False),
    ("perf/tokens_per_s", "tokens/s", True),
)
X_AXES = {"steps": "step", "seconds": "training seconds"}


def read_series(run_dir):
    """{metric: (steps, values)} from RUN_DIR/metrics.jsonl (the file pretrain/main.py writes). A resumed run
    logs again the steps after its checkpoint: the last record of a step wins, as in the resumed model."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        fail(f"{path} does not exist; pass the --save_dir of a pretrain/main.py run")
    series = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if f.read(1) == "":  # a run killed mid-write leaves at most a torn last line
                    break
                fail(f"{path} line {line_number} is not JSON; is it a pretrain/main.py metrics file?")
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, {})[record["step"]] = value
    if "train/loss" not in series:
        fail(f"{path} holds no train/loss; the run logged nothing yet")
    return {key: (sorted(values), [values[step] for step in sorted(values)]) for key, values in series.items()}


def trailing_mean(values, window):
    cumulative = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def training_seconds(series, run_dir):
    """(logged steps, training seconds at each): every log window's step time times its steps, summed."""
    if "perf/step_time_s" not in series:
        fail(f"{run_dir} logged no perf/step_time_s, so it has no training seconds; plot it with --x steps")
    steps, step_times = series["perf/step_time_s"]
    window_steps = np.diff(np.asarray([0, *steps], dtype=float))
    return steps, np.cumsum(window_steps * np.asarray(step_times, dtype=float))


def x_values(steps, series, run_dir, x):
    """The x coordinates of points logged at ``steps``: the steps, or the training seconds there."""
    if x == "steps":
        return steps
    logged_steps, seconds = training_seconds(series, run_dir)
    return np.interp(steps, [0, *logged_steps], [0.0, *seconds])


def plot(runs, output, smooth=1, x="steps", panels=PANELS):
    columns = min(len(panels), 2)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.5 * rows), constrained_layout=True, squeeze=False)
    drawn = {}
    for run_dir in runs:
        series, label = read_series(run_dir), os.path.basename(os.path.normpath(run_dir))
        drawn[label] = {}
        for ax, (key, title, smoothable) in zip(axes.flat, panels):
            steps, values = series.get(key, ([], []))
            drawn[label][key] = len(values)
            if not values:
                continue
            xs = x_values(steps, series, run_dir, x)
            if smoothable and smooth > 1:
                (line,) = ax.plot(xs, values, alpha=0.25)
                ax.plot(xs, trailing_mean(values, smooth), color=line.get_color(), label=label)
            else:
                ax.plot(xs, values, marker="o" if len(values) < 30 else None, label=label)
    for ax, (key, title, _) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    tmp = f"{output}.tmp.png"
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, output)
    return drawn


def parameter_counts(run_dir):
    """(parameters, parameters active per token) of the model the run recorded, counted on the meta device (no
    weights are made or drawn)."""
    import torch

    from models import build_model
    from pretrain.run_dir import recorded_model_config, require_run_config

    config = recorded_model_config(require_run_config(run_dir), run_dir)
    with torch.device("meta"):
        return build_model(config).param_counts()


def outcome(run_dir):
    """One run's table row: parameters, active per token, last val/loss, training seconds and tokens/s over them."""
    series = read_series(run_dir)
    total, active = parameter_counts(run_dir)
    logged_steps, seconds = training_seconds(series, run_dir)
    window_seconds = np.diff(np.insert(seconds, 0, 0.0))
    tokens_per_s = series["perf/tokens_per_s"][1]
    val = series.get("val/loss", ([], []))[1]
    return {
        "run": os.path.basename(os.path.normpath(run_dir)),
        "parameters": total,
        "active_parameters": active,
        "final_val_loss": val[-1] if val else None,
        "steps": logged_steps[-1],
        "seconds": float(seconds[-1]),
        "tokens_per_s": float(np.dot(tokens_per_s, window_seconds) / seconds[-1]),  # all tokens / all seconds
    }


def markdown_table(rows):
    lines = [
        "| run | parameters | active per token | final val loss | steps | training seconds | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        val = "-" if row["final_val_loss"] is None else f"{row['final_val_loss']:.4f}"
        lines.append(
            f"| {row['run']} | {row['parameters']:,} | {row['active_parameters']:,} | {val} | {row['steps']} | "
            f"{row['seconds']:.1f} | {row['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def chosen_panels(panels):
    """PANELS' entries named by --panels (a comma-separated string, or the tuple fire makes of one), in PANELS' order."""
    if panels is None:
        return PANELS
    names = [n for n in (panels.split(",") if isinstance(panels, str) else panels) if n]
    unknown = [n for n in names if n not in {key for key, _, _ in PANELS}]
    if unknown or not names:
        fail(f"--panels takes a comma-separated list of {', '.join(key for key, _, _ in PANELS)}; got {panels!r}")
    return tuple(panel for panel in PANELS if panel[0] in names)


def main(*runs, output="curves.png", smooth=1, x="steps", panels=None, table=None):
    """Draw the curves of RUN_DIR(s) into --output.

    Args:
        runs: pretrain/main.py --save_dir directories.
        output: the PNG to write.
        smooth: trailing-mean window (logged points) for training loss and tokens/s.
        x: what the curves are drawn against: steps, or seconds (training seconds, from the logged step times).
        panels: comma-separated metrics to draw (default: train/loss,val/loss,train/lr,perf/tokens_per_s).
        table: also write a markdown table of each run's parameters, final val loss, seconds and tokens/s here.
    """
    if not runs:
        fail("pass at least one run directory")
    if int(smooth) < 1:
        fail(f"--smooth must be >= 1, got {smooth}")
    if x not in X_AXES:
        fail(f"--x must be steps or seconds, got {x!r}")
    runs = [str(r) for r in runs]
    result = {"output": str(output), "x": x, "points": plot(runs, str(output), int(smooth), x, chosen_panels(panels))}
    if table:
        write_atomically(str(table), markdown_table([outcome(r) for r in runs]))
        result["table"] = str(table)
    print_result(result)


if __name__ == "__main__":
    fire_command(main, "eval.plot")
