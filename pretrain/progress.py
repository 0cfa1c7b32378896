"""How far training is, on rank 0: a tqdm bar on a terminal, the percentage and ETA in the log lines elsewhere.

On a terminal (stdout, else stderr, is a TTY) a bar over [resumed step, --max_steps] shows the rate, the ETA
and, in its postfix, the loss of the last log line; the log lines still print, above the bar (tqdm.write). In a
file (a Slurm log, a pipe) each log line ends with ``[25% of 200 steps, eta 01:23]``, the ETA from the step
rate measured since this launch's first step (its warm-up, the first forward and the optimizer's state
allocation, is left out).
"""

import sys
import time

from tqdm import tqdm


def terminal():
    """The stream a bar can be drawn on, or None when neither stdout nor stderr is a terminal."""
    return next((stream for stream in (sys.stdout, sys.stderr) if stream.isatty()), None)


class Progress:
    def __init__(self, start_step, max_steps, stream):
        """``stream``: where to draw the bar (``terminal()``), or None for plain lines."""
        self.max_steps = max_steps
        self.bar = None
        if stream is not None:
            self.bar = tqdm(total=max_steps, initial=start_step, file=stream, unit="step", desc="train", dynamic_ncols=True)
        self.rate_origin = None  # (time, step) at the end of this launch's first step
        self.step = start_step

    def advance(self, step):
        """``step`` is done."""
        if self.rate_origin is None:
            self.rate_origin = (time.perf_counter(), step)
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def eta_s(self):
        """Seconds to --max_steps at the rate since this launch's first step; None until a second step is done."""
        if self.rate_origin is None or self.step == self.rate_origin[1]:
            return None
        started, first = self.rate_origin
        return (time.perf_counter() - started) / (self.step - first) * (self.max_steps - self.step)

    def write(self, text):
        """A line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def log_line(self, line, metrics):
        """One of the logger's step lines: above the bar (its loss in the postfix), or ending in the progress."""
        if self.bar is not None:
            if "train/loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
            self.write(line)
            return
        eta = self.eta_s()
        shown = tqdm.format_interval(eta) if eta is not None else "--:--"
        self.write(f"{line} [{self.step / self.max_steps:.0%} of {self.max_steps} steps, eta {shown}]")

    def close(self):
        if self.bar is not None:
            self.bar.close()
