"""Generation with an encoder-decoder (models/transformer.py): beam search, greedy and sampling, batched.

Incremental decoding (the default): the encoder runs once per batch, each decoder layer's
cross-attention keys/values are computed once per sentence (and shared by its beams), and the
self-attention keys/values of earlier positions are cached, so each step runs the decoder on one
new position per row. ``incremental=False`` recomputes the whole prefix at every step instead: the
reference the tests compare against and the baseline of bench/generation.py.

Beam search follows fairseq's SequenceGenerator: each step takes the best 2 x beam candidates of
a sentence; an EOS among its best ``beam`` candidates finishes a hypothesis, scored by its summed
log-probability / length ** lenpen (length counts the EOS); the best ``beam`` candidates that did
not end continue; a sentence is done when it holds ``beam`` finished hypotheses. EOS is forbidden
before ``min_len`` tokens and forced once a sentence has max_len = min(a x source length + b,
positions left) tokens; ``vocab_size`` keeps out ids the tokenizer does not have. Results are,
per sentence, its best ``nbest`` Hypothesis objects.

``sync`` keeps ranks in step when they generate together (validation BLEU during training): under
expert parallelism every forward holds an all-to-all and under ZeRO-3 every module's forward
gathers its parameters, so each rank must run as many encoder and decoder steps as every other,
even once its own sentences are done. ``translate_ids`` drives batches of sentences the same way.
"""

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F


@dataclass
class Hypothesis:
    tokens: List[int]  # generated tokens, without the start token and the EOS
    score: float  # beam: summed log-probability / length ** lenpen; greedy and sampling: summed log-probability
    positional_scores: List[float]  # log-probability of each generated token, EOS included


class StepDecoder:
    """Log-probabilities of the next token for each row (sentence x beam), incrementally or from scratch."""

    def __init__(self, model, src, src_pad_mask, rows_per_sentence, incremental):
        self.model, self.incremental = model, incremental
        memory, _, _ = model.encode(src, src_pad_mask)
        self.src_pad_mask = src_pad_mask.repeat_interleave(rows_per_sentence, dim=0)
        if incremental:
            # Once per sentence, then shared by its rows: rows only ever move within their sentence (reorder).
            self.cross_kv = [tuple(t.repeat_interleave(rows_per_sentence, dim=0) for t in kv) for kv in model.cross_keys_values(memory)]
            self.caches = [{} for _ in model.decoder]
        else:
            self.memory = memory.repeat_interleave(rows_per_sentence, dim=0)

    def next_log_probs(self, prefix):
        """prefix (N, t + 1) tokens so far -> (N, V) float32 log-probabilities of token t + 1."""
        if self.incremental:
            start = prefix.shape[1] - 1
            logits = self.model.decode(prefix[:, start:], self.cross_kv, self.src_pad_mask, self.caches, start)[0]
        else:
            cross_kv = self.model.cross_keys_values(self.memory)
            logits = self.model.decode(prefix, cross_kv, self.src_pad_mask)[0]
        return F.log_softmax(logits[:, -1].float(), dim=-1)

    def reorder(self, rows):
        """Row i continues from old row rows[i] (a beam of the same sentence)."""
        if self.incremental:
            for cache in self.caches:
                cache["k"], cache["v"] = cache["k"][rows], cache["v"][rows]


def max_lengths(model, src_pad_mask, max_len_a, max_len_b):
    """Per sentence: a + b x source length tokens at most (EOS excluded), within the model's positions."""
    src_lengths = (~src_pad_mask).sum(dim=1).double()
    wanted = (max_len_a * src_lengths + max_len_b).long()
    return wanted.clamp(min=1, max=model.config.max_seq_len - 1)


def steps_bound(max_lens, sync):
    """Decoding steps at most: this batch's longest allowed output + its EOS, the longest over all ranks with ``sync``."""
    steps = int(max_lens.max()) + 1
    return steps if sync is None else sync.most(steps)


def all_done(done_here, sync):
    """Stop decoding: when this rank's sentences are done, or with ``sync`` when every rank's are."""
    return done_here if sync is None else sync.all(done_here)


