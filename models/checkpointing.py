"""Activation checkpointing of a model's blocks, through DeepSpeed's ``deepspeed.checkpointing``.

A checkpointed block keeps only its inputs in the forward and runs again in the backward to recompute the
rest, trading one more forward of the block for its activations' memory. Which blocks: the model config's
``checkpoint_activations`` (0: none; N: blocks 0, N, 2N, ... of the block loop, counted over the encoder's
layers then the decoder's in an encoder-decoder). How: DeepSpeed's ``checkpoint`` (reentrant, an autograd
Function) or ``non_reentrant_checkpoint`` (saved-tensor hooks), chosen by the DeepSpeed config's
``"activation_checkpointing": {"use_reentrant": ...}`` at launch (``checkpoint_reentrant``, a launch field).
Both restore the CPU and accelerator RNG states for the recomputation, so dropout draws the same masks twice
(tests/models/test_checkpointing.py). The rest of that section (DeepSpeed's own keys) is applied by
``deepspeed.checkpointing.configure`` at launch (pretrain/main.py).
"""

from dataclasses import dataclass, field

import torch

from models.registry import TRAINING_SETTING


@dataclass
class ActivationCheckpointing:
    """The checkpointing fields of a config; a family's config inherits it and its ``problem`` calls
    ``checkpoint_problem``. A training setting: it changes what is kept in memory, not the weights or the
    arithmetic, so a resumed run may change it."""

    checkpoint_activations: int = field(default=0, metadata=TRAINING_SETTING)
    # Set at launch from the DeepSpeed config's activation_checkpointing.use_reentrant, never in a model file.
    checkpoint_reentrant: bool = field(default=True, metadata={"from_launch": True})

    def checkpoint_problem(self):
        if self.checkpoint_activations < 0:
            return f"checkpoint_activations must be 0 (no block checkpointed) or N >= 1 (every Nth block), got {self.checkpoint_activations}"
        return None

    def checkpoints_block(self, index):
        """Whether block ``index`` of the block loop recomputes its activations in the backward."""
        return self.checkpoint_activations > 0 and index % self.checkpoint_activations == 0


def run_block(config, index, block, *args, forward=None):
    """``block(*args)`` (or ``forward(*args)``, a method of ``block``), checkpointed when ``config`` says so for block ``index`` and a backward will follow
    (training with gradients on: evaluation and generation keep no activations anyway).

    The arguments must be tensors or None where gradients flow (a tuple of tensors is passed through by the
    reentrant checkpoint as an object, without gradients: unpack it)."""
    forward = forward or block
    if not (config.checkpoints_block(index) and block.training and torch.is_grad_enabled()):
        return forward(*args)
    from deepspeed import checkpointing

    if config.checkpoint_reentrant:
        return checkpointing.checkpoint(forward, *args)
    return checkpointing.non_reentrant_checkpoint(forward, *args)
