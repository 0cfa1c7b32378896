"""The one place that touches DeepSpeed's internals, written against deepspeed==0.19.8.

"Internals" here means names with a leading underscore, attributes that are not part of DeepSpeed's
documented API, and private modules. Everything else in Switchyard uses only DeepSpeed's documented API
(``deepspeed.initialize``, ``deepspeed.init_distributed``, ``deepspeed.zero.Init`` / ``GatheredParameters``,
``deepspeed.moe.layer.MoE`` as a class, ``deepspeed.moe.utils.is_moe_param`` /
``split_params_into_different_moe_groups_for_optimizer``, ``deepspeed.pipe``'s ``PipelineModule`` /
``LayerSpec`` / ``TiedLayerSpec``, ``deepspeed.accelerator.get_accelerator``, the engine's documented methods,
and the ``deepspeed.checkpoint.ds_to_universal`` command). When DeepSpeed is upgraded, check each function
below against what it relies on, and run ``tests/switchyard/test_deepspeed_compat.py``, which fails when one of
these assumptions stops holding.

One other file reads DeepSpeed's internals on purpose: ``pretrain/ds_schema.py`` validates a DeepSpeed JSON
against DeepSpeed's own config models and constants (``deepspeed.runtime.config``, ``runtime.constants``,
``runtime.zero.config``, ``_REMOVED_*_CONFIG_KEYS``, the optimizer and scheduler lists), so that the schema is
DeepSpeed's rather than a copy of it. An upgrade checks that file too (its tests say what changed).

What each function relies on (engine = ``deepspeed.runtime.engine.DeepSpeedEngine``):

Training (pretrain/trainer.py)
  is_pipeline_engine            ``deepspeed.runtime.pipe.engine.PipelineEngine`` (its module path)
  pipeline_data_parallel_rank   ``PipelineEngine.grid.data_parallel_id`` (the ``PipelineParallelGrid``)
  gradient_clipping_off         ``engine._config.gradient_clipping``, read by ``engine.step`` at every step
  backward_allreduce_off        ``engine.enable_backward_allreduce``, read by ``engine.backward``
  uses_autocast_grad_scaler     ``engine.torch_autocast_z0_gradscaler`` (torch autocast under ZeRO 0)
  loss_scale                    ``engine.optimizer.cur_scale`` (the fp16 optimizers, ZeRO's included)
  min_loss_scale                ``engine._config.float16_config.min_loss_scale``
  no_error_at_min_loss_scale    ``engine.optimizer.loss_scaler.raise_error_at_min_scale``
                                (``runtime.fp16.loss_scaler.DynamicLossScaler``)
  skipped_steps                 ``engine.skipped_steps``
Checkpoints (pretrain/checkpoint.py, pretrain/run_dir.py)
  load_checkpoints_through      ``engine.checkpoint_engine.load`` (the engine unpickles through it)
  replay_cpu_adam_bias_correction
                                the optimizer wrappers' ``.optimizer`` chain; ``FusedAdam.multi_tensor_adam``,
                                ``._dummy_overflow_buf``, ``.adam_w_mode``; ``DeepSpeedCPUAdam.ds_opt_adam.adam_update``,
                                ``.opt_id``; the CPU kernels' float32 running product of beta^t
  checkpoint_allowed_globals    ``runtime.fp16.loss_scaler.LossScaler`` / ``DynamicLossScaler``,
                                ``runtime.zero.config.ZeroStageEnum``, ``utils.tensor_fragment.fragment_address``:
                                what DeepSpeed pickles into its checkpoint files beyond tensors and containers
  zero3_fp32_state_dict         ``deepspeed.utils.zero_to_fp32`` reads files with its module-level ``torch.load``
  expert_checkpoint_path        ``DeepSpeedEngine._get_expert_ckpt_name`` (layer_L_expert_E_mp_rank_00_model_states.pt)
  saved_zero_partitions         ``DeepSpeedEngine._get_rank_zero_ckpt_name`` ([bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt)
                                and what ZeRO 1-2's and BF16_Optimizer's ``state_dict`` save there
                                (``optimizer_state_dict``: ``single_partition_of_fp32_groups``, ``base_optimizer_state``,
                                ``param_slice_mappings``, ``partition_count``; the ``moe`` and ``name`` group keys);
                                ``param_shapes`` in mp_rank_00_model_states.pt
  zero_optimizer_groups         ``runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer`` and its ``.bit16_groups``,
                                ``runtime.bf16_optimizer.BF16_Optimizer`` and its ``.bf16_groups``
  set_zero_optimizer_state      the ZeRO 1-2 optimizer's base ``.optimizer`` (group i holds one flat fp32 partition),
                                ``._hp_optimizer_states_linked`` / ``._lazy_init_hp_params_optimizer_state`` (each
                                parameter's view of the state), ``._load_global_state`` (loss scaler, clipping),
                                ``.update_lp_params``
Optimizer build (pretrain/ds_config.py)
  prebuilt_op                   ``deepspeed.git_version_info.installed_ops`` (ops compiled when DeepSpeed was installed)
  cuda_toolkit_problem          ``ops.op_builder.builder.assert_no_cuda_mismatch`` (CUDA_HOME, its nvcc, torch's CUDA)
ZeRO-3 (pretrain/main.py, bench/zero_memory.py)
  zero_init                     ``zero.Init._post_init_method(module)``, called after each module's constructor and
                                before it is partitioned; ``Init.dtype`` and ``Init.local_device``
  is_partitioned                ``runtime.zero.partition_parameters.is_zero_param``
  whole_fp32_on_cpu             ``is_partitioned``, then the documented ``zero.GatheredParameters`` (models/gpt.py's
                                ``init_weights_``, which every family's initialisation runs)
  full_shape, full_numel, local_numel
                                the ``ds_shape``, ``ds_numel`` and ``ds_tensor`` attributes of a partitioned parameter
Models (models/switch.py, models/gpt.py)
  replace_experts               ``MoE.deepspeed_moe.experts`` (``MOELayer`` calls it on the [ep, E_local, capacity,
                                d_model] buffer after its first all-to-all, and its output goes through the second);
                                DeepSpeed's expert tagging, ``param.allreduce = False`` and ``param.group_name``
                                (``moe.experts.Experts``): ``moe.utils.is_moe_param``, ZeRO 1-2, the bf16 optimizer
                                and the engine's gradient reduction use them to reduce experts over the
                                expert-data-parallel group ``group_name`` names
  local_experts                 ``MoE.deepspeed_moe.experts``; the engine saves and loads expert files by matching
                                ``.deepspeed_moe.experts.deepspeed_experts.<local index>`` in state_dict keys
                                (``_save_moe_checkpoint``, ``load_moe_state_dict``)
  gate_weight                   ``MoE.deepspeed_moe.gate.wg.weight`` (``TopKGate``'s router)
  expert_parallel_group         ``MoE.deepspeed_moe.ep_group``, set by ``MoE.set_deepspeed_parallelism`` (which
                                ``deepspeed.initialize`` calls) to the torch process group of the layer's
                                expert-parallel ranks
  stage_layers                  ``PipelineModule._local_start`` and ``.forward_funcs``
  tied_modules                  ``PipelineModule.tied_modules``
  sequence_parallel_mpu         ``runtime.sequence_parallel.parallel_state_sp`` (its module-level groups,
                                ``_SEQUENCE_PARALLEL_GROUP``, made once per process): the mpu of DeepSpeed-Ulysses
                                (models/ulysses.py), whose getters ``deepspeed.initialize`` reads
Benchmarks (bench/engine_overhead.py)
  engine_inner_phases           ZeRO 1-2's ``optimizer.reduce_gradients`` / ``scaled_global_norm`` / ``.optimizer``;
                                without ZeRO ``engine.clip_fp32_gradients``
"""

