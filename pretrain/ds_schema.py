"""Check every key and the values that matter of a DeepSpeed JSON config, before anything is built.

DeepSpeed reads its config with ``dict.get`` and a default: a misspelled key is not an error, it is the
default. ``"gradient_cliping": 1.0`` trains without clipping, ``"optimizer": {"params": {"weight_decy": 0.1}}``
would fail only once the engine builds the optimizer, after the process group and the model exist.
``check(config, path)`` refuses such a config up front, with one line that names the file, the key path
and the fix (a ``ConfigError``, which pretrain/main.py prints as ``error: ...`` with exit code 2).

Where the keys come from, so that they follow the installed DeepSpeed (0.19.8) rather than a copy:
  * sections DeepSpeed parses with one of its pydantic models (``DeepSpeedConfigModel`` forbids extra
    keys) are validated by that model, and its first error becomes the one line;
  * sections DeepSpeed reads by hand are checked against lists built from DeepSpeed's own constants, each
    with a comment naming the source file;
  * ``optimizer.params`` and ``scheduler.params`` are checked against the constructor of the class
    DeepSpeed would build for that type;
  * Switchyard's own sections are in SWITCHYARD_SECTIONS: other features add their keys there.

Nothing here starts a process group, builds a model or calls ``deepspeed.initialize``; it only imports
DeepSpeed's config modules and optimizer/scheduler classes (which ``import deepspeed`` loads anyway).
"""

import difflib
import inspect
import math
import types
import typing

import torch
from pydantic import BaseModel, ValidationError

from switchyard.errors import ConfigError

# --------------------------------------------------------------------------------------------------------
# Switchyard's own sections. DeepSpeed ignores "moe"; it reads "pipeline" too (its pipeline engine's keys are
# added from DeepSpeed below), but "stages" is what plan_launch reads to split the model. plan_launch checks
# the values; here only the names are checked. Other features add their keys here: a new section is one
# entry, a new sub-key one line (sub-key -> what reads it).
SWITCHYARD_SECTIONS = {
    "moe": {
        "expert_parallel_size": "plan_launch: ranks per expert-parallel group",
    },
    "pipeline": {
        "stages": "plan_launch: pipeline stages the GPT is split into ('auto' = 1)",
    },
    # Sequence-length warmup (pretrain/seqlen_warmup.py, which checks the values and schedule_config's keys).
    "seqlen_warmup": {
        "min_difficulty": "seqlen_warmup: the first steps' sequence length",
        "max_difficulty": "seqlen_warmup: the length the warmup ends at ('auto' = the run's)",
        "schedule_type": "seqlen_warmup: fixed_linear or fixed_root",
        "schedule_config": "seqlen_warmup: total_curriculum_step, difficulty_step (, root_degree)",
    },
    "activation_checkpointing": {
        "use_reentrant": "plan_launch: the model's checkpointed blocks run DeepSpeed's checkpoint (true, the default) or non_reentrant_checkpoint (false)",
    },
}

# Keys DeepSpeed reads but Switchyard refuses, with the fix.
REFUSED_KEYS = {
    # deepspeed/runtime/precision_config.py falls back to "bfloat16" when "bf16" is absent, but plan_launch
    # reads only "bf16": DeepSpeed would train in bf16 while the trainer, following plan.precision, treats
    # the run as fp32 (it clips the gradients itself then, for one).
    "bfloat16": "write it as 'bf16' (Switchyard reads the precision from 'bf16' only)",
    # AutoEP replaces Hugging Face MoE blocks it finds by preset; Switchyard's Switch layer is DeepSpeed's MoE
    # layer itself, which AutoEP does not look for (README, "Expert parallelism"): at best it warns and does
    # nothing, while the user believes the experts are split.
    "expert_parallel": 'AutoEP does not apply to Switchyard models; set expert parallelism with "moe": {"expert_parallel_size": N}',
    # DeepSpeed 0.19 removed it and points to data_efficiency's curriculum, which acts only through DeepSpeed's own
    # data loader (refused too, pretrain/ds_config.py): Switchyard's section drives the sequence length instead.
    "curriculum_learning": (
        'DeepSpeed 0.19 removed it; for sequence-length warmup write the schedule as "seqlen_warmup": {"min_difficulty", '
        '"max_difficulty", "schedule_type", "schedule_config"} (README, "Sequence-length warmup"; ds_configs/seqlen_warmup.json)'
    ),
}

