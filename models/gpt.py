"""Dense decoder-only Transformer LM (GPT): pre-LayerNorm, tied embeddings, SDPA attention.

Read top to bottom: config, attention, feed-forward, block, model. The Switch LM
(models/switch.py) reuses everything here and swaps the feed-forward of chosen layers.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model


@dataclass
class GPTConfig:
    vocab_size: int = 320
    max_seq_len: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    positions: str = "learned"  # "learned" or "rotary"
    # Weights ~ truncated normal with std sqrt(init_scale / fan_in) (Switch Transformer, sec. 2.4).
    init_scale: float = 1.0

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
        return None


def init_linear_(weight, init_scale, generator=None):
    """Truncated normal, std sqrt(init_scale / fan_in), cut at two std (Switch Transformer's init)."""
    std = math.sqrt(init_scale / weight.shape[-1])
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=generator)


def rotary_tables(seq_len, head_dim, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
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

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.rotary:
            cos, sin = rotary_tables(T, C // self.n_heads, x.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # SDPA picks FlashAttention / memory-efficient kernels on a GPU.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


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


@register_model("gpt", GPTConfig)
class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.make_block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.init_weights()

    def make_block(self, config, layer_idx):
        return Block(config)

    def init_weights(self):
        # Modules marked ``own_init`` (Switch experts) are initialized by their layer, outside the
        # global RNG stream, so the rest of the model is the same whatever the expert-parallel size.
        own = {id(m) for owner in self.modules() if getattr(owner, "own_init", False) for m in owner.modules()}
        for module in self.modules():
            if id(module) in own:
                continue
            if isinstance(module, nn.Linear):
                init_linear_(module.weight, self.config.init_scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                init_linear_(module.weight, self.config.init_scale)

    def forward(self, tokens):
        """tokens (B, T) -> (logits (B, T, V), aux_loss scalar, per-MoE-layer stats list)."""
        B, T = tokens.shape
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        x = self.drop(x)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats = []
        for block in self.blocks:
            x, block_aux, block_stats = block(x)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
                stats.append(block_stats)
        logits = F.linear(self.ln_f(x), self.tok_emb.weight)  # tied input/output embedding
        return logits, aux_loss, stats

    def param_counts(self):
        """(total parameters, parameters active per token); the position table is a lookup, not compute."""
        total = sum(p.numel() for p in self.parameters())
        return total, total

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 x active matmul parameters + causal attention (PaLM, app. B)."""
        _, active = self.param_counts()
        matmul_params = active - (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return 6 * matmul_params + 12 * self.config.n_layers * self.config.d_model * seq_len
