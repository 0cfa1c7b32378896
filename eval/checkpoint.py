"""A trained checkpoint as a plain model for evaluation: ``load_model(run_dir, tag=None)``.

A run directory (pretrain/main.py --save_dir) holds run_config.json (model config, DeepSpeed
config, tokenizer spec, and a translation run's source tokenizer when the sides had one each), ``latest`` and DeepSpeed's tag directories. Whatever layout a run was
trained in, the model comes back as the module models.build_model makes, whole on one process:

    ZeRO 0-2            mp_rank_00_model_states.pt["module"]
    Switch (ZeRO 0-2)   + every expert, from layer_{L}_expert_{E}_mp_rank_00_model_states.pt, into a
                        model built with expert_parallel_size=1 (all experts local)
    pipeline stages     layer_XX-model_states.pt, via models.gpt.gpt_state_dict_from_pipeline
    ZeRO-3              the fp32 partitions merged by DeepSpeed's zero_to_fp32

Every file is unpickled through pretrain.checkpoint.safe_load (weights only, DeepSpeed's
allow-list). Problems are a ConfigError with one line naming the fix.
"""
import contextlib
import os
import sys

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from models import build_model, config_from_dict
from models.gpt import gpt_state_dict_from_pipeline
from models.registry import check_architecture
from pretrain import run_dir as run_dir_module
from pretrain.checkpoint import damage, safe_load
from pretrain.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from pretrain.run_dir import RUN_CONFIG, complete_tags
from switchyard.errors import ConfigError


def _check_run_dir(run_dir):
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} does not exist; pass the --save_dir of a pretrain/main.py run")


def read_run_config(run_dir):
    """The run's record (pretrain/run_dir.py writes it); a directory without one is not a run."""
    _check_run_dir(run_dir)
    recorded = run_dir_module.read_run_config(run_dir)
    if recorded is None:
        raise ConfigError(f"{os.path.join(run_dir, RUN_CONFIG)} does not exist; {run_dir} is not the --save_dir of a "
                          f"pretrain/main.py run")
    return recorded


def resolve_tag(run_dir, tag=None):
    """The checkpoint tag to load: ``tag`` if given, else the one ``latest`` names."""
    _check_run_dir(run_dir)
    if tag is None:
        latest = os.path.join(run_dir, "latest")
        if not os.path.isfile(latest):
            raise ConfigError(f"{run_dir} holds no checkpoint ('latest' is missing); let the run save one, or pass a tag")
        with open(latest) as f:
            tag = f.read().strip()
    if not os.path.isdir(os.path.join(run_dir, tag)):
        raise ConfigError(f"checkpoint {tag} is not in {run_dir} (it has: {', '.join(complete_tags(run_dir)) or 'none'})")
    return tag


def run_tokenizer(run_dir, spec):
    """The tokenizer a run recorded: bytes, or its sentencepiece model (at the recorded path or, moved
    with the run, in the run directory or beside it), checked against the recorded sha256."""
    if spec["type"] == "bytes":
        return ByteTokenizer()
    name = os.path.basename(spec["path"])
    for path in (spec["path"], os.path.join(run_dir, name), os.path.join(os.path.dirname(os.path.abspath(run_dir)), name)):
        if os.path.isfile(path):
            tokenizer = SentencePieceTokenizer(path)
            if tokenizer.sha256 != spec["sha256"]:
                raise ConfigError(f"tokenizer {path} is not the one {run_dir} was trained with (sha256 {tokenizer.sha256[:12]}, "
                                  f"recorded {spec['sha256'][:12]}); put the original {name} in {run_dir}")
            return tokenizer
    raise ConfigError(f"{run_dir} was trained with tokenizer {spec['path']}, which no longer exists (nor in or beside "
                      f"the run directory); copy {name} into {run_dir}")


def run_source_tokenizer(run_dir):
    """A translation run's source-side tokenizer: its own when the sides had one each, else the run's only one."""
    run_config = read_run_config(run_dir)
    return run_tokenizer(run_dir, run_config.get("src_tokenizer", run_config["tokenizer"]))


