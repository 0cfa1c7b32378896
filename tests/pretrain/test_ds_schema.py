"""A DeepSpeed config with a misspelled key or a value that trains silently is refused by load_ds_config, in one line
that names the file, the key path and the fix; every shipped config passes unchanged."""

import json
import os
import subprocess
import sys

import pytest

from pretrain import ds_schema
from pretrain.ds_config import load_ds_config
from switchyard.errors import ConfigError
from tests.distributed import CORPUS, MAIN
from tests.pretrain.test_errors import DS, MODELS, write


def zero1_changed(tmp_path, change, base="zero1.json"):
    """ds_configs/<base> with ``change`` applied to its dict, written to tmp_path/ds.json."""
    config = json.loads((DS / base).read_text())
    change(config)
    return write(tmp_path / "ds.json", config)


def refusal(path):
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"DeepSpeed config {path}: "), message
    return message


def set_key(section, key, value):
    def change(config):
        (config.setdefault(section, {}) if section else config)[key] = value

    return change


def rename_param(section, old, new):
    def change(config):
        params = config[section]["params"]
        params[new] = params.pop(old)

    return change


def set_param(section, key, value):
    def change(config):
        config[section]["params"][key] = value

    return change


@pytest.mark.parametrize("name", sorted(p.name for p in DS.glob("*.json")))
def test_every_shipped_config_passes_unchanged(name):
    assert load_ds_config(DS / name) == json.loads((DS / name).read_text())


# ----------------------------------------------------------------- keys


def test_misspelled_top_level_key_says_what_was_meant(tmp_path):
    path = zero1_changed(tmp_path, lambda c: c.update(gradient_cliping=c.pop("gradient_clipping")))
    assert refusal(path).endswith("unknown key 'gradient_cliping' (did you mean 'gradient_clipping'?)")


def test_unknown_top_level_key_without_a_close_name_says_remove_it(tmp_path):
    path = zero1_changed(tmp_path, set_key(None, "my_custom_setting", 1))
    assert "unknown key 'my_custom_setting'; DeepSpeed 0.19 and Switchyard do not read it: remove it" in refusal(path)


@pytest.mark.parametrize(
    "base, section, key, expected",
    [
        ("zero2.json", "zero_optimization", "overlap_com", "did you mean 'zero_optimization.overlap_comm'?"),
        # an alias DeepSpeed's model accepts (stage3_ names of ZeRO-3 fields)
        (
            "zero3.json",
            "zero_optimization",
            "stage3_param_persistence_treshold",
            "did you mean 'zero_optimization.stage3_param_persistence_threshold'?",
        ),
        ("bf16_zero1.json", "bf16", "enable", "did you mean 'bf16.enabled'?"),
        ("fp16_zero1.json", "fp16", "loss_scale_windw", "did you mean 'fp16.loss_scale_window'?"),
    ],
)
def test_misspelled_key_in_a_section_deepspeed_parses_with_pydantic(tmp_path, base, section, key, expected):
    message = refusal(zero1_changed(tmp_path, set_key(section, key, True), base))
    assert f"unknown key '{section}.{key}' ({expected})" in message


def test_misspelled_key_nested_inside_zero_offload(tmp_path):
    path = zero1_changed(tmp_path, lambda c: c["zero_optimization"]["offload_optimizer"].update(devcie="cpu"), "zero3_offload.json")
    assert ("unknown key 'zero_optimization.offload_optimizer.devcie' (did you mean 'zero_optimization.offload_optimizer.device'?)") in refusal(path)


def test_bad_value_is_reported_from_deepspeeds_model(tmp_path):
    path = zero1_changed(tmp_path, set_key("zero_optimization", "reduce_bucket_size", -5))
    assert "zero_optimization.reduce_bucket_size: Input should be greater than 0, got -5" in refusal(path)


@pytest.mark.parametrize(
    "section, key, expected",
    [
        ("activation_checkpointing", "partition_activation", "activation_checkpointing.partition_activations"),
        ("checkpoint", "load_universl", "checkpoint.load_universal"),
        ("flops_profiler", "enable", "flops_profiler.enabled"),
    ],
)
def test_misspelled_key_in_a_section_deepspeed_reads_by_hand(tmp_path, section, key, expected):
    message = refusal(zero1_changed(tmp_path, set_key(section, key, True)))
    assert f"unknown key '{section}.{key}' (did you mean '{expected}'?)" in message


@pytest.mark.parametrize(
    "section, key, expected", [("moe", "expert_paralel_size", "moe.expert_parallel_size"), ("pipeline", "stage", "pipeline.stages")]
)
def test_misspelled_switchyard_key(tmp_path, section, key, expected):
    message = refusal(zero1_changed(tmp_path, set_key(section, key, 2)))
    assert f"unknown key '{section}.{key}' (did you mean '{expected}'?)" in message


