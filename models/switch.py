"""Switch Transformer LM: the GPT of models/gpt.py with chosen FFNs replaced by mixture-of-experts layers.

A Switch layer sends each token to its top-k experts (k=1: Switch; k=2: GShard, Mixtral), each expert a GELU
or SwiGLU FFN, either within a capacity (the capacity factor; tokens over it are dropped and pass through the
block's residual) or dropless, optionally with a shared expert every token also takes (DeepSeekMoE) and a
load-balancing bias on the router's choice (DeepSeek-V3's auxiliary-loss-free balancing), next to the
load-balancing loss and router z-loss. The router runs in float32 whatever the model's dtype (the paper's
selective precision), the experts start from the reduced init (init_scale 0.1 in the presets), each its own draw.

What it keeps of DeepSpeed's MoE, ``deepspeed.moe.layer.MoE`` as the container: the router's weight (its
``TopKGate``'s), the expert-parallel process groups, the expert-parameter tags by which ZeRO and the engine
reduce expert gradients over the expert-data-parallel group, and the engine's one checkpoint file per expert.
What it replaces, and why (README, "Switch layer"):
- DeepSpeed's dispatch and combine are einsums over a dense [tokens, experts, capacity] mask, work that grows
  with the square of the tokens per micro-batch: at 4096 tokens of d_model 128 and 8 experts they took 35 ms of
  this CPU against 4 ms for the experts' own matmuls. Here tokens are sorted by expert and gathered: index work,
  linear in the tokens.
- DeepSpeed's ``Experts`` loops over one deep copy of an expert module per expert; GroupedExperts stacks them
  and computes a layer's local experts as one grouped GEMM over the tokens each received.
- DeepSpeed's gate has no router bias and no dropless top-1, and its all-to-all sends capacity-padded buffers:
  the all-to-all here sends each expert-parallel rank only the tokens routed to it (variable split sizes).
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch.profiler import record_function

from models.gpt import GPT, Block, GPTConfig, init_linear_
from models.registry import TRAINING_SETTING, register_model
from switchyard import deepspeed_compat

EXPERT_ACTIVATIONS = ("gelu", "swiglu")


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
    top_k: int = 1  # experts per token: 1 (Switch) or more (2: GShard, Mixtral), their outputs weighted by the router
    # No capacity: every expert computes every token routed to it (the capacity factors are then unused).
    dropless: bool = field(default=False, metadata=TRAINING_SETTING)
    expert_activation: str = "gelu"  # "gelu": proj(gelu(fc x)), with biases; "swiglu": w2(silu(w1 x) * w3 x), none
    shared_expert: bool = False  # DeepSeekMoE: a dense FFN of the experts' shape that every token also takes
    # DeepSeek-V3's auxiliary-loss-free balancing: after each optimizer step, each expert's bias on the router's
    # choice (not on its output weight) moves by this much, up when the expert took fewer than the mean of the
    # step's tokens, down when more. 0 turns it off; it keeps a buffer in the checkpoint when on.
    router_bias_rate: float = 0.0

    def switch_problem(self):
        """What is wrong with the expert and routing settings, or None."""
        if self.num_experts < 1:
            return f"num_experts must be >= 1, got {self.num_experts}"
        if not 1 <= self.top_k <= self.num_experts:
            return f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}"
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            return f"expert_activation must be one of {', '.join(EXPERT_ACTIVATIONS)}, got {self.expert_activation!r}"
        if self.d_model % 8 or self.d_ff % 8:
            # torch's grouped GEMM (CPU and CUDA) needs rows of a multiple of 16 bytes: 8 bf16 or fp16 values.
            return f"d_model ({self.d_model}) and d_ff ({self.d_ff}) of a model with experts must be multiples of 8"
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            return "capacity_factor and eval_capacity_factor must be positive"
        if self.min_capacity < 0 or self.aux_loss_coef < 0 or self.z_loss_coef < 0 or self.router_bias_rate < 0:
            return "min_capacity, aux_loss_coef, z_loss_coef and router_bias_rate must be >= 0"
        if self.expert_dropout is not None and not 0.0 <= self.expert_dropout < 1.0:
            return f"expert_dropout must be in [0, 1), got {self.expert_dropout}"
        if self.router_bias_rate > 0 and self.checkpoint_activations:
            # SwitchFFN counts each expert's tokens in its forward, which a checkpointed block runs twice.
            return "router_bias_rate counts routed tokens in the forward, which checkpoint_activations runs twice; set one of them to 0"
        if self.num_experts % self.expert_parallel_size:
            return f"num_experts ({self.num_experts}) is not divisible by the expert-parallel size ({self.expert_parallel_size}); change one of them"
        return None


@dataclass
class DecoderSwitchSettings(SwitchSettings):
    """SwitchSettings of a decoder LM, one stack of ``n_layers`` blocks (the Switch LM, llama_moe)."""

    def decoder_experts_problem(self, dense_family):
        """What is wrong with the expert settings, moe_layers included, or None; ``dense_family``: the family to
        use instead when no layer has experts."""
        if self.switch_problem():
            return self.switch_problem()
        bad = [i for i in self.layers_with_experts() if not 0 <= i < self.n_layers]
        if bad:
            return f"moe_layers {bad} out of range for n_layers={self.n_layers}"
        if not self.layers_with_experts():
            return f"moe_layers is empty: use the {dense_family!r} family for a dense model"
        return None

    def layers_with_experts(self):
        return list(range(1, self.n_layers, 2)) if self.moe_layers is None else list(self.moe_layers)


@dataclass
class SwitchConfig(DecoderSwitchSettings, GPTConfig):
    def problem(self):
        return super().problem() or self.decoder_experts_problem("gpt")


class GroupedExperts(nn.Module):
    """Experts held as stacked weights, [experts, in, out] per projection, computed as one grouped GEMM
    (``torch.nn.functional.grouped_mm``) over rows grouped by expert.

    It replaces DeepSpeed's ``Experts``, a Python loop over deep copies of one expert module: at Switch's expert
    counts the loop's per-expert matmuls, and the optimizer's, ZeRO's and clipping's work per parameter (4 per
    expert there, 3 or 4 per layer here), cost more time than the experts' FLOPs are worth. On CUDA the grouped
    GEMM is one kernel in bf16 on Hopper and Blackwell (sm90, sm100); elsewhere (A100, fp32) torch runs it as a
    loop of matmuls after reading the group sizes to the host: correct, at a loop's speed.

    As a layer's experts (``per_expert_keys``), its state_dict holds each expert under DeepSpeed's keys
    (``deepspeed_experts.<local index>.fc.weight``...: copies of slices, shaped as nn.Linear's), so the engine
    still writes one file per global expert and reads them back whatever the expert-parallel size, and
    checkpoints of DeepSpeed's ``Experts`` load; each expert also carries STACKED_KEY: a checkpoint without it
    was saved by the loop, whose optimizer state (per expert parameter) does not fit these parameters
    (pretrain/run_dir.py refuses to resume it). As a shared expert, its parameters are saved as they are."""

    # Each expert's tensors by their on-disk name (nn.Linear's layout) -> the stacked parameter ([in, out]).
    EXPERT_TENSORS = {
        "gelu": {"fc.weight": "fc_weight", "fc.bias": "fc_bias", "proj.weight": "proj_weight", "proj.bias": "proj_bias"},
        "swiglu": {"w1.weight": "w1", "w3.weight": "w3", "w2.weight": "w2"},
    }
    STACKED_KEY = "stacked"

    def __init__(self, num_experts, d_model, d_ff, dropout, activation="gelu", per_expert_keys=True):
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        self.per_expert_keys = per_expert_keys
        # Uninitialized: SwitchFFN.init_experts draws every expert (nothing else initializes these). Stored
        # [in, out], the transpose of nn.Linear's, so that the grouped GEMM reads them without a transpose.
        if activation == "gelu":
            self.fc_weight = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
            self.fc_bias = nn.Parameter(torch.empty(num_experts, d_ff))
            self.proj_weight = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
            self.proj_bias = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))  # gate projection (through SiLU)
            self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))  # up projection
            self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))  # down projection
        for param in self.parameters():
            param.stacked_experts = True  # dim 0 indexes experts: the optimizer decays each expert's matrices only
        self.dropout = nn.Dropout(dropout)

    def expert(self, i):
        """Expert ``i``'s tensors by their on-disk name, shaped as nn.Linear's: views into the stacked
        parameters (the weights transposed ones)."""
        return {
            name: getattr(self, stacked)[i].mT if name.endswith("weight") else getattr(self, stacked)[i]
            for name, stacked in self.EXPERT_TENSORS[self.activation].items()
        }

    def params_per_expert(self):
        return sum(p.numel() for p in self.parameters()) // self.num_experts

    def forward(self, x, offsets, computed=None):
        """x [N, d_model], its rows grouped by expert: expert e's are rows offsets[e-1] up to offsets[e] (int32,
        cumulative, on x's device: no host sync). ``computed`` [N, 1]: True at the rows before offsets[-1]
        (None: every row is); the others give 0 and pass no gradient."""
        if computed is not None:
            # The grouped GEMM neither reads nor writes rows past offsets[-1], forward or backward: they hold
            # whatever the memory held, NaN included (measured). Masked where they enter (their gradient would
            # reach the tokens), where the first products leave (before the activation, whose backward would
            # turn a zero gradient times an undefined value into NaN; biases inside, so theirs stays clean)
            # and where the output leaves, no such value reaches the output or a gradient.
            x = torch.where(computed, x, 0)

        def masked(rows):
            return rows if computed is None else torch.where(computed, rows, 0)

        if self.activation == "swiglu":
            h = F.silu(masked(F.grouped_mm(x, self.w1, offs=offsets))) * masked(F.grouped_mm(x, self.w3, offs=offsets))
            out = F.grouped_mm(self.dropout(h), self.w2, offs=offsets)
        else:
            # Each row's expert, for its biases (the grouped GEMM's own bias takes no gradient). index_select, not
            # indexing: on this CPU indexing's gather is 10x slower and its backward (index_put) 3x (measured).
            expert = torch.bucketize(torch.arange(x.shape[0], device=x.device), offsets, right=True).clamp_(max=self.num_experts - 1)
            h = self.dropout(F.gelu(masked(F.grouped_mm(x, self.fc_weight, offs=offsets) + self.fc_bias.index_select(0, expert))))
            out = F.grouped_mm(h, self.proj_weight, offs=offsets) + self.proj_bias.index_select(0, expert)
        return ContiguousGradient.apply(masked(out))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.per_expert_keys:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # Copies, contiguous as nn.Linear's tensors: views would share the stacked storage, which torch.save
        # writes whole with each and safetensors refuses (eval/export_hf.py).
        for i in range(self.num_experts):
            key = f"{prefix}deepspeed_experts.{i}."
            for name, tensor in self.expert(i).items():
                destination[key + name] = tensor if keep_vars else tensor.detach().clone(memory_format=torch.contiguous_format)
            destination[key + self.STACKED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if not self.per_expert_keys:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        expected = set()
        for i in range(self.num_experts):
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


class ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the grouped GEMM's backward fails on the stride-0
    gradients that broadcasting ops pass back (``out.sum().backward()``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` of rows with variable split sizes, its backward the reverse exchange.
    (torch.distributed.nn's differentiable one is deprecated; DeepSpeed's ``_AllToAll`` takes equal splits.)"""

    @staticmethod
    def forward(ctx, rows, receive_splits, send_splits, group):
        ctx.splits, ctx.group = (send_splits, receive_splits), group
        received = rows.new_empty(sum(receive_splits), rows.shape[1])
        dist.all_to_all_single(received, rows.contiguous(), receive_splits, send_splits, group=group)
        return received

    @staticmethod
    def backward(ctx, grad):
        send_splits, receive_splits = ctx.splits
        grad_rows = grad.new_empty(sum(send_splits), grad.shape[1])
        dist.all_to_all_single(grad_rows, grad.contiguous(), send_splits, receive_splits, group=ctx.group)
        return grad_rows, None, None, None


def inverse_permutation(order):
    return torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=order.device))


