"""Activation checkpointing (models/checkpointing.py) in every family's block loop: the gradients are those of
the plain model, dropout included (DeepSpeed's checkpoint restores the RNG states before recomputing), with the
reentrant and the non-reentrant checkpoint; the checkpointed blocks really run twice."""

import dataclasses

import pytest
import torch

from models import build_model, config_from_dict
from models.checkpointing import run_block
from switchyard.errors import ConfigError
from tests.distributed import REPO

DROPOUT = 0.3  # high enough that a second draw of the masks changes every gradient
FAMILIES = ["tiny-gpt.json", "tiny-switch.json", "tiny-llama.json", "tiny-llama-moe.json", "tiny-transformer.json", "tiny-switch-transformer.json"]


def tiny(preset, **changes):
    import json

    raw = json.loads((REPO / "models" / "configs" / preset).read_text())
    return config_from_dict({**raw, "n_layers" if "n_layers" in raw else "encoder_layers": 4, "dropout": DROPOUT, **changes})


def gradients(config, seed=0):
    """(the loss, each parameter's gradient, how many times each block ran) of one training step of the model
    seeded 0, on batch ``seed``, with dropout drawn from ``seed``."""
    torch.manual_seed(0)
    model = build_model(config).train()
    blocks = list(getattr(model, "blocks", None) or [*model.encoder, *model.decoder])
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 200, (2, 16), generator=generator)
    torch.manual_seed(seed)
    if hasattr(model, "blocks"):
        logits, aux_loss, _ = model(tokens)
    else:
        logits, aux_loss, _ = model(tokens, None, tokens.flip(1), None)
    loss = logits.float().square().mean() + aux_loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("preset", FAMILIES)
def test_checkpointed_blocks_give_the_plain_gradients_with_dropout(preset):
    plain_loss, plain, plain_calls = gradients(tiny(preset))
    assert plain_calls == [1] * len(plain_calls) and len(plain) > 10
    for reentrant in (True, False):
        config = dataclasses.replace(tiny(preset, checkpoint_activations=2), checkpoint_reentrant=reentrant)
        loss, checkpointed, calls = gradients(config)
        assert calls == [2 if index % 2 == 0 else 1 for index in range(len(calls))]  # blocks 0, 2, ... ran again in the backward
        assert loss == plain_loss
        assert checkpointed.keys() == plain.keys()
        assert [name for name in plain if not torch.equal(checkpointed[name], plain[name])] == [], f"reentrant {reentrant}"


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_without_the_rng_restored_dropout_draws_other_masks(monkeypatch, reentrant):
    """The control of the test above: where the recomputation draws new dropout masks, the gradients differ."""
    _, plain, _ = gradients(tiny("tiny-gpt.json"))
    from deepspeed.runtime.activation_checkpointing import checkpointing

    # What DeepSpeed's checkpoint restores the CPU RNG with, and the accelerator's (on the CPU: the same generator).
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    monkeypatch.setattr(checkpointing, "_set_cuda_rng_state", lambda state, device=-1: None)
    _, checkpointed, _ = gradients(dataclasses.replace(tiny("tiny-gpt.json", checkpoint_activations=1), checkpoint_reentrant=reentrant))
    assert [name for name in plain if not torch.equal(checkpointed[name], plain[name])] != []


def test_evaluation_and_no_grad_run_each_block_once():
    model = build_model(tiny("tiny-gpt.json", checkpoint_activations=1))
    block = model.blocks[0]
    x = torch.randn(1, 4, 64, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(run_block(model.config, 0, block.eval(), x)[0], block(x)[0])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"checkpoint_activations": -1}, "checkpoint_activations must be 0 (no block checkpointed) or N >= 1 (every Nth block), got -1"),
        ({"checkpoint_activations": True}, "'checkpoint_activations' must be int, got True"),
        ({"checkpoint_reentrant": False}, "'checkpoint_reentrant' is set at launch (from the DeepSpeed config), not in a model config; remove it"),
    ],
)
def test_a_bad_checkpointing_field_is_one_line(change, message):
    with pytest.raises(ConfigError, match=f"^model config: {message.replace('(', '[(]').replace(')', '[)]')}$"):
        tiny("tiny-gpt.json", **change)


def test_router_bias_is_refused_with_checkpointing():
    """SwitchFFN counts the tokens it routes in its forward; a checkpointed block's second forward would count them again."""
    with pytest.raises(ConfigError, match="router_bias_rate counts routed tokens in the forward, which checkpoint_activations runs twice"):
        tiny("tiny-switch.json", checkpoint_activations=1, router_bias_rate=0.001)


def test_a_resume_may_change_the_checkpointed_blocks_and_a_record_loads_without_the_launch_field():
    """checkpoint_activations changes what is kept in memory, not the weights (a training setting); the record of
    a launch holds checkpoint_reentrant, which a model file may not (models/registry.py without_launch_fields)."""
    from models.registry import config_to_dict, resume_differences, without_launch_fields

    launched = dataclasses.replace(tiny("tiny-llama.json", checkpoint_activations=1), checkpoint_reentrant=False)
    recorded = config_to_dict(launched)
    assert recorded["checkpoint_reentrant"] is False
    assert resume_differences(recorded, tiny("tiny-llama.json")) == ([], [("checkpoint_activations", 1, 0)])
    assert config_from_dict(without_launch_fields(recorded)) == dataclasses.replace(launched, checkpoint_reentrant=True)
