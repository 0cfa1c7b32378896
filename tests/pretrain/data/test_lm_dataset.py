"""LM samples and their seeded order: disjoint rank shards, same global batches for any world size."""
import numpy as np
import torch

from pretrain.data.lm_dataset import LMSamples, SeededOrder, micro_batch, read_text_tokens
from pretrain.data.tokenizer import ByteTokenizer


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
