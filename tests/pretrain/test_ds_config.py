"""The learning-rate schedule follows the run (pretrain/ds_config.py resolve_schedule): "auto" is the first launch's
--max_steps, a resume keeps the recorded length and says so in one line, --extend_schedule stretches it; checked on
the learning rate real runs log."""

import dataclasses
import json
import math
import re
import shutil

import pytest
import torch

from models.registry import ConfigError
from pretrain import ds_schema
from pretrain.ds_config import load_ds_config, optimizer_for_device, resolve_schedule
from switchyard import deepspeed_compat
from tests.distributed import REPO, read_metrics, run_ranks, train_args

LR, WARMUP, COS_MIN = 0.001, 10, 0.1  # ds_configs/zero0.json's optimizer and scheduler


def cosine_lr(step, total):
    """The learning rate DeepSpeed's WarmupCosineLR logs after optimizer step ``step`` (1-based) past the warm-up."""
    progress = min(1.0, (step - WARMUP) / (total - WARMUP))
    return LR * (COS_MIN + (1 - COS_MIN) * (1 + math.cos(math.pi * progress)) / 2)


def test_auto_follows_max_steps_and_a_resume_keeps_or_extends_it(tmp_path):
    run = tmp_path / "run"
    first = run_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 14, save_dir=run), 1, tmp_path / "l1")
    lrs = read_metrics(run, "train/lr")
    assert lrs[14] == LR * COS_MIN and lrs[13] > LR * COS_MIN  # the minimum exactly at --max_steps
    assert json.loads((run / "run_config.json").read_text())["deepspeed"]["scheduler"]["params"]["total_num_steps"] == 14
    assert "notice: " not in first[0].output
    shutil.copytree(run, tmp_path / "extended")

    kept = run_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 18, "--resume", save_dir=run), 1, tmp_path / "l2")
    notices = [line for line in kept[0].output.splitlines() if "learning-rate schedule" in line]
    assert notices == [
        "notice: the learning-rate schedule keeps its recorded length of 14 steps (run_config.json) and "
        "--max_steps is 18: steps 15-18 train at the schedule's final learning rate (cos_min_ratio x lr); "
        "pass --extend_schedule to stretch it to 18"
    ]
    assert [read_metrics(run, "train/lr")[s] for s in range(15, 19)] == [LR * COS_MIN] * 4

    extended = tmp_path / "extended"
    output = run_ranks(
        train_args(tmp_path, "zero0.json", "tiny-gpt.json", 18, "--resume", "--extend_schedule", save_dir=extended), 1, tmp_path / "l3"
    )[0].output
    assert "the learning-rate schedule is stretched from its recorded 14 steps to 18" in output
    lrs = read_metrics(extended, "train/lr")
    assert all(math.isclose(lrs[s], cosine_lr(s, 18), rel_tol=1e-9) for s in range(15, 19))  # the 18-step cosine
    assert lrs[15] > LR * COS_MIN and lrs[18] == LR * COS_MIN
    assert json.loads((extended / "run_config.json").read_text())["deepspeed"]["scheduler"]["params"]["total_num_steps"] == 18


def schedule(total, kind="WarmupCosineLR"):
    return {"scheduler": {"type": kind, "params": {"total_num_steps": total, "warmup_num_steps": 10}}}


def test_what_the_schedule_cannot_do_is_one_line_and_a_fixed_length_is_kept():
    with pytest.raises(
        ConfigError,
        match=r"^--extend_schedule: DeepSpeed config d.json fixes scheduler.params.total_num_steps "
        r"at 100; set it to \"auto\"",
    ):
        resolve_schedule(schedule(100), "d.json", 200, True, schedule(100)["scheduler"], True)
    with pytest.raises(
        ConfigError,
        match=r"^--extend_schedule lengthens the learning-rate schedule, and --max_steps 50 is "
        r"shorter than its recorded 100 steps; drop --extend_schedule",
    ):
        resolve_schedule(schedule("auto"), "d.json", 50, True, schedule(100), True)
    with pytest.raises(ConfigError, match=r"^--extend_schedule: DeepSpeed config d.json has no scheduler"):
        resolve_schedule({}, "d.json", 50, True, {}, True)
    config, notice = resolve_schedule(schedule(100, "WarmupDecayLR"), "d.json", 150, False, None, False)
    assert config == schedule(100, "WarmupDecayLR")
    assert notice == (
        "notice: DeepSpeed config d.json fixes the learning-rate schedule at 100 steps and --max_steps is 150: "
        "the learning rate reaches 0 at step 101 and stays there: the steps after it change no weights; "
        'set scheduler.params.total_num_steps to "auto" to make it follow --max_steps'
    )
    assert resolve_schedule(schedule(100), "d.json", 100, False, None, False) == (schedule(100), None)


