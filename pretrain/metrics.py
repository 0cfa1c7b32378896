"""Rank 0's metric sinks: one stdout line (with the progress, pretrain/progress.py), one JSON object per line in DIR/metrics.jsonl, and W&B.

Names are grouped (train/, val/, moe/, perf/) so a W&B dashboard reads without editing;
metrics.jsonl also carries a bare ``step`` and ``loss`` for scripts.
"""

import json
import os

import numpy as np

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class MetricsLogger:
    def __init__(self, save_dir, is_rank0, wandb_project=None, wandb_run_name=None, run_config=None):
        self.is_rank0 = is_rank0
        self.path = os.path.join(save_dir, "metrics.jsonl")
        self.wandb = None
        self.progress = None  # while the trainer trains, its pretrain.progress.Progress: the step lines go through it
        if not is_rank0:
            return
        os.makedirs(save_dir, exist_ok=True)
        if wandb_project:
            import wandb

            # A run never needs the network: without an API key W&B writes offline files to sync later.
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, dir=save_dir, mode=mode, config=run_config, resume="allow")

    def log(self, step, metrics, histograms=None):
        """metrics: name -> float; histograms: name -> per-expert fractions (W&B only)."""
        if not self.is_rank0:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if "train/loss" in metrics:
            record["loss"] = float(metrics["train/loss"])
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={v:.5g}" for k, v in metrics.items() if not k.startswith("moe/"))
        line = f"step {step} {shown}"
        if self.progress is not None:
            self.progress.log_line(line, metrics)
        else:
            print(line, flush=True)
        if self.wandb is not None:
            import wandb

            payload = dict(metrics)
            for name, fractions in (histograms or {}).items():
                edges = np.arange(len(fractions) + 1)  # one bin per expert
                payload[name] = wandb.Histogram(np_histogram=(np.asarray(fractions), edges))
            self.wandb.log(payload, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def without_secrets(mapping):
    return {k: ("<redacted>" if any(m in k.upper() for m in SECRET_MARKERS) else v) for k, v in mapping.items()}
