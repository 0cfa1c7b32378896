"""Kill-safe DeepSpeed checkpoints, plus what DeepSpeed leaves out: the data position and RNG.

A checkpoint is written as ``global_stepN.partial``; once every rank has written its shards,
rank 0 records a manifest (size and SHA-256 of each file), flushes, renames the directory to
``global_stepN`` and atomically replaces the ``latest`` pointer. A kill at any moment leaves
either the previous checkpoint or the new one as ``latest``, never half of one. On resume a
checkpoint whose files do not match its manifest is skipped, with a warning, for the previous one.
Resuming at another data-parallel size goes through DeepSpeed's universal checkpoint; a model with experts, at
another data- or expert-parallel size, through pretrain/reshard.py.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist

from pretrain import reshard
from pretrain.run_dir import LATEST, MANIFEST, complete_tags, damage, safe_load, sha256
from pretrain.watchdog import barrier_in_store, rank0_alone
from switchyard import deepspeed_compat
from switchyard.errors import ConfigError


class DiskFull(RuntimeError):
    """A save failed because the run directory's filesystem is full or over quota; the previous checkpoint is intact."""


def _disk_full(save_dir, error):
    """Why ``error`` (raised while writing a checkpoint) is a full disk, or None when it is something else.

    torch.save reports a full disk as an obscure RuntimeError of its zip writer ("unexpected pos ..."),
    without errno, so the filesystem's free space decides too: under 5% of it (at most 16 MiB) left."""
    chain = error
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return chain.strerror
        chain = chain.__cause__ or chain.__context__
    usage = shutil.disk_usage(save_dir)
    if usage.free < min(16 << 20, usage.total // 20):
        return f"{usage.free:,} of {usage.total:,} bytes free"
    return None


def _rng_path(directory, rank):
    return os.path.join(directory, f"rng_state_rank{rank}.pt")


def rng_states():
    """This rank's random generators: the CPU's, and the accelerator's where it has its own (CUDA's draws dropout
    masks on a GPU). DeepSpeed's checkpoints hold neither."""
    from deepspeed.accelerator import get_accelerator

    states = {"torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        states["accelerator"] = {"device": accelerator.device_name(), "state": accelerator.get_rng_state()}
    return states


def restore_rng_states(states):
    """Set this rank's generators to ``states`` (rng_states'); returns a one-line notice when the accelerator's could
    not be restored (saved on another kind of device, or before it was saved), else None."""
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(states["torch"])
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return None
    saved = states.get("accelerator")
    if saved is None or saved["device"] != accelerator.device_name():
        where = f"on {saved['device']}" if saved else "without it"
        return (
            f"notice: the checkpoint's {accelerator.device_name()} random state was saved {where}: dropout continues from the seed, not bit-exactly"
        )
    accelerator.set_rng_state(saved["state"])
    return None


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(path) or ".")


def _files(directory):
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            if name != MANIFEST:
                path = os.path.join(root, name)
                yield os.path.relpath(path, directory), path


def save(engine, save_dir, step, client_state, dp_size, keep_last=0):
    """Write checkpoint ``global_step{step}`` on every rank; keep the newest ``keep_last`` (0: all)."""
    tag = f"global_step{step}"
    partial = f"{tag}.partial"
    partial_dir = os.path.join(save_dir, partial)
    rank0_alone(lambda: shutil.rmtree(partial_dir, ignore_errors=True))  # left by a run killed while saving
    try:
        os.makedirs(partial_dir, exist_ok=True)
        torch.save(rng_states(), _rng_path(partial_dir, dist.get_rank()))
        engine.save_checkpoint(save_dir, tag=partial, client_state=client_state, save_latest=False)
    except Exception as e:
        why = _disk_full(save_dir, e)
        if why is None:
            raise
        previous = complete_tags(save_dir)
        raise DiskFull(
            f"no space left for checkpoint {tag} in {save_dir} ({why}); the previous checkpoint "
            f"{previous[0] if previous else '(none: this was the first)'} is intact and is what --resume continues "
            f"from: free space (or lower --keep_checkpoints), remove {partial_dir}, and resume"
        ) from e
    barrier_in_store()  # every rank's shards are on disk
    layout = {
        "dp_size": dp_size,
        "sequence_parallel_size": engine.sequence_parallel_size,
        "expert_parallel_size": _expert_parallel_size(engine.module),
    }
    rank0_alone(lambda: _complete(save_dir, tag, partial_dir, step, layout, keep_last))


def _expert_parallel_size(module):
    """The expert-parallel size of ``module``'s MoE layers (1 without any): a resume at another one converts the
    checkpoint (pretrain/ds_config.plan_resume reads it from the manifest)."""
    from deepspeed.moe.layer import MoE

    return max((layer.ep_size for layer in module.modules() if isinstance(layer, MoE)), default=1)


def _complete(save_dir, tag, partial_dir, step, layout, keep_last):
    """Rank 0, once every rank's shards are written: the manifest, the rename, ``latest``, the old checkpoints'
    removal (minutes for a large model on a slow filesystem, while the others wait in the store)."""
    manifest = {}
    for rel, path in _files(partial_dir):
        _fsync(path)
        manifest[rel] = {"bytes": os.path.getsize(path), "sha256": sha256(path)}
    _write_atomically(os.path.join(partial_dir, MANIFEST), json.dumps({"step": step, **layout, "files": manifest}, indent=1))
    final_dir = os.path.join(save_dir, tag)
    if os.path.isdir(final_dir):
        shutil.rmtree(final_dir)
    os.rename(partial_dir, final_dir)
    _write_atomically(os.path.join(save_dir, LATEST), tag)
    if keep_last:
        for old in complete_tags(save_dir)[keep_last:]:
            shutil.rmtree(os.path.join(save_dir, old))


def _to_universal(save_dir, tag):
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (world-size independent) beside it."""
    universal = f"{tag}_universal"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            os.path.join(save_dir, tag),
            "--output_folder",
            os.path.join(save_dir, universal),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            # DeepSpeed's converter wants Megatron's universal_checkpoint_info; a plain module needs none.
            "--inject_missing_state",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return universal


def load(engine, save_dir, universal=False, resharded=False):
    """Load the newest intact checkpoint; returns its client state (step, consumed_samples, ...).

    Rank 0 checks the files and tells the others its choice (rank0_alone), so every rank loads the same tag. With
    ``universal`` (another data-parallel size than the one saved; the engine was configured with
    ``checkpoint.load_universal``) rank 0 first converts it, and removes the conversion after loading. With
    ``resharded`` (a model with experts at another data- or expert-parallel size, ZeRO 1-2) DeepSpeed loads all but
    the optimizer state, which every rank then rebuilds from the saved files at its own sizes (pretrain/reshard.py).
    """
    tag = rank0_alone(lambda: _newest_intact(save_dir))
    if isinstance(tag, ConfigError):
        raise tag
    load_tag = rank0_alone(lambda: _to_universal(save_dir, tag)) if universal else tag
    deepspeed_compat.load_checkpoints_through(engine, safe_load)  # DeepSpeed's engine unpickles with weights_only=False
    path, client_state = engine.load_checkpoint(save_dir, tag=load_tag, load_optimizer_states=not resharded)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load {os.path.join(save_dir, load_tag)}")
    if resharded:
        reshard.load_optimizer_state(engine, os.path.join(save_dir, tag))
    deepspeed_compat.replay_cpu_adam_bias_correction(engine.optimizer)
    rng_path = _rng_path(os.path.join(save_dir, tag), dist.get_rank())
    if os.path.isfile(rng_path):  # absent for ranks beyond the saved world size
        notice = restore_rng_states(safe_load(rng_path))
        if notice and dist.get_rank() == 0:
            print(notice, flush=True)
    barrier_in_store()  # every rank has loaded (its own shards, at its own pace), the conversion may go
    if universal:
        rank0_alone(lambda: _remove_universal(save_dir, load_tag))
    return client_state


def _newest_intact(save_dir):
    """Rank 0: the newest checkpoint whose files match their manifest (each is hashed whole: minutes for a large
    model, while the others wait in the store), or the ConfigError every rank raises when none is."""
    damaged = []
    for tag in complete_tags(save_dir):
        problem = damage(save_dir, tag)
        if problem is None:
            return tag
        damaged.append(f"{tag}: {problem}")
        print(f"warning: checkpoint {os.path.join(save_dir, tag)} is damaged ({problem}); trying the previous one", file=sys.stderr, flush=True)
    return ConfigError(
        f"--resume: every checkpoint in {save_dir} is damaged ({'; '.join(damaged) or 'none found'}); "
        f"nothing intact to resume from: restore one from a backup, or start a new run"
    )


def _remove_universal(save_dir, universal):
    shutil.rmtree(os.path.join(save_dir, universal))
    os.remove(os.path.join(save_dir, "latest_universal"))  # the converter's pointer; ours is ``latest``