class SwitchFFN(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        expert_dropout = config.dropout if config.expert_dropout is None else config.expert_dropout
        # DeepSpeed's MoE deep-copies ``expert`` into its per-expert loop; an Identity (no weights) stands in
        # there until GroupedExperts replaces the loop. Only its router weight, its process group and its
        # experts' place are used: forward routes the tokens itself (the module docstring says why).
        self.moe = MoE(
            hidden_size=config.d_model,
            expert=nn.Identity(),
            num_experts=config.num_experts,
            ep_size=config.expert_parallel_size,
            k=1,
            use_rts=False,
        )
        n_local = config.num_experts // config.expert_parallel_size
        experts = GroupedExperts(n_local, config.d_model, config.d_ff, expert_dropout, config.expert_activation)
        deepspeed_compat.replace_experts(self.moe, experts)
        # Not an expert parameter: replicated and reduced over every rank, like the rest of the dense model.
        self.shared = (
            GroupedExperts(1, config.d_model, config.d_ff, expert_dropout, config.expert_activation, per_expert_keys=False)
            if config.shared_expert
            else None
        )
        if config.router_bias_rate > 0:
            # The bias as a count of its steps (bias = rate x count): int64 is exact, and casting the model to
            # bf16 casts floating buffers only, so no update is rounded away.
            self.register_buffer("router_bias_steps", torch.zeros(config.num_experts, dtype=torch.int64))
            # Real tokens routed to each expert (before any drop) since the last optimizer step: the bias's input.
            self.register_buffer("routed_tokens", torch.zeros(config.num_experts, dtype=torch.int64), persistent=False)
        self.layer_idx = layer_idx

    def local_experts(self):
        """This rank's experts: one GroupedExperts."""
        return deepspeed_compat.local_experts(self.moe)

    def init_experts(self, seed):
        """Each expert its own draw, as when each was a module of its own (DeepSpeed's deep copies of one
        expert): the same weights as checkpoints from then. The shared expert draws as expert num_experts.

        Expert parallel groups are contiguous ranks, so this rank holds global experts
        ep_rank * n_local ... ; seeding by the global index makes the weights the same
        whatever the expert-parallel size.
        """
        ep_size = self.config.expert_parallel_size
        ep_rank = dist.get_rank() % ep_size if dist.is_initialized() else 0
        n_local = self.config.num_experts // ep_size
        draws = [(self.local_experts(), i, ep_rank * n_local + i) for i in range(n_local)]
        if self.shared is not None:
            draws.append((self.shared, 0, self.config.num_experts))
        for experts, i, global_idx in draws:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + self.layer_idx * 10_007 + global_idx)
            for name, tensor in experts.expert(i).items():
                with torch.no_grad():
                    if name.endswith("bias"):
                        tensor.zero_()
                        continue
                    # Drawn into an nn.Linear-shaped tensor: the random fill of a transposed view would follow
                    # its memory order, and the draws would not be the ones each expert had as a module.
                    weight = torch.empty(tensor.shape)
                    init_linear_(weight, self.config.init_scale, generator=gen)
                    tensor.copy_(weight)

    def router_bias(self):
        return self.config.router_bias_rate * self.router_bias_steps.float()

    def forward(self, x, used_token=None):
        """x (B, T, C); used_token (B, T) True/1 at real tokens, 0 at padding (None: every token is real).
        -> (output, aux loss, routing stats). Padding is routed nowhere: it takes no expert capacity and counts
        in neither the aux loss nor the stats; its output is 0 (the shared expert's, with one). The capacity
        itself, as DeepSpeed's, counts all B x T tokens, so that it is the same on every rank and step."""
        B, T, C = x.shape
        tokens = x.reshape(-1, C)
        S, E, k = tokens.shape[0], self.config.num_experts, self.config.top_k
        used = None if used_token is None else used_token.reshape(-1).bool()
        with record_function("switch/router"):
            logits = F.linear(tokens.float(), deepspeed_compat.gate_weight(self.moe).float())
            probs = torch.softmax(logits, dim=-1)
            scores = probs.detach() if self.config.router_bias_rate == 0 else probs.detach() + self.router_bias()
            # argmax for one: the first of tied experts, as DeepSpeed's top-1 gate chooses.
            choice = scores.argmax(dim=-1, keepdim=True) if k == 1 else scores.topk(k, dim=-1).indices  # [S, k]
            weights = probs.gather(1, choice)
            if k > 1:  # GShard, Mixtral: the chosen experts' probabilities renormalized; Switch (k=1) keeps it raw
                weights = weights / weights.sum(dim=-1, keepdim=True)

        with record_function("switch/dispatch"):
            # Assignment a = j * S + t is token t's j-th choice: every token's first choice comes before any
            # second one, so first choices fill the capacity first and, among them, earlier tokens.
            expert_of = choice.t().reshape(-1)
            real = torch.ones_like(expert_of, dtype=torch.bool) if used is None else used.repeat(k)
            queue = torch.where(real, expert_of, E)  # each real assignment's expert; padding's past the last
            queue_lengths = torch.bincount(queue, minlength=E + 1)
            routed = queue_lengths[:E]  # real assignments per expert
            keep = real if self.config.dropless else real & (position_in_queue(queue, queue_lengths) < self.capacity(S))
            kept_expert = torch.where(keep, expert_of, E)
            order = torch.argsort(kept_expert, stable=True)  # kept assignments grouped by expert, then the rest
            kept = torch.bincount(kept_expert, minlength=E + 1)[:E]
            rows = tokens.index_select(0, order % S)

        if self.config.expert_parallel_size == 1:
            offsets = kept.cumsum(0).to(torch.int32)
            # Dropless without padding keeps every assignment: every row is computed, nothing to mask.
            all_kept = self.config.dropless and used is None
            computed = None if all_kept else (torch.arange(k * S, device=x.device) < offsets[-1]).unsqueeze(1)
            with record_function("switch/experts"):
                out_rows = self.local_experts()(rows, offsets, computed)
        else:
            out_rows = self.expert_parallel(rows, kept)

        with record_function("switch/combine"):
            out_assigned = out_rows.index_select(0, inverse_permutation(order))
            weight = torch.where(keep, weights.t().reshape(-1), 0).to(x.dtype)
            out = (out_assigned * weight.unsqueeze(1)).view(k, S, C).sum(dim=0)  # in choice order: deterministic
            if self.shared is not None:
                out = out + self.shared(tokens, torch.tensor([S], dtype=torch.int32, device=x.device))

        num_real = torch.tensor(S, device=x.device) if used is None else used.sum().clamp(min=1)
        # The load-balancing loss (Switch eq. 4; with k > 1 over all k choices, as Megatron-LM's): num_experts x
        # sum over experts of the fraction of real assignments routed to it (before any drop) x its mean
        # router probability over the real tokens.
        l_aux = E * (routed.float() / (num_real * k) * real_token_mean(probs, used)).sum()
        aux = self.config.aux_loss_coef * l_aux
        if self.config.z_loss_coef > 0:
            aux = aux + self.config.z_loss_coef * real_token_mean(torch.logsumexp(logits, dim=-1).square(), used)
        if self.training and self.config.router_bias_rate > 0:
            self.routed_tokens += routed
        stats = {
            "expert_fraction": routed.float() / (num_real * k),
            "dropped_fraction": (routed.sum() - kept.sum()).float() / (num_real * k),
        }
        return out.view(B, T, C), aux, stats

    def capacity(self, num_tokens):
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        return expert_capacity(self.config.top_k * num_tokens, self.config.num_experts, factor, self.config.min_capacity)

    def expert_parallel(self, rows, kept):
        """The kept rows (grouped by global expert, hence by the expert-parallel rank holding it) to their ranks,
        through this rank's local experts, and back: [rows, C] as the grouped GEMM would have given them here."""
        group = deepspeed_compat.expert_parallel_group(self.moe)
        ep = self.config.expert_parallel_size
        n_local = self.config.num_experts // ep
        with record_function("switch/all-to-all"):
            send_counts = kept.view(ep, n_local)
            receive_counts = torch.empty_like(send_counts)  # [source rank, local expert]
            dist.all_to_all_single(receive_counts, send_counts, group=group)
            # The split sizes must reach the host: one sync per layer, which expert parallelism always costs.
            send_splits, receive_splits = torch.stack([send_counts.sum(1), receive_counts.sum(1)]).tolist()
            received = AllToAll.apply(rows[: sum(send_splits)], receive_splits, send_splits, group)
        # Received by source rank, then by local expert; the grouped GEMM takes them by local expert.
        local_expert = torch.arange(n_local, device=rows.device).repeat(ep).repeat_interleave(receive_counts.flatten())
        by_expert = torch.argsort(local_expert, stable=True)
        with record_function("switch/experts"):
            computed = self.local_experts()(received.index_select(0, by_expert), receive_counts.sum(0).cumsum(0).to(torch.int32))
        with record_function("switch/all-to-all"):
            returned = AllToAll.apply(computed.index_select(0, inverse_permutation(by_expert)), send_splits, receive_splits, group)
        return F.pad(returned, (0, 0, 0, rows.shape[0] - returned.shape[0]))


