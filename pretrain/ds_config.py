"""Read a DeepSpeed JSON config and refuse, in one line, what the launch cannot run.

Everything here runs before torch.distributed starts and before any model is allocated.
The JSON goes to ``deepspeed.initialize`` as written, but for one value: a scheduler's
``"total_num_steps": "auto"``, which ``resolve_schedule`` fills from the run. Switchyard adds sections
of its own, which DeepSpeed ignores: ``"moe": {"expert_parallel_size": N}`` and ``"seqlen_warmup"``
(pretrain/seqlen_warmup.py). DeepSpeed's ``"sequence_parallel_size": N`` (DeepSpeed-Ulysses) is read here
too, and its groups are handed to ``deepspeed.initialize`` as ``mpu`` (models/ulysses.py says why not
DeepSpeed's own mesh of it).
"""

import dataclasses
import json
import os
from dataclasses import dataclass

from models.registry import families_that, family_of
from pretrain import ds_schema, seqlen_warmup
from switchyard.errors import ConfigError


@dataclass
class LaunchPlan:
    """What the config and world size imply, derived the way DeepSpeed derives it."""

    world_size: int
    dp_size: int
    train_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    zero_stage: int
    precision: str  # "fp32", "bf16" or "fp16"
    pipeline_stages: int
    expert_parallel_size: int
    # Ranks each sequence is split over (DeepSpeed-Ulysses, models/ulysses.py): groups of this many consecutive
    # ranks read the same samples, each its slice of every sequence; dp_size counts the groups.
    sequence_parallel_size: int = 1
    resume_universal: bool = False  # resuming a dense ZeRO checkpoint saved at another data-parallel size
    resume_resharded: bool = False  # resuming a ZeRO 1-2 model with experts saved at another data- or expert-parallel size
    seqlen_warmup: dict | None = None  # the checked "seqlen_warmup" section (pretrain/seqlen_warmup.py), or None

    def data_parallel_rank(self, rank):
        """The data-parallel rank of global rank ``rank``: which samples it reads (models/ulysses.py's layout)."""
        return rank // self.sequence_parallel_size

    def sequence_parallel_rank(self, rank):
        """Which slice of each sequence global rank ``rank`` holds."""
        return rank % self.sequence_parallel_size

    @property
    def zero_partitions(self):
        """The ranks ZeRO partitions over: every data- and sequence-parallel rank of a pipeline stage (DeepSpeed's
        sequence-data-parallel group), the number a ZeRO checkpoint is saved in."""
        return self.dp_size * self.sequence_parallel_size