import contextlib
import os

import torch

# Training --------------------------------------------------------------------------------------------------


def is_pipeline_engine(engine):
    """Whether ``engine`` is DeepSpeed's pipeline engine (a model built as a ``deepspeed.pipe.PipelineModule``)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def pipeline_data_parallel_rank(engine):
    """This rank's data-parallel index in a pipeline engine's grid (ranks of one pipeline share it)."""
    return engine.grid.data_parallel_id


@contextlib.contextmanager
def gradient_clipping_off(engine):
    """engine.step without DeepSpeed's own clipping (fp32 without ZeRO reads it from the config at each step)."""
    clipping = engine._config.gradient_clipping
    engine._config.gradient_clipping = 0.0
    try:
        yield
    finally:
        engine._config.gradient_clipping = clipping


def backward_allreduce_off(engine):
    """engine.backward no longer all-reduces the gradients (alone, without ZeRO, that is a copy to no purpose)."""
    engine.enable_backward_allreduce = False


def uses_autocast_grad_scaler(engine):
    """Whether the engine scales the loss with torch's GradScaler (torch autocast in fp16 without ZeRO)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None) is not None


def loss_scale(engine):
    """The fp16 optimizer's current loss scale."""
    return float(engine.optimizer.cur_scale)


def min_loss_scale(engine):
    """The config's fp16 ``min_loss_scale``: the floor dynamic loss scaling does not go below."""
    return engine._config.float16_config.min_loss_scale