# A leaf whose value DeepSpeed (or plan_launch) checks, or that may be anything; and a section whose
# sub-keys are not checked here (deep, version-specific trees of features Switchyard does not use).
ANY = "any value"
SUBKEYS_NOT_LISTED = "sub-keys not listed"
# optimizer and scheduler are checked by _check_optimizer / _check_scheduler below.
CHECKED_BELOW = "checked below"


def _non_negative_number(value):
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        return f"must be a finite number >= 0, got {_shown(value)}"
    return None


def _deepspeed_schema():
    """Top-level key -> ANY, SUBKEYS_NOT_LISTED, CHECKED_BELOW, a value check (function of the value that
    returns the problem or None), a pydantic model class, or a dict of sub-keys (each again one of these)."""
    from deepspeed.autotuning.constants import AUTOTUNING
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.datastates.config import DATASTATES_CHECKPOINTING
    from deepspeed.inference.config import WeightQuantConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.profiling import constants as flops
    from deepspeed.runtime import constants as c
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT, ACT_CHKPT_DEFAULT
    from deepspeed.runtime.config import HybridEngineConfig, get_pipeline_config
    from deepspeed.runtime.data_pipeline.constants import DATA_EFFICIENCY
    from deepspeed.runtime.model_checkpointing import constants as ckpt
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT
    from deepspeed.runtime.swap_tensor.constants import AIO
    from deepspeed.runtime.tensor_parallel.config import TPTrainingConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils.config import TIMERS, TIMERS_THROUGHPUT, DeepSpeedThroughputTimerConfig

    schema = {
        # Scalars read with get_scalar_param in DeepSpeedConfig._initialize_params (deepspeed/runtime/config.py);
        # the batch sizes are checked by plan_launch, which derives them as DeepSpeed does.
        c.TRAIN_BATCH_SIZE: ANY,
        c.TRAIN_MICRO_BATCH_SIZE_PER_GPU: ANY,
        c.GRADIENT_ACCUMULATION_STEPS: ANY,
        c.MANAGED_GRADIENT_ACCUMULATION: ANY,
        c.STEPS_PER_PRINT: ANY,
        c.DUMP_STATE: ANY,
        c.DISABLE_PYTHON_GC: ANY,
        c.DISABLE_ALLGATHER: ANY,
        c.COMMUNICATION_DATA_TYPE: ANY,
        c.SEQ_PARALLEL_COMMUNICATION_DATA_TYPE: ANY,
        c.PRESCALE_GRADIENTS: ANY,
        c.GRADIENT_PREDIVIDE_FACTOR: ANY,
        c.GRADIENT_ALLREDUCE_OP: ANY,
        c.ZERO_ALLOW_UNTESTED_OPTIMIZER: ANY,
        c.ZERO_FORCE_DS_CPU_OPTIMIZER: ANY,
        c.WALL_CLOCK_BREAKDOWN: ANY,
        c.MEMORY_BREAKDOWN: ANY,
        c.USE_DATA_BEFORE_EXPERT_PARALLEL: ANY,
        c.DATALOADER_DROP_LAST: ANY,
        c.LOG_LEVEL: ANY,
        c.VOCABULARY_SIZE: ANY,
        # A clipping of -1 or "1.0" reaches torch's clip_grad_norm_ only at the first step; refuse it now.
        c.GRADIENT_CLIPPING: _non_negative_number,
        # Read by deepspeed/__init__.py (initialize) and deepspeed/runtime/config.py for the Ulysses mesh; Switchyard
        # reads sequence_parallel_size itself and refuses data_parallel_size beside it (pretrain/ds_config.py).
        "sequence_parallel_size": ANY,
        "data_parallel_size": ANY,
        c.OPTIMIZER: CHECKED_BELOW,
        c.SCHEDULER: CHECKED_BELOW,
        # Sections DeepSpeed parses with its pydantic models (all DeepSpeedConfigModel: extra="forbid").
        "zero_optimization": DeepSpeedZeroConfig,  # runtime/zero/config.py get_zero_config
        "fp16": DeepSpeedFP16Config,
        "bf16": DeepSpeedBF16Config,  # runtime/precision_config.py
        "comms_logger": CommsLoggerConfig,  # comm/config.py DeepSpeedCommsConfig
        # monitor/config.py get_monitor_config reads these four top-level keys into one model each.
        "tensorboard": TensorBoardConfig,
        "wandb": WandbConfig,
        "csv_monitor": CSVConfig,
        "comet": CometConfig,
        "hybrid_engine": HybridEngineConfig,  # runtime/config.py get_hybrid_engine_config
        "compile": CompileConfig,  # runtime/config.py: CompileConfig(**param_dict.get('compile', {}))
        "weight_quantization": WeightQuantConfig,  # runtime/config.py
        "tensor_parallel": TPTrainingConfig,  # runtime/tensor_parallel/config.py get_tensor_parallel_config
        TIMERS: {TIMERS_THROUGHPUT: DeepSpeedThroughputTimerConfig},  # utils/config.py get_timers_config
        # Sections DeepSpeed reads by hand (get_scalar_param / dict.get on a fixed set of names).
        ACT_CHKPT: {key: ANY for key in ACT_CHKPT_DEFAULT},  # runtime/activation_checkpointing/config.py
        flops.FLOPS_PROFILER: {
            key: ANY
            for key in (  # profiling/config.py DeepSpeedFlopsProfilerConfig._initialize
                flops.FLOPS_PROFILER_ENABLED,
                flops.FLOPS_PROFILER_RECOMPUTE_FWD_FACTOR,
                flops.FLOPS_PROFILER_PROFILE_STEP,
                flops.FLOPS_PROFILER_MODULE_DEPTH,
                flops.FLOPS_PROFILER_TOP_MODULES,
                flops.FLOPS_PROFILER_DETAILED,
                flops.FLOPS_PROFILER_OUTPUT_FILE,
            )
        },
        AIO: {key: ANY for key in AIO_DEFAULT_DICT},  # runtime/swap_tensor/aio_config.py get_aio_config
        c.CHECKPOINT: {  # runtime/config.py (_initialize_params) and runtime/model_checkpointing/config.py
            c.CHECKPOINT_TAG_VALIDATION: ANY,
            c.LOAD_UNIVERSAL_CHECKPOINT: ANY,
            c.USE_NODE_LOCAL_STORAGE_CHECKPOINT: ANY,
            c.CHECKPOINT_PARALLEL_WRITE: {c.CHECKPOINT_PARALLEL_WRITE_PIPELINE_STAGE: ANY},
            ckpt.CHECKPOINT_SERIALIZATION: ANY,
            ckpt.CHECKPOINT_WRITER: {
                key: ANY
                for key in (
                    ckpt.CHECKPOINT_WRITER_TYPE,
                    ckpt.CHECKPOINT_IO_BUFFER_SIZE,
                    ckpt.CHECKPOINT_IO_BUFFER_DOUBLE,
                    ckpt.CHECKPOINT_IO_STATISTICS,
                    ckpt.CHECKPOINT_DATA_PARALLEL,
                    ckpt.CHECKPOINT_WRITER_DECOUPLED,
                    ckpt.CHECKPOINT_IO_MULTIPLIER,
                )
            },
        },
        # runtime/config.py _initialize_params reads these from "data_types".
        c.DATA_TYPES: {c.GRAD_ACCUM_DTYPE: ANY, c.PARAM_DTYPE: ANY, c.BUFFER_DTYPE: ANY, c.KEEP_IN_FP32_MODULES: ANY},
        # runtime/config.py get_torch_autocast_*.
        c.TORCH_AUTOCAST: {c.TORCH_AUTOCAST_ENABLED: ANY, c.TORCH_AUTOCAST_DTYPE: ANY, c.TORCH_AUTOCAST_LOWER_PRECISION_SAFE_MODULES: ANY},
        # runtime/config.py get_pipeline_config's defaults, plus "use_reentrant" (runtime/pipe/engine.py).
        "pipeline": {**{key: ANY for key in get_pipeline_config({})}, "use_reentrant": ANY},
        AUTOTUNING: SUBKEYS_NOT_LISTED,  # autotuning/config.py: a tree of tuner settings
        DATA_EFFICIENCY: SUBKEYS_NOT_LISTED,  # runtime/data_pipeline/config.py: curriculum, routing, ...
        DATASTATES_CHECKPOINTING: SUBKEYS_NOT_LISTED,  # datastates/config.py: passed on to the DataStates engine
    }
    # Switchyard's sections join DeepSpeed's: a section both read accepts the keys of both.
    for section, keys in SWITCHYARD_SECTIONS.items():
        schema[section] = {**schema.get(section, {}), **{key: ANY for key in keys}}
    return schema