def position_in_queue(queue, queue_lengths):
    """Each assignment's place in its expert's queue (0 for the first assignment ``queue`` routes to it), in
    assignment order; ``queue_lengths``: the bincount of ``queue``."""
    order = torch.argsort(queue, stable=True)
    first = queue_lengths.cumsum(0) - queue_lengths  # where each queue starts among the sorted assignments
    place = torch.arange(queue.numel(), device=queue.device) - first[queue[order]]
    return torch.empty_like(place).index_copy_(0, order, place)  # back in assignment order


def real_token_mean(values, used):
    """Mean over the tokens (dim 0) of ``values`` at the tokens where ``used`` is True; None: every token."""
    if used is None:
        return values.mean(dim=0)
    return used.to(values.dtype) @ values / used.sum().clamp(min=1)


def expert_capacity(num_assignments, num_experts, capacity_factor, min_capacity):
    """Slots per expert for ``num_assignments`` (tokens x k), as DeepSpeed's gates compute them."""
    return max(-(-num_assignments * capacity_factor // num_experts), min_capacity)


def balance_routers(layers):
    """DeepSeek-V3's bias update for SwitchFFN ``layers`` (router_bias_rate > 0), after an optimizer step: each
    expert's load over the step's global batch (every micro-batch, every rank: one all-reduce for all layers)
    against the mean load, and the bias of each expert above it one step down, below it one up."""
    loads = torch.stack([layer.routed_tokens for layer in layers])
    if dist.is_initialized():
        dist.all_reduce(loads)
    for layer, load in zip(layers, loads):
        layer.router_bias_steps += torch.sign(load.double().mean() - load).long()
        layer.routed_tokens.zero_()


class ExpertModel:
    """What a model with SwitchFFN layers adds to its dense form, ``class M(ExpertModel, DenseModel)``: the
    experts' initialization, the routers' bias update, and parameter counts with every expert."""

    def init_weights(self):
        super().init_weights()
        seed = torch.initial_seed() % (2**31)
        for layer in self.switch_layers():
            layer.init_experts(seed)

    def switch_layers(self):
        """The SwitchFFN layers, in module order (the same on every rank)."""
        return [module for module in self.modules() if isinstance(module, SwitchFFN)]

    def balance_routers(self):
        balance_routers(self.switch_layers())

    def param_counts(self):
        """(total, active per token) parameters: every expert counts in the total, top_k of each layer's in the
        active ones, also when expert parallelism holds some of them elsewhere."""
        config = self.config
        here = sum(p.numel() for p in self.parameters())  # this rank: shared weights + local experts
        per_expert = sum(layer.local_experts().params_per_expert() for layer in self.switch_layers())
        shared = here - per_expert * (config.num_experts // config.expert_parallel_size)
        return shared + config.num_experts * per_expert, shared + config.top_k * per_expert


# transformers has no Switch decoder: the export is Switchyard's own (eval/export_hf.py).
@register_model("switch", SwitchConfig, "decoder", experts=True, export=lambda config: "switchyard-switch")
class SwitchLM(ExpertModel, GPT):
    def make_block(self, config, layer_idx):
        if layer_idx in config.layers_with_experts():
            return Block(config, ffn=SwitchFFN(config, layer_idx))
        return Block(config)
