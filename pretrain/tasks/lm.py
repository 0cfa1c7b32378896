"""Language modeling: next-token cross entropy (+ the Switch auxiliary losses) on packed windows,
from one corpus or several blended with weights."""

import os

import numpy as np
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models import build_model
from models.registry import check_architecture, family_of
from models.ulysses import sequence_slice
from pretrain.data.indexed import IndexedTokens, prefix_of
from pretrain.data.lm_dataset import BlendedOrder, BlendedSamples, LMSamples, SeededOrder, micro_batch, read_text_tokens, split_tokens
from pretrain.data.tokenizer import check_fits_model, tokenizer_for_data
from pretrain.tasks import register_task
from switchyard.errors import ConfigError

# Logits per piece of the chunked loss: 128 MB in fp32. The shipped tiny models' logits fit in one piece, which is
# computed exactly as one unchunked cross entropy.
LOSS_CHUNK_ELEMENTS = 1 << 25


def summed_cross_entropy(logits, targets):
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def lm_loss(logits, targets):
    """Mean next-token cross entropy over ``targets`` (B, T), computed in fp32 from ``logits`` (B, T, V).

    Logits of more than LOSS_CHUNK_ELEMENTS go through it in pieces of rows, each upcast and its log-softmax
    recomputed in the backward pass (activation checkpointing), so neither a full fp32 copy of the logits nor their
    fp32 log-softmax is ever held: at gpt-125m, seq 2048, micro-batch 8 those are 3.3 GB each, the largest tensors
    of the step. Only the gradient of the logits, in their own dtype, is full size."""
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    rows = max(1, LOSS_CHUNK_ELEMENTS // logits.size(-1))
    if logits.size(0) <= rows:
        return F.cross_entropy(logits.float(), targets)
    pieces = zip(logits.split(rows), targets.split(rows))
    total = sum(checkpoint(summed_cross_entropy, piece, piece_targets, use_reentrant=False) for piece, piece_targets in pieces)
    return total / (targets != -100).sum()  # cross_entropy's mean: over the targets it does not ignore


@register_task("lm")
class LanguageModelingTask:
    def __init__(self, args, model_config, plan):
        self.model_config = model_config
        self.pipeline_stages = plan.pipeline_stages
        self.plan = plan
        check_architecture(model_config, "decoder", f"--task lm ({args.model_config}; encoder-decoders train with --task translation)")
        self.seq_len = args.seq_len or model_config.max_seq_len
        longest = model_config.longest_sequence()
        if longest is not None and self.seq_len > longest:
            raise ConfigError(
                f"--seq_len {self.seq_len} is longer than the {longest} learned positions of {args.model_config}; "
                f"pass --seq_len <= {longest}, or raise max_seq_len in a new run (or use positions 'rotary')"
            )
        if self.seq_len % plan.sequence_parallel_size:
            raise ConfigError(
                f"--seq_len {self.seq_len} is not divisible by sequence_parallel_size {plan.sequence_parallel_size} "
                f"(each rank holds an equal slice of every sequence); pass a --seq_len that is a multiple of it"
            )
        # Text files are tokenized here; preprocessed ones (PREFIX or PREFIX.bin) are memory-mapped.
        indexed = {path: IndexedTokens(path) for path in (*args.train_data, args.val_data) if path and prefix_of(path)}
        # Without --tokenizer, preprocessed data bring the tokenizer they were made with (else bytes).
        self.tokenizer = tokenizer_for_data(args.tokenizer, {data.idx_path: data.tokenizer_spec for data in indexed.values()})
        check_fits_model(self.tokenizer, model_config.vocab_size, args.model_config)

        def read(path):
            return indexed[path].tokens if path in indexed else read_text_tokens(path, self.tokenizer)

        corpora = [read(path) for path in args.train_data]
        if args.val_data:
            val_tokens, val_name = read(args.val_data), args.val_data
        else:  # the tail of each corpus
            corpora, tails = zip(*(split_tokens(tokens, args.val_fraction) for tokens in corpora))
            val_tokens = tails[0] if len(tails) == 1 else np.concatenate(tails)
            val_name = f"validation split of {', '.join(args.train_data)}"
        train = [LMSamples(tokens, self.seq_len, path) for tokens, path in zip(corpora, args.train_data)]
        if len(train) == 1:
            self.train, self.train_order = train[0], SeededOrder(train[0].num_samples, args.seed)
        else:
            sizes = [samples.num_samples for samples in train]
            self.train = BlendedSamples(train)
            self.train_order = BlendedOrder(sizes, args.train_data_weights or sizes, args.seed)
            if os.environ.get("RANK", "0") == "0":  # before any process group: every rank would print it
                self.log_blend(args, sizes, plan.train_batch_size)
        self.val = LMSamples(val_tokens, self.seq_len, val_name) if len(val_tokens) else None

    def log_blend(self, args, sizes, train_batch_size):
        weights = args.train_data_weights or sizes
        for path, size, weight, share in zip(args.train_data, sizes, weights, self.train_order.shares):
            epochs = args.max_steps * train_batch_size * share / size
            print(
                f"blend {path}: {size:,} samples, weight {weight:g}, share {share:.2%} of samples "
                f"({epochs:.2f} epochs of it in {args.max_steps} steps)",
                flush=True,
            )

    def build_model(self):
        if self.pipeline_stages > 1:  # the DeepSpeed engine built on it is a PipelineEngine
            return family_of(self.model_config).pipeline(self.model_config, self.pipeline_stages, loss_fn=lm_loss)
        return build_model(self.model_config)

    def train_batch(self, consumed_samples, micro_step, micro_batch_size, dp_rank, dp_size, seq_len=None):
        """``seq_len``: the length sequence-length warmup trains this step at (None: the run's), in tokens of input;
        cut before the sequence-parallel slice, so that each rank holds its share of the cut windows."""
        batch = micro_batch(self.train, self.train_order, consumed_samples, micro_step, micro_batch_size, dp_rank, dp_size, seq_len)
        return self.own_slice(batch)

    # train_batch takes seq_len: sequence-length warmup can cut its batches (pretrain/seqlen_warmup.check_launch).
    supports_seqlen_warmup = True

    def val_batch(self, i, micro_batch_size, dp_rank, dp_size):
        """The i-th validation micro-batch of this rank, in file order, wrapping around."""
        n = self.val.num_samples
        first = (i * dp_size + dp_rank) * micro_batch_size
        return self.own_slice(micro_batch(self.val, lambda k: k % n, first, 0, micro_batch_size, 0, 1))

    def own_slice(self, batch):
        """Under sequence parallelism this rank's slice of each window (models/ulysses.py), else the windows."""
        if self.plan.sequence_parallel_size == 1:
            return batch
        return sequence_slice(batch, self.plan.sequence_parallel_rank(dist.get_rank()), self.plan.sequence_parallel_size)

    def loss(self, outputs, batch):
        """(loss to backprop, dict of detached parts to log). Under sequence parallelism the logged part is the mean
        over this rank's slice, and the backpropagated one that over 1/S of the sequence's targets (each slice holds
        as many): DeepSpeed sums the gradients of the S slices and averages over data-parallel ranks only."""
        logits, aux_loss, moe_stats = outputs
        loss = lm_loss(logits, self.targets(batch))
        share = loss / self.plan.sequence_parallel_size if self.plan.sequence_parallel_size > 1 else loss
        return share + aux_loss, {"lm_loss": loss.detach(), "aux_loss": aux_loss.detach(), "moe": moe_stats}

    @staticmethod
    def inputs(batch):
        return batch[:, :-1]

    @staticmethod
    def targets(batch):
        return batch[:, 1:]