def no_error_at_min_loss_scale(engine):
    """Stop DeepSpeed's dynamic loss scaler from raising at an overflow with the scale at its minimum
    (the caller decides when to stop); nothing to do where the optimizer has no loss scaler."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        scaler.raise_error_at_min_scale = False


def skipped_steps(engine):
    """How many optimizer steps DeepSpeed has skipped (fp16 overflows, ZeRO's non-finite gradients)."""
    return engine.skipped_steps


# Checkpoints -----------------------------------------------------------------------------------------------


def load_checkpoints_through(engine, load):
    """engine.load_checkpoint unpickles every file with ``load(path, map_location=...)`` instead of its own
    ``torch.load(..., weights_only=False)``."""
    engine.checkpoint_engine.load = load


def replay_cpu_adam_bias_correction(optimizer):
    """Make DeepSpeed's C++ CPU Adam continue exactly where the saved run stopped.

    The CPU kernels (FusedAdam on the CPU accelerator, DeepSpeedCPUAdam under ZeRO-Offload) keep
    Adam's bias corrections beta^t as a float32 running product, multiplied by beta once per step,
    and fall back to pow(beta, t) when the step they are given is not the next one. A resumed
    process would get pow(beta, t): one ulp off the product, so its updates, and soon its weights,
    differ from the uninterrupted run's. Calling the kernel on empty tensors for steps 1..t rebuilds
    the same product without touching a parameter. (CUDA's FusedAdam computes pow every step.)
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    while not isinstance(optimizer, (FusedAdam, DeepSpeedCPUAdam)) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # ZeRO, bf16 and fp16 wrappers hold the base optimizer
    cpu_fused = isinstance(optimizer, FusedAdam) and get_accelerator().device_name() == "cpu"
    if not (cpu_fused or isinstance(optimizer, DeepSpeedCPUAdam)):
        return
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    if not steps:
        return
    empty = torch.empty(0)
    for step in range(1, max(steps) + 1):
        for group in optimizer.param_groups:  # the kernel saw one call per group and step
            beta1, beta2 = group["betas"]
            bias_correction = 1 if group["bias_correction"] else 0
            if cpu_fused:
                optimizer.multi_tensor_adam(
                    0,
                    optimizer._dummy_overflow_buf,
                    [[empty], [empty], [empty], [empty]],
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    step,
                    optimizer.adam_w_mode,
                    bias_correction,
                    group["weight_decay"],
                )
            else:
                optimizer.ds_opt_adam.adam_update(
                    optimizer.opt_id,
                    step,
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                    bias_correction,
                    empty,
                    empty,
                    empty,
                    empty,
                )


def checkpoint_allowed_globals():
    """The objects DeepSpeed's own files pickle beyond tensors and containers (found by scanning the
    checkpoints of every ds_configs/ recipe): loss scalers, the ZeRO stage, fragment addresses. A weights-only
    unpickler given this list refuses anything else in a checkpoint instead of running it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def zero3_fp32_state_dict(run_dir, tag, load):
    """The whole fp32 state_dict of ZeRO checkpoint ``tag`` (DeepSpeed's zero_to_fp32), every file read with
    ``load(path, map_location)`` instead of its ``torch.load(..., weights_only=False)``.

    Its mmap=True on the optimizer files is dropped with the other arguments: they are read whole.
    """
    from deepspeed.utils import zero_to_fp32

    class LoadingTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def load(f, map_location=None, **_):
            return load(f, map_location)

    zero_to_fp32.torch = LoadingTorch()
    try:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(run_dir, tag)
    finally:
        zero_to_fp32.torch = torch


