"""Switch Transformer LM: the GPT of models/gpt.py with chosen FFNs replaced by top-1 expert layers.

The expert layer is DeepSpeed's ``deepspeed.moe.layer.MoE`` (k=1), so experts are sharded over
expert-parallel ranks and tokens travel by all-to-all; only its per-expert loop is replaced, by
GroupedExperts (a layer's local experts stacked, computed as one batched matmul). What the Switch paper adds on top lives here:
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


class GroupedExperts(nn.Module):
    """A layer's local experts (each fc d_model->d_ff, GELU, expert dropout, proj d_ff->d_model) held as stacked
    weights and computed as one batched matmul per projection.

    It replaces DeepSpeed's ``Experts``, a Python loop over deep copies of one expert module: at Switch's
    expert counts the loop's per-expert matmuls, and the optimizer's, ZeRO's and clipping's work per parameter
    (4 per expert there, 4 per layer here), cost more time than the experts' FLOPs are worth. It takes the
    capacity-padded buffer DeepSpeed's MOELayer dispatches to it, [ep, E_local, capacity, d_model], whose rows
    are the slots of each local expert from each expert-parallel rank, so DeepSpeed's gate, all-to-all and
    combine are unchanged; empty slots are computed and discarded, as in DeepSpeed's loop.

    Its state_dict holds each expert under DeepSpeed's keys (``deepspeed_experts.<local index>.fc.weight``...),
    slices of the stacked tensors, so DeepSpeed's engine still writes one file per global expert and reads them
    back, and checkpoints saved with DeepSpeed's ``Experts`` load. Each expert also carries STACKED_KEY: a
    checkpoint without it was saved by the loop, whose optimizer state (per expert parameter) does not fit
    these parameters (pretrain/run_dir.py refuses to resume it)."""

    # On-disk name of each expert's tensor (DeepSpeed's Experts: the Linear modules' keys) -> stacked parameter.
    EXPERT_TENSORS = {"fc.weight": "fc_weight", "fc.bias": "fc_bias", "proj.weight": "proj_weight", "proj.bias": "proj_bias"}
    STACKED_KEY = "stacked"

    def __init__(self, num_local_experts, d_model, d_ff, dropout):
        super().__init__()
        self.num_local_experts = num_local_experts
        # Uninitialized: SwitchFFN.init_experts draws every expert (nothing else initializes these). The weights
        # are stored [in, out], the transpose of nn.Linear's, so that baddbmm reads them without a transpose:
        # measured the fastest of the batched forms on the CPU (README, "Switch layer").
        self.fc_weight = nn.Parameter(torch.empty(num_local_experts, d_model, d_ff))
        self.fc_bias = nn.Parameter(torch.empty(num_local_experts, d_ff))
        self.proj_weight = nn.Parameter(torch.empty(num_local_experts, d_ff, d_model))
        self.proj_bias = nn.Parameter(torch.empty(num_local_experts, d_model))
        self.dropout = nn.Dropout(dropout)

    def expert(self, i):
        """Local expert ``i``'s tensors by their on-disk name, shaped as nn.Linear's: views into the stacked
        parameters (the weights transposed ones)."""
        return {
            name: getattr(self, stacked)[i].mT if name.endswith("weight") else getattr(self, stacked)[i]
            for name, stacked in self.EXPERT_TENSORS.items()
        }

    def params_per_expert(self):
        return sum(p.numel() for p in self.parameters()) // self.num_local_experts

    def forward(self, dispatched):
        """dispatched [ep, E_local, capacity, d_model] -> the same shape, expert e applied to [:, e]."""
        ep, n_local, capacity, d_model = dispatched.shape
        x = dispatched.transpose(0, 1).reshape(n_local, ep * capacity, d_model)
        h = self.dropout(F.gelu(torch.baddbmm(self.fc_bias.unsqueeze(1), x, self.fc_weight)))
        out = torch.baddbmm(self.proj_bias.unsqueeze(1), h, self.proj_weight)
        return out.reshape(n_local, ep, capacity, d_model).transpose(0, 1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Copies, contiguous as nn.Linear's tensors: views would share the stacked storage, which torch.save
        # writes whole with each and safetensors refuses (eval/export_hf.py).
        for i in range(self.num_local_experts):
            key = f"{prefix}deepspeed_experts.{i}."
            for name, tensor in self.expert(i).items():
                destination[key + name] = tensor if keep_vars else tensor.detach().clone(memory_format=torch.contiguous_format)
            destination[key + self.STACKED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        expected = set()
        for i in range(self.num_local_experts):
            key = f"{prefix}deepspeed_experts.{i}."
            expected.add(key + self.STACKED_KEY)  # optional: checkpoints of DeepSpeed's Experts lack it
            for name, target in self.expert(i).items():
                expected.add(key + name)
                if key + name not in state_dict:
                    missing_keys.append(key + name)
                elif state_dict[key + name].shape != target.shape:
                    error_msgs.append(
                        f"size mismatch for {key + name}: checkpoint {tuple(state_dict[key + name].shape)}, model {tuple(target.shape)}"
                    )
                else:
                    with torch.no_grad():
                        target.copy_(state_dict[key + name])
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)


class SwitchFFN(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        expert_dropout = config.dropout if config.expert_dropout is None else config.expert_dropout
        # DeepSpeed's MoE deep-copies ``expert`` into its per-expert loop; an Identity (no weights) stands in
        # there until GroupedExperts replaces the loop.
        self.moe = MoE(
            hidden_size=config.d_model,
            expert=nn.Identity(),
            num_experts=config.num_experts,
            ep_size=config.expert_parallel_size,
            k=1,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            min_capacity=config.min_capacity,
            drop_tokens=True,
            use_rts=False,  # Switch drops the overflow; random token selection would make runs depend on RNG
        )
        n_local = config.num_experts // config.expert_parallel_size
        experts = GroupedExperts(n_local, config.d_model, config.d_ff, expert_dropout)
        deepspeed_compat.replace_experts(self.moe, experts)
        self.layer_idx = layer_idx

    def local_experts(self):
        """This rank's experts: one GroupedExperts."""
        return deepspeed_compat.local_experts(self.moe)

    def init_experts(self, seed):
        """Each expert its own draw, as when each was a module of its own (DeepSpeed's deep copies of one
        expert): the same weights as checkpoints from then.

        Expert parallel groups are contiguous ranks, so this rank holds global experts
        ep_rank * n_local ... ; seeding by the global index makes the weights the same
        whatever the expert-parallel size.
        """
        ep_size = self.config.expert_parallel_size
        ep_rank = dist.get_rank() % ep_size if dist.is_initialized() else 0
        n_local = self.config.num_experts // ep_size
        experts = self.local_experts()
        for i in range(n_local):
            global_idx = ep_rank * n_local + i
            gen = torch.Generator().manual_seed(seed * 1_000_003 + self.layer_idx * 10_007 + global_idx)
            expert = experts.expert(i)
            for layer in ("fc", "proj"):
                # Drawn into an nn.Linear-shaped tensor: the random fill of a transposed view would follow its
                # memory order, and the draws would not be the ones each expert had as a module.
                weight = torch.empty(expert[f"{layer}.weight"].shape)
                init_linear_(weight, self.config.init_scale, generator=gen)
                with torch.no_grad():
                    expert[f"{layer}.weight"].copy_(weight)
                    expert[f"{layer}.bias"].zero_()

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
        per_expert = [b.ffn.local_experts().params_per_expert() for b in self.blocks if isinstance(b.ffn, SwitchFFN)]
        shared = here - sum(n * (self.config.num_experts // self.config.expert_parallel_size) for n in per_expert)
        return shared + self.config.num_experts * sum(per_expert), shared + sum(per_expert)  # k=1: one expert active
