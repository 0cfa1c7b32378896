"""Dense decoder-only Transformer LM (GPT): pre-LayerNorm, tied embeddings, SDPA attention.

Read top to bottom: config, attention, feed-forward, block, model, then the same model cut
into pipeline stages. The Switch LM (models/switch.py) reuses everything here and swaps the
feed-forward of chosen layers.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from models.checkpointing import ActivationCheckpointing, run_block
from models.registry import TRAINING_SETTING, register_model
from switchyard.deepspeed_compat import full_numel, stage_layers, tied_modules, whole_fp32_on_cpu


@dataclass
class GPTConfig(ActivationCheckpointing):
    vocab_size: int = 320
    max_seq_len: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = field(default=0.0, metadata=TRAINING_SETTING)
    positions: str = "learned"  # "learned" or "rotary"
    # Weights ~ truncated normal with std sqrt(init_scale / fan_in) (Switch Transformer, sec. 2.4).
    init_scale: float = field(default=1.0, metadata=TRAINING_SETTING)

    def longest_sequence(self):
        """The longest sequence the model can read: its learned position table's length; None for rotary positions,
        which are computed for any length."""
        return self.max_seq_len if self.positions == "learned" else None

    def problem(self):
        """One line describing what is wrong with this config, or None."""
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                return f"{name} must be positive, got {getattr(self, name)}"
        if self.d_model % self.n_heads:
            return f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
        if self.positions not in ("learned", "rotary"):
            return f"positions must be 'learned' or 'rotary', got {self.positions!r}"
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            return f"rotary positions need an even head size, got {self.d_model // self.n_heads}"
        if not 0.0 <= self.dropout < 1.0:
            return f"dropout must be in [0, 1), got {self.dropout}"
        if self.init_scale <= 0:
            return f"init_scale must be positive, got {self.init_scale}"
        return self.checkpoint_problem()


def init_linear_(weight, init_scale, generator=None):
    """Truncated normal, std sqrt(init_scale / fan_in), cut at two std (Switch Transformer's init)."""
    std = math.sqrt(init_scale / weight.shape[-1])
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=generator)


def init_weights_(model, init_scale):
    """Every Linear and Embedding of ``model`` by init_linear_, biases zero. (Switch experts are stacked
    parameters, not Linear modules: their layer draws them itself, outside the global RNG stream, so the rest
    of the model is the same whatever the expert-parallel size.)"""
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        # Built under deepspeed.zero.Init (ZeRO-3), every module is partitioned by the time its model's __init__
        # calls this: each is gathered whole, fp32 on the CPU, while it is drawn, so the draws are a plain build's.
        with whole_fp32_on_cpu(module.parameters(recurse=False)):
            init_linear_(module.weight, init_scale)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)


