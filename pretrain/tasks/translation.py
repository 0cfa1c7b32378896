"""Translation: an encoder-decoder (models/transformer.py) on sentence pairs, label-smoothed cross entropy.

    python -m pretrain.tokenizer train.de train.en --per_line --vocab_size 8000 --output data/m30k.bpe8000
    python -m pretrain.preprocess_pairs --source train.de --target train.en --tokenizer data/m30k.bpe8000.model \\
        --output_prefix data/m30k.train          # and the same for the validation pairs
    deepspeed pretrain/main.py --task translation --train_data data/m30k.train --val_data data/m30k.val \\
        --model_config models/configs/tiny-transformer.json --ds_config ds_configs/zero1.json ...

Data are PREFIX.src/.tgt token files (pretrain/data/pairs.py) made with one sentencepiece tokenizer
for both sides (pretrain.tokenizer's, whose pad and bos ids the batches use). Batches are
fairseq's token-budget batches: a micro-batch holds at most micro-batch size x seq_len tokens on
each side (the DeepSpeed config's train_micro_batch_size_per_gpu counts sentences of the longest
kept length, seq_len, default the model's max_seq_len); pairs longer than seq_len on either side
are skipped. Skipped pairs and the padding fraction are printed at start. The loss is cross
entropy with label smoothing (--label_smoothing, default 0.1) over the target's real tokens (the
logged lm_loss and val/loss are this smoothed loss), plus the Switch auxiliary loss. Under expert
parallelism each expert's capacity is that of a full token budget (see build_model).
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from models import ConfigError, build_model
from models.transformer import TransformerConfig
from pretrain.data.pairs import PairDataset, TokenBudgetBatches
from pretrain.data.tokenizer import SentencePieceTokenizer, tokenizer_for_data
from pretrain.distributed import rank_from_env
from pretrain.tasks import register_task

IGNORE = -100  # F.cross_entropy's ignore_index: padded target positions


def label_smoothed_cross_entropy(logits, targets, smoothing):
    """Mean over the targets that are not IGNORE of (1 - e) x NLL + e x the mean NLL over the vocabulary
    (Szegedy et al.; what fairseq's label_smoothed_cross_entropy computes with e spread over V classes)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           label_smoothing=smoothing)


def positions_past(lengths, width):
    """(B, width) True where a position is past its row's length: padding."""
    return torch.arange(width, device=lengths.device)[None, :] >= lengths[:, None]


def pair_tokenizer(pairs, requested):
    """The one sentencepiece tokenizer both sides of ``pairs`` were made with (or ``requested``, checked)."""
    specs = {f"{pairs.prefix}.src.idx": pairs.src_tokenizer_spec, f"{pairs.prefix}.tgt.idx": pairs.tgt_tokenizer_spec}
    if pairs.src_tokenizer_spec != pairs.tgt_tokenizer_spec:
        raise ConfigError(f"{pairs.prefix}: the source and target sides were made with different tokenizers; the "
                          f"translation task needs one for both: preprocess with --tokenizer")
    tokenizer = tokenizer_for_data(requested, specs)
    if not isinstance(tokenizer, SentencePieceTokenizer) or tokenizer.sp.pad_id() < 0 or tokenizer.sp.bos_id() < 0:
        raise ConfigError(f"{pairs.prefix} was made with a tokenizer without pad and bos ids; translation needs a "
                          f"sentencepiece model from python -m pretrain.tokenizer")
    return tokenizer


@register_task("translation")
class TranslationTask:
    def __init__(self, args, model_config, plan):
        if not isinstance(model_config, TransformerConfig):
            raise ConfigError(f"--task translation needs an encoder-decoder model (family 'transformer' or "
                              f"'switch-transformer'); {args.model_config} is a {type(model_config).family_name!r} model")
        if plan.pipeline_stages > 1:
            raise ConfigError("--task translation does not run in pipeline stages; drop 'pipeline' from the DeepSpeed config")
        if len(args.train_data) != 1:
            raise ConfigError("--task translation takes one --train_data PREFIX (of python -m pretrain.preprocess_pairs)")
        if not 0.0 <= args.label_smoothing < 1.0:
            raise ConfigError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
        self.model_config, self.plan, self.seed = model_config, plan, args.seed
        self.smoothing = args.label_smoothing
        self.seq_len = args.seq_len or model_config.max_seq_len
        if self.seq_len > model_config.max_seq_len:
            raise ConfigError(f"--seq_len {self.seq_len} is longer than the model's {model_config.max_seq_len} positions")
        self.train = PairDataset(args.train_data[0])
        self.val = PairDataset(args.val_data) if args.val_data else None
        self.tokenizer = pair_tokenizer(self.train, args.tokenizer)
        if self.val is not None and self.val.src_tokenizer_spec != self.tokenizer.spec:
            raise ConfigError(f"{args.val_data} was made with another tokenizer than {args.train_data[0]}; preprocess "
                              f"both with {self.tokenizer.model_path}")
        for side, size in (("source", model_config.vocab_size), ("target", model_config.target_vocab_size)):
            if self.tokenizer.vocab_size > size:
                raise ConfigError(f"tokenizer {self.tokenizer.model_path} has {self.tokenizer.vocab_size} pieces but the "
                                  f"model's {side} vocabulary {size}; raise it in {args.model_config}")
        self.pad_id, self.bos_id = self.tokenizer.sp.pad_id(), self.tokenizer.sp.bos_id()
        self.max_tokens = plan.micro_batch_size * self.seq_len
        self._batches = {}
        train = self.batches("train", rank_from_env() % plan.dp_size, plan.dp_size)  # checks the data up front
        if rank_from_env() == 0:
            print(f"translation data {self.train.prefix}: {len(self.train):,} pairs, {train.skipped:,} skipped (longer than "
                  f"{self.seq_len} tokens), {len(train):,} batches of <= {self.max_tokens} tokens per rank per epoch, "
                  f"padding fraction {train.padding_fraction:.3f}", flush=True)

    def batches(self, split, dp_rank, dp_size):
        key = (split, dp_rank, dp_size)
        if key not in self._batches:
            pairs = self.train if split == "train" else self.val
            self._batches[key] = TokenBudgetBatches(pairs, self.max_tokens, self.seq_len, self.pad_id, self.bos_id,
                                                    self.seed, dp_rank, dp_size)
        return self._batches[key]

    def build_model(self):
        config = self.model_config
        if getattr(config, "expert_parallel_size", 1) > 1:
            # The all-to-all needs every rank's expert capacity to be the same, but token-budget batches
            # differ in size: every expert gets, on every rank, the capacity of a full token budget.
            full_budget = math.ceil(self.max_tokens * max(config.capacity_factor, config.eval_capacity_factor)
                                    / config.num_experts)
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
        Switch expert capacity."""
        src, tgt_in = batch["src"], batch["tgt_in"]
        return (src, positions_past(batch["src_lengths"], src.shape[1]), tgt_in,
                positions_past(batch["tgt_lengths"], tgt_in.shape[1]))

    @staticmethod
    def targets(batch):
        tgt_out = batch["tgt_out"]
        return tgt_out.masked_fill(positions_past(batch["tgt_lengths"], tgt_out.shape[1]), IGNORE)

    def loss(self, outputs, batch):
        """(loss to backprop, dict of detached parts to log)."""
        logits, aux_loss, moe_stats = outputs
        loss = label_smoothed_cross_entropy(logits, self.targets(batch).to(logits.device), self.smoothing)
        return loss + aux_loss, {"lm_loss": loss.detach(), "aux_loss": aux_loss.detach(), "moe": moe_stats}
