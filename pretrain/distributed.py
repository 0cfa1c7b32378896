"""Process-group start and the clean end of a rank."""
import os
import socket
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env():
    return int(os.environ.get("RANK", "0"))


def init():
    """Start torch.distributed: gloo on CPU, NCCL on GPUs (DeepSpeed's accelerator picks)."""
    if "RANK" not in os.environ:  # plain `python pretrain/main.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank (a no-op on CPU)
    deepspeed.init_distributed()


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(code=0):
    """End this rank: barrier so no rank leaves early, flush, then os._exit.

    os._exit skips interpreter shutdown, where torch 2.13's gloo sometimes aborts (SIGABRT)
    after a run that succeeded.
    """
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
