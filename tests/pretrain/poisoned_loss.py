"""Test-only launcher: pretrain/main.py with a NaN injected into rank 0's training loss at chosen steps.

SWITCHYARD_TEST_NAN_STEPS="3" or "3-" (from step 3 on); SWITCHYARD_TEST_GAS is the number of
micro-batches per step on this rank; SWITCHYARD_TEST_FP16_ON_CPU=1 adds fp16_on_cpu.py's patch. Only rank 0 is poisoned, so the test also shows that every
rank agrees to skip (the NaN reaches the others through the gradient all-reduce).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

if os.environ.get("SWITCHYARD_TEST_FP16_ON_CPU"):
    import tests.pretrain.fp16_on_cpu  # noqa: E402,F401  (its import makes the CPU accelerator report fp16)

from pretrain.main import main  # noqa: E402
from pretrain.tasks.lm import LanguageModelingTask  # noqa: E402

spec = os.environ["SWITCHYARD_TEST_NAN_STEPS"]
first = int(spec.rstrip("-"))
last = float("inf") if spec.endswith("-") else first
gas = int(os.environ["SWITCHYARD_TEST_GAS"])
calls = 0
clean_loss = LanguageModelingTask.loss


def poisoned_loss(self, outputs, batch):
    global calls
    loss, parts = clean_loss(self, outputs, batch)
    if torch.is_grad_enabled():  # training micro-batches only, not validation
        step = calls // gas + 1
        calls += 1
        if os.environ["RANK"] == "0" and first <= step <= last:
            loss = loss * float("nan")
    return loss, parts


LanguageModelingTask.loss = poisoned_loss

if __name__ == "__main__":
    main()
