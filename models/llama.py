"""Llama-style decoder LM: RMSNorm, SwiGLU FFN, rotary positions, grouped-query attention, no biases.

Read top to bottom: config, attention, feed-forward, block, model, then the mixture-of-experts form
("llama_moe"), whose chosen layers take models/switch.py's SwitchFFN (SwiGLU experts) for their FFN.
Both export to transformers (eval/export_hf.py): the dense form as LlamaForCausalLM, the MoE form as
Qwen2MoeForCausalLM. Neither has a pipeline form: a launch with pipeline stages is refused
(pretrain/ds_config.py asks the registration).
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpointing import ActivationCheckpointing, run_block
from models.gpt import apply_rotary, init_weights_, rotary_tables
from models.registry import TRAINING_SETTING, register_model
from models.switch import DecoderSwitchSettings, ExpertModel, SwitchFFN
from switchyard.deepspeed_compat import full_numel


@dataclass
class LlamaConfig(ActivationCheckpointing):
    vocab_size: int = 320
    max_seq_len: int = 128  # the default --seq_len (rotary positions are computed for any length)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    # Key/value heads, each shared by n_heads / n_kv_heads query heads (grouped-query attention); 1 is
    # multi-query attention; None: n_heads (multi-head attention).
    n_kv_heads: Optional[int] = None
    d_ff: int = 176  # SwiGLU's hidden size (Llama: about 8/3 d_model, so that it costs a 4 d_model GELU FFN's)
    dropout: float = field(default=0.0, metadata=TRAINING_SETTING)
    rope_theta: float = 10000.0  # the rotary base: position t turns pair i by t x rope_theta^(-2i / head size)
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    tie_embeddings: bool = False  # the output projection is the input embedding (Llama 1-3 8B+: untied)
    init_scale: float = field(default=1.0, metadata=TRAINING_SETTING)  # as GPTConfig's

    def kv_heads(self):
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def head_dim(self):
        return self.d_model // self.n_heads

    def longest_sequence(self):
        """None: rotary positions are computed for any length (see GPTConfig.longest_sequence)."""
        return None

    def problem(self):
        """One line describing what is wrong with this config, or None."""
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                return f"{name} must be positive, got {getattr(self, name)}"
        if self.d_model % self.n_heads:
            return f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
        if self.head_dim() % 2:
            return f"rotary positions need an even head size, got {self.head_dim()}"
        if self.kv_heads() <= 0 or self.n_heads % self.kv_heads():
            return f"n_kv_heads ({self.kv_heads()}) must be positive and divide n_heads ({self.n_heads})"
        if self.rope_theta <= 1 or self.norm_eps <= 0:
            return f"rope_theta must be > 1 and norm_eps > 0, got {self.rope_theta} and {self.norm_eps}"
        if not 0.0 <= self.dropout < 1.0:
            return f"dropout must be in [0, 1), got {self.dropout}"
        if self.init_scale <= 0:
            return f"init_scale must be positive, got {self.init_scale}"
        return self.checkpoint_problem()


class GroupedQueryAttention(nn.Module):
    """Causal attention whose n_kv_heads key/value heads each serve n_heads / n_kv_heads consecutive query heads
    (query heads g x group ... (g + 1) x group - 1 read kv head g, as transformers' repeat_kv), with rotary
    positions on queries and keys."""

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads(), config.head_dim()
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ulysses = None  # models/ulysses.py: the all-to-all around local_attention when sequences are split

    def forward(self, x):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        y = self.local_attention(q, k, v) if self.ulysses is None else self.ulysses(q, k, v)
        return self.resid_dropout(self.wo(y.reshape(B, T, C)))

    def local_attention(self, q, k, v):
        """Causal attention of [B, T, heads, D] queries and [B, T, kv heads, D] keys and values over their whole
        sequence; any subset of the kv heads with their query heads (under sequence parallelism, this rank's)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = rotary_tables(q.shape[2], self.head_dim, q.device, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa: SDPA reads each kv head for its group of query heads, without copying them out.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return y.transpose(1, 2)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020), no biases: the experts' "swiglu" of models/switch.py, dense."""

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate projection (through SiLU)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up projection
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down projection
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block; as GPT's Block, ``ffn`` may be a Switch layer returning (output, aux_loss, stats)."""

    def __init__(self, config, ffn=None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = GroupedQueryAttention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = ffn if ffn is not None else SwiGLU(config.d_model, config.d_ff, config.dropout)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        out = self.ffn(self.ffn_norm(x))
        if isinstance(out, tuple):  # a Switch FFN: tokens over capacity get 0 here, so pass through the residual
            out, aux_loss, stats = out
            return x + out, aux_loss, stats
        return x + out, None, None


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(self.make_block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    def make_block(self, config, layer_idx):
        return LlamaBlock(config)

    def init_weights(self):
        init_weights_(self, self.config.init_scale)

    def forward(self, tokens):
        """tokens (B, T) -> (logits (B, T, V), aux_loss scalar, per-MoE-layer stats list)."""
        x = self.drop(self.tok_emb(tokens))
        aux_loss = x.new_zeros((), dtype=torch.float32)
        stats = []
        for index, block in enumerate(self.blocks):
            x, block_aux, block_stats = run_block(self.config, index, block, x)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
                stats.append(block_stats)
        x = self.norm(x)
        logits = F.linear(x, self.tok_emb.weight) if self.output is None else self.output(x)
        return logits, aux_loss, stats

    def param_counts(self):
        """(total parameters, parameters active per token), also when ZeRO-3 has partitioned them."""
        total = sum(full_numel(p) for p in self.parameters())
        return total, total

    def flops_per_token(self, seq_len):
        return training_flops_per_token(self.config, self.param_counts()[1], seq_len)


def training_flops_per_token(config, active_params, seq_len):
    """6 x active matmul parameters + causal attention (PaLM, app. B), as GPT's: an untied input embedding is a
    lookup, not a matmul. Attention's scores and mixing cost the same with grouped kv heads (n_heads x head size)."""
    matmul_params = active_params - (0 if config.tie_embeddings else config.vocab_size * config.d_model)
    return 6 * matmul_params + 12 * config.n_layers * config.d_model * seq_len


register_model(
    "llama",
    LlamaConfig,
    "decoder",
    export=lambda config: "llama",
    sequence_parallel=lambda config: {"n_heads": config.n_heads, "n_kv_heads": config.kv_heads()},
)(Llama)


# ------------------------------------------------------------------------------------------
# Mixture of experts: the FFN of chosen layers is a SwitchFFN with SwiGLU experts of d_ff each (top-k routing,
# capacity or dropless, shared expert, router bias: models/switch.py's SwitchSettings).


@dataclass
class LlamaMoEConfig(DecoderSwitchSettings, LlamaConfig):
    expert_activation: str = "swiglu"  # the dense FFN's; the only one a Llama block takes

    def problem(self):
        base = super().problem() or self.decoder_experts_problem("llama")
        if base:
            return base
        if self.expert_activation != "swiglu":
            return f"llama_moe experts are SwiGLU FFNs, as its dense ones (no biases); expert_activation must be 'swiglu', got {self.expert_activation!r}"
        return None


class LlamaMoE(ExpertModel, Llama):
    def make_block(self, config, layer_idx):
        if layer_idx in config.layers_with_experts():
            return LlamaBlock(config, ffn=SwitchFFN(config, layer_idx))
        return LlamaBlock(config)


register_model("llama_moe", LlamaMoEConfig, "decoder", experts=True, export=lambda config: "qwen2_moe")(LlamaMoE)
