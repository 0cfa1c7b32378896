"""Test-only rank script: a Switch layer at expert-parallel size EP (argv[1]) on every launched rank, its
GroupedExperts against DeepSpeed's per-expert loop holding the same weights, through DeepSpeed's real
all-to-all. Each rank routes its own tokens; it exits non-zero when an output or gradient differs."""

import dataclasses
import sys

import deepspeed
import torch
from deepspeed.moe.utils import is_moe_param

from models.switch import GroupedExperts, SwitchFFN
from tests.models.test_switch import TOLERANCES, switch_config, with_loop_experts

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
ep_size = int(sys.argv[1])
torch.manual_seed(0)  # the shared weights (the router) alike on every rank, as data parallelism keeps them
config = switch_config(num_experts=4, d_model=8, d_ff=16, capacity_factor=1.25, min_capacity=2)
layer = SwitchFFN(dataclasses.replace(config, expert_parallel_size=ep_size), layer_idx=1)
layer.init_experts(seed=3)
twin = with_loop_experts(layer)  # before the process groups are set: a deepcopy cannot copy one
for module in (layer, twin):
    module.moe.set_deepspeed_parallelism()
experts = layer.local_experts()
assert all(is_moe_param(p) and p.group_name == f"ep_size_{ep_size}" for p in experts.parameters())

torch.manual_seed(100 + rank)  # each rank its own tokens
x = torch.randn(2, 12, 8)
results = []
for module in (layer, twin):
    xx = x.clone().requires_grad_()
    out, aux, _ = module(xx)
    (out.square().sum() + aux).backward()
    results.append((out, xx.grad))
(out, x_grad), (loop_out, loop_x_grad) = results
tol = TOLERANCES[torch.float32]
torch.testing.assert_close(out, loop_out, **tol)
torch.testing.assert_close(x_grad, loop_x_grad, **tol)
for e, expert in enumerate(twin.local_experts().deepspeed_experts):
    for name, stacked in GroupedExperts.EXPERT_TENSORS.items():
        grad = getattr(experts, stacked).grad[e]
        torch.testing.assert_close(grad.mT if name.endswith("weight") else grad, expert.get_parameter(name).grad, **tol)
print(f"rank {rank}: {experts.num_local_experts} local experts of 4 match the loop", flush=True)