def test_pipeline_accepts_the_keys_deepspeeds_pipeline_engine_reads(tmp_path):
    config = load_ds_config(zero1_changed(tmp_path, set_key("pipeline", "pipe_partitioned", False), "pipeline2_zero1.json"))
    assert config["pipeline"] == {"stages": 2, "pipe_partitioned": False}


def test_a_feature_adds_its_keys_in_one_place(tmp_path, monkeypatch):
    """SWITCHYARD_SECTIONS is the one table a feature edits: a section listed there is accepted, with its sub-keys."""
    path = zero1_changed(tmp_path, set_key("sequence_parallel", "size", 2))
    assert "unknown key 'sequence_parallel'" in refusal(path)
    monkeypatch.setitem(ds_schema.SWITCHYARD_SECTIONS, "sequence_parallel", {"size": "ranks per sequence-parallel group"})
    assert load_ds_config(path)["sequence_parallel"] == {"size": 2}
    assert "unknown key 'sequence_parallel.sise' (did you mean 'sequence_parallel.size'?)" in refusal(
        zero1_changed(tmp_path, set_key("sequence_parallel", "sise", 2))
    )


def test_bfloat16_spelling_is_refused_since_switchyard_reads_bf16(tmp_path):
    assert "'bfloat16': write it as 'bf16'" in refusal(zero1_changed(tmp_path, set_key("bfloat16", "enabled", True)))


def test_a_removed_deepspeed_feature_is_refused_with_deepspeeds_reason(tmp_path):
    message = refusal(zero1_changed(tmp_path, set_key("amp", "enabled", True)))
    assert "'amp' is a removed DeepSpeed feature; remove it. NVIDIA Apex AMP integration has been removed" in message


# ----------------------------------------------------------------- optimizer


def test_misspelled_optimizer_param(tmp_path):
    message = refusal(zero1_changed(tmp_path, rename_param("optimizer", "weight_decay", "weight_decy")))
    assert (
        "optimizer.params.weight_decy is not a parameter of deepspeed.ops.adam.fused_adam.FusedAdam, which DeepSpeed "
        "builds for optimizer.type 'AdamW' (did you mean 'optimizer.params.weight_decay'?)"
    ) in message


def test_optimizer_params_are_those_of_the_class_deepspeed_builds(tmp_path):
    """FusedAdam takes set_grad_none; DeepSpeed's CPU Adam, built when the optimizer is offloaded, does not."""
    load_ds_config(zero1_changed(tmp_path, set_param("optimizer", "set_grad_none", True)))
    message = refusal(zero1_changed(tmp_path, set_param("optimizer", "set_grad_none", True), "zero3_offload.json"))
    assert "optimizer.params.set_grad_none is not a parameter of deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam" in message


def test_deepspeeds_own_adam_keys_are_accepted(tmp_path):
    config = load_ds_config(zero1_changed(tmp_path, lambda c: c["optimizer"]["params"].update(adam_w_mode=True, torch_adam=True)))
    assert config["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("given, expected", [("Adamm", "(did you mean 'adam'?)"), ("sgd", "(did you mean 'SGD'?)")])
def test_unknown_optimizer_type(tmp_path, given, expected):
    message = refusal(zero1_changed(tmp_path, set_key("optimizer", "type", given)))
    assert f"optimizer.type {given!r} is not an optimizer DeepSpeed builds {expected}" in message


@pytest.mark.parametrize("given", ["adamw", "ADAMW", "Lamb"])
def test_optimizer_type_compares_without_case_as_deepspeed_does(tmp_path, given):
    assert load_ds_config(zero1_changed(tmp_path, set_key("optimizer", "type", given)))["optimizer"]["type"] == given


def test_a_torch_optimizer_is_checked_against_its_constructor(tmp_path):
    sgd = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
    load_ds_config(zero1_changed(tmp_path, lambda c: c.update(optimizer=sgd)))
    with_betas = {**sgd, "params": {"lr": 0.1, "betas": [0.9, 0.95]}}
    message = refusal(zero1_changed(tmp_path, lambda c: c.update(optimizer=with_betas)))
    assert "optimizer.params.betas is not a parameter of torch.optim.sgd.SGD" in message


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", -1e-3, "optimizer.params.lr must be a finite number >= 0, got -0.001"),
        ("lr", "1e-3", "optimizer.params.lr must be a finite number >= 0, got '1e-3' (a string; write the number without quotes)"),
        ("lr", True, "optimizer.params.lr must be a finite number >= 0, got True"),
        ("weight_decay", -0.1, "optimizer.params.weight_decay must be a finite number >= 0, got -0.1"),
        ("eps", 0, "optimizer.params.eps must be a finite number > 0, got 0"),
        ("betas", [0.9, 1.0], "optimizer.params.betas must be a pair of numbers in [0, 1)"),
        ("betas", 0.9, "optimizer.params.betas must be a pair of numbers in [0, 1)"),
    ],
)
def test_bad_optimizer_value(tmp_path, key, value, expected):
    assert expected in refusal(zero1_changed(tmp_path, set_param("optimizer", key, value)))