def constrain(lprobs, step, min_len, row_max_lens, bos, eos, pad, vocab_size=None):
    """No padding or start token ever, nor ids from vocab_size on (a model's vocabulary may be larger than its
    tokenizer's); no EOS before min_len; only EOS (with its own log-prob) at max_len."""
    lprobs[:, pad] = -torch.inf
    if vocab_size is not None:
        lprobs[:, vocab_size:] = -torch.inf
    if bos != eos:
        lprobs[:, bos] = -torch.inf
    if step < min_len:
        lprobs[:, eos] = -torch.inf
    at_max = step >= row_max_lens
    if at_max.any():
        eos_lprobs = lprobs[at_max, eos]
        lprobs[at_max] = -torch.inf
        lprobs[at_max, eos] = eos_lprobs
    return lprobs


@torch.no_grad()
def beam_search(
    model,
    src,
    src_pad_mask,
    bos,
    eos,
    pad,
    beam=5,
    lenpen=1.0,
    min_len=1,
    max_len_a=0.0,
    max_len_b=200,
    nbest=1,
    vocab_size=None,
    incremental=True,
    sync=None,
):
    """src (B, S), src_pad_mask (B, S) True at padding -> for each sentence its best ``nbest`` Hypothesis."""
    B, K = src.shape[0], beam
    max_lens = max_lengths(model, src_pad_mask, max_len_a, max_len_b)
    row_max_lens = max_lens.repeat_interleave(K)
    decoder = StepDecoder(model, src, src_pad_mask, K, incremental)
    tokens = src.new_full((B * K, 1), bos)
    device = src.device
    scores = torch.full((B, K), -torch.inf, device=device)
    scores[:, 0] = 0.0  # one live beam per sentence at the start, so the first step does not pick K copies
    positional = torch.zeros(B * K, 0, device=device)
    finished = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    first_row = torch.arange(B, device=device)[:, None] * K
    for step in range(steps_bound(max_lens, sync)):
        lprobs = constrain(decoder.next_log_probs(tokens), step, min_len, row_max_lens, bos, eos, pad, vocab_size)
        V = lprobs.shape[1]
        cand_scores, cand_idx = (scores.view(-1, 1) + lprobs).view(B, K * V).topk(2 * K, dim=1)
        cand_lprobs = lprobs.view(B, K * V).gather(1, cand_idx)
        cand_rows, cand_tokens = first_row + cand_idx // V, cand_idx % V
        is_eos = cand_tokens == eos

        ending = (is_eos[:, :K] & ~done[:, None].to(device) & cand_scores[:, :K].isfinite()).cpu()
        for b, j in ending.nonzero().tolist():
            if len(finished[b]) < K:
                row = int(cand_rows[b, j])
                finished[b].append(
                    Hypothesis(
                        tokens[row, 1:].tolist(),
                        cand_scores[b, j].item() / (step + 1) ** lenpen,
                        positional[row].tolist() + [cand_lprobs[b, j].item()],
                    )
                )
        done |= torch.tensor([len(f) >= K for f in finished])
        if all_done(bool(done.all()), sync):
            break

        # The best K candidates that did not end go on (EOS candidates sort after all others).
        order = is_eos.long() * (2 * K) + torch.arange(2 * K, device=device)
        keep = order.topk(K, dim=1, largest=False).indices
        rows = cand_rows.gather(1, keep).view(-1)
        tokens = torch.cat([tokens[rows], cand_tokens.gather(1, keep).view(-1, 1)], dim=1)
        positional = torch.cat([positional[rows], cand_lprobs.gather(1, keep).view(-1, 1)], dim=1)
        scores = cand_scores.gather(1, keep)
        decoder.reorder(rows)
    return [sorted(f, key=lambda h: -h.score)[:nbest] for f in finished]


