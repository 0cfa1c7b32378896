"""Test-only rank script: a Switch layer at expert-parallel size EP (argv[1]) on every launched rank, through
the real all-to-all. Each rank routes its own tokens; it exits non-zero when an output or gradient differs
from (1) DeepSpeed's MoE layer holding the same weights (top-1, nothing dropped), (2) at top-2 dropless, the
same layer at EP 1 on this rank alone, holding every expert."""

import dataclasses
import sys

import deepspeed
import torch
from deepspeed.moe.utils import is_moe_param

from models.switch import GroupedExperts, SwitchFFN
from pretrain.distributed import finish
from switchyard.deepspeed_compat import gate_weight
from tests.models.test_switch import TOLERANCES, deepspeed_forward, switch_config, with_loop_experts

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
ep_size = int(sys.argv[1])
tol = TOLERANCES[torch.float32]


def layer_at(ep, **over):
    torch.manual_seed(0)  # the shared weights (the router) alike on every rank, as data parallelism keeps them
    layer = SwitchFFN(dataclasses.replace(switch_config(num_experts=4, d_model=8, d_ff=16, **over), expert_parallel_size=ep), layer_idx=1)
    layer.init_experts(seed=3)
    return layer


def run(forward, x):
    xx = x.clone().requires_grad_()
    out = forward(xx)
    out.square().sum().backward()
    return out, xx.grad


torch.manual_seed(100 + rank)  # each rank its own tokens
x = torch.randn(2, 12, 8)

layer = layer_at(ep_size, dropless=True)
twin = with_loop_experts(layer)  # before the process groups are set: a deepcopy cannot copy one
for module in (layer, twin):
    module.moe.set_deepspeed_parallelism()
experts = layer.local_experts()
assert all(is_moe_param(p) and p.group_name == f"ep_size_{ep_size}" for p in experts.parameters())
(out, x_grad), (loop_out, loop_x_grad) = run(lambda xx: layer(xx)[0], x), run(lambda xx: deepspeed_forward(twin, xx), x)
torch.testing.assert_close(out, loop_out, **tol)
torch.testing.assert_close(x_grad, loop_x_grad, **tol)
for e, expert in enumerate(twin.local_experts().deepspeed_experts):
    for name, stacked in GroupedExperts.EXPERT_TENSORS["gelu"].items():
        grad = getattr(experts, stacked).grad[e]
        torch.testing.assert_close(grad.mT if name.endswith("weight") else grad, expert.get_parameter(name).grad, **tol)
print(f"rank {rank}: {experts.num_experts} local experts of 4 match the loop", flush=True)

top2, alone = layer_at(ep_size, top_k=2, dropless=True), layer_at(1, top_k=2, dropless=True)
top2.moe.set_deepspeed_parallelism()
(out, x_grad), (alone_out, alone_x_grad) = run(lambda xx: top2(xx)[0], x), run(lambda xx: alone(xx)[0], x)
torch.testing.assert_close(out, alone_out, **tol)
torch.testing.assert_close(x_grad, alone_x_grad, **tol)
torch.testing.assert_close(gate_weight(top2.moe).grad, gate_weight(alone.moe).grad, **tol)
print(f"rank {rank}: top-2 dropless at expert-parallel size {ep_size} matches one rank", flush=True)

# barrier, flush, os._exit: interpreter shutdown is where torch 2.13's gloo can abort after a run that passed
finish()
