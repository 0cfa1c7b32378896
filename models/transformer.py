"""Encoder-decoder Transformer for translation (Vaswani et al. 2017), pre-LayerNorm, and its Switch variant.

Read top to bottom: config, attention, the two layer kinds, the model (encode, decode, and the
incremental decoding that models/generation.py drives), then the Switch variant, whose chosen
encoder and decoder FFNs are the Switch layers of models/switch.py.

Vocabularies: ``vocab_size`` is the source vocabulary, and the target's too unless ``tgt_vocab_size``
is set. The decoder's input embedding is always tied with its output projection;
``share_all_embeddings`` ties the encoder's embedding as well (one joint vocabulary, as the paper's
English-German model). Masks follow fairseq: ``src_pad_mask`` is True at padding positions.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpointing import ActivationCheckpointing, run_block
from models.gpt import FeedForward, init_weights_
from models.registry import TRAINING_SETTING, register_model
from models.switch import ExpertModel, SwitchFFN, SwitchSettings
from switchyard.deepspeed_compat import full_numel


@dataclass
class TransformerConfig(ActivationCheckpointing):
    vocab_size: int = 320
    tgt_vocab_size: Optional[int] = None  # None: the source vocabulary is the target's too
    share_all_embeddings: bool = True
    max_seq_len: int = 128  # positions of the source and of the target, each
    d_model: int = 64
    n_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 256
    dropout: float = field(default=0.0, metadata=TRAINING_SETTING)
    positions: str = "sinusoidal"  # "sinusoidal" or "learned"
    init_scale: float = field(default=1.0, metadata=TRAINING_SETTING)

    def problem(self):
        """One line describing what is wrong with this config, or None."""
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "encoder_layers", "decoder_layers", "d_ff"):
            if getattr(self, name) <= 0:
                return f"{name} must be positive, got {getattr(self, name)}"
        if self.tgt_vocab_size is not None and self.tgt_vocab_size <= 0:
            return f"tgt_vocab_size must be positive (or null for a shared vocabulary), got {self.tgt_vocab_size}"
        if self.share_all_embeddings and self.target_vocab_size != self.vocab_size:
            return (
                f"share_all_embeddings needs one vocabulary, but vocab_size is {self.vocab_size} and tgt_vocab_size "
                f"{self.tgt_vocab_size}; set share_all_embeddings to false or drop tgt_vocab_size"
            )
        if self.d_model % self.n_heads:
            return f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
        if self.positions not in ("sinusoidal", "learned"):
            return f"positions must be 'sinusoidal' or 'learned', got {self.positions!r}"
        if self.positions == "sinusoidal" and self.d_model % 2:
            return f"sinusoidal positions need an even d_model, got {self.d_model}"
        if not 0.0 <= self.dropout < 1.0:
            return f"dropout must be in [0, 1), got {self.dropout}"
        if self.init_scale <= 0:
            return f"init_scale must be positive, got {self.init_scale}"
        return self.checkpoint_problem()

    @property
    def target_vocab_size(self):
        return self.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size


def sinusoidal_table(num_positions, d_model):
    """Vaswani's positions: sin on even, cos on odd dimensions, wavelengths from 2*pi to 10000*2*pi."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(num_positions, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class Attention(nn.Module):
    """Multi-head attention whose keys/values can be projected once and reused (cross-attention, caches)."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.q = nn.Linear(config.d_model, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def heads(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)

    def keys_values(self, source):
        k, v = self.kv(source).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def forward(self, x, k, v, attend_mask=None, is_causal=False):
        """x (B, T, C) attends to k, v (B, H, S, D); attend_mask (B, 1, 1, S) is True where a key may be seen."""
        B, T, C = x.shape
        y = F.scaled_dot_product_attention(
            self.heads(self.q(x)), k, v, attn_mask=attend_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


def add_ffn(x, ffn, h, used_token):
    """Residual add of ``ffn(h)``: (x + output, aux_loss, stats), aux_loss and stats None for a dense FFN.
    A Switch FFN routes only the tokens where ``used_token`` is True (None: all), so padding takes no
    expert capacity; padding and tokens over capacity get 0 from it and so pass through unchanged."""
    if isinstance(ffn, SwitchFFN):
        out, aux_loss, stats = ffn(h, used_token)
        return x + out, aux_loss, stats
    return x + ffn(h), None, None


class EncoderLayer(nn.Module):
    def __init__(self, config, ffn=None):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.ffn = ffn if ffn is not None else FeedForward(config.d_model, config.d_ff, config.dropout)

    def forward(self, x, attend_mask, used_token):
        """used_token (B, S): True at the real source tokens (None: all)."""
        h = self.ln_attn(x)
        x = x + self.attn(h, *self.attn.keys_values(h), attend_mask=attend_mask)
        return add_ffn(x, self.ffn, self.ln_ffn(x), used_token)


class DecoderLayer(nn.Module):
    def __init__(self, config, ffn=None):
        super().__init__()
        self.ln_self = nn.LayerNorm(config.d_model)
        self.self_attn = Attention(config)
        self.ln_cross = nn.LayerNorm(config.d_model)
        self.cross_attn = Attention(config)
        self.ln_ffn = nn.LayerNorm(config.d_model)
        self.ffn = ffn if ffn is not None else FeedForward(config.d_model, config.d_ff, config.dropout)

    def forward(self, x, cross_kv, src_attend_mask, cache=None, used_token=None):
        """cross_kv: this layer's encoder keys/values. ``cache`` (incremental decoding, x is the newest
        position only) holds the self-attention keys/values of earlier positions and gains this one's.
        used_token (B, T): True at the real target positions (None: all)."""
        h = self.ln_self(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # With a cache the one query is the newest position and may see every key: no mask.
        x = x + self.self_attn(h, k, v, is_causal=cache is None)
        x = x + self.cross_attn(self.ln_cross(x), *cross_kv, attend_mask=src_attend_mask)
        return add_ffn(x, self.ffn, self.ln_ffn(x), used_token)

    def checkpointable(self, x, cross_k, cross_v, src_attend_mask, used_token):
        """The training forward with the encoder's keys and values as tensors of their own (models/checkpointing.py)."""
        return self(x, (cross_k, cross_v), src_attend_mask, None, used_token)


