"""Sentence pairs (translation, summarization) and token-budget batches, as fairseq builds them.

Files (``python -m pretrain.preprocess_pairs``): PREFIX.src.bin/.idx and PREFIX.tgt.bin/.idx, two
token files of pretrain/data/indexed.py with one document per sentence, each ending with EOS; pair
i is document i of both.

API, for a task such as translation:

    pairs = PairDataset("data/multi30k.train")            # memory-mapped; pairs.src(i), pairs.tgt(i), lengths
    batches = TokenBudgetBatches(pairs, max_tokens=4096, max_positions=256, pad_id=0, bos_id=2,
                                 seed=1234, dp_rank=rank, dp_size=world)
    batches.skipped, batches.padding_fraction              # pairs over max_positions; padding share of all batches
    batch = batches.batch(k)                               # k-th batch of this rank, k = 0, 1, 2, ... over epochs
    batch["src"], batch["src_lengths"], batch["tgt_in"], batch["tgt_out"], batch["tgt_lengths"], batch["src_padded"]

A batch is a dict of LongTensors and one bool: ``src`` (B, S) and ``tgt_out`` (B, T) are the stored sentences
(each ending with EOS) right-padded with ``pad_id``; ``tgt_in`` is ``tgt_out`` shifted right behind
``bos_id`` (teacher forcing: position t predicts tgt_out[t] from tgt_in[:t + 1]); the lengths say
which positions are real (pad_id is only a fill value: mask with the lengths, or ignore_index=pad_id
when pad_id is a reserved id such as sentencepiece's 0 from pretrain.tokenizer). ``src_padded`` says,
from the host's copy of the lengths, whether any source is padded: a batch without source padding needs
no attention mask, which lets a GPU run FlashAttention (models/transformer.py), and the model learns it
without reading the lengths back from the device.

Batching: pairs whose source or target is longer than ``max_positions`` tokens are skipped and
counted (never truncated). The rest are sorted by (source length, target length), ties in a
seeded random order, and cut in that order into batches whose padded size, longest x sentences,
stays within ``max_tokens`` for source and for target alike, so sentences of similar length share a
batch and padding stays low. Each epoch the batch order is shuffled by (seed, epoch); batch j of an
epoch goes to rank j % dp_size, and the last len % dp_size batches of the epoch are left out, so
every rank takes the same number of batches per epoch (``len(batches)``) and ranks never share one.
``batch(k)`` is a pure function of (seed, k): a checkpoint needs only k to resume exactly.
"""

import numpy as np
import torch

from pretrain.data.indexed import IndexedTokens
from switchyard.errors import ConfigError


