"""Which GPU a rank takes: its LOCAL_RANK-th when it sees the node's GPUs (torchrun, deepspeed), the one it sees when
Slurm gives each task its own (--gpus-per-task, --gpu-bind, cgroups), and one line otherwise. The visible counts
stand in for GPUs, which this CPU suite never sees (tests/conftest.py hides any: CUDA_VISIBLE_DEVICES is empty)."""

import os

import pytest
import torch

from pretrain.distributed import local_device, visible_device_index
from switchyard.errors import ConfigError


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
