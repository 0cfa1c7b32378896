"""Llama family: grouped-query attention, rotary with its theta, RMSNorm against their formulas; the MoE form's
Switch layers and router balancing; configs and presets."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model, config_from_dict, load_model_config
from models.llama import GroupedQueryAttention, LlamaBlock
from models.switch import SwitchFFN
from switchyard.errors import ConfigError
from tests.distributed import REPO

TINY = {"family": "llama", "vocab_size": 50, "max_seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 48}


def rotary_by_formula(x, theta):
    """x (B, H, T, D): pair (x[i], x[i + D/2]) of position t turned by the angle t x theta^(-2i / D)."""
    D = x.shape[-1]
    t = torch.arange(x.shape[2], dtype=torch.float64)[:, None]
    angle = t * theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    pairs = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([pairs.real, pairs.imag], dim=-1)


def attention_by_formula(attn, x, theta):
    """softmax(q k^T / sqrt(d) + causal mask) v, each query head h reading kv head h // (n_heads / n_kv_heads)."""
    B, T, C = x.shape
    hd = attn.head_dim
    q = attn.wq(x).view(B, T, attn.n_heads, hd).transpose(1, 2)
    k = attn.wk(x).view(B, T, attn.n_kv_heads, hd).transpose(1, 2)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, hd).transpose(1, 2).double()
    q, k = rotary_by_formula(q, theta), rotary_by_formula(k, theta)
    group = attn.n_heads // attn.n_kv_heads
    kv_of = torch.arange(attn.n_heads) // group
    scores = q @ k[:, kv_of].transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v[:, kv_of]
    return attn.wo(y.transpose(1, 2).reshape(B, T, C).float())


@pytest.mark.parametrize("n_kv_heads, theta", [(4, 10000.0), (2, 500000.0), (1, 10.0)])
def test_attention_is_its_formula_with_kv_heads_shared_by_groups(n_kv_heads, theta):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(config_from_dict({**TINY, "n_kv_heads": n_kv_heads, "rope_theta": theta})).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attention_by_formula(attn, x, theta), rtol=1e-5, atol=1e-5)


def test_grouped_kv_heads_equal_multi_head_attention_with_each_kv_head_copied_for_its_group():
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(config_from_dict({**TINY, "n_kv_heads": 2})).eval()
    mha = GroupedQueryAttention(config_from_dict({**TINY, "n_kv_heads": 4})).eval()
    assert gqa.wk.weight.shape == (16, 32) and mha.wk.weight.shape == (32, 32)
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):  # kv head g serves query heads 2g and 2g + 1
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight.view(2, 1, 8, 32).expand(2, 2, 8, 32).reshape(32, 32))
        x = torch.randn(2, 10, 32)
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-6, atol=1e-6)
        # Shared by the wrong grouping (kv head g for query heads g and g + 2) gives another function.
        for name in ("wk", "wv"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight.view(1, 2, 8, 32).expand(2, 2, 8, 32).reshape(32, 32))
        assert not torch.allclose(gqa(x), mha(x), atol=1e-3)


def test_rms_norm_is_its_formula_with_the_configured_eps():
    torch.manual_seed(0)
    block = LlamaBlock(config_from_dict({**TINY, "norm_eps": 0.5}))
    with torch.no_grad():
        block.attn_norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3, 5, 32) * 0.1  # small values: an eps of 0.5 changes the result visibly
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.5) * block.attn_norm.weight
        torch.testing.assert_close(block.attn_norm(x), expected)
        assert not torch.allclose(block.attn_norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * block.attn_norm.weight)


def test_no_biases_causal_and_embeddings_tied_or_not():
    for tied in (False, True):
        torch.manual_seed(0)
        model = build_model(config_from_dict({**TINY, "tie_embeddings": tied})).eval()
        assert not any(name.endswith("bias") for name, _ in model.named_parameters())
        assert (model.output is None) == tied
        tokens = torch.randint(0, 50, (1, 12))
        changed = tokens.clone()
        changed[0, 8] = (tokens[0, 8] + 1) % 50
        logits, aux, stats = model(tokens)
        torch.testing.assert_close(logits[0, :8], model(changed)[0][0, :8])
        assert not torch.allclose(logits[0, 8:], model(changed)[0][0, 8:])
        assert float(aux) == 0.0 and stats == []
        if tied:
            torch.testing.assert_close(
                logits, F.linear(model.norm(model.blocks[1](model.blocks[0](model.tok_emb(tokens))[0])[0]), model.tok_emb.weight)
            )


def test_moe_form_takes_swiglu_switch_layers_and_balances_its_routers():
    torch.manual_seed(0)
    config = config_from_dict({**TINY, "family": "llama_moe", "n_layers": 3, "num_experts": 4, "top_k": 2, "router_bias_rate": 0.01})
    model = build_model(config)
    assert [type(block.ffn) is SwitchFFN for block in model.blocks] == [False, True, False]
    assert config.expert_activation == "swiglu" and config.init_scale == 0.1
    logits, aux, stats = model(torch.randint(0, 50, (4, 16)))
    assert logits.shape == (4, 16, 50) and float(aux.detach()) > 0 and len(stats) == 1
    load = model.blocks[1].ffn.routed_tokens.clone()
    assert load.sum() == 2 * 4 * 16
    model.balance_routers()  # what the trainer calls after each optimizer step
    expected = torch.sign(load.double().mean() - load).long()  # one step against the load
    assert torch.equal(model.blocks[1].ffn.router_bias_steps, expected) and expected.abs().sum() > 0
    total, active = model.param_counts()
    per_expert = 3 * 32 * 48
    assert total - active == (4 - 2) * per_expert


def test_presets_have_the_sizes_of_their_namesakes():
    def size(name):
        with torch.device("meta"):
            return build_model(load_model_config(REPO / "models" / "configs" / name)).param_counts()

    assert size("llama-135m.json") == (134_515_008, 134_515_008)  # SmolLM-135M's shape
    assert size("llama-1b.json") == (1_235_814_400, 1_235_814_400)  # Llama 3.2 1B's shape
    total, active = size("llama-moe-135m-8e.json")
    assert total > 2 * active and active > size("llama-135m.json")[0]  # 8 experts, 2 of them active per token


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_kv_heads": 3}, r"n_kv_heads \(3\) must be positive and divide n_heads \(4\)"),
        ({"n_kv_heads": 0}, "n_kv_heads"),
        ({"rope_theta": 1.0}, "rope_theta must be > 1"),
        ({"positions": "learned"}, "unknown key 'positions'"),
        ({"family": "llama_moe", "expert_activation": "gelu"}, "expert_activation must be 'swiglu'"),
        ({"family": "llama_moe", "moe_layers": []}, "use the 'llama' family for a dense model"),
    ],
)
def test_invalid_configs_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**TINY, **override})
