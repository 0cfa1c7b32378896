"""PREFIX.bin / PREFIX.idx: round trip, uint16 vs uint32, atomic writes, mismatched pairs refused."""

import os

import numpy as np
import pytest

from pretrain.data.indexed import IndexedTokens, IndexedWriter, prefix_of, token_dtype
from switchyard.errors import ConfigError

SPEC = {"type": "bytes"}


def write(prefix, docs, vocab_size=257):
    with IndexedWriter(str(prefix), vocab_size, SPEC) as writer:
        for chunk in (docs[:2], docs[2:]):  # two add() calls: offsets continue across chunks
            writer.add(np.concatenate(chunk), [len(d) for d in chunk])
    return writer


def test_dtype_is_uint16_while_the_vocabulary_fits():
    assert token_dtype(257) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == token_dtype(250_000) == np.uint32


@pytest.mark.parametrize("vocab_size,itemsize", [(320, 2), (100_000, 4)])
def test_round_trip(tmp_path, vocab_size, itemsize):
    docs = [np.array([5, 6, 0]), np.array([vocab_size - 1, 0]), np.array([7, 0]), np.array([1, 2, 3, 0])]
    write(tmp_path / "c", docs, vocab_size)
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]  # the .tmp names are gone
    assert (tmp_path / "c.bin").stat().st_size == 11 * itemsize
    data = IndexedTokens(tmp_path / "c.bin")
    assert isinstance(data.tokens, np.memmap) and data.tokens.dtype.itemsize == itemsize
    assert data.tokens.tolist() == np.concatenate(docs).tolist()
    assert data.offsets.tolist() == [0, 3, 5, 7, 11]
    assert data.footer["vocab_size"] == vocab_size and data.footer["num_docs"] == 4 and data.tokenizer_spec == SPEC


def test_a_failed_write_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedWriter(str(tmp_path / "c"), 257, SPEC) as writer:
            writer.add(np.array([1, 256]), [2])
            raise RuntimeError("input broke off")
    assert os.listdir(tmp_path) == []


def test_prefix_or_bin_names_preprocessed_data(tmp_path):
    (tmp_path / "corpus.bin").touch()
    (tmp_path / "notes.txt").touch()
    assert prefix_of(tmp_path / "corpus") == prefix_of(tmp_path / "corpus.bin") == str(tmp_path / "corpus")
    assert prefix_of(tmp_path / "notes.txt") is None


def swap_bin(tmp_path):
    write(tmp_path / "other", [np.array([1, 0])] * 5)
    os.replace(tmp_path / "other.bin", tmp_path / "c.bin")


def corrupt(offset, data):
    def damage(tmp_path):
        with open(tmp_path / "c.idx", "r+b") as f:
            f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
            f.write(data)

    return damage


@pytest.mark.parametrize(
    "damage,expected",
    [
        (swap_bin, "c.bin has 20 bytes but"),
        (corrupt(0, b"NOTMAGIC"), "c.idx is not a Switchyard token index (wrong magic)"),
        (corrupt(-8, np.array([10**6], "<u8").tobytes()), "c.idx is truncated or corrupt"),
        (corrupt(8 + 3 * 8, np.array([99], "<i8").tobytes()), "c.idx is corrupt (its offsets end at 99, not 7)"),
        (lambda t: os.truncate(t / "c.idx", os.path.getsize(t / "c.idx") - 9), "c.idx is truncated or corrupt"),
        (lambda t: os.remove(t / "c.idx"), "c.idx does not exist"),
    ],
)
def test_a_pair_that_does_not_match_is_refused_in_one_line(tmp_path, damage, expected):
    write(tmp_path / "c", [np.array([1, 2, 0]), np.array([3, 0]), np.array([4, 0])])
    damage(tmp_path)
    with pytest.raises(ConfigError) as refused:
        IndexedTokens(tmp_path / "c")
    message = str(refused.value)
    assert message.startswith(str(tmp_path / expected.split()[0])) and expected in message and "\n" not in message