def expert_checkpoint_path(save_dir, moe_layer, expert, tag):
    """The file DeepSpeed saves expert ``expert`` (its global index) of MoE layer ``moe_layer`` (0, 1, ... in
    module order) to, in checkpoint ``tag`` of ``save_dir``."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine._get_expert_ckpt_name(os.fspath(save_dir), moe_layer, expert, tag)


def saved_zero_partitions(directory, load):
    """The ZeRO 1-2 optimizer partitions checkpoint ``directory`` holds, one per saved rank in rank order (each file,
    ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``, read with ``load(path)``), each a SimpleNamespace:
    ``masters[g]`` (optimizer group g's flat fp32 slice), ``state[g]`` (Adam's state: tensors over the slice, with
    the alignment padding that ZeRO 1-2's masters leave out, and its step), ``slices[g]`` (parameter name ->
    (start, numel) in the slice), ``partitions[g]`` (how many ranks the group is sliced over), ``settings[g]`` (the
    group's hyper-parameters), ``experts[g]`` (an expert group), ``saved`` (the file's optimizer state, which
    ``set_zero_optimizer_state`` takes); and ``shapes``: each group's parameter shapes on a saved rank. A str
    says why there are none: the checkpoint has no such files, or another optimizer wrote them."""
    import re
    import types

    names = (re.fullmatch(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", name) for name in os.listdir(directory))
    files = {int(match.group(1)): os.path.join(directory, match.group(0)) for match in names if match}
    if not files or sorted(files) != list(range(len(files))):
        return f"it holds ZeRO optimizer files for ranks {sorted(files)}, not 0..N-1"
    shapes = load(os.path.join(directory, "mp_rank_00_model_states.pt"))["param_shapes"]
    partitions = []
    for rank in range(len(files)):
        saved = load(files[rank])["optimizer_state_dict"]
        missing = [
            k for k in ("param_slice_mappings", "single_partition_of_fp32_groups", "partition_count", "base_optimizer_state") if k not in saved
        ]
        if missing:
            return f"its optimizer files have no {missing[0]!r} (written by another DeepSpeed optimizer)"
        groups = saved["base_optimizer_state"]["param_groups"]
        partitions.append(
            types.SimpleNamespace(
                masters=saved["single_partition_of_fp32_groups"],
                state=[saved["base_optimizer_state"]["state"].get(g, {}) for g in range(len(groups))],
                slices=[{name: (where.start, where.numel) for name, where in group.items()} for group in saved["param_slice_mappings"]],
                partitions=saved["partition_count"],
                # "name": DeepSpeed's name of the group's process group, "moe": its expert tag; neither a setting
                settings=[{k: v for k, v in group.items() if k not in ("params", "name", "moe")} for group in groups],
                experts=[bool(group.get("moe")) for group in groups],
                saved=saved,
            )
        )
    return types.SimpleNamespace(ranks=partitions, shapes=shapes)


def zero_optimizer_groups(engine):
    """The parameters of each optimizer group of ZeRO 1-2's optimizer (``DeepSpeedZeroOptimizer``, or the
    ``BF16_Optimizer`` DeepSpeed runs for bf16 at ZeRO-1), in group order; None for another (no ZeRO, ZeRO-3)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        return [list(group) for group in engine.optimizer.bit16_groups]
    if isinstance(engine.optimizer, BF16_Optimizer):
        return [list(group) for group in engine.optimizer.bf16_groups]
    return None


