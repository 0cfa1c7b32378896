"""Test-only rank script: a tiny model (models/configs/ARGV[1]) trained STEPS (argv[3]) steps with DeepSpeed
ZeRO-0 on random sequences, each rank holding its slice of every sequence (models/ulysses.py) when launched on
more than one rank. ROUTE (argv[2]) is how DeepSpeed learns the sequence-parallel groups: "mpu" (Switchyard's:
the groups passed to deepspeed.initialize as mpu) or "mesh" (DeepSpeed's JSON keys sequence_parallel_size and
data_parallel_size). Rank 0 writes to OUT (argv[4]) the full sequences' mean loss at each step and, after the
last, the largest difference of any weight between the ranks."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import build_model, load_model_config
from models.ulysses import sequence_slice, split_over, split_sequences
from pretrain.distributed import finish
from tests.distributed import REPO

model_file, route, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
deepspeed.init_distributed(dist_backend="gloo")
world, rank = dist.get_world_size(), dist.get_rank()
config = load_model_config(REPO / "models" / "configs" / model_file)
torch.manual_seed(0)
model = build_model(config)
ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
    "zero_optimization": {"stage": 0},
}
mpu = None
if world > 1 and route == "mpu":
    mpu = split_sequences(model, world)
elif world > 1:
    ds_config.update(sequence_parallel_size=world, data_parallel_size=1)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config, mpu=mpu)
if world > 1 and route == "mesh":
    split_over(engine.module, engine.seq_parallel_group)
sp_rank = engine.module.sequence_slice.rank if world > 1 else 0

data = torch.Generator().manual_seed(1)
losses = []
for _ in range(steps):
    window = torch.randint(0, config.vocab_size, (2, config.max_seq_len + 1), generator=data)  # alike on every rank
    tokens = sequence_slice(window, sp_rank, world)
    logits, _, _ = engine(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    engine.backward(loss / world)  # this slice's share of the sequence's mean, as pretrain/tasks/lm.py's loss
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    losses.append(total.item() / world)

weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
every = [torch.empty_like(weights) for _ in range(world)]
dist.all_gather(every, weights)
spread = max((w - every[0]).abs().max().item() for w in every)
if rank == 0:
    with open(out, "w") as f:
        json.dump({"losses": losses, "weight_spread": spread}, f)

# barrier, flush, os._exit: interpreter shutdown is where torch 2.13's gloo can abort after a run that passed
finish()