@register_model("transformer", TransformerConfig, "encoder-decoder")
class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.src_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.tgt_emb = self.src_emb if config.share_all_embeddings else nn.Embedding(config.target_vocab_size, config.d_model)
        if config.positions == "learned":
            self.src_pos = nn.Embedding(config.max_seq_len, config.d_model)
            self.tgt_pos = nn.Embedding(config.max_seq_len, config.d_model)
        else:  # not a parameter and not saved: recomputed from the config
            self.register_buffer("sinusoids", sinusoidal_table(config.max_seq_len, config.d_model), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config, self.make_ffn(config, i)) for i in range(config.encoder_layers))
        self.ln_enc = nn.LayerNorm(config.d_model)
        self.decoder = nn.ModuleList(DecoderLayer(config, self.make_ffn(config, config.encoder_layers + i)) for i in range(config.decoder_layers))
        self.ln_dec = nn.LayerNorm(config.d_model)
        self.init_weights()

    def make_ffn(self, config, layer_idx):
        """The FFN of layer ``layer_idx`` (encoder layers first, then decoder layers); None: dense."""
        return None

    def init_weights(self):
        init_weights_(self, self.config.init_scale)

    def embed(self, emb, pos_emb, tokens, start=0):
        # Embeddings drawn with std 1/sqrt(d_model) and scaled by sqrt(d_model), as the paper scales them.
        x = emb(tokens) * math.sqrt(self.config.d_model)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = x + (pos_emb(positions) if self.config.positions == "learned" else self.sinusoids[positions].to(x.dtype))
        return self.drop(x)

    @staticmethod
    def attend_mask(src_pad_mask):
        """The attention mask of the source keys; None without source padding: SDPA's FlashAttention kernel takes
        no mask, so only an unmasked call can use it (a boolean mask goes to the memory-efficient kernel)."""
        return None if src_pad_mask is None else ~src_pad_mask[:, None, None, :]

    def encode(self, src, src_pad_mask):
        """src (B, S), src_pad_mask (B, S) True at padding (None: no padding) -> (memory (B, S, C), aux_loss, stats)."""
        x = self.embed(self.src_emb, getattr(self, "src_pos", None), src)
        attend_mask = self.attend_mask(src_pad_mask)
        used_token = None if src_pad_mask is None else ~src_pad_mask
        aux_loss, stats = x.new_zeros((), dtype=torch.float32), []
        for index, layer in enumerate(self.encoder):
            x, layer_aux, layer_stats = run_block(self.config, index, layer, x, attend_mask, used_token)
            if layer_aux is not None:
                aux_loss, stats = aux_loss + layer_aux, stats + [layer_stats]
        return self.ln_enc(x), aux_loss, stats

    def cross_keys_values(self, memory):
        """Every decoder layer's encoder keys/values: computed once per sentence when decoding incrementally."""
        return [layer.cross_attn.keys_values(memory) for layer in self.decoder]

    def decode(self, tgt_in, cross_kv, src_pad_mask, caches=None, start=0, tgt_pad_mask=None):
        """tgt_in (B, T) -> (logits (B, T, V), aux_loss, stats). With ``caches`` (one dict per layer), tgt_in
        holds only the positions from ``start`` on and the caches hold the earlier ones. ``tgt_pad_mask``
        (B, T), True at target padding (None: none), keeps padding out of the Switch layers' routing; the
        causal mask already keeps it from the real positions' attention."""
        x = self.embed(self.tgt_emb, getattr(self, "tgt_pos", None), tgt_in, start)
        attend_mask = self.attend_mask(src_pad_mask)
        used_token = None if tgt_pad_mask is None else ~tgt_pad_mask
        aux_loss, stats = x.new_zeros((), dtype=torch.float32), []
        for i, layer in enumerate(self.decoder):
            if caches is None:  # the encoder's keys and values as arguments of their own: a checkpoint passes tensors' gradients only
                x, layer_aux, layer_stats = run_block(
                    self.config, self.config.encoder_layers + i, layer, x, *cross_kv[i], attend_mask, used_token, forward=layer.checkpointable
                )
            else:
                x, layer_aux, layer_stats = layer(x, cross_kv[i], attend_mask, caches[i], used_token)
            if layer_aux is not None:
                aux_loss, stats = aux_loss + layer_aux, stats + [layer_stats]
        logits = F.linear(self.ln_dec(x), self.tgt_emb.weight)  # tied decoder input/output embedding
        return logits, aux_loss, stats

    def forward(self, src, src_pad_mask, tgt_in, tgt_pad_mask=None):
        """(logits (B, T, V), aux_loss scalar, per-MoE-layer stats list), the LMs' output shape.
        Padding (src_pad_mask, tgt_pad_mask: True there; None: no padding on that side) takes no
        Switch expert capacity and counts in neither the aux loss nor the stats."""
        memory, enc_aux, enc_stats = self.encode(src, src_pad_mask)
        logits, dec_aux, dec_stats = self.decode(tgt_in, self.cross_keys_values(memory), src_pad_mask, tgt_pad_mask=tgt_pad_mask)
        return logits, enc_aux + dec_aux, enc_stats + dec_stats

    def param_counts(self):
        """(total parameters, parameters active per token), also when ZeRO-3 has partitioned them."""
        total = sum(full_numel(p) for p in self.parameters())
        return total, total

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, source and target both seq_len long: 6 x the matmul parameters
        (PaLM's rule; position tables and the source embedding are lookups, the tied target embedding
        is the output projection) + attention (12 x d_model x seq_len per attention: encoder self,
        decoder self and decoder cross)."""
        c = self.config
        _, active = self.param_counts()
        lookup_tables = ("src_pos", "tgt_pos") if c.share_all_embeddings else ("src_emb", "src_pos", "tgt_pos")
        matmul = active - sum(full_numel(p) for name, p in self.named_parameters() if name.startswith(lookup_tables))
        return 6 * matmul + 12 * (c.encoder_layers + 2 * c.decoder_layers) * c.d_model * seq_len


# ------------------------------------------------------------------------------------------
# Switch encoder-decoder: the FFN of chosen layers, in the encoder and in the decoder, is a
# Switch layer (models/switch.py), configured by the same Switch
# fields as the Switch LM (SwitchSettings).


@dataclass
class SwitchTransformerConfig(SwitchSettings, TransformerConfig):
    def problem(self):
        base = super().problem() or self.switch_problem()
        if base:
            return base
        depth = min(self.encoder_layers, self.decoder_layers)
        if self.moe_layers is not None and not all(0 <= i < depth for i in self.moe_layers):
            return f"moe_layers {self.moe_layers} out of range for the shallower stack ({depth} layers)"
        if not self.layers_with_experts():
            return "no layer has experts (moe_layers is empty, or one layer per stack): use the 'transformer' family"
        return None

    def layers_with_experts(self):
        """Global layer indices (encoder 0..E-1, then decoder E..E+D-1) with a Switch FFN, in module order."""

        def chosen(n):
            return range(1, n, 2) if self.moe_layers is None else self.moe_layers

        return [i for i in chosen(self.encoder_layers)] + [self.encoder_layers + i for i in chosen(self.decoder_layers)]


@register_model("switch-transformer", SwitchTransformerConfig, "encoder-decoder", experts=True)
class SwitchTransformer(ExpertModel, Transformer):
    def make_ffn(self, config, layer_idx):
        return SwitchFFN(config, layer_idx) if layer_idx in config.layers_with_experts() else None
