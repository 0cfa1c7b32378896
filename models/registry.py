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

MODEL_FAMILIES = {}

# Field metadata of a training setting (dropout, routing capacity, loss weights, the initialization): it shapes
# how the weights are trained, not the weights, so a resumed run may change it. Every other field is part of
# the weights' shapes or meaning, and a resume that changes it is refused (pretrain/run_dir.py).
TRAINING_SETTING = {"training_setting": True}


# What a family's forward is, which decides the tasks that can train it and the commands that can read it:
# "decoder": forward(tokens) -> next-token logits; "encoder-decoder": forward(src, src_mask, tgt_in, tgt_mask) -> logits.
ARCHITECTURES = ("decoder", "encoder-decoder")


def register_model(name, config_cls, architecture, experts=False, pipeline=None):
    """Register a family and what it can do, which the planner, the tasks and the commands ask instead of its name:
    ``architecture`` (ARCHITECTURES); ``experts``: it has Switch layers on deepspeed.moe (so: no ZeRO-3, an
    expert-parallel size that divides num_experts, no resharding at another data-parallel size);
    ``pipeline``: the deepspeed.pipe module class of its pipeline form, called (config, stages, loss_fn), or None."""
    def wrap(model_cls):
        if name in MODEL_FAMILIES:
            raise ValueError(f"model family {name!r} registered twice")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"model family {name!r}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        MODEL_FAMILIES[name] = (config_cls, model_cls)
        model_cls.family = name
        config_cls.family_name = name
        config_cls.architecture = architecture
        config_cls.has_experts = experts
        config_cls.pipeline_module = pipeline
        return model_cls
    return wrap


def families_that(predicate):
    """The registered family names whose config class satisfies ``predicate``, for messages that name the choices."""
    return sorted(name for name, (config_cls, _) in MODEL_FAMILIES.items() if predicate(config_cls))


def check_architecture(config, architecture, what):
    """Refuse, in one line naming the families that fit, a config whose family is not of ``architecture``."""
    if type(config).architecture != architecture:
        fitting = families_that(lambda cls: cls.architecture == architecture)
        raise ConfigError(f"{what} needs {'an' if architecture[0] in 'aeiou' else 'a'} {architecture} model (family {' or '.join(repr(f) for f in fitting)}); "
                          f"this one is a {type(config).family_name!r} {type(config).architecture} model")


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
        raise ConfigError(f"{where}: 'family' must be one of {sorted(MODEL_FAMILIES)}, got {family!r}"
                          + (_closest(str(family), MODEL_FAMILIES) if family else ""))
    config_cls, _ = MODEL_FAMILIES[family]
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


def config_to_dict(config, launch_fields=True):
    """The config as JSON-ready dict; without ``launch_fields`` it is a valid model config file again."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if launch_fields or not f.metadata.get("from_launch")}
    return {"family": type(config).family_name, **values}


def resume_differences(recorded, config):
    """Where ``config`` differs from the model dict a run recorded (config_to_dict's): (fields that are part of the
    weights, training settings), each a list of (name, recorded value, new value); launch fields are not compared."""
    if recorded.get("family") != type(config).family_name:
        return [("family", recorded.get("family"), type(config).family_name)], []
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
    for family, (config_cls, model_cls) in MODEL_FAMILIES.items():
        if type(config) is config_cls:
            return model_cls(config)
    raise ConfigError(f"no model family registered for {type(config).__name__}")
