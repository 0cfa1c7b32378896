"""Switch against dense: step time of a Switch LM against the dense LM with the same FLOPs per token
(same d_model, d_ff and layers; the Switch LM's every other FFN becomes a top-1 layer of E experts),
for E = 8 and 32, in three cases (CASES): today's ZeRO-2 case at 512 tokens per micro-batch and a ZeRO-2
case at 4096, where arithmetic dominates, each on 1 rank and on 2 real ranks (expert parallelism 2: each
rank holds E/2 experts, tokens travel by all-to-all; the shared weights are data parallel), and
nanoGPT's CPU shape on one process without ZeRO.

    python -m bench.switch_vs_dense                # every case, E = 8 and 32
    python -m bench.switch_vs_dense --profile      # + where each step's time goes (torch.profiler)
    python -m bench.switch_vs_dense --experts 8 32 128 --cases zero2-512
    python -m bench.switch_vs_dense --switch_config '{"dropless": true}'   # extra Switch model-config fields
                                   # (top_k 2 or a shared expert add FLOPs per token: no longer FLOP-matched)
    python -m bench.switch_vs_dense --smoke        # a few steps of E = 8 in the new cases, shrunk (CI runs this)

Every model runs through pretrain/main.py's code path (prepare, build_engine, Trainer.take_step) with
the same per-rank batch, so on 2 ranks the global batch is twice the 1-rank one. One launch per world
size builds all models of all its cases and times them in interleaved rounds (best of each), so every
model sees the same machine load. Prints a table, the ratios and the targets (TARGETS), then one JSON
object last with all of it.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.device_timing import on_cuda, profiled_time_field, profiler_activities, synchronize, time_steps
from models import config_from_dict
from models.registry import family_of
from pretrain.local_ranks import start_ranks, wait_ranks

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    seq_len: int
    micro_batch: int  # per rank
    ds_config: str  # the recipe in ds_configs/
    ranks: tuple  # the world sizes it runs on
    what: str


CASES = {
    "zero2-512": Case(128, 4, "moe_ep2_zero2.json", (1, 2), "ZeRO-2 (ds_configs/moe_ep2_zero2.json's recipe)"),
    "zero2-4096": Case(128, 32, "moe_ep2_zero2.json", (1, 2), "ZeRO-2 (ds_configs/moe_ep2_zero2.json's recipe)"),
    # nanoGPT's shakespeare-char CPU recipe (n_layer 4, n_embd 128, n_head 4, block 64, batch 12, dropout 0), its
    # vocabulary aside (bytes, 320 rows, here).
    "zero0-nanogpt": Case(64, 12, "zero0.json", (1,), "nanoGPT's CPU shape, one process without ZeRO"),
}
# --smoke: (seq_len, micro_batch) of the cases it runs, the new ones; zero2-512 runs zero2-4096's code path.
SMOKE_SHAPES = {"zero2-4096": (32, 8), "zero0-nanogpt": (64, 12)}

# (case, Switch model, ranks, limit, what is compared). Step-time targets: Switch step / dense step at most
# the limit; the one-process target: Switch tokens/s / dense tokens/s by process CPU time at least the limit.
TARGETS = [
    ("zero0-nanogpt", "switch-8", 1, 0.88, "tokens/s ratio"),
    ("zero0-nanogpt", "switch-32", 1, 0.65, "tokens/s ratio"),
    ("zero2-4096", "switch-8", 1, 1.10, "step ratio"),
    ("zero2-4096", "switch-8", 2, 1.10, "step ratio"),
    ("zero2-4096", "switch-32", 1, 1.25, "step ratio"),
    ("zero2-4096", "switch-32", 2, 1.25, "step ratio"),
]

# The profile's Switch parts, in the order they are printed: the Switch layer's own labels (record_function
# "switch/<part>" in models/switch.py). Forward time, but all-to-all: its backward applies it again.
SWITCH_PARTS = ["router", "dispatch", "experts", "all-to-all", "combine"]
STEP_PARTS = ["forward", "backward", "optimizer"]


def model_configs(opts, case):
    dense = {
        "family": "gpt",
        "vocab_size": 320,
        "max_seq_len": case.seq_len,
        "d_model": opts.d_model,
        "n_layers": opts.n_layers,
        "n_heads": opts.n_heads,
        "d_ff": 4 * opts.d_model,
        "dropout": 0.0,
    }
    configs = {"dense": dense}
    for experts in opts.experts:
        # init_scale 1.0 as the dense model: the step time does not depend on it, the comparison stays like for like.
        configs[f"switch-{experts}"] = {**dense, "family": "switch", "num_experts": experts, "init_scale": 1.0, **opts.switch_config}
    return configs


def ds_config(case, world_size, experts):
    config = json.loads((REPO / "ds_configs" / case.ds_config).read_text())
    config.update(train_micro_batch_size_per_gpu=case.micro_batch, gradient_accumulation_steps=1)
    config.pop("train_batch_size")
    config.pop("moe", None)
    if experts:
        config["moe"] = {"expert_parallel_size": world_size}
    return config


def write_inputs(opts, world_size, workdir):
    """The model and DeepSpeed JSON files every rank reads: case -> model -> (model file, DeepSpeed file, seq_len)."""
    files = {}
    for case_name, case in opts.cases.items():
        if world_size not in case.ranks:
            continue
        files[case_name] = {}
        for name, model in model_configs(opts, case).items():
            model_path, ds_path = workdir / f"{case_name}.{name}.model.json", workdir / f"{case_name}.{name}.ds.json"
            model_path.write_text(json.dumps(model))
            experts = family_of(config_from_dict(model)).experts  # the family says whether it needs an expert-parallel group
            ds_path.write_text(json.dumps(ds_config(case, world_size, experts)))
            files[case_name][name] = (str(model_path), str(ds_path), case.seq_len)
    return files


# ---------------------------------------------------------------- one rank


def build_trainer(model_path, ds_path, seq_len, run_dir):
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
        str(seq_len),
    ]
    args, model_config, ds, plan, task = prepare(argv)
    engine, _ = build_engine(args, model_config, ds, plan, task)
    trainer = Trainer(engine, task, plan, args, logger=None, flops_per_token=0)

    def step():
        trainer.take_step()

    return engine, step


def label(owner, attribute, name):
    """Wrap owner.attribute (a method or a module's function) in a profiler label."""
    from torch.profiler import record_function

    original = getattr(owner, attribute)

    def labelled(*args, **kwargs):
        with record_function(name):
            return original(*args, **kwargs)

    setattr(owner, attribute, labelled)


def label_step_parts(engines):
    for engine in engines:
        label(engine, "forward", "forward")
        label(engine, "backward", "backward")
        label(engine, "step", "optimizer")


def profile_steps(step, steps, device):
    """Milliseconds per step in each labelled part and the whole step, from torch.profiler on this rank.

    On the CPU a part's time is the CPU time inside its label; on a GPU it is the GPU time of the kernels the
    profiler attributes to the label (launched inside it), the step's the wall time of synchronized steps. Not run
    on a GPU yet: autograd launches backward kernels from a thread of its own, outside the labels, so there the
    "backward" figure may miss them (the printed "other" column still holds them)."""
    from torch.profiler import profile

    field = profiled_time_field(device)
    with profile(activities=profiler_activities()) as prof:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        total = time.perf_counter() - start
    by_name = {event.key: getattr(event, field) / 1e3 / steps for event in prof.key_averages()}  # microseconds in total -> ms per step
    parts = {part: by_name.get(part, 0.0) for part in STEP_PARTS}
    parts.update({part: by_name.get(f"switch/{part}", 0.0) for part in SWITCH_PARTS})
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
    built = {
        (case, name): build_trainer(model_path, ds_path, seq_len, workdir / f"run-{case}-{name}")
        for case, models in files.items()
        for name, (model_path, ds_path, seq_len) in models.items()
    }
    device = distributed.device()
    wall = {key: float("inf") for key in built}
    cpu = dict(wall)  # process CPU time per step, on the CPU
    for _ in range(opts.rounds):
        for key, (_, step) in built.items():
            # barriers around the timed steps so the slowest rank sets the time; on a GPU synchronized first
            timed = time_steps(step, opts.steps, opts.warmup, device, barrier=dist.barrier)
            wall[key] = min(wall[key], timed.wall_s)
            cpu[key] = min(cpu[key], timed.process_cpu_s)
    result = {
        "step_ms": {case: {name: wall[case, name] * 1e3 for name in models} for case, models in files.items()},
    }
    if not on_cuda(device):  # a GPU's kernels are not in the process's CPU time
        result["cpu_ms"] = {case: {name: cpu[case, name] * 1e3 for name in models} for case, models in files.items()}
    if opts.profile:
        engines = [engine for engine, _ in built.values()]
        label_step_parts(engines)
        result["profile"] = {
            case: {name: profile_steps(built[case, name][1], opts.steps, device) for name in models} for case, models in files.items()
        }
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


def by_case(results, field):
    """{world size: launch result} -> {case: {ranks (str): {model: value}}} of one result field."""
    out = {}
    for world_size, result in results.items():
        for case, models in result.get(field, {}).items():
            out.setdefault(case, {})[str(world_size)] = models
    return out


def ratios_of(step_ms, cpu_ms):
    """Per case, ranks and Switch model: its step time / dense step time (wall clock, the slowest rank's), and on one
    process dense / Switch process CPU time per step, which is the tokens/s ratio the machine's other load disturbs least."""
    ratios = {}
    for case, worlds in step_ms.items():
        for ranks, models in worlds.items():
            for name, ms in models.items():
                if name == "dense":
                    continue
                entry = {"step": ms / models["dense"], "tokens_per_s_wall": models["dense"] / ms}
                if ranks == "1" and case in cpu_ms:
                    cpu = cpu_ms[case]["1"]
                    entry["tokens_per_s_cpu"] = cpu["dense"] / cpu[name]
                ratios.setdefault(case, {}).setdefault(ranks, {})[name] = entry
    return ratios


def targets_of(ratios):
    """TARGETS, each with its measured value and whether it is met (None for both where it was not measured)."""
    rows = []
    for case, model, ranks, limit, measure in TARGETS:
        entry = ratios.get(case, {}).get(str(ranks), {}).get(model)
        if measure == "step ratio":
            value = None if entry is None else entry["step"]
            met = None if value is None else value <= limit
            goal = f"Switch step <= {limit}x dense"
        else:
            value = None if entry is None else entry.get("tokens_per_s_cpu", entry["tokens_per_s_wall"])
            met = None if value is None else value >= limit
            goal = f"Switch tokens/s >= {limit}x dense (process CPU time)"
        rows.append({"case": case, "model": model, "ranks": ranks, "goal": goal, "limit": limit, "value": value, "met": met})
    return rows


def print_report(report, opts):
    print(
        f"\nd_model {opts.d_model}, d_ff {4 * opts.d_model}, {opts.n_layers} layers (experts in every other), fp32, "
        f"best of {opts.rounds} rounds of {opts.steps} steps; Switch config extras: {json.dumps(opts.switch_config)}"
    )
    for case, worlds in report["step_ms"].items():
        shape = opts.cases[case]
        print(
            f"\n{case}: {shape.what}, seq {shape.seq_len} x micro-batch {shape.micro_batch} = {shape.seq_len * shape.micro_batch} tokens per micro-batch and rank"
        )
        print(f"{'model':12s} {'ranks':>5s} {'step ms':>9s} {'tokens/s':>10s} {'CPU ms':>9s}")
        for ranks, models in worlds.items():
            for name, ms in models.items():
                cpu = report["cpu_ms"].get(case, {}).get(ranks, {}).get(name) if ranks == "1" else None
                tokens = int(ranks) * shape.micro_batch * shape.seq_len
                print(f"{name:12s} {ranks:>5s} {ms:9.1f} {tokens / ms * 1e3:10.0f} " + (f"{cpu:9.1f}" if cpu is not None else f"{'':>9s}"))
    if "profile" in report:
        print(
            "\nprofile, rank 0, ms per step: forward + backward + optimizer + other = step; the Switch parts are inside the"
            " forward (all-to-all: both directions, so partly in the backward), by the Switch layer's labels (switch/*)"
        )
        columns = ["step", *STEP_PARTS, "other", *SWITCH_PARTS]
        print(f"{'case':14s} {'model':10s} {'ranks':>5s} " + " ".join(f"{c:>10s}" for c in columns))
        for case, worlds in report["profile"].items():
            for ranks, models in worlds.items():
                for name, parts in models.items():
                    values = {**parts, "other": parts["step"] - sum(parts[p] for p in STEP_PARTS)}
                    print(f"{case:14s} {name:10s} {ranks:>5s} " + " ".join(f"{values[c]:10.1f}" for c in columns))
    print("\nratios (switch step / dense step, same case and ranks; tokens/s: dense / switch, by process CPU time on one process):")
    for case, worlds in report["ratios"].items():
        for ranks, models in worlds.items():
            for name, entry in models.items():
                cpu = f", tokens/s {entry['tokens_per_s_cpu']:.3f} (cpu)" if "tokens_per_s_cpu" in entry else ""
                print(f"{case} {name} on {ranks} rank(s): step {entry['step']:.3f}{cpu}")
    print("\ntargets:")
    for row in report["targets"]:
        verdict = "not measured" if row["met"] is None else ("met" if row["met"] else "NOT MET")
        value = "-" if row["value"] is None else f"{row['value']:.3f}"
        print(f"{row['case']} {row['model']} on {row['ranks']} rank(s): {row['goal']}: {value} {verdict}")


def switch_config_arg(text):
    fields = json.loads(text)
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"--switch_config must be a JSON object of Switch model-config fields, got {text!r}")
    return fields


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument(
        "--switch_config",
        type=switch_config_arg,
        default={},
        help='JSON object of fields added to every Switch model config, e.g. \'{"dropless": true, "top_k": 2}\'',
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also break the step down with torch.profiler")
    p.add_argument("--timeout", type=int, default=3000, help="seconds for one world size's launch")
    p.add_argument("--smoke", action="store_true", help="1 round of 2 steps of E = 8 in the cases of SMOKE_SHAPES, at those shapes, profile included")
    # Set by the launcher for the ranks it starts.
    p.add_argument("--rank_inputs", dest="inputs", help=argparse.SUPPRESS)
    p.add_argument("--rank_result", dest="result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.cases = {name: CASES[name] for name in opts.cases}
    if opts.smoke:
        opts.experts, opts.steps, opts.warmup, opts.rounds, opts.profile = [8], 2, 1, 1, True
        opts.cases = {
            name: Case(*SMOKE_SHAPES[name], case.ds_config, case.ranks, case.what) for name, case in opts.cases.items() if name in SMOKE_SHAPES
        }
    return opts


def main():
    argv = sys.argv[1:]
    opts = parse(argv)
    if opts.inputs:
        return rank_main(opts)
    worlds = [w for w in opts.ranks if any(w in case.ranks for case in opts.cases.values())]
    with tempfile.TemporaryDirectory() as workdir:
        results = {world_size: run_world(opts, world_size, Path(workdir), argv) for world_size in worlds}
    report = {"step_ms": by_case(results, "step_ms"), "cpu_ms": by_case(results, "cpu_ms")}
    if opts.profile:
        report["profile"] = by_case(results, "profile")
    report["ratios"] = ratios_of(report["step_ms"], report["cpu_ms"])
    report["targets"] = targets_of(report["ratios"])
    report.update(smoke=opts.smoke, switch_config=opts.switch_config, experts=opts.experts, rounds=opts.rounds, steps=opts.steps)
    report["cases"] = {name: {"seq_len": c.seq_len, "micro_batch": c.micro_batch, "ds_config": c.ds_config} for name, c in opts.cases.items()}
    print_report(report, opts)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