def model_config(run_config, run_dir):
    raw = dict(run_config["model"])
    # Recorded from the launch; evaluation holds every expert on one process (the default, 1).
    raw.pop("expert_parallel_size", None)
    return config_from_dict(raw, where=f"{os.path.join(run_dir, RUN_CONFIG)} model")


@contextlib.contextmanager
def _loads_through_safe_load(module):
    """DeepSpeed's zero_to_fp32 calls torch.load(..., weights_only=False); give it safe_load instead.

    Its mmap=True on the optimizer files is dropped with the other arguments: they are read whole.
    """
    class SafeTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def load(f, map_location=None, **_):
            return safe_load(f, map_location)

    module.torch = SafeTorch()
    try:
        yield
    finally:
        module.torch = torch


def zero3_state_dict(run_dir, tag):
    from deepspeed.utils import zero_to_fp32

    # zero_to_fp32 reports progress with print(); stdout is for results.
    with _loads_through_safe_load(zero_to_fp32), contextlib.redirect_stdout(sys.stderr):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(run_dir, tag)


def expert_state_dict(run_dir, tag, config):
    """Every expert of every MoE layer. DeepSpeed numbers MoE layers 0, 1, ... in module order and names
    each file and key by the expert's global index, which is its local index when all experts are local."""
    state = {}
    for moe_layer in range(len(config.layers_with_experts())):
        for expert in range(config.num_experts):
            path = DeepSpeedEngine._get_expert_ckpt_name(run_dir, moe_layer, expert, tag)
            if not os.path.isfile(path):
                raise ConfigError(f"{path} is missing; the checkpoint lacks expert {expert} of MoE layer {moe_layer}")
            state.update(safe_load(path, map_location="cpu"))
    return state


def checkpoint_state_dict(run_dir, tag, config):
    """The model's full state_dict from checkpoint ``tag``, whichever way it was written."""
    directory = os.path.join(run_dir, tag)
    if os.path.isfile(os.path.join(directory, "layer_00-model_states.pt")):
        return gpt_state_dict_from_pipeline(directory, config)
    if os.path.isfile(os.path.join(directory, "zero_pp_rank_0_mp_rank_00_model_states.pt")):  # ZeRO-3's name
        return zero3_state_dict(run_dir, tag)
    path = os.path.join(directory, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise ConfigError(f"{directory} holds no model states (no mp_rank_00_model_states.pt, layer_00-model_states.pt "
                          f"or zero_pp_rank_0_mp_rank_00_model_states.pt); is it a complete DeepSpeed checkpoint?")
    state = safe_load(path, map_location="cpu")["module"]
    if hasattr(config, "num_experts"):  # DeepSpeed keeps experts out of "module", in files of their own
        state.update(expert_state_dict(run_dir, tag, config))
    return state


def load_model(run_dir, tag=None, architecture=None, command=None):
    """(model in eval mode on the CPU, its config, the run's tokenizer) of checkpoint ``tag`` (default: latest).
    With ``architecture``, a run of another kind is refused, before any weight is read, for ``command``."""
    run_dir = str(run_dir)
    run_config = read_run_config(run_dir)
    config = model_config(run_config, run_dir)
    if architecture is not None:
        check_architecture(config, architecture, f"{command} of {run_dir}")
    tokenizer = run_tokenizer(run_dir, run_config["tokenizer"])
    tag = resolve_tag(run_dir, tag)
    problem = damage(run_dir, tag)  # every file against the manifest pretrain/checkpoint.py wrote with it
    if problem is not None:
        intact = [t for t in complete_tags(run_dir) if t != tag and damage(run_dir, t) is None]
        raise ConfigError(f"checkpoint {os.path.join(run_dir, tag)} is damaged ({problem}); "
                          + (f"pass --tag {intact[0]} (the newest intact one)" if intact else "no intact checkpoint is left"))
    model = build_model(config)
    model.load_state_dict(checkpoint_state_dict(run_dir, tag, config), strict=True)
    return model.eval(), config, tokenizer
