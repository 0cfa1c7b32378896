"""Switch layer: routing, capacity and dropped tokens against a hand-computed case; the paper's
details (distinct expert init, aux loss reaching the router, fp32 router, z-loss)."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from deepspeed.moe.utils import is_moe_param

from models import config_from_dict, config_to_dict
from models.registry import without_launch_fields
from models.switch import GroupedExperts, SwitchFFN, SwitchLM, SwitchSettings, balance_routers, expert_capacity
from switchyard.deepspeed_compat import gate_weight
from switchyard.errors import ConfigError


def switch_config(**over):
    base = {
        "family": "switch",
        "vocab_size": 32,
        "max_seq_len": 8,
        "d_model": 8,
        "n_layers": 2,
        "n_heads": 2,
        "d_ff": 16,
        "num_experts": 2,
        "capacity_factor": 1.0,
        "eval_capacity_factor": 1.0,
        "min_capacity": 0,
    }
    return config_from_dict({**base, **over})


def expert_ffn(expert, x):
    """What one expert computes, from its tensors by their on-disk names (nn.Linear's layout), in eval mode."""
    linear = torch.nn.functional.linear
    if "w1.weight" in expert:  # SwiGLU
        return linear(torch.nn.functional.silu(linear(x, expert["w1.weight"])) * linear(x, expert["w3.weight"]), expert["w2.weight"])
    return linear(torch.nn.functional.gelu(linear(x, expert["fc.weight"], expert["fc.bias"])), expert["proj.weight"], expert["proj.bias"])


def routed_layer(**over):
    """A Switch layer whose router logits are the first num_experts input features."""
    torch.manual_seed(0)
    layer = SwitchFFN(switch_config(**over), layer_idx=1)
    layer.init_experts(seed=5)
    with torch.no_grad():
        gate_weight(layer.moe).copy_(torch.eye(layer.config.num_experts, layer.config.d_model))
    return layer


def tokens(*rows):
    """(1, len(rows), 8) tokens: each row's features, zero-padded to d_model 8."""
    x = torch.zeros(1, len(rows), 8)
    for i, row in enumerate(rows):
        x[0, i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return x


# 6 tokens: tokens 0-3 prefer expert 0, tokens 4-5 expert 1 (features 0-1 are the logits; 2-3 vary the input).
TOKENS = tokens([2.0, 0, 1, 0], [1.5, 0, 0, 1], [3.0, 1, 0, 0], [1.0, 0, 1, 1], [0, 2.0, 1, 0], [0, 1.0, 0, 1])


def expected_output(layer, x, routes):
    """Hand-computed output of ``layer`` on tokens ``x`` (1, S, C): ``routes[t]`` lists token t's kept
    (expert, weight) pairs."""
    experts = layer.local_experts()
    out = torch.zeros_like(x[0])
    for t, kept in enumerate(routes):
        for e, w in kept:
            out[t] += w * expert_ffn(experts.expert(e), x[0, t])
    return out


def test_routing_capacity_and_dropped_tokens_match_hand_computation():
    layer = routed_layer()
    layer.train()
    out, aux, stats = layer(TOKENS)
    # capacity = ceil(6 tokens / 2 experts * 1.0) = 3: expert 0 receives tokens 0-3, keeps the first 3, drops token 3.
    assert expert_capacity(6, 2, 1.0, 0) == 3
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([4 / 6, 2 / 6]))
    assert math.isclose(float(stats["dropped_fraction"]), 1 / 6, rel_tol=1e-6)
    gates = torch.softmax(TOKENS[0, :, :2], dim=-1)
    routes = [[(e, gates[t, e])] for t, e in enumerate([0, 0, 0, 0, 1, 1])]
    routes[3] = []  # over capacity: output 0
    torch.testing.assert_close(out[0], expected_output(layer, TOKENS, routes), rtol=1e-5, atol=1e-6)
    # Load-balancing loss (Switch eq. 4): alpha * N * sum_i f_i * P_i, f from the routing before the drop.
    f = torch.tensor([4 / 6, 2 / 6])
    P = gates.mean(dim=0)
    torch.testing.assert_close(aux, 0.01 * 2 * (f * P).sum(), rtol=1e-6, atol=0)


# 4 tokens, 4 experts, top-2 (features 0-3 are the logits). First choices: expert 0 <- t0, expert 1 <- t1, t2,
# expert 2 <- t3; second choices: expert 1 <- t0, expert 3 <- t1, t3, expert 2 <- t2.
TOP2_TOKENS = tokens([3.0, 2, 0, 0, 1], [0, 3.0, 0, 2, 0, 1], [0, 3.0, 2, 0, 0, 0, 1], [0, 0, 3.0, 2, 1, 1])
TOP2_CHOICES = [(0, 1), (1, 3), (1, 2), (2, 3)]


def top2_weights(t):
    probs = torch.softmax(TOP2_TOKENS[0, t, :4], dim=-1)
    first, second = TOP2_CHOICES[t]
    total = probs[first] + probs[second]  # GShard: the two chosen probabilities renormalized
    return [(first, probs[first] / total), (second, probs[second] / total)]


def test_top2_first_choices_fill_the_capacity_before_second_ones():
    layer = routed_layer(num_experts=4, top_k=2)
    layer.train()
    out, aux, stats = layer(TOP2_TOKENS)
    # capacity = ceil(4 tokens x 2 / 4 experts x 1.0) = 2. Expert 1 gets t1, t2 as first choices and t0 as a second
    # one: t0's second choice is dropped (first choices go first, though t0 comes first); every other one is kept.
    routes = [top2_weights(t) for t in range(4)]
    routes[0] = routes[0][:1]
    torch.testing.assert_close(out[0], expected_output(layer, TOP2_TOKENS, routes), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([1 / 8, 3 / 8, 2 / 8, 2 / 8]))
    assert math.isclose(float(stats["dropped_fraction"]), 1 / 8, rel_tol=1e-6)
    # The loss over all k choices (Megatron-LM's): N * sum_i (assignments to i / (S k)) * mean probability of i.
    P = torch.softmax(TOP2_TOKENS[0, :, :4], dim=-1).mean(dim=0)
    torch.testing.assert_close(aux, 0.01 * 4 * (torch.tensor([1 / 8, 3 / 8, 2 / 8, 2 / 8]) * P).sum(), rtol=1e-6, atol=0)


def test_dropless_keeps_every_assignment():
    layer = routed_layer(num_experts=4, top_k=2, dropless=True)
    out, _, stats = layer(TOP2_TOKENS)
    torch.testing.assert_close(out[0], expected_output(layer, TOP2_TOKENS, [top2_weights(t) for t in range(4)]), rtol=1e-5, atol=1e-6)
    assert float(stats["dropped_fraction"]) == 0.0
    # k=1 with every token on expert 0 (tied router): capacity 3 would drop half of them, dropless none.
    layer = routed_layer(dropless=True)
    with torch.no_grad():
        gate_weight(layer.moe).zero_()
    out, _, stats = layer(TOKENS)
    torch.testing.assert_close(out[0], expected_output(layer, TOKENS, [[(0, 0.5)]] * 6), rtol=1e-5, atol=1e-6)
    assert float(stats["dropped_fraction"]) == 0.0 and stats["expert_fraction"].tolist() == [1.0, 0.0]


def test_swiglu_experts_compute_w2_of_silu_w1_times_w3():
    layer = routed_layer(expert_activation="swiglu", dropless=True)
    experts = layer.local_experts()
    assert sorted(name for name, _ in experts.named_parameters()) == ["w1", "w2", "w3"]  # no biases
    assert experts.expert(0)["w1.weight"].shape == (16, 8) and experts.expert(0)["w2.weight"].shape == (8, 16)
    out, _, _ = layer(TOKENS)
    gates = torch.softmax(TOKENS[0, :, :2], dim=-1)
    routes = [[(e, gates[t, e])] for t, e in enumerate([0, 0, 0, 0, 1, 1])]
    torch.testing.assert_close(out[0], expected_output(layer, TOKENS, routes), rtol=1e-5, atol=1e-6)
    assert all(f"moe.deepspeed_moe.experts.deepspeed_experts.1.{name}" in layer.state_dict() for name in ("w1.weight", "w3.weight", "w2.weight"))


def test_shared_expert_adds_a_dense_ffn_for_every_token():
    layer = routed_layer(shared_expert=True)
    shared = layer.shared
    assert not any(is_moe_param(p) for p in shared.parameters())  # dense: reduced over every rank
    assert all(is_moe_param(p) for p in layer.local_experts().parameters())
    assert not torch.equal(shared.expert(0)["fc.weight"], layer.local_experts().expert(0)["fc.weight"])  # its own draw
    out, _, _ = layer(TOKENS)
    gates = torch.softmax(TOKENS[0, :, :2], dim=-1)
    routes = [[(e, gates[t, e])] for t, e in enumerate([0, 0, 0, 0, 1, 1])]
    routes[3] = []  # over capacity: the shared expert's output alone
    dense = torch.stack([expert_ffn(shared.expert(0), TOKENS[0, t]) for t in range(6)])
    torch.testing.assert_close(out[0], expected_output(layer, TOKENS, routes) + dense, rtol=1e-5, atol=1e-6)
    assert "moe.deepspeed_moe.gate.wg.weight" in layer.state_dict() and "shared.fc_weight" in layer.state_dict()
    out.sum().backward()  # a broadcast (stride-0) gradient reaches the grouped GEMMs straight through the sum
    assert shared.fc_weight.grad.abs().sum() > 0 and layer.local_experts().fc_weight.grad.abs().sum() > 0


def test_router_bias_moves_against_the_load_and_chooses_without_weighting():
    layer = routed_layer(router_bias_rate=0.1)
    assert "router_bias_steps" in layer.state_dict() and "routed_tokens" not in layer.state_dict()
    assert "router_bias_steps" not in routed_layer().state_dict()  # off: nothing added to the checkpoint
    layer.train()
    layer(TOKENS)
    layer(TOKENS[:, 4:])  # a second micro-batch: 2 more tokens to expert 1
    assert layer.routed_tokens.tolist() == [4, 4]
    layer.eval()
    layer(TOKENS)  # evaluation counts no load
    layer.train()
    layer(TOKENS[:, :1])  # loads 5, 4: mean 4.5
    balance_routers([layer])
    assert layer.router_bias_steps.tolist() == [-1, 1] and layer.routed_tokens.tolist() == [0, 0]
    torch.testing.assert_close(layer.router_bias(), torch.tensor([-0.1, 0.1]))
    # Logits (0.2, 0): probabilities (0.55, 0.45); biased (0.45, 0.55): expert 1 is chosen, weighted by its 0.45.
    x = tokens([0.2, 0, 1, 1])
    out, _, stats = layer(x)
    probs = torch.softmax(torch.tensor([0.2, 0.0]), dim=0)
    assert stats["expert_fraction"].tolist() == [0.0, 1.0]
    torch.testing.assert_close(out[0], expected_output(layer, x, [[(1, probs[1])]]), rtol=1e-5, atol=1e-6)
    # a load at the mean moves nothing
    layer.routed_tokens.copy_(torch.tensor([3, 3]))
    balance_routers([layer])
    assert layer.router_bias_steps.tolist() == [-1, 1]


def test_dropped_token_passes_through_the_block_residual():
    torch.manual_seed(0)
    model = SwitchLM(switch_config(moe_layers=[0], n_layers=1))
    block = model.blocks[0]
    with torch.no_grad():
        gate_weight(block.ffn.moe).zero_()  # all tokens tie -> argmax picks expert 0
    x = torch.randn(1, 6, 8)
    after_attn = x + block.attn(block.ln_attn(x))
    out, _, stats = block(x)
    dropped = [i for i in range(6) if torch.equal(out[0, i], after_attn[0, i])]
    assert dropped == [3, 4, 5] and math.isclose(float(stats["dropped_fraction"]), 0.5, rel_tol=1e-6)


def test_experts_start_different_and_seed_by_global_index():
    torch.manual_seed(0)
    layer = SwitchFFN(switch_config(num_experts=4), layer_idx=1)
    layer.init_experts(seed=7)
    experts = layer.local_experts()
    weights = [experts.expert(e)["fc.weight"].clone() for e in range(4)]
    assert all(not torch.equal(weights[i], weights[j]) for i in range(4) for j in range(i + 1, 4))
    layer.init_experts(seed=7)
    assert all(torch.equal(w, experts.expert(e)["fc.weight"]) for e, w in enumerate(weights))


def test_switch_init_is_reduced_scale():
    torch.manual_seed(0)
    config = switch_config(d_model=256, n_heads=4, d_ff=1024, vocab_size=64)
    model = SwitchLM(config)
    std = model.blocks[0].attn.qkv.weight.std().item()
    # truncated normal at 2 std has std 0.88 * sqrt(0.1 / 256)
    assert abs(std - 0.88 * math.sqrt(0.1 / 256)) < 0.1 * math.sqrt(0.1 / 256)


def test_aux_loss_reaches_the_router_gradient():
    layer = routed_layer()
    _, aux, _ = layer(TOKENS)
    aux.backward()
    grad = gate_weight(layer.moe).grad
    assert grad is not None and grad.abs().sum() > 0


def test_router_runs_in_float32_when_the_model_is_bf16():
    layer = routed_layer().to(torch.bfloat16)
    out, aux, stats = layer(TOKENS.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert aux.dtype == torch.float32  # computed from float32 gate probabilities
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([4 / 6, 2 / 6]))


def test_router_z_loss_adds_mean_squared_logsumexp():
    base = routed_layer()
    with_z = routed_layer(z_loss_coef=0.001)
    _, aux, _ = base(TOKENS)
    _, aux_z, _ = with_z(TOKENS)
    z = torch.logsumexp(TOKENS[0, :, :2], dim=-1).square().mean()
    torch.testing.assert_close(aux_z - aux, 0.001 * z, rtol=1e-5, atol=0)


def test_eval_uses_the_eval_capacity_factor():
    layer = routed_layer(eval_capacity_factor=2.0)
    layer.eval()
    _, _, stats = layer(TOKENS)
    assert float(stats["dropped_fraction"]) == 0.0  # capacity 6 holds all 4 expert-0 tokens


def test_param_counts_total_and_active():
    torch.manual_seed(0)
    model = SwitchLM(switch_config(num_experts=4))
    total, active = model.param_counts()
    per_expert = 2 * 8 * 16 + 16 + 8  # fc and proj weights, their biases (d_model 8, d_ff 16)
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 3 * per_expert
    # top-2 with a shared expert: two experts active per token, and the shared one (an expert's size, SwiGLU's here)
    torch.manual_seed(0)
    model = SwitchLM(switch_config(num_experts=4, top_k=2, shared_expert=True, expert_activation="swiglu"))
    total, active = model.param_counts()
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 2 * 3 * 8 * 16


def test_expert_dropout_acts_inside_experts_only():
    torch.manual_seed(0)
    config = switch_config(dropout=0.0, expert_dropout=0.5)
    model = SwitchLM(config)
    assert model.blocks[1].ffn.local_experts().dropout.p == 0.5
    assert all(m.p == 0.0 for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "experts" not in n)
    x = torch.randn(1, 6, 8)
    model.blocks[1].ffn.train()
    assert not torch.equal(model.blocks[1].ffn(x)[0], model.blocks[1].ffn(x)[0])
    model.blocks[1].ffn.eval()
    assert torch.equal(model.blocks[1].ffn(x)[0], model.blocks[1].ffn(x)[0])


PADDING = tokens(*[[5.0, 0, 0, 0]] * 6)  # padding positions whose router prefers expert 0


def test_padding_takes_no_expert_capacity():
    # 6 padding (expert 0) ahead of 6 real tokens (4 prefer expert 0): capacity ceil(12 / 2 x 1.0) = 6 slots each.
    layer = routed_layer()
    x = torch.cat([PADDING, TOKENS], dim=1)
    used = torch.tensor([[False] * 6 + [True] * 6])
    out, _, stats = layer(x, used)
    assert all(not torch.all(out[0, i] == 0) for i in range(6, 12))  # every real token has its expert's output
    assert torch.all(out[0, :6] == 0)  # padding is not routed
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([4 / 6, 2 / 6]))  # of the real tokens
    assert float(stats["dropped_fraction"]) == 0.0
    # Unmasked, the padding comes first and fills expert 0's 6 slots: the 4 real tokens routed there are dropped.
    out, _, stats = layer(x)
    assert [i for i in range(12) if torch.all(out[0, i] == 0)] == [6, 7, 8, 9]
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([10 / 12, 2 / 12]))
    assert math.isclose(float(stats["dropped_fraction"]), 4 / 12, rel_tol=1e-6)


