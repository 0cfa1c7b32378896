"""Model registry: a family is added by decorating its class, never by editing the trainer.

A family pairs a config dataclass with the nn.Module built from it, as fairseq's
``register_model`` does. Model config files name their family in a ``"family"`` key.
"""

import dataclasses
import difflib
import json
import os
import typing

from switchyard.errors import ConfigError

MODEL_FAMILIES = {}  # family name -> ModelFamily

# Field metadata of a training setting (dropout, routing capacity, loss weights, the initialization): it shapes
# how the weights are trained, not the weights, so a resumed run may change it. Every other field is part of
# the weights' shapes or meaning, and a resume that changes it is refused (pretrain/run_dir.py).
TRAINING_SETTING = {"training_setting": True}


# What a family's forward takes and returns, which decides the tasks that can train it and the commands that
# can read it. Both return (logits, aux_loss or None, routing stats or None); aux_loss is the experts'
# load-balancing (and router z-) loss, already weighted, to add to the task's loss.
#   "decoder":          forward(tokens [B, T]) -> logits [B, T, vocab] of the next token
#   "encoder-decoder":  forward(src [B, S], src_mask [B, S], tgt_in [B, T], tgt_mask [B, T]) -> logits [B, T, vocab]
ARCHITECTURES = ("decoder", "encoder-decoder")


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A registered family and what it can do: the planner, the tasks and the commands ask this, never the name.

    ``architecture``: its forward (ARCHITECTURES).
    ``experts``: it has Switch layers on deepspeed.moe, so ZeRO-3 is refused (DeepSpeed 0.19's MoE layer does not
    run under it), the expert-parallel size must divide ``config.num_experts``, its checkpoints keep every expert in
    a file of its own, and a resume at another data-parallel size is refused (DeepSpeed's ds_to_universal cannot
    convert native MoE experts; dense families reshard through it).
    ``pipeline``: the deepspeed.pipe module class of its pipeline form, built as ``pipeline(config, stages,
    loss_fn)``, or None when it has none; its ``state_dict_prefixes(config)`` names, for each pipeline layer, the
    prefix of that layer's parameters in the plain model's state_dict (how a pipeline checkpoint is read back).
    ``export``: ``export(config)`` names what eval.export_hf writes for this config (a key of its EXPORTERS,
    e.g. "gpt2" or "gpt_neox" for a transformers architecture), or None when the family does not export.
    ``sequence_parallel``: its attention splits sequences over sequence-parallel ranks (DeepSpeed-Ulysses,
    models/ulysses.py); ``sequence_parallel(config)`` names the head counts that are split ({"n_heads": 12}), each of
    which the sequence-parallel size must divide. None: it cannot run so (a launch asking for it is refused).
    """

    name: str
    config_cls: type
    model_cls: type
    architecture: str
    experts: bool = False
    pipeline: typing.Optional[type] = None
    export: typing.Optional[typing.Callable] = None
    sequence_parallel: typing.Optional[typing.Callable] = None


def register_model(name, config_cls, architecture, experts=False, pipeline=None, export=None, sequence_parallel=None):
    """Register the decorated nn.Module class as family ``name``, built from ``config_cls`` (see ModelFamily)."""

    def wrap(model_cls):
        if name in MODEL_FAMILIES:
            raise ValueError(f"model family {name!r} registered twice")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"model family {name!r}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        MODEL_FAMILIES[name] = ModelFamily(name, config_cls, model_cls, architecture, experts, pipeline, export, sequence_parallel)
        return model_cls

    return wrap


def family_of(config):
    """The ModelFamily ``config`` (a config dataclass instance) belongs to."""
    for family in MODEL_FAMILIES.values():
        if type(config) is family.config_cls:
            return family
    raise ConfigError(f"no model family registered for {type(config).__name__}")


def families_that(predicate):
    """The registered family names whose ModelFamily satisfies ``predicate``, for messages that name the choices."""
    return sorted(name for name, family in MODEL_FAMILIES.items() if predicate(family))


def check_architecture(config, architecture, what):
    """Refuse, in one line naming the families that fit, a config whose family is not of ``architecture``."""
    family = family_of(config)
    if family.architecture != architecture:
        fitting = families_that(lambda f: f.architecture == architecture)
        raise ConfigError(
            f"{what} needs {'an' if architecture[0] in 'aeiou' else 'a'} {architecture} model (family {' or '.join(repr(f) for f in fitting)}); "
            f"this one is a {family.name!r} {family.architecture} model"
        )


def _closest(name, candidates):
    match = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_type(where, key, value, annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (object,)
        if not isinstance(value, list) or not all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: {key!r} must be a list of {item_type.__name__}, got {value!r}")
        return
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(annotation, lambda v: True)
    if not ok(value):
        raise ConfigError(f"{where}: {key!r} must be {annotation.__name__}, got {value!r}")


def config_from_dict(raw, where="model config"):
    """Build the family's config dataclass from a dict, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    raw = dict(raw)
    family = raw.pop("family", None)
    if family not in MODEL_FAMILIES:
        raise ConfigError(
            f"{where}: 'family' must be one of {sorted(MODEL_FAMILIES)}, got {family!r}" + (_closest(str(family), MODEL_FAMILIES) if family else "")
        )
    config_cls = MODEL_FAMILIES[family].config_cls
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls) if not f.metadata.get("from_launch")}
    for key, value in raw.items():
        if key in hints and key not in fields:
            raise ConfigError(f"{where}: {key!r} is set at launch (from the DeepSpeed config), not in a model config; remove it")
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_closest(key, fields)}; valid keys: {', '.join(sorted(fields))}")
        _check_type(where, key, value, hints[key])
    config = config_cls(**raw)
    problem = config.problem()
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return config


