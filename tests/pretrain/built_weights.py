"""Test-only rank: pretrain/main.py's build_engine, then the engine's weights gathered whole, what each rank held
right after the model was built (before deepspeed.initialize) and the hpZ partition it holds, into one file.

    python tests/pretrain/built_weights.py OUT.pt MAIN_PY_ARGS...   (started as ranks by tests/distributed.py)
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import pretrain.main
from pretrain import distributed
from switchyard.deepspeed_compat import full_numel, is_partitioned, local_numel


def main():
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    prepared = pretrain.main.prepare(argv)
    distributed.init()
    held = {}
    build_model = pretrain.main.build_model

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        held["values"] = sum(local_numel(p) for p in model.parameters())
        held["full"] = sum(full_numel(p) for p in model.parameters())
        held["partitioned"] = sum(is_partitioned(p) for p in model.parameters())
        held["tensors"] = len(list(model.parameters()))
        return model

    pretrain.main.build_model = recording_build_model
    engine, _ = pretrain.main.build_engine(*prepared)
    params = list(engine.module.parameters())
    # ZeRO++ hpZ: the second, larger partition each rank keeps for the all-gathers within its group (none without)
    held["secondary"] = sum(p.ds_secondary_tensor.numel() for p in params if getattr(p, "ds_secondary_tensor", None) is not None)
    with deepspeed.zero.GatheredParameters(params):  # a no-op below ZeRO-3
        state = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, held)
    if dist.get_rank() == 0:
        torch.save({"state": state, "held": ranks}, out)
    distributed.finish(0)


if __name__ == "__main__":
    main()