def _one_path(model, src, src_pad_mask, bos, eos, pad, choose, min_len, max_len_a, max_len_b, vocab_size, incremental, sync):
    """Greedy or sampled decoding: one hypothesis per sentence, next token = choose(log-probs)."""
    B = src.shape[0]
    max_lens = max_lengths(model, src_pad_mask, max_len_a, max_len_b)
    decoder = StepDecoder(model, src, src_pad_mask, 1, incremental)
    tokens = src.new_full((B, 1), bos)
    step_lprobs, ended = [], torch.zeros(B, dtype=torch.bool, device=src.device)
    for step in range(steps_bound(max_lens, sync)):
        lprobs = constrain(decoder.next_log_probs(tokens), step, min_len, max_lens, bos, eos, pad, vocab_size)
        chosen = torch.where(ended, pad, choose(lprobs))  # finished rows are padded
        step_lprobs.append(torch.where(ended, 0.0, lprobs.gather(1, chosen[:, None]).squeeze(1)))
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        ended |= chosen == eos
        if all_done(bool(ended.all()), sync):
            break
    step_lprobs = torch.stack(step_lprobs, dim=1)
    hypotheses = []
    for b in range(B):
        generated = tokens[b, 1:].tolist()
        length = generated.index(eos) if eos in generated else len(generated)
        positional = step_lprobs[b, : length + 1].tolist()
        hypotheses.append([Hypothesis(generated[:length], sum(positional), positional)])
    return hypotheses


@torch.no_grad()
def greedy(model, src, src_pad_mask, bos, eos, pad, min_len=1, max_len_a=0.0, max_len_b=200, vocab_size=None, incremental=True, sync=None):
    """The most likely token at each step; per sentence a list of one Hypothesis."""
    return _one_path(
        model, src, src_pad_mask, bos, eos, pad, lambda lprobs: lprobs.argmax(dim=-1), min_len, max_len_a, max_len_b, vocab_size, incremental, sync
    )


@torch.no_grad()
def sample(
    model,
    src,
    src_pad_mask,
    bos,
    eos,
    pad,
    temperature=1.0,
    top_k=0,
    generator=None,
    min_len=1,
    max_len_a=0.0,
    max_len_b=200,
    vocab_size=None,
    incremental=True,
    sync=None,
):
    """Tokens drawn from softmax(log-probs / temperature), from the top_k most likely only when top_k > 0.
    Scores are the model's own log-probabilities of the drawn tokens (before temperature and top-k)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}; use greedy() for the argmax")

    def choose(lprobs):
        logits = lprobs / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    return _one_path(model, src, src_pad_mask, bos, eos, pad, choose, min_len, max_len_a, max_len_b, vocab_size, incremental, sync)


SEARCHES = {"beam": beam_search, "greedy": greedy, "sample": sample}


@torch.no_grad()
def translate_ids(model, encoded, pad, bos, eos, search="beam", batch_size=64, device="cpu", sync=None, progress=iter, **options):
    """For each entry of ``encoded`` (token ids, EOS included; None for an empty line, which gets []) its
    Hypothesis list from ``search`` (a SEARCHES name, given ``options``: beam, lenpen, nbest, min_len, max_len_a,
    max_len_b, vocab_size, temperature, top_k, generator, as that function takes them), in order. Sentences
    of similar length share a batch; ``progress`` wraps the batches (a tqdm). With ``sync``, ranks that hold
    fewer batches decode a one-token sentence until every rank is done."""
    outputs = [[] for _ in encoded]
    order = sorted((i for i, ids in enumerate(encoded) if ids is not None), key=lambda i: len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    num_batches = len(batches) if sync is None else sync.most(len(batches))
    for b in progress(range(num_batches)):
        rows = batches[b] if b < len(batches) else None
        sentences = [encoded[i] for i in rows] if rows else [[eos]]
        width = max(len(ids) for ids in sentences)
        src = torch.full((len(sentences), width), pad, dtype=torch.long)
        for row, ids in enumerate(sentences):
            src[row, : len(ids)] = torch.tensor(ids)
        src_pad_mask = torch.arange(width)[None, :] >= torch.tensor([len(ids) for ids in sentences])[:, None]
        hypotheses = SEARCHES[search](model, src.to(device), src_pad_mask.to(device), bos, eos, pad, sync=sync, **options)
        for i, hyps in zip(rows or [], hypotheses):
            outputs[i] = hyps
    return outputs