# The optimizer by device (pretrain/ds_config.optimizer_for_device). No GPU here: the device is passed as "cuda",
# and DeepSpeed's answers about compiling ops (a prebuilt op, a CUDA toolkit) are patched, saying what they stand in for.

SHIPPED = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
NO_TOOLKIT = "CUDA_HOME does not exist, unable to compile CUDA op(s)"  # DeepSpeed's MissingCUDAException on such a machine


@pytest.fixture
def gpu_without_toolkit(monkeypatch):
    """A GPU machine with a pip-installed torch: no CUDA toolkit, no op compiled when DeepSpeed was installed."""
    monkeypatch.setattr(deepspeed_compat, "cuda_toolkit_problem", lambda: NO_TOOLKIT)
    monkeypatch.setattr(deepspeed_compat, "prebuilt_op", lambda name: False)


def shipped(name):
    path = REPO / "ds_configs" / name
    return load_ds_config(str(path)), str(path)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_cpu_keeps_every_shipped_optimizer_as_written(name):
    config, path = shipped(name)
    assert optimizer_for_device(config, path, "cpu") == (config, None)


def offloads_the_optimizer(name):
    """ZeRO-Offload's optimizer is DeepSpeed's C++ CPU Adam, on CUDA too (tested below)."""
    offload = shipped(name)[0].get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


@pytest.mark.parametrize("name", [n for n in SHIPPED if not offloads_the_optimizer(n)])
def test_cuda_runs_adamw_as_torch_fused_adamw_and_compiles_nothing(name, gpu_without_toolkit):
    config, path = shipped(name)
    chosen, notice = optimizer_for_device(config, path, "cuda")
    assert chosen["optimizer"]["params"] == {**config["optimizer"]["params"], "torch_adam": True, "fused": True}
    assert {k: v for k, v in chosen.items() if k != "optimizer"} == {k: v for k, v in config.items() if k != "optimizer"}
    assert ds_schema.built_optimizer(chosen, path) is torch.optim.AdamW
    ds_schema.check(chosen, path)  # "fused" is a parameter of what DeepSpeed builds
    assert notice.startswith("optimizer: torch.optim.AdamW(fused=True) on CUDA") and "torch_adam to false" in notice


def test_a_compiled_optimizer_on_cuda_needs_a_toolkit_or_a_prebuilt_op(monkeypatch, gpu_without_toolkit):
    config, path = shipped("zero1.json")
    fused_adam = {**config, "optimizer": {**config["optimizer"], "params": {**config["optimizer"]["params"], "torch_adam": False}}}
    with pytest.raises(ConfigError) as refused:
        optimizer_for_device(fused_adam, path, "cuda")
    assert str(refused.value) == (
        f"DeepSpeed config {path}: FusedAdam is compiled by DeepSpeed at start on CUDA, which it cannot do here "
        f"({NO_TOOLKIT}); drop optimizer.params.torch_adam (torch's fused AdamW is built in), or install a CUDA "
        "toolkit matching torch's CUDA"
    )
    offload, offload_path = shipped("zero3_offload.json")  # ZeRO-Offload's optimizer is DeepSpeed's C++ CPU Adam
    with pytest.raises(ConfigError, match=r"DeepSpeedCPUAdam is compiled .* reinstall DeepSpeed with DS_BUILD_CPU_ADAM=1$"):
        optimizer_for_device(offload, offload_path, "cuda")

    monkeypatch.setattr(deepspeed_compat, "prebuilt_op", lambda name: name == "fused_adam")  # DS_BUILD_FUSED_ADAM=1 install
    assert optimizer_for_device(fused_adam, path, "cuda") == (fused_adam, None)
    monkeypatch.setattr(deepspeed_compat, "prebuilt_op", lambda name: False)
    monkeypatch.setattr(deepspeed_compat, "cuda_toolkit_problem", lambda: None)  # a matching toolkit: DeepSpeed compiles
    assert optimizer_for_device(fused_adam, path, "cuda") == (fused_adam, None)
    assert optimizer_for_device(offload, offload_path, "cuda") == (offload, None)