def load_ds_config(path):
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass one of ds_configs/*.json to --ds_config")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file")
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    ds_schema.check(config, path)  # every key and the values that train silently when wrong (pretrain/ds_schema.py)
    return config


def _positive_int(config, key, path):
    value = config.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"DeepSpeed config {path}: {key} must be a positive integer, got {value!r}")
    return value


def plan_launch(config, path, world_size, model_config):
    """The LaunchPlan of DeepSpeed config ``config`` (read from ``path``) for ``model_config`` on ``world_size`` ranks;
    what the model's family cannot run (its registration says: pipeline form, experts) is refused here."""
    family = family_of(model_config)
    if (config.get("data_efficiency") or {}).get("enabled"):
        # DeepSpeed applies data_efficiency only through the data loader deepspeed.initialize builds from
        # training_data and layers wrapped for it; Switchyard's own data pipeline would leave it silently off.
        raise ConfigError(
            f"DeepSpeed config {path}: data_efficiency (DeepSpeed's curriculum data sampling and random-LTD) works only "
            f"with DeepSpeed's own data loader, which Switchyard does not use, and random-LTD with a CUDA op and "
            f"DeepSpeed's layer wrappers: it would be ignored; remove it"
        )
    zero = config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    fp16 = bool((config.get("fp16") or {}).get("enabled", False))
    bf16 = bool((config.get("bf16") or {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError(f"DeepSpeed config {path} enables both fp16 and bf16; enable one")
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"

    stages = (config.get("pipeline") or {}).get("stages", 1)
    stages = 1 if stages == "auto" else stages
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"DeepSpeed config {path}: pipeline.stages must be a positive integer, got {stages!r}")
    if stages > 1:
        if stage >= 2:
            raise ConfigError(
                f"DeepSpeed config {path}: pipeline parallelism runs with ZeRO stage 0 or 1 only "
                f"(DeepSpeed partitions gradients across micro-batches otherwise); set zero_optimization.stage to 0 or 1"
            )
        if family.pipeline is None:
            raise ConfigError(
                f"DeepSpeed config {path}: pipeline stages need a family with a pipeline form "
                f"({', '.join(repr(f) for f in families_that(lambda f: f.pipeline))}); "
                f"use a config without 'pipeline' for a {family.name!r} model"
            )
        if world_size % stages:
            raise ConfigError(
                f"DeepSpeed config {path}: {stages} pipeline stages do not divide the world size {world_size}; launch a multiple of {stages} ranks"
            )

    check_activation_checkpointing(config, path, model_config, stages)

    ep_size = (config.get("moe") or {}).get("expert_parallel_size", 1)
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ConfigError(f"DeepSpeed config {path}: moe.expert_parallel_size must be a positive integer, got {ep_size!r}")
    if family.experts:
        if stage == 3:
            raise ConfigError(
                f"DeepSpeed config {path}: DeepSpeed 0.19's MoE layer does not run under ZeRO-3 "
                f"(it points to AutoEP, which needs a Hugging Face model); use ZeRO stage 0, 1 or 2 for "
                f"a {family.name!r} model"
            )
        if world_size % ep_size:
            raise ConfigError(
                f"DeepSpeed config {path}: moe.expert_parallel_size {ep_size} does not divide the world size "
                f"{world_size}; launch a multiple of {ep_size} ranks or lower expert_parallel_size"
            )
        if model_config.num_experts % ep_size:
            raise ConfigError(
                f"DeepSpeed config {path}: moe.expert_parallel_size {ep_size} does not divide num_experts "
                f"{model_config.num_experts}; pick an expert-parallel size that divides it"
            )

    sp = plan_sequence_parallel(config, path, world_size, stages, stage, model_config)
    dp = world_size // (stages * sp)
    tbs = _positive_int(config, "train_batch_size", path)
    mbs = _positive_int(config, "train_micro_batch_size_per_gpu", path)
    gas = _positive_int(config, "gradient_accumulation_steps", path)
    if tbs is None and mbs is None:
        raise ConfigError(f"DeepSpeed config {path} sets neither train_batch_size nor train_micro_batch_size_per_gpu; set at least one")
    if tbs is not None and mbs is not None and gas is None:
        if tbs % (mbs * dp):
            raise ConfigError(
                f"DeepSpeed config {path}: train_batch_size {tbs} is not divisible by train_micro_batch_size_per_gpu "
                f"{mbs} x {dp} data-parallel ranks; set train_batch_size to a multiple of {mbs * dp} or launch another number of ranks"
            )
        gas = tbs // (mbs * dp)
    elif tbs is not None and gas is not None and mbs is None:
        if tbs % (gas * dp):
            raise ConfigError(
                f"DeepSpeed config {path}: train_batch_size {tbs} is not divisible by gradient_accumulation_steps "
                f"{gas} x {dp} data-parallel ranks; set train_batch_size to a multiple of {gas * dp}"
            )
        mbs = tbs // (gas * dp)
    elif tbs is None:
        gas = gas or 1
        tbs = mbs * gas * dp
    elif mbs is None:
        gas = 1
        if tbs % dp:
            raise ConfigError(
                f"DeepSpeed config {path}: train_batch_size {tbs} is not divisible by {dp} data-parallel ranks; set it to a multiple of {dp}"
            )
        mbs = tbs // dp
    elif tbs != mbs * gas * dp:
        raise ConfigError(
            f"DeepSpeed config {path}: train_batch_size {tbs} != train_micro_batch_size_per_gpu {mbs} x "
            f"gradient_accumulation_steps {gas} x {dp} data-parallel ranks; drop one of the three and let it be derived"
        )
    return LaunchPlan(
        world_size=world_size,
        dp_size=dp,
        train_batch_size=tbs,
        micro_batch_size=mbs,
        grad_accum_steps=gas,
        zero_stage=stage,
        precision=precision,
        pipeline_stages=stages,
        expert_parallel_size=ep_size,
        sequence_parallel_size=sp,
        seqlen_warmup=seqlen_warmup.check_section(config, path),
    )


def plan_sequence_parallel(config, path, world_size, stages, zero_stage, model_config):
    """The sequence-parallel size ``sequence_parallel_size`` asks for (1 without it), or a one-line refusal of what
    cannot run so: a family that does not declare it (experts, encoder-decoders), heads it does not divide, pipeline
    stages, ZeRO-3, a world it does not divide, and DeepSpeed's mesh route (``data_parallel_size`` beside it). The
    sequence length is the task's check (pretrain/tasks/lm.py)."""
    sp = config.get("sequence_parallel_size", 1)
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise ConfigError(f"DeepSpeed config {path}: sequence_parallel_size must be a positive integer, got {sp!r}")
    if "data_parallel_size" in config and "sequence_parallel_size" in config:
        raise ConfigError(
            f"DeepSpeed config {path}: data_parallel_size beside sequence_parallel_size makes DeepSpeed build a device "
            f"mesh that never reduces gradients across sequence-parallel ranks (their weights drift apart); remove "
            f"data_parallel_size: it is derived (world size / sequence_parallel_size)"
        )
    if sp == 1:
        return sp
    family = family_of(model_config)
    if family.sequence_parallel is None:
        raise ConfigError(
            f"DeepSpeed config {path}: sequence_parallel_size {sp} needs a family whose attention splits sequences "
            f"({', '.join(repr(f) for f in families_that(lambda f: f.sequence_parallel))}); a {family.name!r} model "
            f"runs without it"
        )
    if stages > 1:
        raise ConfigError(f"DeepSpeed config {path}: sequence_parallel_size {sp} with {stages} pipeline stages is not supported; use one of them")
    if zero_stage == 3:
        # Measured (2 ranks, tiny-gpt): the losses are one rank's, but DeepSpeed 0.19.8's ZeRO-3 reports a gradient
        # norm 1/S of the true one, which is what it clips by; ZeRO 0-2 report the true norm.
        raise ConfigError(
            f"DeepSpeed config {path}: sequence_parallel_size {sp} with ZeRO-3 is not supported (DeepSpeed's ZeRO-3 "
            f"then clips by a gradient norm 1/{sp} of the true one); use ZeRO stage 0, 1 or 2"
        )
    if world_size % sp:
        raise ConfigError(
            f"DeepSpeed config {path}: sequence_parallel_size {sp} does not divide the world size {world_size}; launch a multiple of {sp} ranks"
        )
    for name, count in family.sequence_parallel(model_config).items():
        if count % sp:
            raise ConfigError(
                f"DeepSpeed config {path}: sequence_parallel_size {sp} does not divide the model's {name} {count} "
                f"(each rank attends with {name} / {sp} of them); pick a size that divides it"
            )
    return sp


def check_activation_checkpointing(config, path, model_config, stages):
    """The DeepSpeed config's activation_checkpointing section against the model's checkpointed blocks
    (``checkpoint_activations``, models/checkpointing.py): a section with no block to apply it to, or keys
    that would do nothing here, are refused rather than silently ignored."""
    section = config.get("activation_checkpointing")
    every = getattr(model_config, "checkpoint_activations", 0)
    if section is not None and not every:
        raise ConfigError(
            f"DeepSpeed config {path}: activation_checkpointing configures how checkpointed blocks are recomputed, "
            f"and the model checkpoints none; set checkpoint_activations in the model config (N: every Nth block) or remove the section"
        )
    if not every:
        return
    if stages > 1:
        raise ConfigError(
            f"DeepSpeed config {path}: the pipeline form does not checkpoint its blocks (checkpoint_activations "
            f"{every} in the model config); set checkpoint_activations to 0 with pipeline stages"
        )
    section = section or {}
    if not isinstance(section.get("use_reentrant", True), bool):
        raise ConfigError(f"DeepSpeed config {path}: activation_checkpointing.use_reentrant must be true or false, got {section['use_reentrant']!r}")
    for key in ("partition_activations", "contiguous_memory_optimization"):
        if section.get(key):
            # DeepSpeed splits each checkpoint across the tensor-parallel group of the mpu it is configured with
            # (contiguous buffers only with that split); Switchyard has no tensor parallelism, so nothing is split.
            raise ConfigError(
                f"DeepSpeed config {path}: activation_checkpointing.{key} splits checkpoints across tensor-parallel "
                f"ranks, which Switchyard does not have (it would keep each whole); remove it"
            )


def launch_checkpointing(config):
    """The model's launch field of the activation_checkpointing section: which DeepSpeed checkpoint it runs."""
    return {"checkpoint_reentrant": (config.get("activation_checkpointing") or {}).get("use_reentrant", True)}


# The DeepSpeed op each optimizer class DeepSpeed may build JIT-compiles at deepspeed.initialize on a GPU (its op
# builder's NAME); torch.optim's classes compile nothing.
COMPILED_OPS = {
    "FusedAdam": "fused_adam",
    "DeepSpeedCPUAdam": "cpu_adam",
    "ZenFlowCPUAdam": "cpu_adam",
    "FusedLamb": "fused_lamb",
    "FusedLion": "fused_lion",
    "DeepSpeedCPUAdagrad": "cpu_adagrad",
    "DeepSpeedCPULion": "cpu_lion",
}


def optimizer_for_device(config, path, device):
    """(``config`` with the optimizer this device runs, a one-line notice or None), decided at launch.

    On the CPU the config goes as written: DeepSpeed's C++ Adam, which the README's figures and the exact-resume
    replay (deepspeed_compat.replay_cpu_adam_bias_correction) are measured with. On CUDA, Adam and AdamW without an
    explicit ``torch_adam`` become torch's fused AdamW (``torch_adam`` with ``fused``), the same update in one kernel:
    DeepSpeed's FusedAdam would be compiled with nvcc at deepspeed.initialize, which needs a CUDA toolkit matching
    torch's (a pip-installed torch brings none), takes minutes on the first start, and makes every rank wait on a
    build lock that a job killed mid-build leaves behind. An optimizer that is still compiled on CUDA (asked for
    with ``"torch_adam": false``, the CPU optimizers of ZeRO-Offload, Lamb, Lion) is refused in one line when
    DeepSpeed could not compile it here, unless it was compiled at install."""
    from switchyard import deepspeed_compat

    section = config.get("optimizer") or {}
    params = section.get("params") or {}
    if device != "cuda" or not section:
        return config, None
    built = ds_schema.built_optimizer(config, path)
    notice = None
    if built is not None and built.__name__ == "FusedAdam" and "torch_adam" not in params:
        config = {**config, "optimizer": {**section, "params": {**params, "torch_adam": True, "fused": True}}}
        notice = (
            f"optimizer: torch.optim.AdamW(fused=True) on CUDA for {section['type']} in {path} (DeepSpeed's FusedAdam "
            f"would be compiled with nvcc at start; set optimizer.params.torch_adam to false to use it)"
        )
        built = ds_schema.built_optimizer(config, path)
    op = COMPILED_OPS.get(built.__name__) if built is not None else None
    if op and not deepspeed_compat.prebuilt_op(op):
        problem = deepspeed_compat.cuda_toolkit_problem()
        if problem:
            if built.__name__ == "FusedAdam":
                fix = "drop optimizer.params.torch_adam (torch's fused AdamW is built in), or install a CUDA toolkit matching torch's CUDA"
            else:
                fix = f"install a CUDA toolkit matching torch's CUDA (CUDA_HOME), or reinstall DeepSpeed with DS_BUILD_{op.upper()}=1"
            raise ConfigError(
                f"DeepSpeed config {path}: {built.__name__} is compiled by DeepSpeed at start on CUDA, which it cannot do here ({problem}); {fix}"
            )
    return config, notice


# ZeRO++'s quantized communication: DeepSpeed quantizes with CUDA kernels of its quantizer op (CUDAQuantizer in
# runtime/zero/partition_parameters.py), which the CPU accelerator does not have: there qwZ fails at the first
# all-gather, and qgZ silently falls back to a plain reduce-scatter under the deepspeed launcher.
QUANTIZED_ZERO = {
    "zero_quantized_weights": "qwZ",
    "zero_quantized_nontrainable_weights": "qwZ of frozen weights",
    "zero_quantized_gradients": "qgZ",
}


def check_device_features(config, path, device):
    """Refuse, in one line, what the DeepSpeed config asks of a device that does not have it: activation
    checkpoints offloaded to host memory (cpu_checkpointing) off an accelerator; ZeRO++'s quantized
    weights and gradients (qwZ, qgZ) need DeepSpeed's CUDA quantizer, compiled at start (on CUDA: the same
    toolkit condition as a compiled optimizer, optimizer_for_device)."""
    from switchyard import deepspeed_compat

    if device != "cuda" and (config.get("activation_checkpointing") or {}).get("cpu_checkpointing"):
        # Measured with DeepSpeed 0.19.8 on the CPU accelerator: its offload engine leaves each checkpoint an empty
        # tensor there, and the backward's recomputation fails on it (for both checkpoint functions).
        raise ConfigError(
            f"DeepSpeed config {path}: activation_checkpointing.cpu_checkpointing moves checkpoints from an accelerator "
            f"to host memory; on the {device} they are there already, and DeepSpeed's offload loses them in the backward; remove it"
        )
    zero = config.get("zero_optimization") or {}
    for key, name in QUANTIZED_ZERO.items():
        if not zero.get(key):
            continue
        if device != "cuda":
            raise ConfigError(
                f"DeepSpeed config {path}: zero_optimization.{key} (ZeRO++ {name}) quantizes with DeepSpeed's CUDA "
                f"kernels, which the {device} does not have; remove it here (hpZ, zero_hpz_partition_size, runs anywhere)"
            )
        problem = None if deepspeed_compat.prebuilt_op("quantizer") else deepspeed_compat.cuda_toolkit_problem()
        if problem:
            raise ConfigError(
                f"DeepSpeed config {path}: zero_optimization.{key} (ZeRO++ {name}) needs DeepSpeed's quantizer op, "
                f"compiled at start, which it cannot do here ({problem}); install a CUDA toolkit matching torch's CUDA "
                f"(CUDA_HOME), or remove it"
            )


NVME_OFFLOADS = ("offload_optimizer", "offload_param")


def resolve_nvme_paths(config, path):
    """``config`` with each NVMe offload's (ZeRO-Infinity) ``nvme_path`` made absolute, a relative one against the
    launch's working directory (as every path flag is), so that each rank and the run's record name one directory.

    Refused in one line: DeepSpeed's async_io op cannot be built here (it needs libaio's headers), or the directory
    does not exist or is not writable. DeepSpeed would create a missing one: a mistyped mount point would then
    swap onto whatever disk holds its parent."""
    zero = config.get("zero_optimization") or {}
    offloads = [key for key in NVME_OFFLOADS if (zero.get(key) or {}).get("device") == "nvme"]
    if not offloads:
        return config
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(
            f"DeepSpeed config {path}: zero_optimization.{offloads[0]} to nvme needs DeepSpeed's async_io op, which "
            f"cannot be built here without libaio; install libaio-dev (apt-get install libaio-dev) or offload to cpu"
        )
    zero = dict(zero)
    for key in offloads:
        given = zero[key].get("nvme_path")
        if not isinstance(given, str) or not given:
            raise ConfigError(f"DeepSpeed config {path}: zero_optimization.{key}.nvme_path must name a directory on an NVMe drive, got {given!r}")
        directory = os.path.abspath(os.path.expanduser(given))
        if not os.path.isdir(directory):
            raise ConfigError(
                f"DeepSpeed config {path}: zero_optimization.{key}.nvme_path {directory} is not a directory; create it "
                f"on the NVMe drive (its mount point) or point nvme_path at one"
            )
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(
                f"DeepSpeed config {path}: zero_optimization.{key}.nvme_path {directory} is not writable; pick a directory you can write"
            )
        zero[key] = {**zero[key], "nvme_path": directory}
    return {**config, "zero_optimization": zero}


def plan_resume(plan, config, path, saved_dp_size, model_config, saved_ep_size=None, saved_sp_size=None):
    """Resuming at another data-parallel size: ZeRO-0 loads as is (nothing is partitioned); ZeRO 1-3
    go through DeepSpeed's universal checkpoint; what that cannot convert is refused.

    A model with experts at another data- or expert-parallel size: under ZeRO 1-2 through pretrain/reshard.py
    (``resume_resharded``; DeepSpeed's converter would join different experts' partitions as one tensor's). Under
    ZeRO-0 it loads as is at another data-parallel size only: each expert-parallel rank's optimizer file
    (``expp_rank_R_*``) holds that rank's experts whole, which fits any launch of the same expert-parallel size
    and no other. (ZeRO-3 runs no experts: plan_launch.) ``saved_ep_size``: the checkpoint's (None: unknown).

    A dense model's ZeRO checkpoint is partitioned over its data- and sequence-parallel ranks together
    (LaunchPlan.zero_partitions; ``saved_sp_size``: the checkpoint's sequence-parallel size, None: 1): it loads as is
    wherever their product is the same, and through the universal checkpoint elsewhere."""
    if family_of(model_config).experts:
        saved = (saved_dp_size or plan.dp_size, saved_ep_size or plan.expert_parallel_size)
        if saved == (plan.dp_size, plan.expert_parallel_size) or (plan.zero_stage == 0 and saved[1] == plan.expert_parallel_size):
            return plan, config
        if plan.zero_stage == 0:
            raise ConfigError(
                f"the ZeRO-0 checkpoint of this {family_of(model_config).name!r} model was saved with expert-parallel "
                f"size {saved[1]} and this launch has {plan.expert_parallel_size}: ZeRO-0 keeps each expert-parallel "
                f"rank's optimizer state in a file of its own, which Switchyard does not convert (it converts ZeRO 1-2); "
                f"launch with moe.expert_parallel_size {saved[1]}" + (f" (on a multiple of {saved[1]} ranks)" if saved[1] > 1 else "")
            )
        return dataclasses.replace(plan, resume_resharded=True), config
    saved_partitions = None if saved_dp_size is None else saved_dp_size * (saved_sp_size or 1)
    if saved_partitions is None or saved_partitions == plan.zero_partitions or plan.zero_stage == 0:
        return plan, config
    if (saved_sp_size or 1) > 1 or plan.sequence_parallel_size > 1:
        # DeepSpeed records a sequence-parallel checkpoint's size as its tensor-parallel degree (the mpu's model-
        # parallel size is the sequence-parallel one), and ds_to_universal then looks for that many model files.
        raise ConfigError(
            f"the checkpoint's ZeRO state is partitioned over {saved_partitions} ranks and this launch partitions it "
            f"over {plan.zero_partitions}: with sequence parallelism on either side DeepSpeed's universal checkpoint "
            f"cannot convert it; launch data-parallel x sequence-parallel = {saved_partitions} ranks (x pipeline stages)"
        )
    if plan.pipeline_stages > 1:
        raise ConfigError(
            f"the checkpoint was saved with {saved_dp_size} data-parallel ranks and this launch has {plan.dp_size}: "
            f"only dense models without pipeline stages resume at another data-parallel size; launch "
            f"{saved_dp_size * plan.pipeline_stages} ranks"
        )
    config = {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}
    return dataclasses.replace(plan, resume_universal=True), config


def _schedule_end(scheduler, total, max_steps):
    """What a learning-rate schedule of ``total`` steps does in a run that stops at step ``max_steps``."""
    if max_steps < total:
        return f"training stops at step {max_steps}, before the learning rate has decayed to the schedule's end"
    if scheduler["type"] == "WarmupDecayLR":  # its linear decay would go below 0 past the end; DeepSpeed clamps it
        return f"the learning rate reaches 0 at step {total + 1} and stays there: the steps after it change no weights"
    return f"steps {total + 1}-{max_steps} train at the schedule's final learning rate (cos_min_ratio x lr)"


def resolve_schedule(config, path, max_steps, resume, recorded, extend):
    """(``config`` with an ``"auto"`` schedule length filled in, a one-line notice or None).

    A new run's ``"auto"`` is its --max_steps. A resumed run keeps the length it recorded (run_config.json holds
    the resolved config, ``recorded``; None when the run has no record), which the checkpoint's scheduler state
    continues; ``extend`` (--extend_schedule) makes it this launch's --max_steps. That takes effect although
    DeepSpeed loads the scheduler's state from the checkpoint: WarmupCosineLR and WarmupDecayLR save only
    ``last_batch_iteration`` there (deepspeed/runtime/lr_schedules.py), so their length is always the config's.
    A config that fixes the length keeps it; the notice says where it ends against --max_steps."""
    scheduler = config.get("scheduler") or {}
    key = ds_schema.AUTO_STEP_KEYS.get(scheduler.get("type"))
    total = (scheduler.get("params") or {}).get(key) if key else None
    if total is None:
        if extend:
            raise ConfigError(
                f"--extend_schedule: DeepSpeed config {path} has no scheduler with a total_num_steps to "
                f"stretch ({' or '.join(ds_schema.AUTO_STEP_KEYS)}); drop --extend_schedule"
            )
        return config, None
    if total != ds_schema.AUTO:
        if extend:
            raise ConfigError(
                f"--extend_schedule: DeepSpeed config {path} fixes scheduler.params.{key} at {total}; "
                f'set it to "auto" to let the schedule follow --max_steps'
            )
        notice = None
        if total != max_steps:
            notice = (
                f"notice: DeepSpeed config {path} fixes the learning-rate schedule at {total} steps and --max_steps "
                f"is {max_steps}: {_schedule_end(scheduler, total, max_steps)}; set scheduler.params.{key} to "
                f'"auto" to make it follow --max_steps'
            )
        return config, notice
    recorded_scheduler = (recorded or {}).get("scheduler") or {}
    recorded_total = (recorded_scheduler.get("params") or {}).get(key) if recorded_scheduler.get("type") == scheduler["type"] else None
    notice = None
    if not resume:
        total = max_steps
    elif recorded_total is None:  # a checkpoint copied in without its record, or a run that had another scheduler
        total = max_steps
        notice = (
            f"notice: the run records no {scheduler['type']} length to keep; the learning-rate schedule now "
            f"ends at this launch's --max_steps {max_steps}"
        )
    elif extend:
        if max_steps < recorded_total:
            raise ConfigError(
                f"--extend_schedule lengthens the learning-rate schedule, and --max_steps {max_steps} is "
                f"shorter than its recorded {recorded_total} steps; drop --extend_schedule (training then "
                f"stops at step {max_steps} of the {recorded_total}-step schedule)"
            )
        total = max_steps
        if max_steps != recorded_total:
            notice = (
                f"notice: --extend_schedule: the learning-rate schedule is stretched from its recorded "
                f"{recorded_total} steps to {max_steps}; from the resumed step on the learning rate follows "
                f"the {max_steps}-step schedule"
            )
    else:
        total = recorded_total
        if max_steps != recorded_total:
            stretch = f"; pass --extend_schedule to stretch it to {max_steps}" if max_steps > recorded_total else ""
            notice = (
                f"notice: the learning-rate schedule keeps its recorded length of {recorded_total} steps "
                f"(run_config.json) and --max_steps is {max_steps}: "
                f"{_schedule_end(scheduler, recorded_total, max_steps)}{stretch}"
            )
    params = {**scheduler["params"], key: total}
    return {**config, "scheduler": {**scheduler, "params": params}}, notice
