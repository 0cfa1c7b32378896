"""Language-model samples: a token stream cut into fixed-length windows, read in a seeded order.

The order is a pure function of (seed, sample number), so the position in the data is one
integer, ``consumed_samples``: a resumed run recomputes exactly the batches an uninterrupted
run would have drawn. Within a global batch, rank r of W reads micro-batch slice r, so ranks
read disjoint samples and the union over ranks is the same global batch for any W.
"""
import numpy as np
import torch

from models.registry import ConfigError


def read_text_tokens(path, tokenizer):
    """Tokenize a UTF-8 text file; documents are separated by blank lines and end with EOS."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist; pass an existing UTF-8 text file")
    if not raw.strip():
        raise ConfigError(f"data file {path} is empty; pass a file with text in it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"data file {path} line {line} is not UTF-8 (byte {e.start}); convert it, e.g. iconv -t UTF-8")
    ids = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids.extend(tokenizer.encode(doc + "\n\n"))
            ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int32)


def split_tokens(tokens, val_fraction):
    """Train on the head, validate on the tail (a contiguous split keeps validation text unseen)."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


class LMSamples:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets)."""

    def __init__(self, tokens, seq_len, name):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_samples = (len(tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise ConfigError(f"{name} has {len(tokens)} tokens, fewer than one sample of seq_len {seq_len}; use more data or a shorter --seq_len")

    def __getitem__(self, i):
        window = self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1]
        return torch.from_numpy(window.astype(np.int64))


class SeededOrder:
    """Sample number k -> sample index: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_samples, seed):
        self.num_samples = num_samples
        self.seed = seed
        self._epoch, self._perm = None, None

    def __call__(self, k):
        epoch, pos = divmod(k, self.num_samples)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._perm[pos])


def micro_batch(samples, order, consumed_samples, micro_step, micro_batch_size, dp_rank, dp_size):
    """The (B, seq_len + 1) tensor of one micro-batch of the global batch starting at consumed_samples."""
    first = consumed_samples + (micro_step * dp_size + dp_rank) * micro_batch_size
    return torch.stack([samples[order(k)] for k in range(first, first + micro_batch_size)])
