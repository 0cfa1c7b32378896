"""Activation checkpointing through pretrain/main.py and the DeepSpeed engine (ds_configs/zero1_activation_checkpointing.json):
a GPT with dropout whose every block is checkpointed trains with the plain run's losses, with DeepSpeed's reentrant
and non-reentrant checkpoint (the gradients themselves: tests/models/test_checkpointing.py)."""

import json

from tests.distributed import REPO, read_metrics, run_ranks, train_args

STEPS = 3


def test_checkpointed_blocks_train_with_the_plain_losses(tmp_path):
    model = json.loads((REPO / "models" / "configs" / "tiny-gpt-dropout.json").read_text())
    assert model["dropout"] > 0
    checkpointed = tmp_path / "tiny-gpt-dropout-checkpointed.json"
    checkpointed.write_text(json.dumps({**model, "checkpoint_activations": 1}))
    config = json.loads((REPO / "ds_configs" / "zero1_activation_checkpointing.json").read_text())
    assert config["activation_checkpointing"]["use_reentrant"] is True
    config["activation_checkpointing"]["use_reentrant"] = False
    non_reentrant = tmp_path / "zero1_non_reentrant.json"
    non_reentrant.write_text(json.dumps(config))

    losses = {}
    for name, ds_config, model_config in (
        ("plain", "zero1.json", "tiny-gpt-dropout.json"),
        ("reentrant", "zero1_activation_checkpointing.json", checkpointed),
        ("non-reentrant", non_reentrant, checkpointed),
    ):
        run = tmp_path / name
        run_ranks(train_args(tmp_path, ds_config, model_config, STEPS, save_dir=run), 1, tmp_path / f"logs-{name}")
        losses[name] = read_metrics(run)
        assert json.loads((run / "run_config.json").read_text())["model"]["checkpoint_activations"] == (0 if name == "plain" else 1)
    assert sorted(losses["plain"]) == list(range(1, STEPS + 1))
    assert losses["reentrant"] == losses["plain"] and losses["non-reentrant"] == losses["plain"]
