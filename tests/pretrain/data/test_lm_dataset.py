"""LM samples and their seeded order: disjoint rank shards, same global batches for any world size;
documents streamed from text and JSON Lines files."""

import numpy as np
import pytest
import torch

from pretrain.data.lm_dataset import LMSamples, SeededOrder, micro_batch, read_documents, read_text_tokens
from pretrain.data.tokenizer import ByteTokenizer
from switchyard.errors import ConfigError


def samples_and_order(n_tokens=1000, seq_len=9, seed=3):
    tokens = np.arange(n_tokens, dtype=np.int32)
    samples = LMSamples(tokens, seq_len, "test")
    return samples, SeededOrder(samples.num_samples, seed)


def global_batch(samples, order, consumed, batch, micro, world):
    rows = []
    for micro_step in range(batch // (micro * world)):
        for rank in range(world):
            rows.append(micro_batch(samples, order, consumed, micro_step, micro, rank, world))
    return torch.cat(rows)


def test_windows_are_inputs_and_shifted_targets():
    samples, _ = samples_and_order()
    assert samples.num_samples == 111
    assert samples[2].tolist() == list(range(18, 28))


def test_ranks_read_disjoint_samples_and_any_world_sees_the_same_global_batch():
    samples, order = samples_and_order()
    one = global_batch(samples, order, 16, 8, 2, 1)
    two = global_batch(samples, order, 16, 8, 2, 2)
    assert sorted(map(tuple, one.tolist())) == sorted(map(tuple, two.tolist()))
    rank0 = micro_batch(samples, order, 16, 0, 2, 0, 2)
    rank1 = micro_batch(samples, order, 16, 0, 2, 1, 2)
    assert not set(map(tuple, rank0.tolist())) & set(map(tuple, rank1.tolist()))


def test_order_is_a_permutation_per_epoch_reproducible_from_the_seed():
    samples, order = samples_and_order()
    epoch0 = [order(k) for k in range(samples.num_samples)]
    epoch1 = [order(k) for k in range(samples.num_samples, 2 * samples.num_samples)]
    assert sorted(epoch0) == list(range(samples.num_samples)) and epoch0 != epoch1
    assert [SeededOrder(samples.num_samples, 3)(k) for k in range(50)] == epoch0[:50]
    assert [SeededOrder(samples.num_samples, 4)(k) for k in range(50)] != epoch0[:50]


def test_text_documents_end_with_eos(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab\n\ncd")
    assert read_text_tokens(path, ByteTokenizer()).tolist() == [97, 98, 10, 10, 256, 99, 100, 10, 10, 256]


def test_streamed_paragraphs_are_the_pieces_of_splitting_the_whole_file(tmp_path):
    """read_documents reads line by line; its documents must be exactly str.split("\\n\\n") of the whole text
    (with "\\n\\n" put back, blank pieces dropped), whatever runs of newlines and spaces the text has."""
    rng = np.random.default_rng(0)
    for case in range(200):
        text = "".join(rng.choice(["a", "b", " ", "\n"], size=rng.integers(1, 40), p=[0.3, 0.2, 0.1, 0.4]))
        path = tmp_path / f"{case}.txt"
        path.write_text(text)
        expected = [doc + "\n\n" for doc in text.split("\n\n") if doc.strip()]
        if not expected:
            with pytest.raises(ConfigError, match="is empty"):
                list(read_documents(path))
            continue
        documents = list(read_documents(path))
        assert [doc for doc, _ in documents] == expected, repr(text)
        assert sum(n for _, n in documents) == len(text.encode())  # every byte is counted once (progress, MB/s)


def test_line_and_json_lines_documents(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("one two\n\n  \nthree\n")
    assert [doc for doc, _ in read_documents(lines, per_line=True)] == ["one two", "three"]
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "x y", "id": 1}\n\n{"text": ["s1", "s2"]}\n')
    assert [doc for doc, _ in read_documents(records)] == ["x y", "s1\ns2"]


@pytest.mark.parametrize(
    "name,content,field,expected",
    [
        ("empty.txt", b"", "text", "data file {} is empty"),
        ("blank.jsonl", b"\n\n", "text", "data file {} is empty"),
        ("latin1.txt", "caf\u00e9\n\nna\u00efve".encode("latin-1"), "text", "data file {} line 1 is not UTF-8 (byte 3)"),
        ("missing.jsonl", b'{"text": "a"}\n{"summary": "b"}\n', "text", "data file {} line 2 has no field 'text' (it has 'summary')"),
        ("badjson.jsonl", b'{"text": "a"}\n{"text": \n', "text", "data file {} line 2 is not valid JSON"),
        ("number.jsonl", b'{"text": 3}\n', "text", "data file {} line 1 field 'text' is int, not text"),
    ],
)
def test_bad_documents_are_refused_naming_file_and_line(tmp_path, name, content, field, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        list(read_documents(path, field=field))
    assert str(refused.value).startswith(expected.format(path)) and "\n" not in str(refused.value)