# --------------------------------------------------------------------------------------------------------
# Small helpers: numbers as JSON has them (a bool is not a number, a quoted "1e-3" is not either), and
# did-you-mean as models/registry.py suggests model-config keys.


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value):
    return f"{value!r} (a string; write the number without quotes)" if isinstance(value, str) else repr(value)


def _did_you_mean(name, candidates, prefix=""):
    candidates = list(candidates)
    # A case slip ("sgd" for torch's "SGD") first: difflib would rather suggest a longer name ("musgd").
    match = [c for c in candidates if c.lower() == name.lower()] or difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {prefix + match[0]!r}?)" if match else ""


def _unknown_key(where, key_path, key, candidates):
    prefix = key_path[: len(key_path) - len(key)]
    hint = _did_you_mean(key, candidates, prefix)
    if not hint:
        listed = sorted(candidates)
        hint = (
            f"; {prefix.rstrip('.') or 'the top level'} takes {', '.join(listed)}"
            if len(listed) <= 12
            else "; DeepSpeed 0.19 and Switchyard do not read it: remove it"
        )
    return ConfigError(f"{where}: unknown key {key_path!r}{hint}")


# --------------------------------------------------------------------------------------------------------
# Walking the schema.


def _check_section(value, spec, key_path, where):
    if spec in (ANY, SUBKEYS_NOT_LISTED, CHECKED_BELOW):
        if spec == SUBKEYS_NOT_LISTED and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key_path} must be a JSON object, got {value!r}")
        return
    if callable(spec) and not isinstance(spec, type):
        problem = spec(value)
        if problem:
            raise ConfigError(f"{where}: {key_path} {problem}")
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key_path} must be a JSON object, got {value!r}")
    if isinstance(spec, type) and issubclass(spec, BaseModel):
        _check_with_model(value, spec, key_path, where)
        return
    for key, sub in value.items():
        if key not in spec:
            raise _unknown_key(where, f"{key_path}.{key}", key, spec)
        _check_section(sub, spec[key], f"{key_path}.{key}", where)