def load_model_config(path, overrides=None):
    """Read a model config JSON file; ``overrides`` (a dict) replaces keys, e.g. from the command line."""
    if not os.path.isfile(path):
        raise ConfigError(f"model config {path} does not exist; pass an existing file to --model_config (presets are in models/configs/)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"model config {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file")
    if overrides:
        raw.update(overrides)
    return config_from_dict(raw, where=f"model config {path}")


def with_launch_fields(config, **fields):
    """``config`` with fields that are set at launch (``from_launch`` metadata, e.g. the expert-parallel size from
    the DeepSpeed config), checked again as a whole."""
    launch_fields = {f.name for f in dataclasses.fields(config) if f.metadata.get("from_launch")}
    unknown = set(fields) - launch_fields
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not launch fields of {type(config).__name__}")
    config = dataclasses.replace(config, **fields)
    problem = config.problem()
    if problem:
        raise ConfigError(f"model config at launch: {problem}")
    return config


def without_launch_fields(raw):
    """Model dict ``raw`` (config_to_dict's, as a run records it) without the fields its family sets at launch,
    for a model built outside a launch (evaluation, export: every default fits one process)."""
    family = MODEL_FAMILIES.get(raw.get("family"))
    launch = {f.name for f in dataclasses.fields(family.config_cls) if f.metadata.get("from_launch")} if family else set()
    return {key: value for key, value in raw.items() if key not in launch}


def config_to_dict(config, launch_fields=True):
    """The config as JSON-ready dict; without ``launch_fields`` it is a valid model config file again."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if launch_fields or not f.metadata.get("from_launch")}
    return {"family": family_of(config).name, **values}


def resume_differences(recorded, config):
    """Where ``config`` differs from the model dict a run recorded (config_to_dict's): (fields that are part of the
    weights, training settings), each a list of (name, recorded value, new value); launch fields are not compared."""
    family = family_of(config).name
    if recorded.get("family") != family:
        return [("family", recorded.get("family"), family)], []
    weights, settings = [], []
    for f in dataclasses.fields(config):
        if f.metadata.get("from_launch"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        old, new = recorded.get(f.name, default), getattr(config, f.name)
        if old != new:
            (settings if f.metadata.get("training_setting") else weights).append((f.name, old, new))
    return weights, settings


def build_model(config):
    return family_of(config).model_cls(config)
