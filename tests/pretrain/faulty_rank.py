"""Test-only launcher: pretrain/main.py with one rank failing at a chosen step, in one of two ways.

SWITCHYARD_TEST_FAULT="raise:RANK:STEP" raises a RuntimeError in that rank's training step (what a CUDA
out-of-memory error is to the other ranks); "sleep:RANK:STEP:SECONDS" sleeps there, alive (its watchdog
beats on), while the others wait for it in the step's gradient reduction.
"""

import os
import time

from pretrain.main import main
from pretrain.trainer import Trainer

kind, rank, step, *seconds = os.environ["SWITCHYARD_TEST_FAULT"].split(":")
clean_train_step = Trainer.train_step


def faulty_train_step(self):
    if os.environ["RANK"] == rank and self.step + 1 == int(step):
        if kind == "raise":
            raise RuntimeError(f"injected failure at step {step}")
        time.sleep(float(seconds[0]))
    return clean_train_step(self)


Trainer.train_step = faulty_train_step

if __name__ == "__main__":
    main()
