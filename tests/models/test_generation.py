"""Generation: incremental decoding gives the tokens and scores of recomputing the whole prefix at
every step (fp32), for greedy, beam and sampling, on padded batches; beam search's fairseq rules."""

import math

import pytest
import torch

from models import build_model, config_from_dict
from models.generation import beam_search, greedy, sample, translate_ids

PAD, BOS, EOS = 0, 1, 2


def tiny_model(family="transformer", eos_boost=3.0, seed=0, **over):
    """A randomly initialized tiny model whose EOS logit varies a lot between states (its embedding row
    scaled), so hypotheses end at different steps instead of all running to the maximum length."""
    base = {"family": family, "vocab_size": 24, "max_seq_len": 40, "d_model": 32, "n_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "d_ff": 64}
    torch.manual_seed(seed)
    model = build_model(config_from_dict({**base, **over})).eval()
    with torch.no_grad():
        model.tgt_emb.weight[EOS] *= eos_boost
    return model


def padded_batch(lengths=(5, 9, 2, 7), vocab=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    S = max(lengths)
    src = torch.full((len(lengths), S), PAD)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(3, vocab, (n,), generator=gen)
        src[i, n - 1] = EOS
    return src, src == PAD


def assert_same_hypotheses(a, b):
    """Same tokens, exactly; the same scores to float32 rounding. Bit equality of the scores is out of
    reach: CPU matmul kernels round differently for different row counts (F.linear on the last row of
    9 differs in the last bit from F.linear on that row alone), and the two modes multiply 1 row or
    the whole prefix. The largest gaps measured here: 1.8e-6 on a summed score, 1.4e-6 on one token's
    log-probability."""
    assert len(a) == len(b)
    for hyps_a, hyps_b in zip(a, b):
        assert [h.tokens for h in hyps_a] == [h.tokens for h in hyps_b]
        for h_a, h_b in zip(hyps_a, hyps_b):
            assert math.isclose(h_a.score, h_b.score, rel_tol=1e-5, abs_tol=1e-5)
            torch.testing.assert_close(torch.tensor(h_a.positional_scores), torch.tensor(h_b.positional_scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_greedy_incremental_equals_full_recomputation(positions):
    model = tiny_model(positions=positions)
    src, mask = padded_batch()
    args = dict(bos=BOS, eos=EOS, pad=PAD, max_len_a=1.0, max_len_b=8)
    incremental = greedy(model, src, mask, **args)
    assert_same_hypotheses(incremental, greedy(model, src, mask, incremental=False, **args))
    lengths = {len(h[0].tokens) for h in incremental}
    assert len(lengths) > 1  # the sentences ended at different steps


@pytest.mark.parametrize("family", ["transformer", "switch-transformer"])
def test_beam_incremental_equals_full_recomputation(family):
    # Switch: a capacity no step can exceed, so no token is dropped in either mode.
    over = {"eval_capacity_factor": 100.0} if family == "switch-transformer" else {}
    model = tiny_model(family, **over)
    src, mask = padded_batch()
    args = dict(bos=BOS, eos=EOS, pad=PAD, beam=4, lenpen=1.0, max_len_a=1.0, max_len_b=6, nbest=4)
    incremental = beam_search(model, src, mask, **args)
    assert_same_hypotheses(incremental, beam_search(model, src, mask, incremental=False, **args))
    assert all(len(hyps) == 4 for hyps in incremental)


def test_sampling_incremental_equals_full_recomputation():
    model = tiny_model()
    src, mask = padded_batch()
    args = dict(bos=BOS, eos=EOS, pad=PAD, temperature=0.8, top_k=5, max_len_b=10)
    incremental = sample(model, src, mask, generator=torch.Generator().manual_seed(3), **args)
    full = sample(model, src, mask, generator=torch.Generator().manual_seed(3), incremental=False, **args)
    assert_same_hypotheses(incremental, full)


def test_batched_decoding_equals_one_sentence_at_a_time():
    model = tiny_model()
    src, mask = padded_batch()
    args = dict(bos=BOS, eos=EOS, pad=PAD, beam=3, max_len_a=1.0, max_len_b=5, nbest=3)
    batched = beam_search(model, src, mask, **args)
    for i, hyps in enumerate(batched):
        n = int((~mask[i]).sum())
        alone = beam_search(model, src[i : i + 1, :n], mask[i : i + 1, :n], **args)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        for a, b in zip(alone, hyps):
            assert math.isclose(a.score, b.score, rel_tol=1e-5, abs_tol=1e-6)


def test_beam_scores_are_normalized_log_probabilities():
    model = tiny_model()
    src, mask = padded_batch()
    for lenpen in (0.0, 1.0, 2.0):
        for hyps in beam_search(model, src, mask, BOS, EOS, PAD, beam=4, lenpen=lenpen, max_len_b=6, nbest=4):
            assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
            for h in hyps:
                assert len(h.positional_scores) == len(h.tokens) + 1  # the EOS is scored too
                expected = sum(h.positional_scores) / (len(h.tokens) + 1) ** lenpen
                assert math.isclose(h.score, expected, rel_tol=1e-5, abs_tol=1e-5)


def test_beam_of_one_is_greedy():
    model = tiny_model()
    src, mask = padded_batch()
    beams = beam_search(model, src, mask, BOS, EOS, PAD, beam=1, lenpen=0.0, max_len_b=8)
    for beam_hyps, greedy_hyps in zip(beams, greedy(model, src, mask, BOS, EOS, PAD, max_len_b=8)):
        assert beam_hyps[0].tokens == greedy_hyps[0].tokens
        assert math.isclose(beam_hyps[0].score, greedy_hyps[0].score, rel_tol=1e-5)


def test_best_beam_scores_at_least_greedy():
    model = tiny_model(eos_boost=1.0)
    src, mask = padded_batch()
    greedy_scores = [h[0].score for h in greedy(model, src, mask, BOS, EOS, PAD, max_len_b=6)]
    beam_scores = [h[0].score for h in beam_search(model, src, mask, BOS, EOS, PAD, beam=5, lenpen=0.0, max_len_b=6)]
    assert all(b >= g - 1e-6 for b, g in zip(beam_scores, greedy_scores))


def test_min_and_max_length():
    model = tiny_model(eos_boost=6.0)
    src, mask = padded_batch()
    src_lengths = (~mask).sum(dim=1).tolist()
    for hyps, n in zip(beam_search(model, src, mask, BOS, EOS, PAD, beam=3, max_len_a=0.5, max_len_b=2, nbest=3), src_lengths):
        assert all(len(h.tokens) <= int(0.5 * n + 2) for h in hyps)
    for hyps in beam_search(model, src, mask, BOS, EOS, PAD, beam=3, min_len=4, max_len_b=10, nbest=3):
        assert all(len(h.tokens) >= 4 for h in hyps)
    for hyps in greedy(model, src, mask, BOS, EOS, PAD, min_len=3, max_len_b=3):
        assert len(hyps[0].tokens) == 3
    # Never past the model's positions, whatever is asked.
    for hyps in greedy(tiny_model(eos_boost=0.0), src, mask, BOS, EOS, PAD, max_len_b=1000):
        assert len(hyps[0].tokens) <= 39


def test_no_padding_or_start_token_is_generated():
    model = tiny_model()
    src, mask = padded_batch()
    for hyps in beam_search(model, src, mask, BOS, EOS, PAD, beam=4, max_len_b=8, nbest=4):
        assert all(PAD not in h.tokens and BOS not in h.tokens and EOS not in h.tokens for h in hyps)


def test_sampling_follows_the_generator_and_top_k_one_is_greedy():
    model = tiny_model()
    src, mask = padded_batch()
    draws = [sample(model, src, mask, BOS, EOS, PAD, generator=torch.Generator().manual_seed(s), max_len_b=8) for s in (1, 1, 2)]
    assert [h[0].tokens for h in draws[0]] == [h[0].tokens for h in draws[1]]
    assert [h[0].tokens for h in draws[0]] != [h[0].tokens for h in draws[2]]
    top1 = sample(model, src, mask, BOS, EOS, PAD, top_k=1, generator=torch.Generator().manual_seed(5), max_len_b=8)
    assert [h[0].tokens for h in top1] == [h[0].tokens for h in greedy(model, src, mask, BOS, EOS, PAD, max_len_b=8)]


def test_ids_past_the_tokenizers_vocabulary_are_never_generated():
    model = tiny_model()
    src, mask = padded_batch()
    with torch.no_grad():
        model.tgt_emb.weight[20:] *= 10  # make the ids a smaller tokenizer lacks the likeliest
    for hyps in beam_search(model, src, mask, BOS, EOS, PAD, beam=3, max_len_b=8, nbest=3, vocab_size=20):
        assert all(t < 20 for h in hyps for t in h.tokens)
    for hyps in greedy(model, src, mask, BOS, EOS, PAD, max_len_b=8, vocab_size=20):
        assert all(t < 20 for t in hyps[0].tokens)
    assert any(t >= 20 for hyps in greedy(model, src, mask, BOS, EOS, PAD, max_len_b=8) for t in hyps[0].tokens)


class CountingSync:
    """Stands in for the other ranks of lockstep decoding: they want ``extra_steps`` more decoding steps and
    ``extra_batches`` more batches than this rank; counts the decoder calls this rank makes."""

    def __init__(self, model, extra_steps=0, extra_batches=0):
        self.extra_steps, self.extra_batches = extra_steps, extra_batches
        self.decoder_calls, self.steps_asked = 0, []
        decode = model.decode

        def counted(*args, **kwargs):
            self.decoder_calls += 1
            return decode(*args, **kwargs)

        model.decode = counted

    def most(self, n):
        self.steps_asked.append(n)
        return n + (self.extra_batches if len(self.steps_asked) == 1 else self.extra_steps)

    def all(self, done_here):
        return False  # another rank is never done first: this one runs to the agreed bound


@pytest.mark.parametrize("search", ["beam", "greedy"])
def test_decoding_in_step_with_slower_ranks_changes_no_hypothesis(search):
    """A rank done before the others keeps decoding (its hypotheses frozen) until the agreed last step."""
    model = tiny_model()
    src, mask = padded_batch()
    args = dict(bos=BOS, eos=EOS, pad=PAD, max_len_a=1.0, max_len_b=6)
    run = (
        (lambda **kw: beam_search(model, src, mask, beam=3, **args, **kw))
        if search == "beam"
        else (lambda **kw: greedy(model, src, mask, **args, **kw))
    )
    alone = run()
    sync = CountingSync(model, extra_steps=5)
    sync.steps_asked.append(None)  # not a batch count: every most() here is a step bound
    in_step = run(sync=sync)
    assert_same_hypotheses(alone, in_step)
    assert sync.decoder_calls == sync.steps_asked[1] + 5  # every step up to the slower ranks' bound was run


def tokens(hypothesis_lists):
    return [[h.tokens for h in hyps] for hyps in hypothesis_lists]


def test_translate_ids_runs_the_other_ranks_extra_batches_and_keeps_the_order():
    model = tiny_model()
    src, mask = padded_batch(lengths=(5, 9, 2, 7, 3))
    encoded = [row[~m].tolist() for row, m in zip(src, mask)]
    encoded.insert(2, None)  # an empty line
    args = dict(pad=PAD, bos=BOS, eos=EOS, beam=2, max_len_a=1.0, max_len_b=6, batch_size=2)
    alone = translate_ids(model, encoded, **args)
    assert alone[2] == [] and all(alone[i] for i in (0, 1, 3, 4, 5))
    single = [
        beam_search(model, src[i : i + 1, : len(ids)], mask[i : i + 1, : len(ids)], BOS, EOS, PAD, beam=2, max_len_a=1.0, max_len_b=6)[0][0].tokens
        for i, ids in enumerate(e for e in encoded if e)
    ]
    assert [h[0].tokens for h in alone if h] == single  # in input order, whatever the batching by length
    model = tiny_model()  # unwrapped decode: each CountingSync counts its own calls
    no_extra = CountingSync(model)
    assert tokens(translate_ids(model, encoded, sync=no_extra, **args)) == tokens(alone)
    model = tiny_model()
    extra = CountingSync(model, extra_batches=2)
    assert tokens(translate_ids(model, encoded, sync=extra, **args)) == tokens(alone)
    assert extra.steps_asked[0] == no_extra.steps_asked[0] == 3  # this rank's batches of 2
    assert extra.decoder_calls > no_extra.decoder_calls  # the other ranks' 2 more batches were decoded too


@pytest.mark.parametrize("search,options", [("beam", dict(beam=3, nbest=3)), ("greedy", {})])
def test_translate_ids_takes_every_search(search, options):
    model = tiny_model()
    src, mask = padded_batch(lengths=(2, 5, 7, 9))  # already by length: translate_ids' one batch has this order
    encoded = [row[~m].tolist() for row, m in zip(src, mask)]
    out = translate_ids(model, encoded, PAD, BOS, EOS, search=search, max_len_a=1.0, max_len_b=6, **options)
    direct = {"beam": beam_search, "greedy": greedy}[search](model, src, mask, BOS, EOS, PAD, max_len_a=1.0, max_len_b=6, **options)
    assert len(out) == 4 and all(len(hyps) == options.get("nbest", 1) for hyps in out)
    assert tokens(out) == tokens(direct)


def test_translate_ids_samples_reproducibly_from_a_seeded_generator():
    model = tiny_model()
    src, mask = padded_batch()
    encoded = [row[~m].tolist() for row, m in zip(src, mask)]

    def draw(seed):
        return tokens(
            translate_ids(
                model,
                encoded,
                PAD,
                BOS,
                EOS,
                search="sample",
                max_len_a=1.0,
                max_len_b=6,
                temperature=1.5,
                generator=torch.Generator().manual_seed(seed),
            )
        )

    assert draw(3) == draw(3)
    assert len({str(draw(seed)) for seed in range(4)}) > 1  # the seed matters
