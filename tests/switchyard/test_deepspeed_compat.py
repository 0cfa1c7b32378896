"""What switchyard/deepspeed_compat.py assumes about DeepSpeed's internals, checked on the installed DeepSpeed.

Each test fails when an upgrade moves or changes an internal a wrapper relies on; the fix then goes in
deepspeed_compat.py alone. The engine tests share one 1-process engine (gloo, a tiny nn.Linear, a torch
optimizer: a few seconds to build).
"""

import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.local_ranks import free_port
from switchyard import deepspeed_compat


@pytest.fixture(scope="module")
def process_group():
    """A 1-process gloo group, taken down afterwards (the other in-process tests expect none)."""
    import deepspeed

    if dist.is_initialized():
        yield
        return
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def engine(process_group):
    """fp32 without ZeRO, clipping on, an fp16 section (disabled) that sets min_loss_scale."""
    import deepspeed

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    config = {"train_batch_size": 1, "gradient_clipping": 1.0, "fp16": {"enabled": False, "min_loss_scale": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    return engine


# Training ---------------------------------------------------------------------------------------------------


def test_gradient_clipping_off_zeroes_the_value_engine_step_reads_and_restores_it(engine):
    assert engine.gradient_clipping() == 1.0  # the documented accessor reads the attribute the wrapper toggles
    with deepspeed_compat.gradient_clipping_off(engine):
        assert engine.gradient_clipping() == 0.0
    assert engine.gradient_clipping() == 1.0
    with pytest.raises(ZeroDivisionError), deepspeed_compat.gradient_clipping_off(engine):
        1 / 0
    assert engine.gradient_clipping() == 1.0


def test_engine_step_reads_the_clipping_from_the_config():
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "self.gradient_clipping()" in inspect.getsource(DeepSpeedEngine._take_model_step)


def test_engine_attributes_the_trainer_reads(engine):
    assert deepspeed_compat.min_loss_scale(engine) == 2
    assert deepspeed_compat.skipped_steps(engine) == 0
    assert not deepspeed_compat.is_pipeline_engine(engine)
    assert hasattr(engine, "torch_autocast_z0_gradscaler")  # read with a default: a rename would pass unseen
    assert not deepspeed_compat.uses_autocast_grad_scaler(engine)


def test_backward_allreduce_off_sets_the_flag_engine_backward_reads(engine):
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert engine.enable_backward_allreduce is True
    assert "self.enable_backward_allreduce" in inspect.getsource(DeepSpeedEngine._backward_epilogue)
    deepspeed_compat.backward_allreduce_off(engine)
    assert engine.enable_backward_allreduce is False


def test_pipeline_engine_keeps_its_grid():
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert "self.grid = self.module._grid" in inspect.getsource(PipelineEngine.__init__)
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    assert "self.data_parallel_id =" in inspect.getsource(PipelineParallelGrid.__init__)


def test_loss_scale_attributes_of_the_fp16_optimizers(process_group):  # update_scale logs on rank 0
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for optimizer in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(optimizer.cur_scale, property)
        assert "self.loss_scaler =" in inspect.getsource(optimizer.__init__)
    scaler = DynamicLossScaler(init_scale=2.0, scale_window=1000, min_scale=1.0, delayed_shift=1, consecutive_hysteresis=False)
    assert scaler.cur_scale == 2.0 and scaler.raise_error_at_min_scale
    scaler.update_scale(True)  # an overflow: down to the minimum
    with pytest.raises(Exception):
        scaler.update_scale(True)  # an overflow at the minimum raises unless told not to
    scaler.raise_error_at_min_scale = False
    scaler.update_scale(True)
    assert scaler.cur_scale == 1.0


# Checkpoints ------------------------------------------------------------------------------------------------


def test_checkpoints_load_through_the_given_loader(engine, tmp_path):
    from pretrain.run_dir import safe_load

    engine.save_checkpoint(str(tmp_path), tag="t")
    loaded = []

    def recording_load(path, map_location=None):
        loaded.append(os.path.basename(path))
        return safe_load(path, map_location)  # the allow-list covers what the engine saved

    deepspeed_compat.load_checkpoints_through(engine, recording_load)
    path, _ = engine.load_checkpoint(str(tmp_path), tag="t")
    assert path is not None and "mp_rank_00_model_states.pt" in loaded


def test_checkpoint_allowed_globals_round_trip_under_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    allowed = deepspeed_compat.checkpoint_allowed_globals()
    assert [c.__name__ for c in allowed] == ["LossScaler", "DynamicLossScaler", "ZeroStageEnum", "fragment_address"]
    scaler = DynamicLossScaler(init_scale=4.0, scale_window=10, min_scale=1.0, delayed_shift=1, consecutive_hysteresis=False)
    torch.save({"scaler": scaler}, tmp_path / "s.pt")
    with torch.serialization.safe_globals(allowed):
        assert torch.load(tmp_path / "s.pt", weights_only=True)["scaler"].cur_scale == 4.0


def test_zero_to_fp32_reads_through_its_module_level_torch(tmp_path):
    from deepspeed.utils import zero_to_fp32

    assert zero_to_fp32.torch is torch and "torch.load(" in inspect.getsource(zero_to_fp32)
    assert "get_fp32_state_dict_from_zero_checkpoint" in dir(zero_to_fp32)
    with pytest.raises(Exception):  # no checkpoint there; the swap is undone whatever happens
        deepspeed_compat.zero3_fp32_state_dict(str(tmp_path), "none", lambda f, map_location=None: {})
    assert zero_to_fp32.torch is torch


def test_expert_checkpoint_path_form(tmp_path):
    path = deepspeed_compat.expert_checkpoint_path(tmp_path, 1, 3, "global_step7")
    assert path == os.path.join(str(tmp_path), "global_step7", "layer_1_expert_3_mp_rank_00_model_states.pt")


@pytest.mark.parametrize("kind", ["FusedAdam", "DeepSpeedCPUAdam"])
def test_cpu_adam_replay_continues_the_uninterrupted_run_bit_for_bit(kind):
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import adam

    if kind == "FusedAdam" and get_accelerator().device_name() != "cpu":
        pytest.skip("the CUDA FusedAdam computes pow(beta, t) every step: nothing to replay")
    make = getattr(adam, kind)
    torch.manual_seed(0)
    grads = [torch.randn(64) for _ in range(6)]
    start = torch.randn(64)
    through = nn.Parameter(start.clone())
    uninterrupted = make([through], lr=1e-2)
    for grad in grads:
        through.grad = grad.clone()
        uninterrupted.step()
    resumed_param = nn.Parameter(start.clone())
    first = make([resumed_param], lr=1e-2)
    for grad in grads[:3]:
        resumed_param.grad = grad.clone()
        first.step()
    resumed = make([resumed_param], lr=1e-2)  # a new process's optimizer, from the saved state
    resumed.load_state_dict(first.state_dict())
    deepspeed_compat.replay_cpu_adam_bias_correction(resumed)
    for grad in grads[3:]:
        resumed_param.grad = grad.clone()
        resumed.step()
    assert torch.equal(through, resumed_param)


def test_cpu_adam_replay_leaves_other_optimizers_alone():
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([param])
    deepspeed_compat.replay_cpu_adam_bias_correction(optimizer)
    assert torch.equal(param, torch.ones(2))


# ZeRO-3 -----------------------------------------------------------------------------------------------------


def test_zero_init_hook_and_partitioned_parameters(process_group):
    seen = []

    def before_partition(module, dtype, device):
        seen.append((type(module).__name__, dtype, all(not deepspeed_compat.is_partitioned(p) for p in module.parameters())))

    config = {"train_batch_size": 1, "zero_optimization": {"stage": 3}}
    with deepspeed_compat.zero_init(config, before_partition):
        layer = nn.Linear(4, 3)
    assert seen == [("Linear", torch.float32, True)]  # after the constructor, before partitioning
    assert deepspeed_compat.is_partitioned(layer.weight) and layer.weight.numel() == 0
    assert tuple(deepspeed_compat.full_shape(layer.weight)) == (3, 4)
    assert deepspeed_compat.full_numel(layer.weight) == 12
    assert deepspeed_compat.local_numel(layer.weight) == 12  # one rank holds the whole partition


def test_plain_parameters_read_as_themselves():
    param = nn.Parameter(torch.zeros(3, 4))
    assert not deepspeed_compat.is_partitioned(param)
    assert deepspeed_compat.full_shape(param) == (3, 4)
    assert deepspeed_compat.full_numel(param) == deepspeed_compat.local_numel(param) == 12


# Models -----------------------------------------------------------------------------------------------------


class RecordingExperts(nn.Module):
    """Experts that double their input and record its shape; one parameter, for the tagging."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.shapes = []

    def forward(self, dispatched):
        self.shapes.append(tuple(dispatched.shape))
        return dispatched * self.scale


def test_sequence_parallel_state_is_the_module_sequence_parallel_mpu_reads():
    """sequence_parallel_mpu's groups need 2 ranks or more (DeepSpeed refuses a size of 1): made on real ranks in
    tests/models/test_ulysses.py; here the module-level state it reads and the getters the engine calls."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    assert parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None  # nothing in this process made groups
    for getter in ("get_sequence_parallel_group", "get_sequence_data_parallel_group", "get_sequence_parallel_world_size"):
        assert callable(getattr(parallel_state_sp, getter)), getter


def test_moe_layer_internals():
    import inspect

    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    torch.manual_seed(0)
    moe = MoE(hidden_size=4, expert=nn.Identity(), num_experts=2, ep_size=1, k=1, min_capacity=0, capacity_factor=2.0)
    experts = RecordingExperts()
    deepspeed_compat.replace_experts(moe, experts)
    assert deepspeed_compat.local_experts(moe) is experts
    # Tagged as DeepSpeed's Experts tags its parameters: reduced over the expert-data-parallel group it names.
    assert is_moe_param(experts.scale) and experts.scale.group_name == moe.expert_group_name
    x = torch.randn(1, 6, 4)
    out, _, _ = moe(x)
    assert experts.shapes == [(1, 2, 6, 4)]  # [ep, local experts, capacity 6 / 2 x 2.0, d_model]
    # The capacity holds every token: each output is 2 x its gate value x its input.
    gates = torch.softmax(x.reshape(6, 4) @ deepspeed_compat.gate_weight(moe).T, dim=-1).max(-1).values
    torch.testing.assert_close(out.reshape(6, 4), 2 * gates[:, None] * x.reshape(6, 4))
    weight = deepspeed_compat.gate_weight(moe)
    assert weight.shape == (2, 4) and any(weight is p for p in moe.parameters())
    # The engine finds each expert's keys by this prefix (models/switch.py GroupedExperts writes them):
    for method in (DeepSpeedEngine._save_moe_checkpoint, DeepSpeedEngine.load_moe_state_dict):
        assert "'.deepspeed_moe.experts.deepspeed_experts.'" in inspect.getsource(method)


def test_expert_parallel_group_is_the_one_set_deepspeed_parallelism_makes(process_group):
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    moe = MoE(hidden_size=8, expert=nn.Identity(), num_experts=2, ep_size=1)
    assert deepspeed_compat.expert_parallel_group(moe) is None  # until deepspeed.initialize (or this) sets it
    moe.set_deepspeed_parallelism()
    group = deepspeed_compat.expert_parallel_group(moe)
    assert group is groups._get_expert_parallel_group(moe.expert_group_name) and torch.distributed.get_world_size(group) == 1


def test_pipeline_module_stage_layers_and_tied_modules(process_group):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    pipe = PipelineModule([TiedLayerSpec("emb", nn.Linear, 2, 2), lambda x: x, LayerSpec(nn.Linear, 2, 2)], num_stages=1)
    layers = deepspeed_compat.stage_layers(pipe)
    assert [index for index, _ in layers] == [0, 2] and all(isinstance(layer, nn.Linear) for _, layer in layers)
    assert list(deepspeed_compat.tied_modules(pipe)) == ["emb"]
    assert deepspeed_compat.tied_modules(pipe)["emb"] is layers[0][1]


# Benchmarks -------------------------------------------------------------------------------------------------


def test_engine_inner_phases_name_existing_methods(engine):
    in_backward, in_step = deepspeed_compat.engine_inner_phases(engine)
    assert in_backward == [] and [name for _, _, name in in_step] == ["DeepSpeed clipping", "Adam"]
    assert all(callable(getattr(owner, attribute)) for owner, attribute, _ in in_step)
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert callable(DeepSpeedZeroOptimizer.reduce_gradients) and callable(DeepSpeedZeroOptimizer.scaled_global_norm)
