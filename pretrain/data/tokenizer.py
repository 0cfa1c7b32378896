"""Tokenizers: raw UTF-8 bytes (no training needed) or a trained sentencepiece model.

Both expose vocab_size, eos_id, encode(str) -> list[int], decode(list[int]) -> str, and a
``spec`` dict that checkpoints record so evaluation decodes with the same tokenizer.
"""

import hashlib
import os

import sentencepiece as spm

from switchyard.errors import ConfigError


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-document id 256 (as ByT5 does, without its specials)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def spec(self):
        return {"type": "bytes"}


class SentencePieceTokenizer:
    def __init__(self, model_path):
        if not os.path.isfile(model_path):
            raise ConfigError(f"tokenizer {model_path} does not exist; train one with python -m pretrain.tokenizer or pass --tokenizer bytes")
        self.model_path = os.path.abspath(model_path)
        with open(model_path, "rb") as f:  # the identity of the tokenizer, wherever the file is moved
            self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except RuntimeError:  # "could not parse ModelProto", or for an empty file "unk is not defined"
            raise ConfigError(
                f"tokenizer {model_path} is not a sentencepiece model; pass a .model file written by "
                f"python -m pretrain.tokenizer, or --tokenizer bytes"
            ) from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.sp.piece_to_id("</s>")

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(ids)

    @property
    def spec(self):
        return {"type": "sentencepiece", "path": self.model_path, "sha256": self.sha256}


def load_tokenizer(name_or_path):
    """``bytes`` or a sentencepiece ``.model`` file."""
    if name_or_path in (None, "bytes"):
        return ByteTokenizer()
    return SentencePieceTokenizer(name_or_path)


def _describe(spec):
    return "bytes" if spec["type"] == "bytes" else f"{spec['path']} (sha256 {spec['sha256'][:12]})"


def _same(spec, other):
    return spec["type"] == other["type"] and spec.get("sha256") == other.get("sha256")


def tokenizer_for_data(name_or_path, made_with):
    """The tokenizer for training data, some of it preprocessed: ``made_with`` maps each index file to the
    spec of the tokenizer its tokens were made with. Without --tokenizer (None) that one is used (found
    at its recorded path or, moved with the data, beside the index); every index must match the choice."""
    if name_or_path is None and made_with:
        index_path, spec = next(iter(made_with.items()))
        if spec["type"] == "bytes":
            tokenizer = ByteTokenizer()
        else:
            beside = os.path.join(os.path.dirname(index_path), os.path.basename(spec["path"]))
            path = spec["path"] if os.path.isfile(spec["path"]) else beside
            if not os.path.isfile(path):
                raise ConfigError(
                    f"{index_path} was made with tokenizer {spec['path']}, which no longer exists (nor beside "
                    f"the index); pass --tokenizer with that .model file"
                )
            tokenizer = SentencePieceTokenizer(path)
    else:
        tokenizer = load_tokenizer(name_or_path)
    fix = (
        "drop --tokenizer to use the one it was made with"
        if name_or_path is not None
        else "preprocess training and validation data with one tokenizer"
    )
    for index_path, spec in made_with.items():
        if not _same(spec, tokenizer.spec):
            raise ConfigError(f"{index_path} was made with tokenizer {_describe(spec)}, not {_describe(tokenizer.spec)}; {fix}")
    return tokenizer


def check_fits_model(tokenizer, vocab_size, model_config_path):
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids but model config {model_config_path} has vocab_size "
            f"{vocab_size}; set vocab_size >= {tokenizer.vocab_size} or use the tokenizer the model was made for"
        )
