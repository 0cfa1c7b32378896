"""Translation: an encoder-decoder (models/transformer.py) on sentence pairs, label-smoothed cross entropy.

    python -m pretrain.tokenizer train.de train.en --per_line --vocab_size 8000 --output data/m30k.bpe8000
    python -m pretrain.preprocess_pairs --source train.de --target train.en --tokenizer data/m30k.bpe8000.model \\
        --output_prefix data/m30k.train          # and the same for the validation pairs
    deepspeed pretrain/main.py --task translation --train_data data/m30k.train --val_data data/m30k.val \\
        --model_config models/configs/tiny-transformer.json --ds_config ds_configs/zero1.json ...

Data are PREFIX.src/.tgt token files (pretrain/data/pairs.py) made with one sentencepiece tokenizer
for both sides, or one for each (preprocess_pairs --src_tokenizer/--tgt_tokenizer, with a model
config of separate vocabularies: share_all_embeddings false, tgt_vocab_size), pretrain.tokenizer's,
whose pad and bos ids the batches use. Batches are
fairseq's token-budget batches: a micro-batch holds at most micro-batch size x seq_len tokens on
each side (the DeepSpeed config's train_micro_batch_size_per_gpu counts sentences of the longest
kept length, seq_len, default the model's max_seq_len); pairs longer than seq_len on either side
are skipped. Skipped pairs and the padding fraction are printed at start. The loss is cross
entropy with label smoothing (--label_smoothing, default 0.1) over the target's real tokens (the
logged lm_loss and val/loss are this smoothed loss), plus the Switch auxiliary loss. Under expert
parallelism each expert's capacity is that of a full token budget (see build_model).

With --bleu_src/--bleu_ref, each validation also translates that dev set by beam search (--bleu_beam;
max length 1.2 x source + 10, as eval.bleu) and logs val/bleu, sacreBLEU's corpus BLEU.
"""

import dataclasses
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sacrebleu.metrics import BLEU

from models import build_model
from models.generation import translate_ids
from models.registry import check_architecture
from pretrain.data.pairs import PairDataset, TokenBudgetBatches
from pretrain.data.tokenizer import SentencePieceTokenizer, tokenizer_for_data
from pretrain.distributed import RankSync, device, rank_from_env
from pretrain.tasks import register_task
from switchyard.errors import ConfigError

IGNORE = -100  # F.cross_entropy's ignore_index: padded target positions


def label_smoothed_cross_entropy(logits, targets, smoothing):
    """Mean over the targets that are not IGNORE of (1 - e) x NLL + e x the mean NLL over the vocabulary
    (Szegedy et al.; what fairseq's label_smoothed_cross_entropy computes with e spread over V classes)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, label_smoothing=smoothing)


def positions_past(lengths, width):
    """(B, width) True where a position is past its row's length: padding."""
    return torch.arange(width, device=lengths.device)[None, :] >= lengths[:, None]


def pair_tokenizers(pairs, requested):
    """(source, target) tokenizers ``pairs`` were made with: one for both sides, or one for each (--tokenizer,
    if given, must be the one both sides were made with)."""
    separate = pairs.src_tokenizer_spec != pairs.tgt_tokenizer_spec
    if separate and requested is not None:
        raise ConfigError(
            f"{pairs.prefix}: the source and target sides were made with different tokenizers, but "
            f"--tokenizer names one; drop --tokenizer to use the ones each side was made with"
        )
    src = tokenizer_for_data(requested, {f"{pairs.prefix}.src.idx": pairs.src_tokenizer_spec})
    tgt = tokenizer_for_data(None, {f"{pairs.prefix}.tgt.idx": pairs.tgt_tokenizer_spec}) if separate else src
    for side, tokenizer in (("source", src), ("target", tgt)):
        if not isinstance(tokenizer, SentencePieceTokenizer) or tokenizer.sp.pad_id() < 0 or tokenizer.sp.bos_id() < 0:
            raise ConfigError(
                f"{pairs.prefix}'s {side} side was made with a tokenizer without pad and bos ids; translation "
                f"needs sentencepiece models from python -m pretrain.tokenizer"
            )
    if src.sp.pad_id() != tgt.sp.pad_id():
        raise ConfigError(
            f"{pairs.prefix}: the source tokenizer pads with id {src.sp.pad_id()} and the target's with "
            f"{tgt.sp.pad_id()}; train both with python -m pretrain.tokenizer (pad id 0)"
        )
    return src, tgt