class PairDataset:
    """Memory-mapped sentence pairs of PREFIX.src and PREFIX.tgt."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        self.source = IndexedTokens(f"{prefix}.src")
        self.target = IndexedTokens(f"{prefix}.tgt")
        n_src, n_tgt = len(self.source.offsets) - 1, len(self.target.offsets) - 1
        if n_src != n_tgt:
            raise ConfigError(
                f"{self.source.idx_path} has {n_src} sentences but {self.target.idx_path} has {n_tgt}; "
                f"they were not written together: re-run python -m pretrain.preprocess_pairs"
            )
        self.src_lengths = np.diff(self.source.offsets)
        self.tgt_lengths = np.diff(self.target.offsets)

    def __len__(self):
        return len(self.src_lengths)

    def src(self, i):
        return self.source.tokens[self.source.offsets[i] : self.source.offsets[i + 1]]

    def tgt(self, i):
        return self.target.tokens[self.target.offsets[i] : self.target.offsets[i + 1]]

    @property
    def src_tokenizer_spec(self):
        return self.source.tokenizer_spec

    @property
    def tgt_tokenizer_spec(self):
        return self.target.tokenizer_spec


def cut_by_token_budget(order, src_lengths, tgt_lengths, max_tokens):
    """Split ``order`` (indices, in order) into consecutive batches whose longest source and longest
    target, times the number of sentences, each stay within max_tokens (fairseq's batch_by_size)."""
    batches, start, longest_src, longest_tgt = [], 0, 0, 0
    for end, i in enumerate(order):
        src_len, tgt_len = max(longest_src, src_lengths[i]), max(longest_tgt, tgt_lengths[i])
        if end > start and max(src_len, tgt_len) * (end - start + 1) > max_tokens:
            batches.append(order[start:end])
            start, src_len, tgt_len = end, src_lengths[i], tgt_lengths[i]
        longest_src, longest_tgt = src_len, tgt_len
    if len(order) > start:
        batches.append(order[start:])
    return batches


def pad(rows, lengths, pad_id):
    """(B, longest) int64 array of the rows, right-padded with pad_id."""
    out = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.concatenate(rows)  # row-major: row by row, in order
    return out


class TokenBudgetBatches:
    """Length-sorted batches of a PairDataset within a token budget, shuffled per epoch, sharded over ranks."""

    def __init__(self, pairs, max_tokens, max_positions, pad_id, bos_id, seed, dp_rank=0, dp_size=1):
        if max_positions < 1 or max_tokens < max_positions:
            raise ConfigError(
                f"max_tokens ({max_tokens}) must be >= max_positions ({max_positions}) >= 1, so that every pair that is kept fits in a batch"
            )
        self.pairs, self.pad_id, self.bos_id = pairs, pad_id, bos_id
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        src_lengths, tgt_lengths = pairs.src_lengths, pairs.tgt_lengths
        fits = (src_lengths <= max_positions) & (tgt_lengths <= max_positions)
        self.skipped = int((~fits).sum())
        tie_break = np.random.default_rng(seed).permutation(len(pairs))
        order = np.lexsort((tie_break, tgt_lengths, src_lengths))  # the last key sorts first
        self.all_batches = cut_by_token_budget(order[fits[order]], src_lengths, tgt_lengths, max_tokens)
        if len(self.all_batches) < dp_size:
            raise ConfigError(
                f"{pairs.prefix} makes {len(self.all_batches)} batches of max_tokens {max_tokens}, fewer than "
                f"the {dp_size} data-parallel ranks; use more data or a smaller max_tokens"
            )
        real = sum(int(src_lengths[b].sum() + tgt_lengths[b].sum()) for b in self.all_batches)
        padded = sum(len(b) * int(src_lengths[b].max() + tgt_lengths[b].max()) for b in self.all_batches)
        self.padding_fraction = 1.0 - real / padded
        self._epoch, self._epoch_order = None, None

    def __len__(self):
        """Batches per rank per epoch."""
        return len(self.all_batches) // self.dp_size

    def indices(self, k):
        """Pair indices of this rank's k-th batch (k counts on across epochs)."""
        epoch, step = divmod(k, len(self))
        if epoch != self._epoch:
            self._epoch = epoch
            self._epoch_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.all_batches))
        return self.all_batches[self._epoch_order[step * self.dp_size + self.dp_rank]]

    def batch(self, k):
        indices = self.indices(k)
        src_lengths, tgt_lengths = self.pairs.src_lengths[indices], self.pairs.tgt_lengths[indices]
        tgt_out = pad([self.pairs.tgt(i) for i in indices], tgt_lengths, self.pad_id)
        tgt_in = np.roll(tgt_out, 1, axis=1)  # shifted right behind BOS; the EOS drops off each row's end
        tgt_in[:, 0] = self.bos_id
        tgt_in[np.arange(tgt_in.shape[1]) >= tgt_lengths[:, None]] = self.pad_id
        return {
            "src": torch.from_numpy(pad([self.pairs.src(i) for i in indices], src_lengths, self.pad_id)),
            "src_lengths": torch.from_numpy(src_lengths.astype(np.int64)),
            "tgt_in": torch.from_numpy(tgt_in),
            "tgt_out": torch.from_numpy(tgt_out),
            "tgt_lengths": torch.from_numpy(tgt_lengths.astype(np.int64)),
            "src_padded": bool(src_lengths.min() < src_lengths.max()),
        }