def test_dropped_fraction_is_of_the_real_tokens():
    # 6 real + 2 padding, capacity factor 0.5: ceil(8 / 2 x 0.5) = 2 slots; expert 0 keeps 2 of its 4 real tokens.
    layer = routed_layer(capacity_factor=0.5)
    layer.train()
    out, _, stats = layer(torch.cat([TOKENS, PADDING[:, :2]], dim=1), torch.tensor([[1] * 6 + [0] * 2]))
    assert [i for i in range(8) if torch.all(out[0, i] == 0)] == [2, 3, 6, 7]  # tokens 2, 3 over capacity; padding
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([4 / 6, 2 / 6]))
    assert math.isclose(float(stats["dropped_fraction"]), 2 / 6, rel_tol=1e-6)


def test_aux_and_z_loss_are_those_of_the_real_tokens_alone():
    layer = routed_layer(z_loss_coef=0.001)
    _, real_only, _ = layer(TOKENS)
    _, padded, _ = layer(torch.cat([TOKENS, PADDING], dim=1), torch.tensor([[True] * 6 + [False] * 6]))
    torch.testing.assert_close(padded, real_only, rtol=1e-6, atol=0)
    # and they reach the router from the real tokens only
    padded.backward()
    grad = gate_weight(layer.moe).grad.clone()
    layer.zero_grad()
    real_only.backward()
    torch.testing.assert_close(grad, gate_weight(layer.moe).grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["switch", "switch-transformer"])
