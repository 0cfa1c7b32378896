"""Switch Transformer LM: the GPT of models/gpt.py with chosen FFNs replaced by top-1 expert layers.

The expert layer is DeepSpeed's ``deepspeed.moe.layer.MoE`` (k=1), so experts are sharded over
expert-parallel ranks and tokens travel by all-to-all. What the Switch paper adds on top lives here:
the capacity factors, the load-balancing loss coefficient, router z-loss, expert dropout, the
reduced init (init_scale 0.1 in the presets) and each expert initialized on its own.
DeepSpeed's gate already computes the router in float32 whatever the model's dtype
(TopKGate.forward casts input and weight), which is the paper's selective precision.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.moe.layer import MoE

from models.gpt import GPT, Block, GPTConfig, init_linear_
from models.registry import TRAINING_SETTING, register_model
from switchyard import deepspeed_compat


@dataclass
class SwitchSettings:
    """The Switch fields of a config, shared by the LM's (SwitchConfig) and the encoder-decoder's
    (models/transformer.py); SwitchFFN reads them. A config inherits it before its dense base class,
    ``class C(SwitchSettings, DenseConfig)``, so that its init_scale replaces the dense default while
    the field order stays the dense fields, then these."""

    init_scale: float = field(default=0.1, metadata=TRAINING_SETTING)
    num_experts: int = 4
    # Layers whose FFN is a Switch layer (the encoder-decoder: indices within each stack, applied to both);
    # None means every other layer (1, 3, 5, ...) as in the paper.
    moe_layers: Optional[List[int]] = None
    capacity_factor: float = field(default=1.25, metadata=TRAINING_SETTING)
    eval_capacity_factor: float = field(default=2.0, metadata=TRAINING_SETTING)
    min_capacity: int = field(default=4, metadata=TRAINING_SETTING)
    aux_loss_coef: float = field(default=0.01, metadata=TRAINING_SETTING)
    z_loss_coef: float = field(default=0.0, metadata=TRAINING_SETTING)  # router z-loss (ST-MoE); 0 turns it off
    expert_dropout: Optional[float] = field(default=None, metadata=TRAINING_SETTING)  # None: same as dropout
    # Set at launch from the DeepSpeed config's "moe": {"expert_parallel_size": N}, never in a model file.
    expert_parallel_size: int = field(default=1, metadata={"from_launch": True})

    def switch_problem(self):
        """What is wrong with the expert and routing settings, or None."""
        if self.num_experts < 1:
            return f"num_experts must be >= 1, got {self.num_experts}"
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            return "capacity_factor and eval_capacity_factor must be positive"
        if self.min_capacity < 0 or self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            return "min_capacity, aux_loss_coef and z_loss_coef must be >= 0"
        if self.expert_dropout is not None and not 0.0 <= self.expert_dropout < 1.0:
            return f"expert_dropout must be in [0, 1), got {self.expert_dropout}"
        if self.num_experts % self.expert_parallel_size:
            return f"num_experts ({self.num_experts}) is not divisible by the expert-parallel size ({self.expert_parallel_size}); change one of them"
        return None


@dataclass
class SwitchConfig(SwitchSettings, GPTConfig):
    def problem(self):
        base = super().problem() or self.switch_problem()
        if base:
            return base
        bad = [i for i in self.layers_with_experts() if not 0 <= i < self.n_layers]
        if bad:
            return f"moe_layers {bad} out of range for n_layers={self.n_layers}"
        if not self.layers_with_experts():
            return "moe_layers is empty: use the 'gpt' family for a dense model"
        return None

    def layers_with_experts(self):
        return list(range(1, self.n_layers, 2)) if self.moe_layers is None else list(self.moe_layers)


class Expert(nn.Module):
    """One expert's FFN; its dropout (expert dropout) is separate from the rest of the model's."""

    own_init = True  # SwitchFFN.init_experts draws each expert's weights

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.proj(self.dropout(F.gelu(self.fc(x))))


class SwitchFFN(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        expert_dropout = config.dropout if config.expert_dropout is None else config.expert_dropout
        self.moe = MoE(
            hidden_size=config.d_model,
            expert=Expert(config.d_model, config.d_ff, expert_dropout),
            num_experts=config.num_experts,
            ep_size=config.expert_parallel_size,
            k=1,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            min_capacity=config.min_capacity,
            drop_tokens=True,
            use_rts=False,  # Switch drops the overflow; random token selection would make runs depend on RNG
        )
        self.layer_idx = layer_idx

    def local_experts(self):
        return deepspeed_compat.local_experts(self.moe)

    def init_experts(self, seed):
        """DeepSpeed deep-copies one expert, so every expert starts identical: give each its own draw.

        Expert parallel groups are contiguous ranks, so this rank holds global experts
        ep_rank * n_local ... ; seeding by the global index makes the weights the same
        whatever the expert-parallel size.
        """
        ep_size = self.config.expert_parallel_size
        ep_rank = dist.get_rank() % ep_size if dist.is_initialized() else 0
        n_local = self.config.num_experts // ep_size
        for i, expert in enumerate(self.local_experts()):
            global_idx = ep_rank * n_local + i
            gen = torch.Generator().manual_seed(seed * 1_000_003 + self.layer_idx * 10_007 + global_idx)
            for module in (expert.fc, expert.proj):
                init_linear_(module.weight, self.config.init_scale, generator=gen)
                nn.init.zeros_(module.bias)

    def forward(self, x, used_token=None):
        """x (B, T, C); used_token (B, T) True/1 at real tokens, 0 at padding (None: every token is real).
        -> (output, aux loss, routing stats). Padding gets a zero output and takes no expert capacity:
        DeepSpeed's top1gating zeroes its routing before it fills the capacity, so it counts neither in
        exp_counts nor in the slots. The capacity itself is still DeepSpeed's, from all B x T tokens."""
        B, T, C = x.shape
        used = None if used_token is None else used_token.reshape(-1).long()  # long: top1gating's one-hot dtype
        out, l_aux, exp_counts = self.moe(x, used)
        num_real = B * T if used is None else used.sum().clamp(min=1)
        if used is not None or self.config.z_loss_coef > 0:
            # Same float32 logits as DeepSpeed's gate computes (TopKGate.forward).
            logits = F.linear(x.reshape(-1, C).float(), deepspeed_compat.gate_weight(self.moe).float())
        if used is not None:
            # DeepSpeed's l_aux is num_experts x sum(mean gate probability x routed count / B*T) with both means
            # over all B x T tokens: padding adds its gate probabilities to the first factor (a gradient that
            # balances the router on padding) and scales the second by the real fraction, so the loss's
            # strength would depend on how padded a batch is. Switch eq. 4 over the real tokens instead:
            mean_gates = real_token_mean(torch.softmax(logits, dim=-1), used)
            l_aux = self.config.num_experts * (mean_gates * exp_counts.float() / num_real).sum()
        aux = self.config.aux_loss_coef * l_aux.float()
        if self.config.z_loss_coef > 0:
            aux = aux + self.config.z_loss_coef * real_token_mean(torch.logsumexp(logits, dim=-1).square(), used)
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        stats = routing_stats(exp_counts, B * T, num_real, self.config.num_experts, factor, self.config.min_capacity)
        return out, aux, stats