def _model_at(model, loc):
    """The pydantic model that holds the field at ``loc`` (a ValidationError's location), or None."""
    for part in loc:
        fields = dict(model.model_fields)
        fields.update({f.alias: f for f in model.model_fields.values() if f.alias})
        if part not in fields:
            return None
        annotation = fields[part].annotation
        models = [a for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            return None
        model = models[0]
    return model


def _check_with_model(value, model, key_path, where):
    """Validate ``value`` as DeepSpeed does (the model's constructor, so "auto" values are dropped and
    deprecated names accepted as DeepSpeed accepts them) and turn the first error into one line."""
    try:
        model(**value)
    except ValidationError as e:
        error = e.errors()[0]
        loc = [str(part) for part in error["loc"]]
        full = ".".join([key_path, *loc])
        if error["type"] == "extra_forbidden":
            parent = _model_at(model, error["loc"][:-1])
            candidates = set()
            if parent is not None:
                candidates = set(parent.model_fields) | {f.alias for f in parent.model_fields.values() if f.alias}
            raise _unknown_key(where, full, loc[-1], candidates) from None
        # A section's own validator gets the section (a dict, or the model built from it): not worth printing whole.
        got = f", got {_shown(error['input'])}" if "input" in error and not isinstance(error["input"], (dict, BaseModel)) else ""
        # "Value error, " and "Assertion failed, " are pydantic's prefixes for a validator's own message, which
        # already says it all.
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ").splitlines()[0]
        raise ConfigError(f"{where}: {full}: {message}{got}") from None
    except (ValueError, TypeError, AssertionError) as e:  # a validator that raises instead of reporting
        raise ConfigError(f"{where}: {key_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# --------------------------------------------------------------------------------------------------------
# The optimizer: the type must be one DeepSpeed builds, and the params must be parameters of the class it
# builds (DeepSpeedEngine._configure_basic_optimizer in deepspeed/runtime/engine.py passes them as **kwargs,
# so a misspelled one is a TypeError only once the model exists).


def _cpu_offloaded(config):
    """Whether DeepSpeed builds its CPU optimizers (engine.zero_use_cpu_optimizer: offload to cpu or nvme)."""
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")


def _optimizer_class(name, params, config, where):
    """(class DeepSpeed builds, DeepSpeed's own keys it pops from params, keys DeepSpeed itself passes) for
    optimizer.type ``name`` (DeepSpeed lower-cases it when it is one of DEEPSPEED_OPTIMIZERS)."""
    from deepspeed.runtime import config as dsc

    adam_keys = {dsc.ADAM_W_MODE, dsc.TORCH_ADAM_PARAM, "fp32_optimizer_states"}  # engine.get_optimizer_configuration
    if name in (dsc.ADAM_OPTIMIZER, dsc.ADAMW_OPTIMIZER):
        if params.get(dsc.TORCH_ADAM_PARAM):
            adam_w = name == dsc.ADAMW_OPTIMIZER or params.get(dsc.ADAM_W_MODE, dsc.ADAM_W_MODE_DEFAULT)
            return (torch.optim.AdamW if adam_w else torch.optim.Adam), adam_keys, set()
        if _cpu_offloaded(config):  # ZenFlow's CPU Adam takes the same parameters (it passes them on)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam, adam_keys, {"adamw_mode"}
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam, adam_keys, set()
    if name == dsc.ADAGRAD_OPTIMIZER:
        if _cpu_offloaded(config):
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

            return DeepSpeedCPUAdagrad, set(), set()
        return torch.optim.Adagrad, set(), set()
    if name == dsc.LAMB_OPTIMIZER:
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb, set(), set()
    if name == dsc.LION_OPTIMIZER:
        if _cpu_offloaded(config):
            from deepspeed.ops.lion import DeepSpeedCPULion

            return DeepSpeedCPULion, set(), set()
        from deepspeed.ops.lion import FusedLion

        return FusedLion, set(), set()
    if name in (dsc.MUADAM_OPTIMIZER, dsc.MUADAMW_OPTIMIZER, dsc.MUSGD_OPTIMIZER):
        try:
            import mup
        except ImportError:
            raise ConfigError(
                f"{where}: optimizer.type {name!r} needs the mup package, which is not installed; pip install mup or use AdamW"
            ) from None
        return getattr(mup, {"muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD"}[name]), set(), set()
    return getattr(torch.optim, name), set(), set()  # engine: getattr(torch.optim, optimizer_name())


def _constructor_parameters(cls):
    """(all keyword parameters but the first, the parameters or optimizer, and self; the required ones), or
    (None, ...) when the constructor takes **kwargs and so any name."""
    signature = inspect.signature(cls.__init__)
    parameters = list(signature.parameters.values())[2:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None, set()
    named = {p.name: p for p in parameters if p.kind not in (p.VAR_POSITIONAL,)}
    required = {n for n, p in named.items() if p.default is p.empty}
    return named, required


def built_optimizer(config, where):
    """The class DeepSpeed builds for ``config``'s optimizer (already checked), or None: no optimizer section
    (the model's own), or Muon (DeepSpeed's, assembled in the engine)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, MUON_OPTIMIZER

    section = config.get("optimizer")
    if not section:
        return None
    given = section["type"]
    name = given.lower() if given.lower() in DEEPSPEED_OPTIMIZERS else given
    if name == MUON_OPTIMIZER:
        return None
    return _optimizer_class(name, section.get("params", {}), config, where)[0]


def _optimizer_keys(name, params, config, where):
    """The keys optimizer.params may have, and the class they go to (for the message)."""
    from deepspeed.runtime.config import MUON_OPTIMIZER

    if name == MUON_OPTIMIZER:
        from deepspeed.runtime.engine import DeepSpeedEngine

        # engine._muon_param_groups: each half's keys, muon_lr / adam_lr overriding lr; plus the Adam keys popped
        # by get_optimizer_configuration.
        keys = {
            *DeepSpeedEngine._MUON_HALF_KEYS,
            *DeepSpeedEngine._ADAM_HALF_KEYS,
            "muon_lr",
            "adam_lr",
            "adam_w_mode",
            "torch_adam",
            "fp32_optimizer_states",
        }
        return keys, "DeepSpeed's Muon (deepspeed/runtime/engine.py)"
    cls, deepspeed_keys, passed_by_deepspeed = _optimizer_class(name, params, config, where)
    named, _ = _constructor_parameters(cls)
    if named is None:
        return None, cls.__name__
    return (set(named) - passed_by_deepspeed) | deepspeed_keys, f"{cls.__module__}.{cls.__name__}"


def _optimizer_types():
    """optimizer.type values DeepSpeed builds: its own (any case) and torch.optim's classes (exact name)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    torch_names = {
        n for n, v in vars(torch.optim).items() if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
    }
    return list(DEEPSPEED_OPTIMIZERS), sorted(torch_names)


def _check_hyperparameters(params, prefix, where):
    """The values every optimizer shares, where a wrong one trains silently (a negative lr climbs the loss)."""
    for key in ("lr", "muon_lr", "adam_lr", "weight_decay"):
        if key in params:
            problem = _non_negative_number(params[key])
            if problem:
                raise ConfigError(f"{where}: {prefix}.{key} {problem}")
    if "eps" in params:
        eps = params["eps"]
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise ConfigError(f"{where}: {prefix}.eps must be a finite number > 0, got {_shown(eps)}")
    if "betas" in params:
        betas = params["betas"]
        if not isinstance(betas, list) or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{where}: {prefix}.betas must be a pair of numbers in [0, 1), e.g. [0.9, 0.95], got {_shown(betas)}")


def _check_optimizer(section, config, where):
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: optimizer must be a JSON object, got {section!r}")
    from deepspeed.runtime import constants as c

    for key in section:
        if key not in (c.TYPE, c.OPTIMIZER_PARAMS, c.LEGACY_FUSION):
            raise _unknown_key(where, f"optimizer.{key}", key, (c.TYPE, c.OPTIMIZER_PARAMS, c.LEGACY_FUSION))
    if c.TYPE not in section:
        raise ConfigError(f"{where}: optimizer has no 'type' (DeepSpeed would build no optimizer); set optimizer.type, e.g. \"AdamW\"")
    given = section[c.TYPE]
    deepspeed_names, torch_names = _optimizer_types()
    if isinstance(given, str) and given.lower() in deepspeed_names:
        name = given.lower()  # as DeepSpeedConfig._initialize_params does
    elif isinstance(given, str) and given in torch_names:
        name = given
    else:
        # DeepSpeed's names compare lower-cased, torch's as written: a case slip of a torch name first ("sgd").
        hint = (
            _did_you_mean(str(given), [n for n in torch_names if n.lower() == str(given).lower()])
            or _did_you_mean(str(given).lower(), deepspeed_names)
            or _did_you_mean(str(given), torch_names)
        )
        raise ConfigError(
            f"{where}: optimizer.type {given!r} is not an optimizer DeepSpeed builds{hint}; use one of "
            f"{', '.join(deepspeed_names)} (any case) or a torch.optim class name"
        )
    params = section.get(c.OPTIMIZER_PARAMS, {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: optimizer.params must be a JSON object, got {params!r}")
    if c.MAX_GRAD_NORM in params:  # DeepSpeed refuses it at initialize; say so now
        raise ConfigError(f'{where}: optimizer.params.max_grad_norm is not read by DeepSpeed; set the top-level "gradient_clipping" instead')
    keys, built = _optimizer_keys(name, params, config, where)
    if keys is not None:
        for key in params:
            if key not in keys:
                hint = _did_you_mean(key, keys, "optimizer.params.")
                raise ConfigError(
                    f"{where}: optimizer.params.{key} is not a parameter of {built}, which DeepSpeed "
                    f"builds for optimizer.type {given!r}{hint}; it takes {', '.join(sorted(keys))}"
                )
    _check_hyperparameters(params, "optimizer.params", where)


# --------------------------------------------------------------------------------------------------------
# The scheduler: DeepSpeedEngine._scheduler_from_config looks the type up in deepspeed.runtime.lr_schedules
# (exact name), then in torch.optim.lr_scheduler, and calls it with (optimizer, **params).


def _scheduler_types():
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES
    from torch.optim import lr_scheduler

    torch_names = {
        n
        for n, v in vars(lr_scheduler).items()
        if isinstance(v, type) and issubclass(v, lr_scheduler.LRScheduler) and v is not lr_scheduler.LRScheduler
    }
    return list(VALID_LR_SCHEDULES), sorted(torch_names)


def _is_numeric_parameter(parameter):
    """A scheduler parameter annotated int/float (or Optional of them), or without annotation but with a number
    as its default: a quoted "1000" there is a TypeError inside the scheduler's arithmetic at the first step."""
    annotation, numeric = parameter.annotation, (int, float, type(None))
    if annotation is parameter.empty:
        return _is_number(parameter.default)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(a in numeric for a in typing.get_args(annotation))
    return annotation in (int, float)


# The scheduler parameters that may be "auto" (as in DeepSpeed's Hugging Face integration): pretrain/ds_config.py's
# resolve_schedule fills them from the run's --max_steps before DeepSpeed sees the config. Only the schedule's
# length follows the run: a warm-up is a number of steps in itself (it does not scale with the run), and
# Switchyard has no flag it could come from, so warmup_num_steps stays a number.
AUTO = "auto"
AUTO_STEP_KEYS = {"WarmupCosineLR": "total_num_steps", "WarmupDecayLR": "total_num_steps"}


def _auto_problem(name, key, named):
    """Why scheduler.params.``key`` of scheduler ``name`` (constructor parameters ``named``) cannot be "auto"."""
    if AUTO_STEP_KEYS.get(name) == key:
        return None
    filled = " or ".join(AUTO_STEP_KEYS)
    if key == "total_num_steps" and key not in named:
        return (
            f'is "auto", but {name} has no step count to fill from --max_steps; use {filled}, whose total_num_steps follows the run, or drop the key'
        )
    return f'cannot be "auto": only total_num_steps of {filled} is filled from --max_steps; give {key} a number'


def _check_scheduler(section, where):
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: scheduler must be a JSON object, got {section!r}")
    from deepspeed.runtime import constants as c
    from deepspeed.runtime import lr_schedules
    from torch.optim import lr_scheduler

    for key in section:
        if key not in (c.TYPE, c.SCHEDULER_PARAMS):
            raise _unknown_key(where, f"scheduler.{key}", key, (c.TYPE, c.SCHEDULER_PARAMS))
    if c.TYPE not in section:
        raise ConfigError(f"{where}: scheduler has no 'type' (DeepSpeed would keep the lr constant); set scheduler.type, e.g. \"WarmupCosineLR\"")
    name = section[c.TYPE]
    deepspeed_names, torch_names = _scheduler_types()
    if name in deepspeed_names:
        cls = getattr(lr_schedules, name)
    elif name in torch_names:
        cls = getattr(lr_scheduler, name)
    else:
        hint = _did_you_mean(str(name), deepspeed_names + torch_names)
        raise ConfigError(
            f"{where}: scheduler.type {name!r} is not a scheduler DeepSpeed builds{hint}; use one of "
            f"{', '.join(deepspeed_names)} or a torch.optim.lr_scheduler class name (the case matters)"
        )
    params = section.get(c.SCHEDULER_PARAMS, {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: scheduler.params must be a JSON object, got {params!r}")
    named, required = _constructor_parameters(cls)
    for key, value in params.items():
        problem = _auto_problem(name, key, named or {}) if value == AUTO else None
        if problem:
            raise ConfigError(f"{where}: scheduler.params.{key} {problem}")
    if named is None:
        return
    for key, value in params.items():
        if value == AUTO:  # accepted above; resolve_schedule replaces it with a number
            continue
        if key not in named:
            hint = _did_you_mean(key, named, "scheduler.params.")
            raise ConfigError(f"{where}: scheduler.params.{key} is not a parameter of {name}{hint}; it takes {', '.join(named)}")
        if _is_numeric_parameter(named[key]) and value is not None and (not _is_number(value) or not math.isfinite(value)):
            raise ConfigError(f"{where}: scheduler.params.{key} must be a finite number, got {_shown(value)}")
    missing = sorted(required - set(params))
    if missing:
        raise ConfigError(f"{where}: scheduler {name} needs scheduler.params.{missing[0]}; add it")


# --------------------------------------------------------------------------------------------------------


def check(config, path):
    """Refuse, as one ConfigError line, what DeepSpeed would ignore or refuse only after the model exists."""
    from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS, _REMOVED_ZERO_CONFIG_KEYS

    where = f"DeepSpeed config {path}"
    schema = _deepspeed_schema()
    for key in config:
        if key in REFUSED_KEYS:  # first: Switchyard's fix replaces DeepSpeed's removal notice where both name a key
            raise ConfigError(f"{where}: {key!r}: {REFUSED_KEYS[key]}")
        # DeepSpeed's own words for features it removed (it raises them at initialize, after the model exists).
        if key in _REMOVED_TOP_LEVEL_CONFIG_KEYS:
            raise ConfigError(f"{where}: {key!r} is a removed DeepSpeed feature; remove it. {_REMOVED_TOP_LEVEL_CONFIG_KEYS[key].strip()}")
        if key not in schema:
            raise _unknown_key(where, key, key, schema)
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        for key, message in _REMOVED_ZERO_CONFIG_KEYS.items():
            if key in zero:
                raise ConfigError(f"{where}: 'zero_optimization.{key}' is a removed DeepSpeed feature; remove it. {message.strip()}")
        # plan_launch words this one for Switchyard (the stages it runs); say it the same way before pydantic does.
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
            raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key, value in config.items():
        _check_section(value, schema[key], key, where)
    if "optimizer" in config:
        _check_optimizer(config["optimizer"], config, where)
    if "scheduler" in config:
        _check_scheduler(config["scheduler"], where)