def set_zero_optimizer_state(engine, groups, global_state, set_params):
    """ZeRO 1-2, once ``engine.load_checkpoint(..., load_optimizer_states=False)`` has loaded the module: give
    optimizer group i the hyper-parameters ``groups[i]["settings"]``, the state values ``groups[i]["scalars"]``
    (Adam's step) and zeroed state tensors named ``groups[i]["keys"]``; the loss scaler and clipping of ``global_state`` (a saved
    ``optimizer_state_dict``); then ``set_params()`` sets every parameter's fp32 master and state through
    ``deepspeed.utils.safe_set_full_*``, and the module's weights are made the masters' (bf16: cast).

    The base optimizer's state is made lazily at its first step, and each parameter's view of it is linked after
    that step; a resumed optimizer needs both before its first step, so they are made here as that step would."""
    zero = engine.optimizer
    base = zero.optimizer
    for group, wanted in zip(base.param_groups, groups):
        flat = group["params"][0]  # the group's flat fp32 partition (single_partition_of_fp32_groups[i])
        group.update(wanted["settings"])
        base.state[flat] = {**wanted["scalars"], **{key: torch.zeros_like(flat) for key in wanted["keys"]}}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    zero._load_global_state(global_state)
    set_params()
    zero.update_lp_params()  # every rank gathers the others' partitions


# Optimizer build --------------------------------------------------------------------------------------------


def prebuilt_op(name):
    """Whether DeepSpeed's op ``name`` (``fused_adam``, ``cpu_adam``...) was compiled when DeepSpeed was installed
    (``DS_BUILD_FUSED_ADAM=1 pip install deepspeed``), so that nothing is compiled at start."""
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get(name))


def cuda_toolkit_problem():
    """None when DeepSpeed can JIT-compile a CUDA op here (a CUDA toolkit whose nvcc matches torch's CUDA), else
    DeepSpeed's own reason, in one line."""
    from deepspeed.ops.op_builder.builder import assert_no_cuda_mismatch

    try:
        assert_no_cuda_mismatch()
    except Exception as e:  # MissingCUDAException, CUDAMismatchException, or no torch CUDA at all
        return " ".join(str(e).lstrip(">- ").split())
    return None


# ZeRO-3 ----------------------------------------------------------------------------------------------------


def zero_init(config, before_partition):
    """``deepspeed.zero.Init`` from the DeepSpeed config dict ``config``, without DeepSpeed's tensor overrides
    (tensors are made as without it), that calls ``before_partition(module, dtype, device)`` on each module
    once its constructor has run and before DeepSpeed partitions it: ``dtype`` is the training dtype,
    ``device`` the local accelerator."""
    import deepspeed

    class InitWithHook(deepspeed.zero.Init):
        def _post_init_method(self, module):
            before_partition(module, self.dtype, self.local_device)
            super()._post_init_method(module)

    return InitWithHook(config_dict_or_path=config, tensor_overrides=[])


def is_partitioned(param):
    """Whether ZeRO-3 has taken ``param`` over (partitioned it or will)."""
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    return is_zero_param(param)


@contextlib.contextmanager
def whole_fp32_on_cpu(params):
    """Inside: ``params`` whole, as fp32 CPU tensors, as a plain build holds them before DeepSpeed casts and
    moves them; on exit what was written goes back into them (cast) and rank 0's values are re-partitioned to
    every rank. Nothing happens when none of them is ZeRO-3's (a plain build). Every rank enters it together
    (it gathers)."""
    import deepspeed

    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        gathered = [p.data for p in params]
        for p in params:
            p.data = p.data.to("cpu", torch.float32)
        try:
            yield
        finally:
            for p, data in zip(params, gathered):
                data.copy_(p.data)
                p.data = data


