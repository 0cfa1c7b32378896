"""Process-group start and the clean end of a rank."""

import datetime
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.accelerator import get_accelerator

from pretrain.local_ranks import free_port
from switchyard.errors import ConfigError


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env():
    return int(os.environ.get("RANK", "0"))


def init(timeout_minutes=60.0, precision=None, tf32=True):
    """Start torch.distributed: gloo on CPU, NCCL on GPUs (DeepSpeed's accelerator picks), every collective bounded
    by ``timeout_minutes`` (pretrain/watchdog.py says why it is long). With the run's ``precision`` ("fp32", "bf16",
    "fp16") and --tf32, also how fp32 matmuls run on this device (set_up_fp32_matmuls), before any model is built."""
    if "RANK" not in os.environ:  # plain `python pretrain/main.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    this_device = local_device()  # one GPU per rank (the CPU on CPU)
    set_up_fp32_matmuls(this_device.type, precision, tf32)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # The groups DeepSpeed makes (data-, expert-, pipeline-parallel) come from torch's new_group, which takes
    # torch's own default (30 min for gloo, 10 for NCCL) instead of the world group's timeout or DEEPSPEED_TIMEOUT:
    # set that default too, or a rank waiting on a stopped peer in a ZeRO reduction would outlast the bound.
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    try:
        deepspeed.init_distributed(timeout=timeout)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        raise ConfigError(
            f"the rendezvous port {os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is in use by another "
            f"process; pick a free one (deepspeed --master_port P, or MASTER_PORT=P)"
        ) from None


def visible_device_index(local_rank, local_world_size, visible):
    """Which of the ``visible`` GPUs the rank with ``local_rank`` (of ``local_world_size`` on its node; 0 when the
    launcher does not say) uses. Launched by torchrun or deepspeed, every rank sees the node's GPUs and takes its
    LOCAL_RANK-th; under Slurm with --gpus-per-task (or --gpu-bind, or cgroups) each sees only its own, device 0."""
    if visible > local_rank and visible >= local_world_size:
        return local_rank
    if visible == 1:
        return 0
    raise ConfigError(
        f"rank {local_rank} of {local_world_size or 'this node'}'s ranks sees {visible} GPUs: give each rank "
        f"one GPU of its own (srun --gpus-per-task=1) or every rank all of the node's (one rank per GPU)"
    )


def local_device():
    """This process's device, made current: its GPU among those it sees (visible_device_index), or the CPU."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    index = visible_device_index(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "0")), accelerator.device_count())
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))


def tf32_matmuls(device_type, precision, tf32):
    """Whether fp32 matmuls and convolutions run on TF32 tensor cores: --tf32 (default on) for an fp32 run on a CUDA
    GPU, where full fp32 matmuls run several times slower (A100, H100); None (torch's defaults left as they are)
    anywhere else: bf16 and fp16 runs, whose matmuls are not fp32, and the CPU, where "high" may let oneDNN
    compute fp32 matmuls in lower precision and so change every CPU figure."""
    if device_type != "cuda" or precision != "fp32":
        return None
    return tf32


def set_up_fp32_matmuls(device_type, precision, tf32):
    """Apply tf32_matmuls' choice, and say it on rank 0. Before the trainer is built: its MFU peak for fp32 is
    the TF32 one when torch.get_float32_matmul_precision() allows it (pretrain/trainer.device_peak_tflops)."""
    use_tf32 = tf32_matmuls(device_type, precision, tf32)
    if use_tf32 is None:
        return
    torch.set_float32_matmul_precision("high" if use_tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = use_tf32
    if rank_from_env() == 0:
        chosen = "TF32 tensor cores (--no-tf32 for full fp32)" if use_tf32 else "full fp32 (--no-tf32)"
        print(f"fp32 matmuls and convolutions: {chosen}", flush=True)


def device():
    """This rank's device: collectives need tensors there (NCCL takes GPU tensors only)."""
    return torch.device(get_accelerator().current_device_name())


class RankSync:
    """What all ranks agree on while they generate in step (models.generation's ``sync``): one all-reduce per call."""

    @staticmethod
    def most(n):
        value = torch.tensor([n], device=device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    @staticmethod
    def all(flag):
        value = torch.tensor([int(flag)], device=device())
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())


def finish(code=0, watchdog=None):
    """End this rank: barrier so no rank leaves early (the watchdog still watches for a rank that never comes),
    flush, then os._exit.

    os._exit skips interpreter shutdown, where torch 2.13's gloo sometimes aborts (SIGABRT)
    after a run that succeeded.
    """
    if dist.is_initialized():
        dist.barrier()
    if watchdog is not None:
        watchdog.stop()
    exit_now(code)


def exit_now(code):
    """Flush and end the process without interpreter shutdown, where torch 2.13's gloo may abort (finish's docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
