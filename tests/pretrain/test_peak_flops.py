"""The MFU peak table: each product name as torch.cuda.get_device_name reports it gets its own form factor's peak in
the run's precision (these names stand in for the GPUs, which this CPU suite never sees)."""

import pytest

from pretrain.peak_flops import peak_tflops


@pytest.mark.parametrize(
    "name,precision,tf32,expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),  # SXM
        ("NVIDIA H100 PCIe", "bf16", False, 756.0),
        ("NVIDIA H100 NVL", "bf16", False, 835.5),
        ("NVIDIA H200", "bf16", False, 989.4),
        ("NVIDIA H200 NVL", "bf16", False, 835.5),
        ("NVIDIA GH200 480GB", "bf16", False, 989.4),
        ("NVIDIA H800", "bf16", False, 989.4),
        ("NVIDIA H800 PCIe", "fp16", False, 756.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
        ("NVIDIA A100 80GB PCIe", "fp16", False, 312.0),
        ("NVIDIA A800-SXM4-80GB", "bf16", False, 312.0),
        ("NVIDIA L40S", "bf16", False, 362.05),
        ("NVIDIA B200", "bf16", False, 2250.0),
        # fp32 against the TF32 tensor-core peak only when matmuls may use TF32, never against bf16's
        ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),
        ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),
        ("NVIDIA A100-SXM4-40GB", "fp32", False, 19.5),
        ("NVIDIA B200", "fp32", True, 1100.0),
    ],
)
def test_each_product_gets_its_own_peak(name, precision, tf32, expected):
    assert peak_tflops(name, precision, tf32) == expected


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA A10", "NVIDIA L4"])
def test_an_unknown_device_gets_no_peak_rather_than_a_near_one(name):
    assert peak_tflops(name, "bf16", False) is None
