"""Dense peak TFLOP/s of NVIDIA GPUs by precision, for MFU when --peak_tflops is not given.

The figures are NVIDIA's datasheet numbers without 2:4 sparsity (half the headline tensor figures).
A device is matched by its product name as torch.cuda.get_device_name reports it, form factor first:
an H100 PCIe or NVL has less compute than the SXM part the bare name means. fp32 is measured against
the TF32 tensor-core peak when torch lets matmuls use TF32, else against the plain FP32 peak. An
unknown device gets no peak (and no MFU) rather than a wrong one.
"""

import re

HOPPER_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
HOPPER_PCIE = {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}
HOPPER_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}
AMPERE = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}  # A100 and A800, SXM and PCIe alike
ADA_L40S = {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}
BLACKWELL_B200 = {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}  # HGX B200 at 1000 W

# (pattern of the product name, peaks); the first match wins, so a form factor comes before its bare name.
PEAK_TFLOPS = [
    (r"\bGH200\b", HOPPER_SXM),
    (r"\bH200 NVL\b", HOPPER_NVL),
    (r"\bH200\b", HOPPER_SXM),
    (r"\bH100 NVL\b", HOPPER_NVL),
    (r"\bH100 PCIe\b", HOPPER_PCIE),
    (r"\bH100\b", HOPPER_SXM),
    (r"\bH800 PCIe\b", HOPPER_PCIE),
    (r"\bH800\b", HOPPER_SXM),
    (r"\bA[18]00\b", AMPERE),
    (r"\bL40S\b", ADA_L40S),
    (r"\bB200\b", BLACKWELL_B200),
]


def peak_tflops(device_name, precision, tf32):
    """Dense peak TFLOP/s of ``device_name`` in ``precision`` ("bf16", "fp16", "fp32"; fp32 matmuls on TF32 tensor
    cores when ``tf32``), or None for a device not in PEAK_TFLOPS."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peaks["tf32" if precision == "fp32" and tf32 else precision]
    return None
