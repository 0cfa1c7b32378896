"""Tokenizers: raw UTF-8 bytes (no training needed) or a trained sentencepiece model.

Both expose vocab_size, eos_id, encode(str) -> list[int], decode(list[int]) -> str, and a
``spec`` dict that checkpoints record so evaluation decodes with the same tokenizer.
"""
import os

import sentencepiece as spm

from models.registry import ConfigError


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
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.sp.piece_to_id("</s>")

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(ids)

    @property
    def spec(self):
        return {"type": "sentencepiece", "path": self.model_path}


def load_tokenizer(name_or_path):
    """``bytes`` or a sentencepiece ``.model`` file."""
    if name_or_path in (None, "bytes"):
        return ByteTokenizer()
    return SentencePieceTokenizer(name_or_path)


def check_fits_model(tokenizer, vocab_size, model_config_path):
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but model config {model_config_path} has vocab_size "
                          f"{vocab_size}; set vocab_size >= {tokenizer.vocab_size} or use the tokenizer the model was made for")
