"""Sentence pairs and token-budget batches: budgets kept, long pairs skipped and counted, every kept
pair once per epoch, disjoint equal shards per rank, a pure function of (seed, k)."""

import numpy as np
import pytest
import torch

from pretrain.data.indexed import IndexedWriter
from pretrain.data.pairs import PairDataset, TokenBudgetBatches
from switchyard.errors import ConfigError

EOS = 3


def write_side(prefix, sentences):
    with IndexedWriter(prefix, 64, {"type": "test"}) as writer:
        writer.add(np.concatenate(sentences), [len(s) for s in sentences])


def random_pairs(tmp_path, n=300, seed=0, longest=40):
    """Pair i: source of random length whose tokens are all 4 + i % 50, target of another random length."""
    rng = np.random.default_rng(seed)
    src = [np.append(np.full(rng.integers(1, longest), 4 + i % 50), EOS) for i in range(n)]
    tgt = [np.append(np.full(rng.integers(1, longest), 4 + i % 50), EOS) for i in range(n)]
    write_side(tmp_path / "p.src", src)
    write_side(tmp_path / "p.tgt", tgt)
    return PairDataset(tmp_path / "p")


def test_batches_stay_within_the_budget_and_hold_every_kept_pair_once(tmp_path):
    pairs = random_pairs(tmp_path)
    batches = TokenBudgetBatches(pairs, max_tokens=120, max_positions=30, pad_id=0, bos_id=2, seed=1)
    too_long = (pairs.src_lengths > 30) | (pairs.tgt_lengths > 30)
    assert batches.skipped == int(too_long.sum()) > 0
    seen = np.concatenate([batches.indices(k) for k in range(len(batches))])
    assert sorted(seen) == sorted(np.flatnonzero(~too_long))
    for k in range(len(batches)):
        b = batches.batch(k)
        assert b["src"].numel() <= 120 and b["tgt_out"].numel() <= 120
        assert b["src"].shape[1] == b["src_lengths"].max() and b["tgt_out"].shape[1] == b["tgt_lengths"].max()


def test_length_sorting_pads_less_than_random_batches(tmp_path):
    pairs = random_pairs(tmp_path)
    batches = TokenBudgetBatches(pairs, max_tokens=120, max_positions=40, pad_id=0, bos_id=2, seed=1)
    # the same number of sentences per batch, drawn in random order
    rng = np.random.default_rng(0)
    shuffled = np.array_split(rng.permutation(len(pairs)), len(batches.all_batches))
    real = pairs.src_lengths.sum() + pairs.tgt_lengths.sum()
    random_padded = sum(len(b) * (pairs.src_lengths[b].max() + pairs.tgt_lengths[b].max()) for b in shuffled)
    assert 0 <= batches.padding_fraction < 1 - real / random_padded


def test_batch_is_padded_sentences_with_shifted_decoder_input(tmp_path):
    pairs = random_pairs(tmp_path, n=20)
    batches = TokenBudgetBatches(pairs, max_tokens=200, max_positions=40, pad_id=0, bos_id=2, seed=1)
    b, i = batches.batch(0), int(batches.indices(0)[0])
    n_src, n_tgt = int(b["src_lengths"][0]), int(b["tgt_lengths"][0])
    assert b["src"][0, :n_src].tolist() == pairs.src(i).tolist() and (b["src"][0, n_src:] == 0).all()
    assert b["tgt_out"][0, :n_tgt].tolist() == pairs.tgt(i).tolist() and b["tgt_out"][0, n_tgt - 1] == EOS
    assert b["tgt_in"][0, :n_tgt].tolist() == [2] + pairs.tgt(i)[:-1].tolist() and (b["tgt_in"][0, n_tgt:] == 0).all()
    assert ((b["tgt_out"] == 0) == (b["tgt_in"] == 0)).all()  # the same padding positions on both target tensors
    assert all(t.dtype.is_signed and not t.dtype.is_floating_point for name, t in b.items() if name != "src_padded")


def test_a_batch_says_on_the_host_whether_any_source_is_padded(tmp_path):
    """Length-sorted batches mostly share one source length: those pass no source mask to the model (translation's
    inputs), which on a GPU lets attention run FlashAttention; the flag comes from the host's lengths, no device read."""
    from pretrain.tasks.translation import TranslationTask

    pairs = random_pairs(tmp_path)
    batches = TokenBudgetBatches(pairs, max_tokens=120, max_positions=40, pad_id=0, bos_id=2, seed=1)
    flags = []
    for k in range(len(batches)):
        b = batches.batch(k)
        assert b["src_padded"] is bool((b["src_lengths"] < b["src"].shape[1]).any())
        src_pad_mask = TranslationTask.inputs(b)[1]
        assert (src_pad_mask is None) == (not b["src_padded"])
        assert src_pad_mask is None or torch.equal(src_pad_mask, torch.arange(b["src"].shape[1]) >= b["src_lengths"][:, None])
        flags.append(b["src_padded"])
    assert 0 < flags.count(False) and 0 < flags.count(True)


def test_ranks_take_disjoint_batches_of_equal_count_and_order_is_pure_in_seed_and_k(tmp_path):
    pairs = random_pairs(tmp_path)
    ranks = [TokenBudgetBatches(pairs, 120, 40, 0, 2, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(ranks[0].all_batches) // 2
    taken = [set(np.concatenate([rank.indices(k) for k in range(len(rank))]).tolist()) for rank in ranks]
    assert not taken[0] & taken[1]
    fresh = TokenBudgetBatches(pairs, 120, 40, 0, 2, seed=5, dp_rank=1, dp_size=2)
    later = len(ranks[1]) + 3  # in the second epoch, asked for first: no state carried from earlier batches
    assert fresh.indices(later).tolist() == ranks[1].indices(later).tolist()
    first_epoch = [ranks[0].indices(k).tolist() for k in range(len(ranks[0]))]
    second_epoch = [ranks[0].indices(len(ranks[0]) + k).tolist() for k in range(len(ranks[0]))]
    assert first_epoch != second_epoch
    other_seed = TokenBudgetBatches(pairs, 120, 40, 0, 2, seed=6, dp_rank=0, dp_size=2)
    assert [other_seed.indices(k).tolist() for k in range(len(other_seed))] != first_epoch


def test_mismatched_sides_and_impossible_budgets_are_refused(tmp_path):
    pairs = random_pairs(tmp_path, n=10)
    write_side(tmp_path / "q.src", [pairs.src(i) for i in range(10)])
    write_side(tmp_path / "q.tgt", [pairs.tgt(i) for i in range(9)])
    with pytest.raises(ConfigError, match="has 10 sentences but .*q.tgt.idx has 9"):
        PairDataset(tmp_path / "q")
    with pytest.raises(ConfigError, match="must be >= max_positions"):
        TokenBudgetBatches(pairs, max_tokens=10, max_positions=20, pad_id=0, bos_id=2, seed=0)
    with pytest.raises(ConfigError, match="fewer than the 64 data-parallel ranks"):
        TokenBudgetBatches(pairs, max_tokens=400, max_positions=40, pad_id=0, bos_id=2, seed=0, dp_size=64)
