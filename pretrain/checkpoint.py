"""DeepSpeed checkpoints plus what DeepSpeed leaves out: the data position and each rank's RNG.

Tags are ``global_stepN``; DeepSpeed writes the shards (ZeRO partitions, every expert of every
expert-parallel rank) and the ``latest`` pointer.
"""
import os

import torch
import torch.distributed as dist


def _rng_path(save_dir, tag, rank):
    return os.path.join(save_dir, tag, f"rng_state_rank{rank}.pt")


def save(engine, save_dir, step, client_state):
    tag = f"global_step{step}"
    # RNG first: DeepSpeed writes the ``latest`` pointer last, so a checkpoint that ``latest`` names has it.
    os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
    torch.save({"torch": torch.get_rng_state()}, _rng_path(save_dir, tag, dist.get_rank()))
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state)


def has_checkpoint(save_dir):
    return os.path.isfile(os.path.join(save_dir, "latest"))


def load(engine, save_dir):
    """Load the latest checkpoint; returns its client state (step, consumed_samples, ...)."""
    path, client_state = engine.load_checkpoint(save_dir)
    if path is None:
        raise FileNotFoundError(f"no loadable checkpoint in {save_dir}")
    tag = os.path.basename(os.path.dirname(path))  # path is the tag's model-states file
    rng = torch.load(_rng_path(save_dir, tag, dist.get_rank()), weights_only=True)
    torch.set_rng_state(rng["torch"])
    return client_state
