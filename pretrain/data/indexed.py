"""Preprocessed token files: ``PREFIX.bin`` holds the token ids of every document (each ending
with EOS) back to back, ``PREFIX.idx`` says how to read them.

    PREFIX.bin   little-endian uint16 ids when the vocabulary fits in 65,536, else uint32
    PREFIX.idx   MAGIC | int64 offsets[num_docs + 1] | JSON footer | uint64 footer length

Document d is tokens[offsets[d]:offsets[d + 1]]. The footer (dtype, vocab_size, tokenizer spec
with its sha256, num_docs, num_tokens, source) comes last so that the writer streams offsets out
as it goes and never holds them. Both files are written under ``.tmp`` names and renamed when
complete; a reader refuses any pair whose sizes disagree with the footer, so a half-written,
truncated or mismatched pair is never read as data.
"""

import json
import os

import numpy as np

from switchyard.errors import ConfigError

MAGIC = b"SWYDIDX1"
VERSION = 1
_INT64 = np.dtype("<i8")
_FOOTER_LEN = np.dtype("<u8")


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def prefix_of(path):
    """PREFIX for ``PREFIX`` or ``PREFIX.bin`` when that names preprocessed tokens, else None (a text file)."""
    path = str(path)
    if path.endswith(".bin"):
        return path[: -len(".bin")]
    if not os.path.isfile(path) and os.path.isfile(path + ".bin"):
        return path
    return None


class IndexedWriter:
    """Context manager: add() chunks of documents; on a clean exit the footer is written and both files
    are renamed into place, on an exception the temporary files are removed."""

    def __init__(self, prefix, vocab_size, tokenizer_spec, source=None):
        self.bin_path, self.idx_path = f"{prefix}.bin", f"{prefix}.idx"
        self.dtype = token_dtype(vocab_size)
        self.footer = {"version": VERSION, "dtype": self.dtype.str, "vocab_size": vocab_size, "tokenizer": tokenizer_spec, "source": source}
        self.num_docs = self.num_tokens = 0

    def __enter__(self):
        self._bin = open(self.bin_path + ".tmp", "wb")
        self._idx = open(self.idx_path + ".tmp", "wb")
        self._idx.write(MAGIC)
        self._idx.write(np.zeros(1, _INT64).tobytes())  # offsets[0]
        return self

    def add(self, tokens, doc_lengths):
        """Append documents: their tokens back to back (each ending with EOS) and their lengths."""
        self._bin.write(np.asarray(tokens, self.dtype).tobytes())
        self._idx.write((self.num_tokens + np.cumsum(doc_lengths, dtype=_INT64)).tobytes())
        self.num_docs += len(doc_lengths)
        self.num_tokens += len(tokens)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            footer = json.dumps({**self.footer, "num_docs": self.num_docs, "num_tokens": self.num_tokens}).encode()
            self._idx.write(footer)
            self._idx.write(np.array([len(footer)], _FOOTER_LEN).tobytes())
        for f in (self._bin, self._idx):
            f.close()
        for path in (self.bin_path, self.idx_path):
            if exc_type is None:
                os.replace(path + ".tmp", path)
            else:
                os.remove(path + ".tmp")


class IndexedTokens:
    """The memory-mapped tokens (``tokens``) and document ``offsets`` of PREFIX.bin / PREFIX.idx."""

    def __init__(self, path):
        prefix = prefix_of(path) or str(path)
        self.bin_path, self.idx_path = f"{prefix}.bin", f"{prefix}.idx"
        self.footer = self._read_footer()
        self.dtype = np.dtype(self.footer["dtype"])
        num_docs, num_tokens = self.footer["num_docs"], self.footer["num_tokens"]
        bin_size = os.path.getsize(self.bin_path)
        if bin_size != num_tokens * self.dtype.itemsize:
            raise ConfigError(
                f"{self.bin_path} has {bin_size} bytes but {self.idx_path} describes {num_tokens} tokens of "
                f"{self.dtype.itemsize} bytes; the two were not written together: re-run python -m pretrain.preprocess"
            )
        self.tokens = np.memmap(self.bin_path, self.dtype, mode="r", shape=(num_tokens,))
        self.offsets = np.memmap(self.idx_path, _INT64, mode="r", offset=len(MAGIC), shape=(num_docs + 1,))
        if self.offsets[-1] != num_tokens:
            raise ConfigError(
                f"{self.idx_path} is corrupt (its offsets end at {self.offsets[-1]}, not {num_tokens}); re-run python -m pretrain.preprocess"
            )

    def _read_footer(self):
        fix = "re-run python -m pretrain.preprocess"
        for path in (self.bin_path, self.idx_path):
            if not os.path.isfile(path):
                raise ConfigError(f"{path} does not exist; preprocessed data is a PREFIX.bin and PREFIX.idx pair: {fix}")
        size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ConfigError(f"{self.idx_path} is not a Switchyard token index (wrong magic); {fix}")
            try:
                f.seek(size - _FOOTER_LEN.itemsize)
                footer_len = int(np.frombuffer(f.read(_FOOTER_LEN.itemsize), _FOOTER_LEN)[0])
                f.seek(size - _FOOTER_LEN.itemsize - footer_len)
                footer = json.loads(f.read(footer_len))
                expected = len(MAGIC) + (footer["num_docs"] + 1) * _INT64.itemsize + footer_len + _FOOTER_LEN.itemsize
            except (OSError, ValueError, KeyError, TypeError):  # a seek before the start, bad JSON, a missing key
                raise ConfigError(f"{self.idx_path} is truncated or corrupt; {fix}")
        if footer.get("version") != VERSION:
            raise ConfigError(f"{self.idx_path} is format version {footer.get('version')}, this code reads {VERSION}; {fix}")
        if size != expected:
            raise ConfigError(f"{self.idx_path} has {size} bytes, not the {expected} its footer describes; {fix}")
        return footer

    @property
    def tokenizer_spec(self):
        return self.footer["tokenizer"]