def encode_sources(lines, tokenizer, max_positions, path, warn=True):
    """Token ids + EOS per line (None for an empty line); lines over max_positions are cut, with a warning."""
    encoded = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            encoded.append(None)
            continue
        ids = tokenizer.encode(line) + [tokenizer.eos_id]
        if len(ids) > max_positions:
            if warn:
                print(
                    f"warning: {path} line {number} has {len(ids)} tokens; translating its first {max_positions - 1} "
                    f"(the model has {max_positions} positions)",
                    file=sys.stderr,
                )
            ids = ids[: max_positions - 1] + [tokenizer.eos_id]
        encoded.append(ids)
    return encoded


def read_text_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


@register_task("translation")
class TranslationTask:
    def __init__(self, args, model_config, plan):
        check_architecture(model_config, "encoder-decoder", f"--task translation ({args.model_config})")
        if plan.pipeline_stages > 1:
            raise ConfigError("--task translation does not run in pipeline stages; drop 'pipeline' from the DeepSpeed config")
        if len(args.train_data) != 1:
            raise ConfigError("--task translation takes one --train_data PREFIX (of python -m pretrain.preprocess_pairs)")
        if not 0.0 <= args.label_smoothing < 1.0:
            raise ConfigError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
        self.model_config, self.plan, self.seed = model_config, plan, args.seed
        self.smoothing, self.bleu_beam = args.label_smoothing, args.bleu_beam
        self.seq_len = args.seq_len or model_config.max_seq_len
        if self.seq_len > model_config.max_seq_len:
            raise ConfigError(f"--seq_len {self.seq_len} is longer than the model's {model_config.max_seq_len} positions")
        self.train = PairDataset(args.train_data[0])
        self.val = PairDataset(args.val_data) if args.val_data else None
        # self.tokenizer is the target side's: it decodes what the model writes (and run_config.json records it).
        self.src_tokenizer, self.tokenizer = pair_tokenizers(self.train, args.tokenizer)
        if self.src_tokenizer is not self.tokenizer and model_config.share_all_embeddings:
            raise ConfigError(
                f"{args.train_data[0]} has a tokenizer for each side, but {args.model_config} shares one "
                f"embedding between them; set share_all_embeddings to false and tgt_vocab_size"
            )
        if self.val is not None and (self.val.src_tokenizer_spec, self.val.tgt_tokenizer_spec) != (self.src_tokenizer.spec, self.tokenizer.spec):
            raise ConfigError(f"{args.val_data} was made with other tokenizers than {args.train_data[0]}; preprocess both with the same ones")
        for side, tokenizer, size in (
            ("source", self.src_tokenizer, model_config.vocab_size),
            ("target", self.tokenizer, model_config.target_vocab_size),
        ):
            if tokenizer.vocab_size > size:
                raise ConfigError(
                    f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces but the "
                    f"model's {side} vocabulary {size}; raise it in {args.model_config}"
                )
        self.pad_id, self.bos_id = self.tokenizer.sp.pad_id(), self.tokenizer.sp.bos_id()
        self.bleu = self.read_bleu_set(args) if args.bleu_src else None
        self.max_tokens = plan.micro_batch_size * self.seq_len
        self._batches = {}
        train = self.batches("train", rank_from_env() % plan.dp_size, plan.dp_size)  # checks the data up front
        if rank_from_env() == 0:
            print(
                f"translation data {self.train.prefix}: {len(self.train):,} pairs, {train.skipped:,} skipped (longer than "
                f"{self.seq_len} tokens), {len(train):,} batches of <= {self.max_tokens} tokens per rank per epoch, "
                f"padding fraction {train.padding_fraction:.3f}",
                flush=True,
            )

    def read_bleu_set(self, args):
        """(encoded source lines, reference lists) of --bleu_src/--bleu_ref, for BLEU at each validation."""
        sources = read_text_lines(args.bleu_src)
        references = [read_text_lines(path) for path in args.bleu_ref or []]
        if not sources or not references:
            raise ConfigError(f"--bleu_src {args.bleu_src} must hold one sentence per line, with at least one --bleu_ref file of its translations")
        for path, lines in zip(args.bleu_ref, references):
            if len(lines) != len(sources):
                raise ConfigError(
                    f"--bleu_ref {path} has {len(lines)} lines but --bleu_src {args.bleu_src} has {len(sources)}; they must be line-aligned"
                )
        encoded = encode_sources(sources, self.src_tokenizer, self.model_config.max_seq_len, args.bleu_src, warn=rank_from_env() == 0)
        return encoded, references

    def validation_metrics(self, model):
        """val/bleu on --bleu_src (sacreBLEU against --bleu_ref): each rank translates every world-size-th line by beam
        search, all ranks in step (see models.generation), and rank 0 scores the whole set. {} without --bleu_src."""
        if self.bleu is None:
            return {}
        encoded, references = self.bleu
        if self.plan.zero_stage == 3:
            model = self.whole_copy(model)
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = range(rank, len(encoded), world)
        hypotheses = translate_ids(
            model,
            [encoded[i] for i in mine],
            self.pad_id,
            self.bos_id,
            self.tokenizer.eos_id,
            beam=self.bleu_beam,
            max_len_a=1.2,
            max_len_b=10,
            vocab_size=self.tokenizer.vocab_size,
            device=device(),
            sync=RankSync(),
        )
        parts = [None] * world if rank == 0 else None
        dist.gather_object([(i, self.tokenizer.decode(hyps[0].tokens) if hyps else "") for i, hyps in zip(mine, hypotheses)], parts, dst=0)
        if rank != 0:
            return {}
        hypotheses = [""] * len(encoded)
        for part in parts:
            for i, text in part:
                hypotheses[i] = text
        return {"val/bleu": BLEU().corpus_score(hypotheses, references).score}

    def whole_copy(self, model):
        """A plain copy of a ZeRO-3 model, whole on this rank, to generate with: decoding calls the model's parts
        (encode, decode) outside its forward, where ZeRO-3 would not gather the tied output embedding."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        with torch.random.fork_rng(devices=[]):  # its throw-away init must not move the training RNG (dropout)
            copy = build_model(self.model_config).to(device=device(), dtype=next(iter(state.values())).dtype)
        copy.load_state_dict(state)
        return copy.eval()

    def batches(self, split, dp_rank, dp_size):
        key = (split, dp_rank, dp_size)
        if key not in self._batches:
            pairs = self.train if split == "train" else self.val
            self._batches[key] = TokenBudgetBatches(pairs, self.max_tokens, self.seq_len, self.pad_id, self.bos_id, self.seed, dp_rank, dp_size)
        return self._batches[key]

    def build_model(self):
        config = self.model_config
        if getattr(config, "expert_parallel_size", 1) > 1:
            # The all-to-all needs every rank's expert capacity to be the same, but token-budget batches
            # differ in size: every expert gets, on every rank, the capacity of a full token budget.
            full_budget = math.ceil(self.max_tokens * max(config.capacity_factor, config.eval_capacity_factor) / config.num_experts)
            config = dataclasses.replace(config, min_capacity=max(config.min_capacity, full_budget))
        return build_model(config)

    def train_batch(self, consumed_samples, micro_step, micro_batch_size, dp_rank, dp_size):
        # The k-th micro-batch of this rank: k counts micro-batches, as consumed_samples counts sentences slots.
        k = consumed_samples // self.plan.train_batch_size * self.plan.grad_accum_steps + micro_step
        return self.batches("train", dp_rank, dp_size).batch(k)

    def val_batch(self, i, micro_batch_size, dp_rank, dp_size):
        batches = self.batches("val", dp_rank, dp_size)
        return batches.batch(i % len(batches))  # within the first epoch: the same batches at every validation

    @staticmethod
    def inputs(batch):
        """The model's arguments: (src, src_pad_mask, tgt_in, tgt_pad_mask); the masks keep padding out of
        attention and Switch expert capacity. A batch without source padding passes no source mask (None), so
        its attention runs without one (FlashAttention on a GPU)."""
        src, tgt_in = batch["src"], batch["tgt_in"]
        src_pad_mask = positions_past(batch["src_lengths"], src.shape[1]) if batch.get("src_padded", True) else None
        return (src, src_pad_mask, tgt_in, positions_past(batch["tgt_lengths"], tgt_in.shape[1]))

    @staticmethod
    def targets(batch):
        tgt_out = batch["tgt_out"]
        return tgt_out.masked_fill(positions_past(batch["tgt_lengths"], tgt_out.shape[1]), IGNORE)

    def loss(self, outputs, batch):
        """(loss to backprop, dict of detached parts to log)."""
        logits, aux_loss, moe_stats = outputs
        loss = label_smoothed_cross_entropy(logits, self.targets(batch).to(logits.device), self.smoothing)
        return loss + aux_loss, {"lm_loss": loss.detach(), "aux_loss": aux_loss.detach(), "moe": moe_stats}