def rotary_tables(seq_len, head_dim, device, theta=10000.0):
    """cos and sin of position t x theta^(-2i / head_dim), [seq_len, head_dim / 2] (RoFormer, eq. 15)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (B, H, T, D); rotate pairs (x1, x2) of the two halves of the head dimension.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.rotary = config.positions == "rotary"
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ulysses = None  # models/ulysses.py: the all-to-all around local_attention when sequences are split

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads) for t in (q, k, v))
        y = self.local_attention(q, k, v) if self.ulysses is None else self.ulysses(q, k, v)
        return self.resid_dropout(self.proj(y.reshape(B, T, C)))

    def local_attention(self, q, k, v):
        """Causal attention of [B, T, heads, D] queries, keys and values over their whole sequence; any subset of
        the heads (under sequence parallelism, this rank's)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.rotary:
            cos, sin = rotary_tables(q.shape[2], q.shape[3], q.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # SDPA picks FlashAttention / memory-efficient kernels on a GPU.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN block; ``ffn`` returns (output, aux_loss, stats) so dense and Switch blocks share one shape."""

    def __init__(self, config, ffn=None):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.ffn = ffn if ffn is not None else FeedForward(config.d_model, config.d_ff, config.dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_attn(x))
        out = self.ffn(self.ln_ffn(x))
        if isinstance(out, tuple):  # a Switch FFN: tokens over capacity get 0 here, so pass through the residual
            out, aux_loss, stats = out
            return x + out, aux_loss, stats
        return x + out, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.make_block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.sequence_slice = None  # models/ulysses.py: which slice of each sequence this rank reads (None: all)
        self.init_weights()

    def make_block(self, config, layer_idx):
        return Block(config)

    def init_weights(self):
        init_weights_(self, self.config.init_scale)

    def forward(self, tokens):
        """tokens (B, T) -> (logits (B, T, V), aux_loss scalar, per-MoE-layer stats list)."""
        B, T = tokens.shape
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            first = 0 if self.sequence_slice is None else self.sequence_slice.first_position(T)
            x = x + self.pos_emb(torch.arange(first, first + T, device=tokens.device))
        x = self.drop(x)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats = []
        for index, block in enumerate(self.blocks):
            x, block_aux, block_stats = run_block(self.config, index, block, x)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
                stats.append(block_stats)
        logits = F.linear(self.ln_f(x), self.tok_emb.weight)  # tied input/output embedding
        return logits, aux_loss, stats

    def param_counts(self):
        """(total parameters, parameters active per token), also when ZeRO-3 has partitioned them."""
        total = sum(full_numel(p) for p in self.parameters())
        return total, total

    def flops_per_token(self, seq_len):
        return training_flops_per_token(self.config, self.param_counts()[1], seq_len)


def training_flops_per_token(config, active_params, seq_len):
    """Training FLOPs per token: 6 x active matmul parameters + causal attention (PaLM, app. B)."""
    matmul_params = active_params - (config.max_seq_len * config.d_model if config.positions == "learned" else 0)
    return 6 * matmul_params + 12 * config.n_layers * config.d_model * seq_len


# ------------------------------------------------------------------------------------------
# Pipeline parallelism: the same GPT as a flat list of layers for deepspeed.pipe.PipelineModule.
#
#   layer 0          token embedding, tied with the head (TiedLayerSpec key "tok_emb")
#   layer 1          learned positions (nothing for rotary) + dropout
#   layers 2..L+1    the blocks
#   layer L+2        final LayerNorm
#   layer L+3        head: logits = x @ tok_emb.weight.T, the tied embedding again
#
# Each layer's state_dict is a slice of GPT's state_dict (GPTPipe.state_dict_prefixes), so a pipeline
# checkpoint, which DeepSpeed writes as one layer_XX-model_states.pt per layer, converts back
# (pretrain/run_dir.py pipeline_state_dict).


class Positions(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        return self.drop(x)


class PipelineBlock(Block):
    """A dense block passing one tensor to the next stage (no aux loss, no MoE stats)."""

    def forward(self, x):
        return super().forward(x)[0]


def tied_head(tok_emb, x):
    return F.linear(x, tok_emb.weight)


def to_pipeline_layers(config):
    return [
        TiedLayerSpec("tok_emb", nn.Embedding, config.vocab_size, config.d_model),
        LayerSpec(Positions, config),
        *[LayerSpec(PipelineBlock, config) for _ in range(config.n_layers)],
        LayerSpec(nn.LayerNorm, config.d_model),
        TiedLayerSpec("tok_emb", nn.Embedding, config.vocab_size, config.d_model, forward_fn=tied_head),
    ]


class GPTPipe(PipelineModule):
    """GPT split into ``num_stages`` pipeline stages; each rank builds only its own stage's layers.

    It starts from exactly the weights GPT(config) would draw from the global RNG here: a plain
    GPT is built first and its weights copied in (the whole model is briefly in memory on each rank).
    """

    def __init__(self, config, num_stages, loss_fn):
        plain = GPT(config)
        super().__init__(to_pipeline_layers(config), num_stages=num_stages, loss_fn=loss_fn, partition_method="parameters")
        self.config = config
        self.counts = plain.param_counts()
        self.load_gpt_state_dict(plain.state_dict())

    @staticmethod
    def state_dict_prefixes(config):
        """Layer index -> prefix of its parameters in GPT's state_dict (None: the head has none of its own)."""
        return ["tok_emb.", "", *[f"blocks.{i}." for i in range(config.n_layers)], "ln_f.", None]

    def load_gpt_state_dict(self, state_dict):
        """Copy this stage's slice of a GPT state_dict into its layers (and its copy of the tied embedding)."""
        prefixes = self.state_dict_prefixes(self.config)
        layers = [(prefixes[index], layer) for index, layer in stage_layers(self)]
        layers += [(key + ".", module) for key, module in tied_modules(self).items()]
        for prefix, layer in layers:
            layer.load_state_dict({k: state_dict[prefix + k] for k in layer.state_dict()})

    def param_counts(self):
        return self.counts  # of the whole model, not of this stage

    def flops_per_token(self, seq_len):
        return training_flops_per_token(self.config, self.counts[1], seq_len)


# Registered here, below its pipeline form, which the registration names. Its export is the transformers
# architecture it is exactly (eval/export_hf.py): GPT-2 with learned positions, GPT-NeoX with rotary ones.
register_model(
    "gpt",
    GPTConfig,
    "decoder",
    pipeline=GPTPipe,
    export=lambda config: "gpt2" if config.positions == "learned" else "gpt_neox",
    sequence_parallel=lambda config: {"n_heads": config.n_heads},
)(GPT)