def test_max_grad_norm_points_to_gradient_clipping(tmp_path):
    message = refusal(zero1_changed(tmp_path, set_param("optimizer", "max_grad_norm", 1.0)))
    assert 'set the top-level "gradient_clipping" instead' in message


# ----------------------------------------------------------------- scheduler


def test_unknown_scheduler_type(tmp_path):
    message = refusal(zero1_changed(tmp_path, set_key("scheduler", "type", "WarmupCosine")))
    assert "scheduler.type 'WarmupCosine' is not a scheduler DeepSpeed builds (did you mean 'WarmupCosineLR'?)" in message


def test_misspelled_scheduler_param(tmp_path):
    message = refusal(zero1_changed(tmp_path, rename_param("scheduler", "warmup_num_steps", "warmup_num_step")))
    assert ("scheduler.params.warmup_num_step is not a parameter of WarmupCosineLR (did you mean 'scheduler.params.warmup_num_steps'?)") in message


def test_scheduler_number_given_as_a_string(tmp_path):
    message = refusal(zero1_changed(tmp_path, set_param("scheduler", "total_num_steps", "1000")))
    assert "scheduler.params.total_num_steps must be a finite number, got '1000'" in message


def test_auto_is_accepted_only_for_a_schedules_length(tmp_path):
    decay = {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 10}}
    assert load_ds_config(zero1_changed(tmp_path, lambda c: c.update(scheduler=decay)))["scheduler"] == decay
    message = refusal(zero1_changed(tmp_path, set_param("scheduler", "warmup_num_steps", "auto")))
    assert message.endswith(
        'scheduler.params.warmup_num_steps cannot be "auto": only total_num_steps of WarmupCosineLR '
        "or WarmupDecayLR is filled from --max_steps; give warmup_num_steps a number"
    )
    warmup_only = {"type": "WarmupLR", "params": {"total_num_steps": "auto"}}
    message = refusal(zero1_changed(tmp_path, lambda c: c.update(scheduler=warmup_only)))
    assert message.endswith(
        'scheduler.params.total_num_steps is "auto", but WarmupLR has no step count to fill from '
        "--max_steps; use WarmupCosineLR or WarmupDecayLR, whose total_num_steps follows the run, or drop the key"
    )


def test_scheduler_without_a_required_param(tmp_path):
    message = refusal(zero1_changed(tmp_path, lambda c: c["scheduler"]["params"].pop("total_num_steps")))
    assert "scheduler WarmupCosineLR needs scheduler.params.total_num_steps; add it" in message


def test_a_torch_scheduler_is_accepted_with_its_own_params(tmp_path):
    scheduler = {"type": "MultiStepLR", "params": {"milestones": [10, 20], "gamma": 0.5}}
    assert load_ds_config(zero1_changed(tmp_path, lambda c: c.update(scheduler=scheduler)))["scheduler"] == scheduler


# ----------------------------------------------------------------- gradient clipping


@pytest.mark.parametrize("value, shown", [(-1.0, "-1.0"), ("1.0", "'1.0' (a string"), (float("inf"), "inf")])
def test_bad_gradient_clipping(tmp_path, value, shown):
    message = refusal(zero1_changed(tmp_path, set_key(None, "gradient_clipping", value)))
    assert f"gradient_clipping must be a finite number >= 0, got {shown}" in message


# ----------------------------------------------------------------- end to end


def test_main_refuses_a_misspelled_key_before_creating_the_run_dir(tmp_path):
    bad = zero1_changed(tmp_path, lambda c: c["zero_optimization"].update(stgae=1))
    save_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WORLD_SIZE"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            str(MAIN),
            "--ds_config",
            str(bad),
            "--model_config",
            str(MODELS / "tiny-gpt.json"),
            "--train_data",
            str(CORPUS),
            "--max_steps",
            "1",
            "--save_dir",
            str(save_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert errors == [f"error: DeepSpeed config {bad}: unknown key 'zero_optimization.stgae' (did you mean 'zero_optimization.stage'?)"], proc.stderr[
        -2000:
    ]
    assert not save_dir.exists()
