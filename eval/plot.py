"""Training curves of one or more runs from their metrics.jsonl, as a PNG (for users without W&B, or a paper).

    python -m eval.plot RUN_DIR [RUN_DIR ...] --output curves.png [--smooth 20]

Four panels against the optimizer step: training loss, validation loss, learning rate and
tokens/s; one line per run, labelled with its directory name. --smooth N draws the training
loss and tokens/s as a trailing mean over N logged points, the raw values faint behind it.
Prints one JSON object last: the output path and how many points each panel drew per run.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt
import numpy as np

from eval.cli import fail, fire_command, print_result

PANELS = (
    ("train/loss", "training loss", True),
    ("val/loss", "validation loss", False),
    ("train/lr", "learning rate", False),
    ("perf/tokens_per_s", "tokens/s", True),
)


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


def plot(runs, output, smooth=1):
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    drawn = {}
    for run_dir in runs:
        series, label = read_series(run_dir), os.path.basename(os.path.normpath(run_dir))
        drawn[label] = {}
        for ax, (key, title, smoothable) in zip(axes.flat, PANELS):
            steps, values = series.get(key, ([], []))
            drawn[label][key] = len(values)
            if not values:
                continue
            if smoothable and smooth > 1:
                (line,) = ax.plot(steps, values, alpha=0.25)
                ax.plot(steps, trailing_mean(values, smooth), color=line.get_color(), label=label)
            else:
                ax.plot(steps, values, marker="o" if len(values) < 30 else None, label=label)
    for ax, (key, title, _) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
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


def main(*runs, output="curves.png", smooth=1):
    """Draw the curves of RUN_DIR(s) into --output.

    Args:
        runs: pretrain/main.py --save_dir directories.
        output: the PNG to write.
        smooth: trailing-mean window (logged points) for training loss and tokens/s.
    """
    if not runs:
        fail("pass at least one run directory")
    if int(smooth) < 1:
        fail(f"--smooth must be >= 1, got {smooth}")
    print_result({"output": str(output), "points": plot([str(r) for r in runs], str(output), int(smooth))})


if __name__ == "__main__":
    fire_command(main, "eval.plot")