def test_switch_fields_are_declared_once_and_saved_configs_load(family):
    config = config_from_dict({"family": family, "capacity_factor": 1.5})
    assert isinstance(config, SwitchSettings) and config.init_scale == 0.1  # the Switch default, not the dense 1.0
    switch_fields = [f.name for f in dataclasses.fields(SwitchSettings)]
    # the Switch fields follow the dense ones; init_scale keeps its place among the dense fields
    assert [f.name for f in dataclasses.fields(config)][-len(switch_fields) + 1 :] == switch_fields[1:]
    saved = json.loads(json.dumps(config_to_dict(config)))  # as a run records it, with the launch fields
    assert {"expert_parallel_size", "checkpoint_reentrant"} <= saved.keys()
    with pytest.raises(ConfigError, match="is set at launch"):
        config_from_dict(saved)
    assert config_from_dict(without_launch_fields(saved)) == config  # what pretrain/run_dir.py's loader does


class LoopExpert(torch.nn.Module):
    """One expert as a module of its own, as SwitchFFN built them for DeepSpeed's Experts loop before
    GroupedExperts: its state_dict keys are the ones checkpoints hold."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.fc = torch.nn.Linear(d_model, d_ff)
        self.proj = torch.nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.proj(torch.nn.functional.gelu(self.fc(x)))


def with_loop_experts(layer):
    """A copy of SwitchFFN ``layer`` whose experts are DeepSpeed's per-expert loop, loaded from ``layer``'s
    state_dict without the stacked marker: the old module structure and its checkpoint keys."""
    from deepspeed.moe.experts import Experts

    from switchyard.deepspeed_compat import replace_experts

    twin = copy.deepcopy(layer)
    config = layer.config
    n_local = layer.local_experts().num_experts
    loop = Experts(LoopExpert(config.d_model, config.d_ff), n_local, twin.moe.expert_group_name).to(layer.local_experts().fc_weight.dtype)
    replace_experts(twin.moe, loop)
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.endswith("." + GroupedExperts.STACKED_KEY)}, strict=True)
    return twin


def deepspeed_forward(twin, x, used=None):
    """DeepSpeed's own MoE layer on ``twin`` (with_loop_experts): its top-1 gate, einsum dispatch and combine,
    all-to-all and per-expert loop, with a capacity (the tokens of a rank) at which it drops nothing."""
    gate = twin.moe.deepspeed_moe.gate
    gate.capacity_factor = gate.eval_capacity_factor = float(twin.config.num_experts)
    return twin.moe(x, None if used is None else used.reshape(-1).long())[0]


# fp32: the same products summed by other kernels (grouped GEMM against addmm), so equal to float32 rounding.
# bf16: each kernel rounds its fp32 accumulation to bf16 (8 bits), so results may differ by a few bf16 ulps
# (2^-8 relative each); gradients summed over tokens carry a few such roundings.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_deepspeeds_moe_layer(dtype):
    """At top-1 with nothing dropped, outputs and every gradient (input, router, each expert's weights; 4
    experts of which expert 3 receives no token, and padding that routes nowhere) equal those of DeepSpeed's
    MoE layer, its gate, dispatch and loop over one module per expert, holding the same weights."""
    torch.manual_seed(0)
    layer = SwitchFFN(switch_config(num_experts=4, d_model=8, d_ff=16, n_heads=2, dropless=True), layer_idx=1)
    layer.init_experts(seed=3)
    with torch.no_grad():
        gate_weight(layer.moe)[:, 7] = 0.0
        gate_weight(layer.moe)[3, 7] = -100.0  # feature 7 is 1 at every token: expert 3's logit is far below
    layer = layer.to(dtype)
    twin = with_loop_experts(layer)
    x = torch.randn(2, 12, 8, dtype=dtype)
    x[..., 7] = 1.0
    used = torch.ones(2, 12, dtype=torch.bool)
    used[1, 9:] = False
    outputs = []
    for forward in (lambda xx: layer(xx, used)[0], lambda xx: deepspeed_forward(twin, xx, used)):
        xx = x.clone().requires_grad_()
        out = forward(xx)
        out.float().square().sum().backward()
        outputs.append((out, xx.grad))
    (out, x_grad), (loop_out, loop_x_grad) = outputs
    assert float(layer(x, used)[2]["expert_fraction"][3]) == 0.0
    torch.testing.assert_close(out, loop_out, **TOLERANCES[dtype])
    torch.testing.assert_close(x_grad, loop_x_grad, **TOLERANCES[dtype])
    torch.testing.assert_close(gate_weight(layer.moe).grad, gate_weight(twin.moe).grad, **TOLERANCES[dtype])
    grads = {name: p.grad for name, p in layer.local_experts().named_parameters()}
    for e, expert in enumerate(twin.local_experts().deepspeed_experts):
        for name, stacked in GroupedExperts.EXPERT_TENSORS["gelu"].items():
            grad = grads[stacked][e].mT if name.endswith("weight") else grads[stacked][e]
            torch.testing.assert_close(grad, expert.get_parameter(name).grad, **TOLERANCES[dtype])
    assert all(torch.all(expert_grad[3] == 0) for expert_grad in grads.values())  # expert 3 had no token


def test_checkpoint_of_the_per_expert_modules_loads_into_grouped_experts():
    """A state_dict with the old module structure's keys (DeepSpeed's Experts: deepspeed_experts.E.fc.weight...)
    loads each expert into its slice; a state_dict of GroupedExperts has those keys too, plus the marker."""
    torch.manual_seed(0)
    source = SwitchFFN(switch_config(num_experts=4), layer_idx=1)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()  # weights the new layer could not have by chance
    old = with_loop_experts(source)
    saved = old.state_dict()
    assert not any(k.endswith(GroupedExperts.STACKED_KEY) for k in saved)
    torch.manual_seed(1)
    new = SwitchFFN(switch_config(num_experts=4), layer_idx=1)
    new.load_state_dict(saved, strict=True)
    for e, expert in enumerate(old.local_experts().deepspeed_experts):
        for name, tensor in new.local_experts().expert(e).items():
            assert torch.equal(tensor, expert.get_parameter(name))
    x = torch.randn(1, 6, 8)
    torch.testing.assert_close(new(x)[0], source(x)[0], rtol=0, atol=0)
    state = new.state_dict()
    assert all(f"moe.deepspeed_moe.experts.deepspeed_experts.{e}.{GroupedExperts.STACKED_KEY}" in state for e in range(4))
    assert set(saved) == {k for k in state if not k.endswith(GroupedExperts.STACKED_KEY)}


def test_grouped_experts_refuse_a_state_dict_that_does_not_fit():
    layer = SwitchFFN(switch_config(num_experts=2), layer_idx=1)
    state = layer.state_dict()
    extra = {**state, "moe.deepspeed_moe.experts.deepspeed_experts.2.fc.weight": torch.zeros(16, 8)}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        layer.load_state_dict(extra)
    missing = {k: v for k, v in state.items() if "deepspeed_experts.1.proj.bias" not in k}
    with pytest.raises(RuntimeError, match="Missing key.*deepspeed_experts.1.proj.bias"):
        layer.load_state_dict(missing)
    wrong = {**state, "moe.deepspeed_moe.experts.deepspeed_experts.0.fc.weight": torch.zeros(8, 16)}
    with pytest.raises(RuntimeError, match="size mismatch for .*deepspeed_experts.0.fc.weight"):
        layer.load_state_dict(wrong)


def test_experts_need_dimensions_the_grouped_gemm_takes():
    with pytest.raises(ConfigError, match="d_model .4. and d_ff .8. of a model with experts must be multiples of 8"):
        switch_config(d_model=4, d_ff=8)
    with pytest.raises(ConfigError, match="top_k must be between 1 and num_experts"):
        switch_config(top_k=3)
    with pytest.raises(ConfigError, match="expert_activation must be one of gelu, swiglu"):
        switch_config(expert_activation="relu")


@pytest.mark.parametrize("ep_size", [1, 2])
def test_grouped_experts_equal_the_loop_on_two_ranks(tmp_path, ep_size):
    """On 2 real ranks at EP 2 (each rank holds 2 of the 4 experts and computes the other rank's tokens routed to
    them, through the variable all-to-all) and at EP 1: outputs and gradients equal DeepSpeed's MoE layer's (its
    equal-split all-to-all, its loop); top-2 dropless routing equals that of one rank holding every expert."""
    from tests.distributed import REPO, start_ranks, wait_ranks

    # The rank script imports this module's helpers as tests.models.test_switch: the checkout on its path.
    script = REPO / "tests" / "models" / "grouped_experts_ranks.py"
    results = wait_ranks(start_ranks([ep_size], 2, tmp_path, {"PYTHONPATH": str(REPO)}, script=script), tmp_path)
    n_local = 4 // ep_size
    assert all(r.returncode == 0 for r in results), results[0].output[-3000:] + results[1].output[-3000:]
    assert all(f"rank {r.rank}: {n_local} local experts of 4 match the loop" in r.output for r in results)
    assert all(f"rank {r.rank}: top-2 dropless at expert-parallel size {ep_size} matches one rank" in r.output for r in results)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_rows_the_grouped_gemm_leaves_undefined_reach_no_output_or_gradient(monkeypatch, activation):
    """The grouped GEMM leaves rows past its last offset unwritten (measured: whatever memory held, NaN at times):
    made NaN here, the dropped and padding rows still give 0 and every output and gradient stays finite."""
    grouped_mm = torch.nn.functional.grouped_mm

    def leaves_nan(a, b, offs):
        out = grouped_mm(a, b, offs=offs)
        return torch.where((torch.arange(out.shape[0]) < offs[-1]).unsqueeze(1), out, float("nan"))

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", leaves_nan)
    layer = routed_layer(expert_activation=activation)
    x = torch.cat([PADDING[:, :2], TOKENS], dim=1).requires_grad_()
    out, aux, stats = layer(x, torch.tensor([[False] * 2 + [True] * 6]))
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([4 / 6, 2 / 6]))  # padding: past the last offset
    (out.square().sum() + aux).backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