def real_token_mean(values, used):
    """Mean over the tokens (dim 0) of ``values`` at the tokens where ``used`` is 1; None: every token."""
    if used is None:
        return values.mean(dim=0)
    return used.to(values.dtype) @ values / used.sum().clamp(min=1)


def expert_capacity(num_tokens, num_experts, capacity_factor, min_capacity):
    """Slots per expert, as DeepSpeed's ``_capacity`` computes them for this rank's tokens."""
    return max(-(-num_tokens * capacity_factor // num_experts), min_capacity)


def routing_stats(exp_counts, num_tokens, num_real_tokens, num_experts, capacity_factor, min_capacity):
    """Fraction of this rank's real tokens routed to each expert, and the fraction of them dropped over
    capacity. ``exp_counts`` counts real tokens only; the capacity comes from all ``num_tokens``."""
    counts = exp_counts.detach().float()
    capacity = expert_capacity(num_tokens, num_experts, capacity_factor, min_capacity)
    dropped = (counts - capacity).clamp(min=0).sum() / num_real_tokens
    return {"expert_fraction": counts / num_real_tokens, "dropped_fraction": dropped}


# transformers has no Switch decoder: the export is Switchyard's own (eval/export_hf.py).
@register_model("switch", SwitchConfig, "decoder", experts=True, export=lambda config: "switchyard-switch")
class SwitchLM(GPT):
    def make_block(self, config, layer_idx):
        if layer_idx in config.layers_with_experts():
            return Block(config, ffn=SwitchFFN(config, layer_idx))
        return Block(config)

    def init_weights(self):
        super().init_weights()
        seed = torch.initial_seed() % (2**31)
        for block in self.blocks:
            if isinstance(block.ffn, SwitchFFN):
                block.ffn.init_experts(seed)

    def param_counts(self):
        here = sum(p.numel() for p in self.parameters())  # this rank: shared weights + local experts
        per_expert = [sum(p.numel() for p in b.ffn.local_experts()[0].parameters()) for b in self.blocks if isinstance(b.ffn, SwitchFFN)]
        shared = here - sum(n * (self.config.num_experts // self.config.expert_parallel_size) for n in per_expert)
        return shared + self.config.num_experts * sum(per_expert), shared + sum(per_expert)  # k=1: one expert active
