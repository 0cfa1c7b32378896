"""Blending corpora with weights: realized shares track the weights, each corpus is read in its own
seeded order, the blend is a pure function of (seed, k), ranks read disjoint samples; a real 2-rank
run through pretrain/main.py trains on two corpora."""

import numpy as np
import pytest

from pretrain.data.lm_dataset import BLEND_BLOCK, BlendedOrder, BlendedSamples, LMSamples, apportion, micro_batch
from tests.distributed import CORPUS, read_metrics, run_ranks, train_args


def test_apportion_is_exact_and_proportional():
    counts = apportion([0.6, 0.3, 0.1], 1000)
    assert counts.tolist() == [600, 300, 100]
    counts = apportion([1, 1, 1], 100)
    assert counts.sum() == 100 and counts.max() - counts.min() == 1


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [5, 1], [1, 1, 1, 1000]])
def test_shares_of_every_prefix_track_the_weights(weights):
    blend = BlendedOrder([50, 70, 30, 20][: len(weights)], weights, seed=0)
    corpora = np.array([blend(k)[0] for k in range(3 * BLEND_BLOCK // 2)])  # one block and a half
    target = np.asarray(weights) / np.sum(weights)
    for n in (10, 100, 1000, 10_000, BLEND_BLOCK, len(corpora)):
        counts = np.bincount(corpora[:n], minlength=len(weights))
        assert np.abs(counts - n * target).max() <= 2, (n, counts, n * target)  # within two samples of exact


def test_each_corpus_is_read_in_its_own_seeded_order_and_the_blend_is_pure():
    sizes = [40, 25]
    blend = BlendedOrder(sizes, [1, 1], seed=7)
    drawn = [blend(k) for k in range(200)]
    for d, size in enumerate(sizes):
        mine = [i for c, i in drawn if c == d]
        first, second = mine[:size], mine[size : 2 * size]
        assert sorted(first) == sorted(second) == list(range(size))  # whole epochs, each corpus on its own
        assert first != sorted(first) and second != first  # shuffled, a new permutation each epoch
    late = BLEND_BLOCK * 3 + 17  # asked for first, by a fresh object: no state carried from earlier samples
    assert BlendedOrder(sizes, [1, 1], seed=7)(late) == blend(late)
    assert [BlendedOrder(sizes, [1, 1], seed=7)(k) for k in range(200)] == drawn
    other = [BlendedOrder(sizes, [1, 1], seed=8)(k) for k in range(200)]
    assert [c for c, _ in other] == [c for c, _ in drawn] and other != drawn  # the seed orders samples, not corpora


def test_two_ranks_read_disjoint_samples_of_the_same_global_batch():
    corpora = [LMSamples(np.arange(1000, dtype=np.int32), 9, "a"), LMSamples(np.arange(5000, 5600, dtype=np.int32), 9, "b")]
    samples, order = BlendedSamples(corpora), BlendedOrder([c.num_samples for c in corpora], [0.7, 0.3], seed=3)

    def rows(*batches):
        return [tuple(row) for b in batches for row in b.tolist()]

    for consumed in (0, 8, 800):
        one = rows(*(micro_batch(samples, order, consumed, m, 2, 0, 1) for m in range(4)))
        rank0 = rows(*(micro_batch(samples, order, consumed, m, 2, 0, 2) for m in range(2)))
        rank1 = rows(*(micro_batch(samples, order, consumed, m, 2, 1, 2) for m in range(2)))
        assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == sorted(one)


def second_corpus(path):
    """A small text that is not Shakespeare: numbered sentences in blank-line-separated paragraphs."""
    words = ["the", "river", "carries", "stones", "north", "while", "a", "small", "boat", "waits", "by", "mill"]
    rng = np.random.default_rng(0)
    paragraphs = [" ".join(rng.choice(words, 60)) + f" {i}." for i in range(400)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def blended_args(tmp_path, max_steps, *extra, save_dir=None):
    args = train_args(tmp_path, "zero1.json", "tiny-gpt.json", max_steps, *extra, save_dir=save_dir)
    after_corpus = args.index(CORPUS) + 1
    args[after_corpus:after_corpus] = [second_corpus(tmp_path / "river.txt"), "--train_data_weights", 0.75, 0.25]
    return args


def test_two_rank_training_on_two_blended_corpora(tmp_path):
    results = run_ranks(blended_args(tmp_path, 6), 2, tmp_path / "logs")
    blend_lines = [line for line in results[0].output.splitlines() if line.startswith("blend ")]
    assert len(blend_lines) == 2 and "share 75.00%" in blend_lines[0] and "share 25.00%" in blend_lines[1]
    assert not any(line.startswith("blend ") for line in results[1].output.splitlines())
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, 7)) and all(np.isfinite(v) for v in losses.values())


def test_blended_run_resumes_bit_exact(tmp_path):
    """Stopped after step 3 and resumed, a blended run sees the batches of an uninterrupted one: same losses, bit for bit."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_ranks(blended_args(tmp_path, 6, save_dir=full), 2, tmp_path / "logs_full")
    run_ranks(blended_args(tmp_path, 3, save_dir=stopped), 2, tmp_path / "logs_first")
    run_ranks(blended_args(tmp_path, 6, "--resume", save_dir=stopped), 2, tmp_path / "logs_resumed")
    uninterrupted, resumed = read_metrics(full), read_metrics(stopped)
    assert [resumed[step] for step in (4, 5, 6)] == [uninterrupted[step] for step in (4, 5, 6)]
