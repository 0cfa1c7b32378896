"""Test-only launcher: pretrain/main.py with DeepSpeed's CPU accelerator claiming fp16 support.

This CPU has no mkldnn fp16, so DeepSpeed refuses fp16 at initialize. The loss scaler's logic
(skip an overflowing step, lower the scale) does not depend on the hardware, so the fp16 test
patches only that capability query and runs the real entry point; the real fp16 kernels are
exercised on a GPU (see BENCHMARKS.md when one was available).
"""

from deepspeed.accelerator import get_accelerator

get_accelerator().is_fp16_supported = lambda: True

from pretrain.main import main  # noqa: E402  (after the patch, so nothing main imports sees the real answer)

if __name__ == "__main__":
    main()