def test_cuda_toolkit_problem_is_deepspeeds_answer_here():
    """This machine has no CUDA toolkit and a CPU torch: DeepSpeed's own check says it cannot compile, in one line."""
    problem = deepspeed_compat.cuda_toolkit_problem()
    assert problem and "\n" not in problem
    assert deepspeed_compat.prebuilt_op("fused_adam") is False  # the PyPI wheel compiles ops at first use


def test_the_launch_decides_by_device_and_deepspeed_builds_torchs_fused_adamw(tmp_path, monkeypatch, gpu_without_toolkit):
    """prepare() asks the accelerator (patched to say "cuda": the CUDA launch's decision), and the config it makes
    trains through DeepSpeed here: the optimizer in the checkpoint is torch's AdamW with fused=True (torch 2.13
    has a fused AdamW on the CPU too), with the config's hyperparameters."""
    from deepspeed.accelerator import get_accelerator

    from pretrain.main import prepare

    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "device_name", lambda device_index=None: "cuda")
    args = train_args(tmp_path, "zero0.json", "tiny-gpt.json", 2)
    _, _, ds_config, _, _ = prepare([str(a) for a in args])
    monkeypatch.undo()
    assert ds_config["optimizer"]["params"]["torch_adam"] is True and ds_config["optimizer"]["params"]["fused"] is True

    chosen = tmp_path / "zero0-cuda-choice.json"
    chosen.write_text(json.dumps(ds_config))
    run_ranks(train_args(tmp_path, chosen, "tiny-gpt.json", 2), 1, tmp_path / "logs")
    states = torch.load(tmp_path / "run" / "global_step2" / "mp_rank_00_model_states.pt", weights_only=False)
    groups = states["optimizer"]["param_groups"]
    assert {(g["fused"], g["lr"] > 0, tuple(g["betas"])) for g in groups} == {(True, True, (0.9, 0.95))}
    assert all(torch.is_tensor(s["step"]) and int(s["step"]) == 2 for s in states["optimizer"]["state"].values())


