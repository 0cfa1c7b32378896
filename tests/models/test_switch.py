"""Switch layer: routing, capacity and dropped tokens against a hand-computed case; the paper's
details (distinct expert init, aux loss reaching the router, fp32 router, z-loss)."""

import dataclasses
import json
import math

import pytest
import torch

from models import config_from_dict, config_to_dict
from models.switch import SwitchFFN, SwitchLM, SwitchSettings, expert_capacity
from switchyard.deepspeed_compat import gate_weight
from switchyard.errors import ConfigError


def switch_config(**over):
    base = {
        "family": "switch",
        "vocab_size": 32,
        "max_seq_len": 8,
        "d_model": 4,
        "n_layers": 2,
        "n_heads": 2,
        "d_ff": 8,
        "num_experts": 2,
        "capacity_factor": 1.0,
        "eval_capacity_factor": 1.0,
        "min_capacity": 0,
    }
    return config_from_dict({**base, **over})


def routed_layer(**over):
    torch.manual_seed(0)
    layer = SwitchFFN(switch_config(**over), layer_idx=1)
    with torch.no_grad():  # router logits = the first two input features
        gate_weight(layer.moe).copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    return layer


# 6 tokens: tokens 0-3 prefer expert 0, tokens 4-5 expert 1.
TOKENS = torch.tensor([[2.0, 0, 1, 0], [1.5, 0, 0, 1], [3.0, 1, 0, 0], [1.0, 0, 1, 1], [0, 2.0, 1, 0], [0, 1.0, 0, 1]]).reshape(1, 6, 4)


def test_routing_capacity_and_dropped_tokens_match_hand_computation():
    layer = routed_layer()
    layer.train()
    out, aux, stats = layer(TOKENS)
    # capacity = ceil(6 tokens / 2 experts * 1.0) = 3: expert 0 receives 4 tokens, keeps 3, drops 1.
    assert expert_capacity(6, 2, 1.0, 0) == 3
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([4 / 6, 2 / 6]))
    assert math.isclose(float(stats["dropped_fraction"]), 1 / 6, rel_tol=1e-6)

    logits = TOKENS[0, :, :2]
    gates = torch.softmax(logits, dim=-1)
    experts = layer.local_experts()
    expected = [gates[i, e] * experts[e](TOKENS[0, i]) for i, e in enumerate([0, 0, 0, 0, 1, 1])]
    zero_rows = [i for i in range(6) if torch.all(out[0, i] == 0)]
    assert len(zero_rows) == 1 and zero_rows[0] < 4  # exactly one expert-0 token over capacity, output 0
    for i in range(6):
        if i not in zero_rows:
            torch.testing.assert_close(out[0, i], expected[i], rtol=1e-5, atol=1e-6)
    # Load-balancing loss (Switch eq. 4): alpha * N * sum_i f_i * P_i, f from the routing before the drop.
    f = torch.tensor([4 / 6, 2 / 6])
    P = gates.mean(dim=0)
    torch.testing.assert_close(aux, 0.01 * 2 * (f * P).sum(), rtol=1e-6, atol=0)


def test_dropped_token_passes_through_the_block_residual():
    torch.manual_seed(0)
    model = SwitchLM(switch_config(moe_layers=[0], n_layers=1))
    block = model.blocks[0]
    with torch.no_grad():
        gate_weight(block.ffn.moe).zero_()  # all tokens tie -> argmax picks expert 0
    x = torch.randn(1, 6, 4)
    after_attn = x + block.attn(block.ln_attn(x))
    out, _, stats = block(x)
    dropped = [i for i in range(6) if torch.equal(out[0, i], after_attn[0, i])]
    assert len(dropped) == 3 and math.isclose(float(stats["dropped_fraction"]), 0.5, rel_tol=1e-6)


def test_experts_start_different_and_seed_by_global_index():
    torch.manual_seed(0)
    layer = SwitchFFN(switch_config(num_experts=4), layer_idx=1)
    layer.init_experts(seed=7)
    weights = [e.fc.weight.clone() for e in layer.local_experts()]
    assert all(not torch.equal(weights[i], weights[j]) for i in range(4) for j in range(i + 1, 4))
    layer.init_experts(seed=7)
    assert all(torch.equal(w, e.fc.weight) for w, e in zip(weights, layer.local_experts()))


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
    per_expert = sum(p.numel() for p in model.blocks[1].ffn.local_experts()[0].parameters())
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 3 * per_expert


def test_expert_dropout_acts_inside_experts_only():
    torch.manual_seed(0)
    config = switch_config(dropout=0.0, expert_dropout=0.5)
    model = SwitchLM(config)
    expert = model.blocks[1].ffn.local_experts()[0]
    assert expert.dropout.p == 0.5
    assert all(m.p == 0.0 for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "experts" not in n)
    x = torch.randn(1, 6, 4)
    model.blocks[1].ffn.train()
    assert not torch.equal(model.blocks[1].ffn(x)[0], model.blocks[1].ffn(x)[0])
    model.blocks[1].ffn.eval()
    assert torch.equal(model.blocks[1].ffn(x)[0], model.blocks[1].ffn(x)[0])


PADDING = torch.tensor([5.0, 0, 0, 0]).expand(1, 6, 4)  # padding positions whose router prefers expert 0


def test_padding_takes_no_expert_capacity():
    # 6 real tokens (4 prefer expert 0) + 6 padding (expert 0): capacity ceil(12 / 2 x 1.0) = 6 slots each.
    layer = routed_layer()
    x = torch.cat([TOKENS, PADDING], dim=1)
    used = torch.tensor([[True] * 6 + [False] * 6])
    out, _, stats = layer(x, used)
    assert all(not torch.all(out[0, i] == 0) for i in range(6))  # every real token has its expert's output
    assert torch.all(out[0, 6:] == 0)  # padding is not routed
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([4 / 6, 2 / 6]))  # of the real tokens
    assert float(stats["dropped_fraction"]) == 0.0
    # Unmasked, the padding competes for expert 0's 6 slots: 10 tokens, 4 dropped, real ones among them.
    out, _, stats = layer(x)
    assert any(torch.all(out[0, i] == 0) for i in range(4))
    torch.testing.assert_close(stats["expert_fraction"], torch.tensor([10 / 12, 2 / 12]))
    assert math.isclose(float(stats["dropped_fraction"]), 4 / 12, rel_tol=1e-6)


def test_dropped_fraction_is_of_the_real_tokens():
    # 6 real + 2 padding, capacity factor 0.5: ceil(8 / 2 x 0.5) = 2 slots; expert 0 keeps 2 of its 4 real tokens.
    layer = routed_layer(capacity_factor=0.5)
    layer.train()
    out, _, stats = layer(torch.cat([TOKENS, PADDING[:, :2]], dim=1), torch.tensor([[1] * 6 + [0] * 2]))
    assert sum(bool(torch.all(out[0, i] == 0)) for i in range(4)) == 2
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
    with pytest.raises(ConfigError, match="'expert_parallel_size' is set at launch"):
        config_from_dict(saved)
    del saved["expert_parallel_size"]  # what pretrain/run_dir.py's loader drops
    assert config_from_dict(saved) == config
