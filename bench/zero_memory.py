"""Memory per ZeRO stage: peak memory per rank for ZeRO 0/1/2/3 on 2 real ranks, fp32 and bf16, next to
the ZeRO paper's model-state formula.

    python -m bench.zero_memory            # a 57M-parameter GPT (d_model 768, 8 layers), both precisions
    python -m bench.zero_memory --smoke    # a small GPT, ZeRO 0 and 3 in fp32 (CI runs this)
    python -m bench.zero_memory --checkpoint_activations 1   # every block's activations recomputed in the backward

What is measured: the resident set size (RSS) high-water mark of each rank process (VmHWM in
/proc/self/status), reset through /proc/self/clear_refs just before the model is built, minus the
RSS at that moment (Python, torch, DeepSpeed and the tokenized corpus). So the figure is what
building the engine and training a few steps adds: model states, activations, DeepSpeed's buffers.
"made" is the same high-water mark read right after the task has made the model (before
deepspeed.initialize), "built" right after build_engine (deepspeed.initialize done, no step yet).
ZeRO-3 makes the model partitioned (pretrain/main.py, deepspeed.zero.Init): no rank holds it whole.
glibc's malloc keeps freed heap pages, so the RSS marks also count fragmentation (MALLOC_MMAP_THRESHOLD_
fixes the threshold above which malloc maps and unmaps each allocation: it changes these figures).
RSS rather than torch's allocator statistics because torch keeps no statistics for CPU memory
(torch.cpu has no memory_allocated), and because RSS is what runs out: it also counts gloo's and
DeepSpeed's C++ buffers and pages malloc keeps after a free. On GPUs (one per rank) each rank also
reports torch.cuda.max_memory_allocated, reset at the same moment, at the same three points, in a
table of its own: there the model states live in GPU memory, and the host RSS is what stays on the host.
The ratios then compare the GPU figures with the formula (the CPU's, in BENCHMARKS.md, the RSS ones).

The formula (ZeRO paper, sec. 3.1 and fig. 1), Psi parameters, N = 2 data-parallel ranks:
  mixed precision (bf16): 2Psi weights + 2Psi gradients + K*Psi optimizer states, K = 12
      (fp32 master weights, Adam m and v);
  fp32: the same with 4Psi + 4Psi + K*Psi, K = 8 (Adam m and v; the weights are the master copy).
  ZeRO-0 keeps all of it; ZeRO-1 divides the optimizer states by N; ZeRO-2 also the gradients;
  ZeRO-3 also the weights. Activations and buffers are not in the formula.
Prints a table, then the ratios (measured / formula) last.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pretrain.local_ranks import start_ranks, wait_ranks

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
GIB = 2**30
# bytes per parameter: (weights, gradients, optimizer states K)
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 12)}


def model_state_bytes(params, precision, stage, world_size=WORLD_SIZE):
    """The ZeRO paper's model-state memory per rank."""
    weights, grads, optimizer = (b * params for b in STATE_BYTES[precision])
    if stage >= 1:
        optimizer /= world_size
    if stage >= 2:
        grads /= world_size
    if stage >= 3:
        weights /= world_size
    return weights + grads + optimizer


def ds_config(stage, precision, micro_batch):
    config = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1)
    config.pop("train_batch_size")
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


# ---------------------------------------------------------------- one rank


