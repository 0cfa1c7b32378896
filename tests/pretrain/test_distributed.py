"""Which GPU a rank takes: its LOCAL_RANK-th when it sees the node's GPUs (torchrun, deepspeed), the one it sees when
Slurm gives each task its own (--gpus-per-task, --gpu-bind, cgroups), and one line otherwise; and whether its fp32
matmuls run on TF32 (fp32 runs on CUDA, unless --no-tf32). The visible counts and a stand-in accelerator stand in for
GPUs, which this CPU suite never sees (tests/conftest.py hides any: CUDA_VISIBLE_DEVICES is empty)."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.distributed_c10d as c10d

import pretrain.main
from pretrain import distributed
from pretrain.args import parse_args
from pretrain.distributed import local_device, tf32_matmuls, visible_device_index
from switchyard.errors import ConfigError
from tests.distributed import CORPUS


@pytest.mark.parametrize(
    "local_rank,local_world_size,visible,expected",
    [
        (3, 8, 8, 3),  # torchrun / deepspeed: every rank sees the node's 8 GPUs
        (3, 0, 8, 3),  # the launcher does not say how many ranks the node has (srun)
        (3, 8, 1, 0),  # srun --gpus-per-task=1: rank 3 sees only its own GPU, as device 0 ("invalid device ordinal" before)
        (0, 1, 1, 0),
        (1, 2, 4, 1),  # fewer ranks than GPUs: the first ones are used
    ],
)
def test_a_rank_takes_a_gpu_it_sees(local_rank, local_world_size, visible, expected):
    assert visible_device_index(local_rank, local_world_size, visible) == expected


@pytest.mark.parametrize("local_rank,local_world_size,visible", [(3, 8, 2), (5, 0, 4)])
def test_a_rank_that_sees_some_but_not_its_gpu_is_one_line(local_rank, local_world_size, visible):
    with pytest.raises(ConfigError, match=f"rank {local_rank} of .* sees {visible} GPUs: give each rank one GPU of its own"):
        visible_device_index(local_rank, local_world_size, visible)


def test_the_suite_runs_on_the_cpu_even_on_a_gpu_machine():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    assert local_device() == torch.device("cpu")


@pytest.mark.parametrize(
    "device_type,precision,tf32,expected",
    [
        ("cuda", "fp32", True, True),  # the default on a GPU: TF32 tensor cores
        ("cuda", "fp32", False, False),  # --no-tf32: full fp32, set explicitly (cuDNN allows TF32 by default)
        ("cuda", "bf16", True, None),  # bf16 and fp16 matmuls are not fp32: torch's defaults stay
        ("cuda", "fp16", False, None),
        ("cpu", "fp32", True, None),  # never on the CPU: every CPU figure stays as it was
        ("cpu", "fp32", False, None),
        ("cuda", None, True, None),  # init() without a run's precision (the benchmarks)
    ],
)
def test_tf32_only_for_fp32_runs_on_cuda(device_type, precision, tf32, expected):
    assert tf32_matmuls(device_type, precision, tf32) == expected


class OneGPU:
    """DeepSpeed's accelerator as a one-GPU machine answers; the suite's ranks never see one."""

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self):
        return 1

    def set_device(self, index):
        pass


@pytest.mark.parametrize(
    "accelerator,precision,tf32,expected", [(OneGPU, "fp32", True, "high"), (OneGPU, "fp32", False, "highest"), (OneGPU, "bf16", True, None)]
)
def test_the_rank_start_sets_the_fp32_matmul_precision(monkeypatch, capsys, accelerator, precision, tf32, expected):
    """distributed.init, where a rank takes its GPU, sets how its fp32 matmuls run (before any model or trainer is
    built, so the trainer's MFU peak follows it), and rank 0 says so."""
    chosen = []
    monkeypatch.setattr(distributed, "get_accelerator", accelerator)
    monkeypatch.setattr(distributed.deepspeed, "init_distributed", lambda timeout: None)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", chosen.append)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # restored after the test
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    distributed.init(1.0, precision, tf32)
    assert chosen == ([expected] if expected else [])
    printed = capsys.readouterr().out
    if expected:
        assert torch.backends.cudnn.allow_tf32 == tf32
        assert printed == f"fp32 matmuls and convolutions: {'TF32 tensor cores (--no-tf32 for full fp32)' if tf32 else 'full fp32 (--no-tf32)'}\n"
    else:
        assert printed == ""


def test_launching_passes_the_precision_and_tf32_to_the_rank_start(monkeypatch):
    """pretrain/main.run starts the rank with the plan's precision and --tf32, first: before the engine and trainer."""

    class Started(Exception):
        pass

    def start(timeout_minutes, precision, tf32):
        raise Started(timeout_minutes, precision, tf32)

    monkeypatch.setattr(distributed, "init", start)
    args = parse_args(
        ["--ds_config", "d.json", "--model_config", "m.json", "--train_data", str(CORPUS), "--max_steps", "1", "--save_dir", "r", "--no-tf32"]
    )
    with pytest.raises(Started) as started:
        # Signals stand in for StopSignals, whose handlers would outlive the test in this process.
        pretrain.main.run(args, None, None, SimpleNamespace(precision="fp32"), None, SimpleNamespace(runner_terminated=lambda: None))
    assert started.value.args == (60.0, "fp32", False)
