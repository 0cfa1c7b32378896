"""Switch against dense: step time of a Switch LM against the dense LM with the same FLOPs per token
(same d_model, d_ff and layers; the Switch LM's every other FFN becomes a top-1 layer of E experts),
for E = 8, 32 and 128, on 1 rank and on 2 real ranks (expert parallelism 2: each rank holds E/2
experts, tokens travel by all-to-all; the shared weights are data parallel).

    python -m bench.switch_vs_dense                # E = 8, 32, 128 on 1 and 2 ranks
    python -m bench.switch_vs_dense --profile      # + where the Switch step's time goes (torch.profiler)
    python -m bench.switch_vs_dense --smoke        # a few steps of E = 8 (CI runs this)

Every model runs through pretrain/main.py's code path (prepare, build_engine, Trainer.take_step)
with ZeRO-2 (ds_configs/moe_ep2_zero2.json's recipe) and the same per-rank batch, so on 2 ranks the
global batch is twice the 1-rank one. One launch per world size builds all models and times them in
interleaved rounds (best of each), so every model sees the same machine load. Prints a table, then
the ratios (Switch step time / dense step time at the same world size) last.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.device_timing import profiled_time_field, profiler_activities, synchronize, time_steps
from models import config_from_dict
from models.registry import family_of
from pretrain.local_ranks import start_ranks, wait_ranks

REPO = Path(__file__).resolve().parents[1]

# The profile's categories, in the order they are printed: record_function labels put on the engine
# and on DeepSpeed's MoE pieces (see label_switch_parts). Router and experts are their forward time;
# their backward is inside "backward", the backward all-to-all inside "all-to-all".
PROFILE_PARTS = ["forward", "router", "all-to-all", "experts", "backward", "optimizer"]


def model_configs(opts):
    dense = {
        "family": "gpt",
        "vocab_size": 320,
        "max_seq_len": opts.seq_len,
        "d_model": opts.d_model,
        "n_layers": opts.n_layers,
        "n_heads": opts.n_heads,
        "d_ff": 4 * opts.d_model,
        "dropout": 0.0,
    }
    configs = {"dense": dense}
    for experts in opts.experts:
        # init_scale 1.0 as the dense model: the step time does not depend on it, the comparison stays like for like.
        configs[f"switch-{experts}"] = {**dense, "family": "switch", "num_experts": experts, "init_scale": 1.0}
    return configs


def ds_config(opts, world_size, experts):
    config = json.loads((REPO / "ds_configs" / "moe_ep2_zero2.json").read_text())
    config.update(train_micro_batch_size_per_gpu=opts.micro_batch, gradient_accumulation_steps=1)
    config.pop("train_batch_size")
    if experts:
        config["moe"] = {"expert_parallel_size": world_size}
    else:
        config.pop("moe")
    return config


def write_inputs(opts, world_size, workdir):
    """The model and DeepSpeed JSON files every rank reads, one pair per model."""
    files = {}
    for name, model in model_configs(opts).items():
        model_path, ds_path = workdir / f"{name}.model.json", workdir / f"{name}.ds{world_size}.json"
        model_path.write_text(json.dumps(model))
        experts = family_of(config_from_dict(model)).experts  # the family says whether it needs an expert-parallel group
        ds_path.write_text(json.dumps(ds_config(opts, world_size, experts)))
        files[name] = (str(model_path), str(ds_path))
    return files


# ---------------------------------------------------------------- one rank


def build_trainer(model_path, ds_path, opts, run_dir):
    from pretrain.main import build_engine, prepare
    from pretrain.trainer import Trainer

    argv = [
        "--ds_config",
        ds_path,
        "--model_config",
        model_path,
        "--train_data",
        str(REPO / "data" / "tinyshakespeare.txt"),
        "--max_steps",
        "1",
        "--save_dir",
        str(run_dir),
        "--seq_len",
        str(opts.seq_len),
    ]
    args, model_config, ds, plan, task = prepare(argv)
    engine, _ = build_engine(args, model_config, ds, plan, task)
    trainer = Trainer(engine, task, plan, args, logger=None, flops_per_token=0)

    def step():
        trainer.take_step()

    return engine, step


def label(owner, attribute, name):
    """Wrap owner.attribute (a method) in a profiler label."""
    from torch.profiler import record_function

    original = getattr(owner, attribute)

    def labelled(*args, **kwargs):
        with record_function(name):
            return original(*args, **kwargs)

    setattr(owner, attribute, labelled)


def label_switch_parts(engines):
    """Labels for the profile: the engine's forward/backward/step, DeepSpeed's gate (router), experts and all-to-all.

    _AllToAll.forward runs in both directions (its backward applies it again), so one label covers both.
    """
    from switchyard.deepspeed_compat import moe_all_to_all, moe_gates_and_experts

    label(moe_all_to_all(), "forward", "all-to-all")
    for engine in engines:
        label(engine, "forward", "forward")
        label(engine, "backward", "backward")
        label(engine, "step", "optimizer")
        for gate, experts in moe_gates_and_experts(engine.module):
            label(gate, "forward", "router")
            label(experts, "forward", "experts")


def profile_steps(step, steps, device):
    """Milliseconds per step in each labelled part, and the whole step, from torch.profiler on this rank.

    On the CPU a part's time is the CPU time inside its label; on a GPU it is the GPU time of the kernels the
    profiler attributes to the label (launched inside it), the step's the wall time of synchronized steps. Not run
    on a GPU yet: autograd launches backward kernels from a thread of its own, outside the labels, so there the
    "backward" figure may miss them (the printed "rest" column still holds them)."""
    from torch.profiler import profile

    field = profiled_time_field(device)
    with profile(activities=profiler_activities()) as prof:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        total = time.perf_counter() - start
    by_name = {event.key: getattr(event, field) for event in prof.key_averages()}
    parts = {part: by_name.get(part, 0.0) / 1e3 / steps for part in PROFILE_PARTS}  # microseconds in total -> ms per step
    parts["step"] = total * 1e3 / steps
    return parts


def rank_main(opts):
    import torch
    import torch.distributed as dist

    from pretrain import distributed

    torch.set_num_threads(1)
    distributed.init()
    files = json.loads(Path(opts.inputs).read_text())
    workdir = Path(opts.inputs).parent
    built = {name: build_trainer(model_path, ds_path, opts, workdir / f"run-{name}") for name, (model_path, ds_path) in files.items()}
    device = distributed.device()
    seconds = {name: float("inf") for name in built}
    for _ in range(opts.rounds):
        for name, (_, step) in built.items():
            # barriers around the timed steps so the slowest rank sets the time; on a GPU synchronized first
            seconds[name] = min(seconds[name], time_steps(step, opts.steps, opts.warmup, device, barrier=dist.barrier).wall_s)
    result = {"step_ms": {name: s * 1e3 for name, s in seconds.items()}}
    if opts.profile:
        label_switch_parts([engine for engine, _ in built.values()])
        result["profile"] = {name: profile_steps(step, opts.steps, device) for name, (_, step) in built.items()}
    if dist.get_rank() == 0:
        out = Path(opts.result)
        out.with_suffix(".tmp").write_text(json.dumps(result))
        out.with_suffix(".tmp").rename(out)
    distributed.finish(0)


# ---------------------------------------------------------------- the launcher


def run_world(opts, world_size, workdir, argv):
    workdir = workdir / f"world{world_size}"
    workdir.mkdir()
    inputs = workdir / "inputs.json"
    inputs.write_text(json.dumps(write_inputs(opts, world_size, workdir)))
    result = workdir / "result.json"
    procs = start_ranks([*argv, "--rank_inputs", inputs, "--rank_result", result], world_size, workdir / "logs", script=Path(__file__).resolve())
    for rank in wait_ranks(procs, workdir / "logs", timeout=opts.timeout):
        if rank.returncode != 0:
            sys.exit(f"error: rank {rank.rank} of {world_size} exited {rank.returncode}:\n{rank.output[-3000:]}")
    return json.loads(result.read_text())


def print_report(results, opts):
    names = list(model_configs(opts))
    print(
        f"\nd_model {opts.d_model}, d_ff {4 * opts.d_model}, {opts.n_layers} layers (experts in every other), "
        f"seq {opts.seq_len}, micro-batch {opts.micro_batch} per rank, ZeRO-2, fp32, best of {opts.rounds} rounds"
    )
    print(f"{'model':12s} {'ranks':>5s} {'step ms':>9s} {'tokens/s':>10s}")
    tokens_per_rank = opts.micro_batch * opts.seq_len
    for world_size, result in results.items():
        for name in names:
            ms = result["step_ms"][name]
            print(f"{name:12s} {world_size:5d} {ms:9.1f} {world_size * tokens_per_rank / ms * 1e3:10.0f}")
    if opts.profile:
        print(
            "\nprofile, rank 0, ms per step (router and experts: forward only; all-to-all: both directions;"
            " rest = step - router - all-to-all - experts)"
        )
        print(f"{'model':12s} {'ranks':>5s} {'step':>8s} " + " ".join(f"{p:>10s}" for p in PROFILE_PARTS) + f" {'rest':>8s}")
        for world_size, result in results.items():
            for name in names:
                parts = result["profile"][name]
                rest = parts["step"] - parts["router"] - parts["all-to-all"] - parts["experts"]
                print(f"{name:12s} {world_size:5d} {parts['step']:8.1f} " + " ".join(f"{parts[p]:10.1f}" for p in PROFILE_PARTS) + f" {rest:8.1f}")
    print("\nratios (switch step time / dense step time, same ranks; 1.0 = experts cost nothing extra):")
    for world_size, result in results.items():
        for name in names[1:]:
            print(f"{name} on {world_size} rank(s): {result['step_ms'][name] / result['step_ms']['dense']:.3f}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also break the step down with torch.profiler")
    p.add_argument("--timeout", type=int, default=3000, help="seconds for one world size's launch")
    p.add_argument("--smoke", action="store_true", help="2 steps of E = 8 at seq 32, profile included")
    # Set by the launcher for the ranks it starts.
    p.add_argument("--rank_inputs", dest="inputs", help=argparse.SUPPRESS)
    p.add_argument("--rank_result", dest="result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.experts, opts.seq_len, opts.steps, opts.warmup, opts.rounds, opts.profile = [8], 32, 2, 1, 1, True
    return opts


def main():
    argv = sys.argv[1:]
    opts = parse(argv)
    if opts.inputs:
        return rank_main(opts)
    with tempfile.TemporaryDirectory() as workdir:
        results = {world_size: run_world(opts, world_size, Path(workdir), argv) for world_size in opts.ranks}
    print_report(results, opts)


if __name__ == "__main__":
    main()