def rss_kib(field):
    """VmRSS (now) or VmHWM (high-water mark) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rank_main(opts):
    import torch
    import torch.distributed as dist

    from bench.device_timing import device_memory_bytes, reset_peak_memory, synchronize
    from pretrain import distributed
    from pretrain.main import build_engine, prepare
    from pretrain.trainer import Trainer
    from switchyard.deepspeed_compat import full_numel

    torch.set_num_threads(1)
    distributed.init()
    argv = [
        "--ds_config",
        opts.ds,
        "--model_config",
        opts.model,
        "--train_data",
        str(REPO / "data" / "tinyshakespeare.txt"),
        "--max_steps",
        "1",
        "--save_dir",
        str(Path(opts.result).parent / "run"),
        "--seq_len",
        str(opts.seq_len),
    ]
    args, model_config, ds, plan, task = prepare(argv)
    device = distributed.device()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_kib("VmRSS")
    reset_peak_memory(device)  # on a GPU the same marks of its allocator, next to the host's
    gpu_before = device_memory_bytes(device, peak=False)
    made, make = {}, task.build_model

    def make_and_measure():
        model = make()
        made["kib"], made["gpu"] = rss_kib("VmHWM"), device_memory_bytes(device)
        return model

    task.build_model = make_and_measure
    engine, _ = build_engine(args, model_config, ds, plan, task)
    built, gpu_built = rss_kib("VmHWM"), device_memory_bytes(device)
    trainer = Trainer(engine, task, plan, args, logger=None, flops_per_token=0)
    for _ in range(opts.steps):  # Adam's states appear at the first step; later steps show the steady peak
        trainer.take_step()
    synchronize(device)
    params = sum(full_numel(p) for p in engine.module.parameters())
    mine = {"before_kib": before, "made_kib": made["kib"], "built_kib": built, "peak_kib": rss_kib("VmHWM"), "params": params}
    mine.update(gpu_before=gpu_before, gpu_made=made["gpu"], gpu_built=gpu_built, gpu_peak=device_memory_bytes(device))  # bytes; None on CPU
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        out = Path(opts.result)
        out.with_suffix(".tmp").write_text(json.dumps(ranks))
        out.with_suffix(".tmp").rename(out)
    distributed.finish(0)


# ---------------------------------------------------------------- the launcher


def run_case(opts, stage, precision, workdir, argv):
    case = workdir / f"zero{stage}-{precision}"
    case.mkdir()
    model = case / "model.json"
    model.write_text(
        json.dumps(
            {
                "family": "gpt",
                "vocab_size": 320,
                "max_seq_len": opts.seq_len,
                "d_model": opts.d_model,
                "n_layers": opts.n_layers,
                "n_heads": opts.n_heads,
                "d_ff": 4 * opts.d_model,
                "checkpoint_activations": opts.checkpoint_activations,
            }
        )
    )
    ds = case / "ds.json"
    ds.write_text(json.dumps(ds_config(stage, precision, opts.micro_batch)))
    result = case / "result.json"
    procs = start_ranks(
        [*argv, "--rank_model", model, "--rank_ds", ds, "--rank_result", result], WORLD_SIZE, case / "logs", script=Path(__file__).resolve()
    )
    for rank in wait_ranks(procs, case / "logs", timeout=opts.timeout):
        if rank.returncode != 0:
            sys.exit(f"error: rank {rank.rank} of zero{stage} {precision} exited {rank.returncode}:\n{rank.output[-3000:]}")
    return json.loads(result.read_text())


def added_bytes(rank):
    """What building the engine and training added on a rank: in GPU memory where the rank had a GPU, else its RSS."""
    if rank["gpu_peak"] is not None:
        return rank["gpu_peak"] - rank["gpu_before"]
    return (rank["peak_kib"] - rank["before_kib"]) * 1024


def print_report(rows, opts):
    params = rows[0][2][0]["params"]
    print(
        f"\nGPT d_model {opts.d_model}, {opts.n_layers} layers, Psi = {params:,} parameters; {WORLD_SIZE} ranks, "
        f"micro-batch {opts.micro_batch}, seq {opts.seq_len}, {opts.steps} steps, checkpoint_activations {opts.checkpoint_activations}"
    )
    print("GiB per rank; added = RSS high-water mark - RSS before the model was built; formula = model states only")
    print(f"{'precision':9s} {'stage':>5s} {'formula':>8s} {'added r0':>9s} {'added r1':>9s} {'peak r0':>8s} {'peak r1':>8s} {'before r0':>10s}")
    for precision, stage, ranks in rows:
        formula = model_state_bytes(params, precision, stage) / GIB
        added = [(r["peak_kib"] - r["before_kib"]) * 1024 / GIB for r in ranks]
        peak = [r["peak_kib"] * 1024 / GIB for r in ranks]
        print(
            f"{precision:9s} {stage:5d} {formula:8.3f} {added[0]:9.3f} {added[1]:9.3f} {peak[0]:8.3f} {peak[1]:8.3f} "
            f"{ranks[0]['before_kib'] * 1024 / GIB:10.3f}"
        )
    print(
        "\nmade, built = the RSS high-water mark right after the task made the model / after build_engine "
        "(deepspeed.initialize done, no step yet) - RSS before; GiB per rank; 4Psi = the whole model in fp32"
    )
    print(f"{'stage':5s} {'precision':9s} {'4Psi':>8s} {'made r0':>8s} {'made r1':>8s} {'built r0':>9s} {'built r1':>9s}")
    for precision, stage, ranks in rows:
        made = [(r["made_kib"] - r["before_kib"]) * 1024 / GIB for r in ranks]
        built = [(r["built_kib"] - r["before_kib"]) * 1024 / GIB for r in ranks]
        print(f"zero{stage:<1d} {precision:9s} {4 * params / GIB:8.3f} {made[0]:8.3f} {made[1]:8.3f} {built[0]:9.3f} {built[1]:9.3f}")
    if rows[0][2][0]["gpu_peak"] is not None:
        print(
            "\nGPU memory (torch.cuda.max_memory_allocated, reset before the model was built), GiB per rank; "
            "added = peak - allocated before; made, built = the high-water mark at those points"
        )
        print(f"{'precision':9s} {'stage':>5s} {'formula':>8s} {'added r0':>9s} {'added r1':>9s} {'made r0':>8s} {'built r0':>9s}")
        for precision, stage, ranks in rows:
            formula = model_state_bytes(params, precision, stage) / GIB
            added = [(r["gpu_peak"] - r["gpu_before"]) / GIB for r in ranks]
            print(
                f"{precision:9s} {stage:5d} {formula:8.3f} {added[0]:9.3f} {added[1]:9.3f} "
                f"{(ranks[0]['gpu_made'] - ranks[0]['gpu_before']) / GIB:8.3f} {(ranks[0]['gpu_built'] - ranks[0]['gpu_before']) / GIB:9.3f}"
            )
    print("\nratios (added memory, the larger rank / formula; and each stage / ZeRO-0 of the same precision, measured vs formula):")
    zero0 = {}
    for precision, stage, ranks in rows:
        added = max(added_bytes(r) for r in ranks)
        formula = model_state_bytes(params, precision, stage)
        zero0.setdefault(precision, (added, formula))
        measured_saving = added / zero0[precision][0]
        formula_saving = formula / zero0[precision][1]
        print(f"{precision} zero{stage}: {added / formula:.3f} (vs zero0: measured {measured_saving:.3f}, formula {formula_saving:.3f})")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, nargs="+", choices=[0, 1, 2, 3], help="default: 0 1 2 3 (--smoke: 0 3)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(STATE_BYTES))
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--n_heads", type=int, default=12)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument(
        "--checkpoint_activations",
        type=int,
        default=0,
        help="the model's checkpoint_activations: 0 none, N every Nth block (models/checkpointing.py)",
    )
    p.add_argument("--timeout", type=int, default=1200, help="seconds for one launch")
    p.add_argument("--smoke", action="store_true", help="d_model 64, 2 layers, ZeRO 0 and 3 (or --stages), fp32, 1 step")
    # Set by the launcher for the ranks it starts.
    p.add_argument("--rank_model", dest="model", help=argparse.SUPPRESS)
    p.add_argument("--rank_ds", dest="ds", help=argparse.SUPPRESS)
    p.add_argument("--rank_result", dest="result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.stages, opts.precisions, opts.d_model, opts.n_heads, opts.n_layers, opts.seq_len, opts.steps = (
            opts.stages or [0, 3],
            ["fp32"],
            64,
            4,
            2,
            32,
            1,
        )
    opts.stages = opts.stages or [0, 1, 2, 3]
    return opts


def main():
    argv = sys.argv[1:]
    opts = parse(argv)
    if opts.model:
        return rank_main(opts)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [(precision, stage, run_case(opts, stage, precision, Path(workdir), argv)) for precision in opts.precisions for stage in opts.stages]
    print_report(rows, opts)


if __name__ == "__main__":
    main()
