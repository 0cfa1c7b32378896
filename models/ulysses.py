"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al. 2023), the model's side.

The ranks of a sequence-parallel group read the same sequences and each holds one contiguous slice of every
one: rank r of S the tokens r x T/S ... (r + 1) x T/S - 1 (``sequence_slice``). Everything in a block but
attention acts on each token alone and runs on the slice as it is; attention exchanges the slices for heads
(deepspeed.sequence.layer.DistributedAttention, an all-to-all), so each rank attends over the whole sequence with
n_heads / S of the query heads (and n_kv_heads / S of the key/value heads: a query head's kv head goes to the same
rank), and exchanges the result back. Rotary positions are applied inside the attention, after the exchange, on
the whole sequence (where DistributedAttention applies its own ``rotary_pos_emb``); learned positions are added to
the slice at its offset, r x T/S.

A family that can run so declares it at registration (``sequence_parallel``: the head counts the size must
divide, models/registry.py); its attention modules have a ``ulysses`` attribute (None: the sequence is whole) and
a ``local_attention(q, k, v)`` over batch-first [B, T, heads, D] tensors, and the model a ``sequence_slice``
attribute its positions read.

The process groups are DeepSpeed's own (parallel_state_sp: switchyard/deepspeed_compat.py), passed to
``deepspeed.initialize`` as ``mpu``: the engine then reduces gradients over the sequence- and data-parallel ranks
together and divides by the data-parallel size only (each sequence-parallel rank contributes its slice's part of
the sequence's gradient). DeepSpeed's other route, ``sequence_parallel_size`` with ``data_parallel_size`` in the
JSON, builds a device mesh whose gradient reduction leaves the sequence-parallel ranks out: their weights drift
apart silently (tests/models/test_ulysses.py shows it; pretrain/ds_config.py refuses it).
"""

from dataclasses import dataclass

import torch.distributed as dist
from deepspeed.sequence.layer import DistributedAttention

from switchyard import deepspeed_compat


@dataclass(frozen=True)
class SequenceSlice:
    """Which slice of each sequence this rank holds: ``rank`` of ``size`` equal ones."""

    rank: int
    size: int

    def first_position(self, slice_len):
        return self.rank * slice_len


def sequence_slice(tokens, rank, size):
    """Rank ``rank``'s slice of ``tokens`` [B, T + 1] (a window: inputs and the targets shifted by one), as
    [B, T / size + 1]: its inputs are tokens[r T/S : (r+1) T/S] and its targets the next token of each."""
    length = (tokens.shape[1] - 1) // size
    return tokens[:, rank * length : (rank + 1) * length + 1]


class UlyssesAttention(DistributedAttention):
    """DistributedAttention over batch-first [B, T / S, heads, D] queries, keys and values: heads are scattered
    (dim 2) and the sequence gathered (dim 1), and back after ``local_attention``."""

    def __init__(self, local_attention, group):
        super().__init__(local_attention, group, scatter_idx=2, gather_idx=1)

    def forward(self, q, k, v):
        return super().forward(q, k, v, 0)


def split_sequences(model, size):
    """Make ``model`` (of a family that declares ``sequence_parallel``) read slices of sequences split over groups
    of ``size`` ranks; returns the mpu to pass to ``deepspeed.initialize``."""
    mpu = deepspeed_compat.sequence_parallel_mpu(size)
    split_over(model, mpu.get_sequence_parallel_group())
    return mpu


def split_over(model, group):
    """Make ``model`` read its slice of sequences split over the ranks of process group ``group``."""
    model.sequence_slice = SequenceSlice(dist.get_rank(group), dist.get_world_size(group))
    attentions = [module for module in model.modules() if hasattr(module, "ulysses")]
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no attention that splits sequences (no 'ulysses' attribute)")
    for module in attentions:
        module.ulysses = UlyssesAttention(module.local_attention, group)
