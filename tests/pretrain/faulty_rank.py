"""Test-only launcher: pretrain/main.py with one rank failing or slow at a chosen step, in one of three ways.

SWITCHYARD_TEST_FAULT="raise:RANK:STEP" raises a RuntimeError in that rank's training step (what a CUDA
out-of-memory error is to the other ranks); "sleep:RANK:STEP:SECONDS" sleeps there, alive (its watchdog
beats on), while the others wait for it in the step's gradient reduction; "slow_hash:RANK:0:SECONDS" makes
each checkpoint hash on that rank take SECONDS longer (what hashing a multi-GB checkpoint is), on save and
on resume.
"""

import os
import time

import pretrain.checkpoint
import pretrain.run_dir
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
clean_sha256 = pretrain.run_dir.sha256


def slow_sha256(path):
    if path.endswith("mp_rank_00_model_states.pt"):  # once per checkpoint
        time.sleep(float(seconds[0]))
    return clean_sha256(path)


if kind == "slow_hash" and os.environ["RANK"] == rank:
    pretrain.run_dir.sha256 = pretrain.checkpoint.sha256 = slow_sha256

if __name__ == "__main__":
    main()
