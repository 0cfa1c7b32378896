"""Test-only rank: pretrain/main.py's build_engine under a ZeRO-Infinity config, then, per parameter, where
DeepSpeed keeps this rank's partition (its ds_tensor's final_location and status) and how large it is, and the
swap files under nvme_path, into one file.

    python tests/pretrain/nvme_placement.py OUT.pt MAIN_PY_ARGS...   (started as ranks by tests/distributed.py)
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import pretrain.main
from pretrain import distributed


def main():
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    prepared = pretrain.main.prepare(argv)
    distributed.init()
    engine, _ = pretrain.main.build_engine(*prepared)
    nvme_path = prepared[2]["zero_optimization"]["offload_param"]["nvme_path"]
    placement = {
        name: {
            "partition_bytes": p.ds_tensor.ds_numel * p.element_size(),
            "final_location": str(p.ds_tensor.final_location),
            "status": p.ds_tensor.status.name,
            "in_memory": p.ds_tensor.numel(),  # what the partition's tensor holds now (0: only the swap file has it)
        }
        for name, p in engine.module.named_parameters()
    }
    files = sorted(os.path.relpath(os.path.join(d, f), nvme_path) for d, _, fs in os.walk(nvme_path) for f in fs)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"placement": placement, "files": files})
    if dist.get_rank() == 0:
        torch.save(ranks, out)
    distributed.finish(0)


if __name__ == "__main__":
    main()
