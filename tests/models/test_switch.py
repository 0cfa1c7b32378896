"""Switch layer: routing, capacity and dropped tokens against a hand-computed case; the paper's
details (distinct expert init, aux loss reaching the router, fp32 router, z-loss)."""

import copy
import dataclasses
import json
import math

import pytest
import torch

from models import config_from_dict, config_to_dict
from models.switch import GroupedExperts, SwitchFFN, SwitchLM, SwitchSettings, expert_capacity
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


def expert_ffn(expert, x):
    """What one expert computes, from its tensors by their on-disk names (nn.Linear's layout), in eval mode."""
    h = torch.nn.functional.gelu(torch.nn.functional.linear(x, expert["fc.weight"], expert["fc.bias"]))
    return torch.nn.functional.linear(h, expert["proj.weight"], expert["proj.bias"])


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
    expected = [gates[i, e] * expert_ffn(experts.expert(e), TOKENS[0, i]) for i, e in enumerate([0, 0, 0, 0, 1, 1])]
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
    per_expert = 2 * 4 * 8 + 8 + 4  # fc and proj weights, their biases (d_model 4, d_ff 8)
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 3 * per_expert


def test_expert_dropout_acts_inside_experts_only():
    torch.manual_seed(0)
    config = switch_config(dropout=0.0, expert_dropout=0.5)
    model = SwitchLM(config)
    assert model.blocks[1].ffn.local_experts().dropout.p == 0.5
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
    n_local = layer.local_experts().num_local_experts
    loop = Experts(LoopExpert(config.d_model, config.d_ff), n_local, twin.moe.expert_group_name).to(layer.local_experts().fc_weight.dtype)
    replace_experts(twin.moe, loop)
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.endswith("." + GroupedExperts.STACKED_KEY)}, strict=True)
    return twin


# fp32: the same products summed by other kernels (baddbmm against addmm), so equal to float32 rounding.
# bf16: each kernel rounds its fp32 accumulation to bf16 (8 bits), so results may differ by a few bf16 ulps
# (2^-8 relative each); gradients summed over tokens carry a few such roundings.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_per_expert_loop(dtype):
    """Outputs and every gradient (router, each expert's weights; 4 experts of which expert 3 receives no
    token, and padding that routes nowhere) equal those of DeepSpeed's loop over one module per expert."""
    torch.manual_seed(0)
    layer = SwitchFFN(switch_config(num_experts=4, d_model=8, d_ff=16, n_heads=2, capacity_factor=1.25, min_capacity=2), layer_idx=1)
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
    for module in (layer, twin):
        xx = x.clone().requires_grad_()
        out, aux, stats = module(xx, used)
        (out.float().square().sum() + aux).backward()
        outputs.append((out, xx.grad, stats))
    (out, x_grad, stats), (loop_out, loop_x_grad, loop_stats) = outputs
    assert float(stats["expert_fraction"][3]) == 0.0
    torch.testing.assert_close(out, loop_out, **TOLERANCES[dtype])
    torch.testing.assert_close(x_grad, loop_x_grad, **TOLERANCES[dtype])
    torch.testing.assert_close(gate_weight(layer.moe).grad, gate_weight(twin.moe).grad, **TOLERANCES[dtype])
    grads = {name: p.grad for name, p in layer.local_experts().named_parameters()}
    for e, expert in enumerate(twin.local_experts().deepspeed_experts):
        for name, stacked in GroupedExperts.EXPERT_TENSORS.items():
            grad = grads[stacked][e].mT if name.endswith("weight") else grads[stacked][e]
            torch.testing.assert_close(grad, expert.get_parameter(name).grad, **TOLERANCES[dtype])
    assert all(torch.all(expert_grad[3] == 0) for expert_grad in grads.values())  # expert 3 had no token


def test_checkpoint_of_the_per_expert_modules_loads_into_grouped_experts():
    """A state_dict with the old module structure's keys (DeepSpeed's Experts: deepspeed_experts.E.fc.weight...)
    loads each expert into its slice; a state_dict of GroupedExperts has those keys too, plus the marker."""
    torch.manual_seed(0)
    old = with_loop_experts(SwitchFFN(switch_config(num_experts=4), layer_idx=1))
    with torch.no_grad():
        for p in old.local_experts().parameters():
            p.normal_()  # weights the new layer could not have by chance
    saved = old.state_dict()
    assert not any(k.endswith(GroupedExperts.STACKED_KEY) for k in saved)
    torch.manual_seed(1)
    new = SwitchFFN(switch_config(num_experts=4), layer_idx=1)
    new.load_state_dict(saved, strict=True)
    for e, expert in enumerate(old.local_experts().deepspeed_experts):
        for name, tensor in new.local_experts().expert(e).items():
            assert torch.equal(tensor, expert.get_parameter(name))
    x = torch.randn(1, 6, 4)
    torch.testing.assert_close(new(x)[0], old(x)[0], **TOLERANCES[torch.float32])
    state = new.state_dict()
    assert all(f"moe.deepspeed_moe.experts.deepspeed_experts.{e}.{GroupedExperts.STACKED_KEY}" in state for e in range(4))
    assert set(saved) == {k for k in state if not k.endswith(GroupedExperts.STACKED_KEY)}


def test_grouped_experts_refuse_a_state_dict_that_does_not_fit():
    layer = SwitchFFN(switch_config(num_experts=2), layer_idx=1)
    state = layer.state_dict()
    extra = {**state, "moe.deepspeed_moe.experts.deepspeed_experts.2.fc.weight": torch.zeros(8, 4)}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        layer.load_state_dict(extra)
    missing = {k: v for k, v in state.items() if "deepspeed_experts.1.proj.bias" not in k}
    with pytest.raises(RuntimeError, match="Missing key.*deepspeed_experts.1.proj.bias"):
        layer.load_state_dict(missing)
    wrong = {**state, "moe.deepspeed_moe.experts.deepspeed_experts.0.fc.weight": torch.zeros(4, 8)}
    with pytest.raises(RuntimeError, match="size mismatch for .*deepspeed_experts.0.fc.weight"):
        layer.load_state_dict(wrong)


@pytest.mark.parametrize("ep_size", [1, 2])
def test_grouped_experts_equal_the_loop_on_two_ranks(tmp_path, ep_size):
    """On 2 real ranks, through DeepSpeed's all-to-all at EP 2 (each rank holds 2 of the 4 experts and computes
    the other rank's tokens routed to them), and without it at EP 1: outputs and gradients equal the loop's."""
    from tests.distributed import REPO, start_ranks, wait_ranks

    # The rank script imports this module's helpers as tests.models.test_switch: the checkout on its path.
    script = REPO / "tests" / "models" / "grouped_experts_ranks.py"
    results = wait_ranks(start_ranks([ep_size], 2, tmp_path, {"PYTHONPATH": str(REPO)}, script=script), tmp_path)
    n_local = 4 // ep_size
    assert all(r.returncode == 0 for r in results), results[0].output[-3000:] + results[1].output[-3000:]
    assert all(f"rank {r.rank}: {n_local} local experts of 4 match the loop" in r.output for r in results)