def full_shape(param):
    """A parameter's shape, also when ZeRO-3 has partitioned it (then ``param`` holds an empty tensor)."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param):
    """How many values the whole parameter has, also when ZeRO-3 has partitioned it."""
    return getattr(param, "ds_numel", param.numel())


def local_numel(param):
    """How many of the parameter's values this rank holds (its ZeRO-3 partition, or all of it)."""
    partition = getattr(param, "ds_tensor", None)
    return partition.numel() if partition is not None else param.numel()


# Models ----------------------------------------------------------------------------------------------------


def replace_experts(moe_layer, experts):
    """Make ``experts`` the module a ``deepspeed.moe.layer.MoE`` computes its local experts with, its parameters
    tagged as DeepSpeed's own ``Experts`` tags them, so that the engine and ZeRO reduce their gradients over the
    layer's expert-data-parallel group instead of all ranks. Its state_dict keys must name each expert as
    ``deepspeed_experts.<local index>.*`` (the engine's expert files are found by that)."""
    for param in experts.parameters():
        param.allreduce = False
        param.group_name = moe_layer.expert_group_name
    moe_layer.deepspeed_moe.experts = experts


def local_experts(moe_layer):
    """The module that computes the experts a ``deepspeed.moe.layer.MoE`` holds on this rank."""
    return moe_layer.deepspeed_moe.experts


def gate_weight(moe_layer):
    """The router's weight (num_experts, hidden) of a ``deepspeed.moe.layer.MoE``."""
    return moe_layer.deepspeed_moe.gate.wg.weight


def expert_parallel_group(moe_layer):
    """The process group of the expert-parallel ranks a ``deepspeed.moe.layer.MoE`` exchanges tokens with."""
    return moe_layer.deepspeed_moe.ep_group


def stage_layers(pipeline_module):
    """(index in the whole layer list, layer) of each nn.Module layer of a ``deepspeed.pipe.PipelineModule``
    that this rank's stage built, in order (functions among the layers are left out)."""
    start = pipeline_module._local_start
    return [(start + i, f) for i, f in enumerate(pipeline_module.forward_funcs) if isinstance(f, torch.nn.Module)]


def tied_modules(pipeline_module):
    """key -> module of the tied layers (``TiedLayerSpec``) this rank's stage holds a copy of."""
    return pipeline_module.tied_modules


# Benchmarks ------------------------------------------------------------------------------------------------


def engine_inner_phases(engine):
    """The DeepSpeed calls inside engine.backward and engine.step worth timing, as (backward phases, step
    phases), each a list of (owner, attribute, name) in call order: ZeRO 1-2's gradient reduction, its
    gradient norm and the base optimizer's step; without ZeRO, DeepSpeed's clipping and the optimizer's step."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "reduce_gradients"):  # ZeRO 1-2
        return (
            [(optimizer, "reduce_gradients", "ZeRO gradient reduction")],
            [(optimizer, "scaled_global_norm", "ZeRO gradient norm"), (optimizer.optimizer, "step", "Adam")],
        )
    return [], [(engine, "clip_fp32_gradients", "DeepSpeed clipping"), (optimizer, "step", "Adam")]


def sequence_parallel_mpu(size):
    """DeepSpeed's sequence-parallel groups of ``size`` consecutive ranks, made once per process, as the mpu module
    ``deepspeed.initialize`` takes: rank r is sequence-parallel rank r % size of data-parallel rank r // size."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:
        parallel_state_sp.initialize_sequence_parallel(size)
    if parallel_state_sp.get_sequence_parallel_world_size() != size:
        raise ValueError(f"sequence-parallel groups of {parallel_state_sp.get_sequence_parallel_world_size()} ranks exist; asked for {size}")
    return parallel_state_sp
