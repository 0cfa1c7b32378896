"""Test-only launcher: pretrain/main.py with a NaN injected into rank 0's training loss at chosen steps.

SWITCHYARD_TEST_NAN_STEPS="3" or "3-" (from step 3 on); SWITCHYARD_TEST_GAS is the number of
micro-batches per step on this rank; SWITCHYARD_TEST_FP16_ON_CPU=1 adds fp16_on_cpu.py's patch. Only rank 0 is poisoned,
so the test also shows that every rank agrees to skip (the NaN reaches the others through the gradient all-reduce).
"""

import os

import torch

if os.environ.get("SWITCHYARD_TEST_FP16_ON_CPU"):
    import fp16_on_cpu  # noqa: F401  (beside this script, so on its sys.path; importing it makes the CPU accelerator report fp16)

from pretrain.main import main
from pretrain.tasks.lm import LanguageModelingTask

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