@pytest.mark.parametrize("name", SHIPPED)
def test_offloaded_state_is_pinned(name):
    """Offloaded optimizer states and parameters cross PCIe every step on a GPU: pinned host memory copies
    asynchronously and about twice as fast. (On the CPU accelerator pinning is a no-op, so the CPU figures hold.)"""
    zero = shipped(name)[0].get("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        if zero.get(section, {}).get("device") in ("cpu", "nvme"):
            assert zero[section].get("pin_memory") is True, f"{name}: {section}"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_model_with_experts_at_other_sizes_is_resharded_under_zero_1_2_and_under_zero_0_only_at_its_expert_parallel_size(stage):
    """Resumes themselves: tests/pretrain/test_reshard.py. ZeRO-3 does not run experts at all (plan_launch)."""
    from models import load_model_config
    from pretrain.ds_config import plan_launch, plan_resume

    model = load_model_config(str(REPO / "models" / "configs" / "tiny-switch.json"))
    config = {**shipped("moe_ep2_zero2.json")[0], "zero_optimization": {"stage": stage}}
    plan = plan_launch(config, "moe.json", 2, model)  # 2 ranks, expert-parallel size 2
    assert plan_resume(plan, config, "moe.json", 2, model, 2) == (plan, config)
    assert plan_resume(plan, config, "moe.json", None, model, None) == (plan, config)  # a checkpoint without a record
    for saved_dp, saved_ep in ((2, 1), (1, 2), (4, 2), (1, 1)):
        if stage == 0 and saved_ep != 2:
            refusal = f"saved with expert-parallel size {saved_ep} and this launch has 2: .* launch with moe.expert_parallel_size {saved_ep}"
            with pytest.raises(ConfigError, match=refusal):
                plan_resume(plan, config, "moe.json", saved_dp, model, saved_ep)
        elif stage == 0:  # nothing is partitioned: each expert-parallel rank's file holds its experts whole
            assert plan_resume(plan, config, "moe.json", saved_dp, model, saved_ep) == (plan, config)
        else:
            resumed, resumed_config = plan_resume(plan, config, "moe.json", saved_dp, model, saved_ep)
            assert resumed == dataclasses.replace(plan, resume_resharded=True) and resumed_config == config  # not DeepSpeed's universal load
    with pytest.raises(ConfigError, match="does not run under ZeRO-3"):
        plan_launch({**config, "zero_optimization": {"stage": 3}}, "moe.json", 2, model)


def test_zero_plus_plus_quantization_on_cuda_needs_the_quantizer_op(monkeypatch, gpu_without_toolkit):
    """qwZ/qgZ on CUDA compile DeepSpeed's quantizer at start: refused in one line without a toolkit, accepted with one
    or with the op prebuilt (on the CPU they are refused outright: tests/pretrain/test_errors.py)."""
    from pretrain.ds_config import check_device_features

    config, path = shipped("zero3.json")
    qgz = {**config, "zero_optimization": {**config["zero_optimization"], "zero_quantized_gradients": True}}
    check_device_features(config, path, "cuda")
    refusal = f"ZeRO++ qgZ) needs DeepSpeed's quantizer op, compiled at start, which it cannot do here ({NO_TOOLKIT})"
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        check_device_features(qgz, path, "cuda")
    monkeypatch.setattr(deepspeed_compat, "prebuilt_op", lambda name: name == "quantizer")
    check_device_features(qgz, path, "cuda")
    monkeypatch.setattr(deepspeed_compat, "prebuilt_op", lambda name: False)
    monkeypatch.setattr(deepspeed_compat, "cuda_toolkit_problem", lambda: None)
    check_device_features(qgz, path, "cuda")


def model_preset(name, **over):
    from models import load_model_config

    return load_model_config(str(REPO / "models" / "configs" / name), over or None)


@pytest.mark.parametrize(
    "world, over, preset, model_over, refusal",
    [
        (2, {"data_parallel_size": 1}, "tiny-gpt.json", {}, "data_parallel_size beside sequence_parallel_size makes DeepSpeed build a device mesh"),
        (2, {"sequence_parallel_size": 0}, "tiny-gpt.json", {}, "sequence_parallel_size must be a positive integer, got 0"),
        (3, {}, "tiny-gpt.json", {}, "sequence_parallel_size 2 does not divide the world size 3"),
        (2, {}, "tiny-gpt.json", {"n_heads": 1, "d_model": 64}, "does not divide the model's n_heads 1"),
        (4, {"sequence_parallel_size": 4}, "tiny-llama.json", {}, "sequence_parallel_size 4 does not divide the model's n_kv_heads 2"),
        (2, {"pipeline": {"stages": 2}}, "tiny-gpt.json", {}, "with 2 pipeline stages is not supported"),
        (2, {"zero_optimization": {"stage": 3}}, "tiny-gpt.json", {}, "with ZeRO-3 is not supported"),
        (2, {}, "tiny-switch.json", {}, "needs a family whose attention splits sequences \\('gpt', 'llama'\\); a 'switch' model"),
        (2, {}, "tiny-llama-moe.json", {}, "a 'llama_moe' model runs without it"),
        (2, {}, "tiny-transformer.json", {}, "a 'transformer' model runs without it"),
    ],
)
def test_sequence_parallelism_it_cannot_run_is_refused_in_one_line(world, over, preset, model_over, refusal):
    from pretrain.ds_config import plan_launch

    config, path = shipped("ulysses2_zero1.json")
    with pytest.raises(ConfigError, match=refusal):
        plan_launch({**config, **over}, path, world, model_preset(preset, **model_over))


def test_sequence_parallel_groups_are_data_parallel_ranks_in_the_batch_arithmetic():
    from pretrain.ds_config import plan_launch

    config, path = shipped("ulysses2_zero1.json")
    plan = plan_launch(config, path, 4, model_preset("tiny-llama.json"))
    assert (plan.dp_size, plan.sequence_parallel_size, plan.zero_partitions) == (2, 2, 4)
    assert plan.train_batch_size == plan.micro_batch_size * plan.grad_accum_steps * plan.dp_size == 8
    assert plan_launch({k: v for k, v in config.items() if k != "sequence_parallel_size"}, path, 4, model_preset("tiny-gpt.json")).dp_size == 4


# Activation checkpointing and ZeRO-Infinity's nvme_path (pretrain/ds_config.py check_activation_checkpointing,
# resolve_nvme_paths); the launches themselves: test_main_checkpointing.py, test_main_zero.py, test_errors.py.


def checkpointed_gpt(every=1):
    from models import config_from_dict

    return config_from_dict({"family": "gpt", "checkpoint_activations": every})


@pytest.mark.parametrize(
    "section, stages, message",
    [
        ({"use_reentrant": "no"}, 1, "activation_checkpointing.use_reentrant must be true or false, got 'no'"),
        ({"partition_activations": True}, 1, "activation_checkpointing.partition_activations splits checkpoints across tensor-parallel ranks"),
        ({"contiguous_memory_optimization": True}, 1, "activation_checkpointing.contiguous_memory_optimization splits"),
        ({}, 2, "the pipeline form does not checkpoint its blocks (checkpoint_activations 1 in the model config)"),
    ],
)
def test_what_activation_checkpointing_cannot_do_is_one_line(section, stages, message):
    from pretrain.ds_config import plan_launch

    config = {**shipped("zero1_activation_checkpointing.json")[0], "activation_checkpointing": section, "pipeline": {"stages": stages}}
    with pytest.raises(ConfigError) as refused:
        plan_launch(config, "d.json", 2, checkpointed_gpt())
    assert str(refused.value).startswith("DeepSpeed config d.json: ") and message in str(refused.value)


def test_the_shipped_checkpointing_config_plans_and_picks_the_checkpoint():
    from pretrain.ds_config import launch_checkpointing, plan_launch

    config, path = shipped("zero1_activation_checkpointing.json")
    assert plan_launch(config, path, 2, checkpointed_gpt(2)).zero_stage == 1
    assert launch_checkpointing(config) == {"checkpoint_reentrant": True}
    assert launch_checkpointing({**config, "activation_checkpointing": {"use_reentrant": False}}) == {"checkpoint_reentrant": False}
    assert launch_checkpointing(shipped("zero1.json")[0]) == {"checkpoint_reentrant": True}  # DeepSpeed's defaults, reentrant


def test_nvme_path_is_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from pretrain.ds_config import resolve_nvme_paths

    config, path = shipped("zero3_nvme.json")
    (tmp_path / "drive").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = {**config, "zero_optimization": {**config["zero_optimization"]}}
    for key in ("offload_optimizer", "offload_param"):
        relative["zero_optimization"][key] = {**config["zero_optimization"][key], "nvme_path": "drive"}
    if not AsyncIOBuilder().is_compatible(verbose=False):
        with pytest.raises(ConfigError, match="needs DeepSpeed's async_io op, which cannot be built here without libaio; install libaio-dev"):
            resolve_nvme_paths(relative, path)
        return
    resolved = resolve_nvme_paths(relative, path)
    assert {resolved["zero_optimization"][key]["nvme_path"] for key in ("offload_optimizer", "offload_param")} == {str(tmp_path / "drive")}
    assert resolve_nvme_paths(shipped("zero3_offload.json")[0], "o.json") == shipped("zero3_offload.json")[0]  # no nvme: as written
