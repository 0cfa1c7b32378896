"""Dense GPT: causality, tied embeddings, positions, configs and presets."""

import glob
import os

import pytest
import torch

from models import build_model, config_from_dict, load_model_config
from models.gpt import GPT
from switchyard.errors import ConfigError
from tests.distributed import REPO

TINY = {"family": "gpt", "vocab_size": 50, "max_seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64}


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_a_token_sees_only_its_past(positions):
    torch.manual_seed(0)
    model = GPT(config_from_dict({**TINY, "positions": positions})).eval()
    tokens = torch.randint(0, 50, (1, 12))
    changed = tokens.clone()
    changed[0, 8] = (tokens[0, 8] + 1) % 50
    logits, _, _ = model(tokens)
    logits2, _, _ = model(changed)
    torch.testing.assert_close(logits[0, :8], logits2[0, :8])
    assert not torch.allclose(logits[0, 8:], logits2[0, 8:])


def test_rotary_positions_make_attention_order_aware():
    torch.manual_seed(0)
    model = GPT(config_from_dict({**TINY, "positions": "rotary"})).eval()
    assert model.pos_emb is None
    # Without positions, the last token's attention is a bag of the earlier tokens: swapping two of
    # them would not change its output. Rotary positions must make it change.
    logits, _, _ = model(torch.tensor([[3, 9, 4, 7]]))
    swapped, _, _ = model(torch.tensor([[9, 3, 4, 7]]))
    assert not torch.allclose(logits[0, 3], swapped[0, 3])


def test_output_projection_is_the_input_embedding():
    model = GPT(config_from_dict(TINY))
    tokens = torch.randint(0, 50, (2, 5))
    logits, aux, stats = model(tokens)
    logits.sum().backward()
    assert model.tok_emb.weight.grad is not None
    assert not any(p.shape == (50, 32) for n, p in model.named_parameters() if n != "tok_emb.weight")
    assert float(aux) == 0.0 and stats == []


def test_all_shipped_model_configs_load_and_presets_have_their_sizes():
    sizes = {}
    for path in glob.glob(str(REPO / "models" / "configs" / "*.json")):
        config = load_model_config(path)
        with torch.device("meta"):
            sizes[os.path.basename(path)] = build_model(config).param_counts()
    assert abs(sizes["gpt-125m.json"][0] / 1e6 - 125) < 1.0
    assert abs(sizes["gpt-350m.json"][0] / 1e6 - 355) < 2.0
    assert abs(sizes["gpt-1.3b.json"][0] / 1e9 - 1.3) < 0.03
    total8, active8 = sizes["switch-base-8.json"]
    total128, active128 = sizes["switch-base-128.json"]
    assert total128 > 10 * total8 and abs(active128 - active8) / active8 < 0.01  # experts add parameters, not FLOPs


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_heads": 3}, "divisible by n_heads"),
        ({"positions": "alibi"}, "positions must be"),
        ({"dropout": 1.5}, "dropout must be"),
        ({"d_model": 0}, "d_model must be positive"),
        ({"vocab_sise": 5}, "did you mean 'vocab_size'"),
        ({"n_layers": True}, "'n_layers' must be int"),
    ],
)
def test_invalid_configs_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**TINY, **override})
