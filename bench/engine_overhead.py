"""Engine overhead: Switchyard's training step (pretrain/main.py's build_engine + Trainer.take_step,
a DeepSpeed engine) against a plain PyTorch loop (torch.optim.AdamW, same model, weights, batches,
accumulation and clipping), measured in the same run on one process.

    python -m bench.engine_overhead                 # tiny and 125M-shape GPT, ZeRO-0/1, fp32/bf16
    python -m bench.engine_overhead --smoke         # a few steps of the tiny model (CI runs this)
    python -m bench.engine_overhead --profile       # + the top operators of each Switchyard step (torch.profiler)
    python -m bench.engine_overhead --phases        # + where each step's process CPU time goes, phase by phase

Prints a table, then the ratios (Switchyard tokens/s / plain tokens/s) last: by wall-clock time, and by
the process's CPU time (time.process_time), which other processes' load on a shared machine disturbs
far less than the wall clock (it still counts gloo's threads; both loops run in this one process). The 125M shape runs at
seq 128 and micro-batch 2 so a CPU finishes it (the tiny one at its own max_seq_len, 64); on a GPU pass --seq_len 2048 --micro_batch 8.

Both loops run on the engine's device (the plain model and its batches too, under torch.autocast of that
device's type). On a GPU the clocks are read after torch.cuda.synchronize, and only the wall-clock figures
are printed: the GPU's kernels are not in the process's CPU time (bench/device_timing.py). --profile then
ranks operators by their kernels' GPU time; --phases still reports host CPU time, the cost of launching the work.
"""

import argparse
import collections
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.device_timing import on_cuda, profiled_time_field, profiler_activities, synchronize, time_steps
from pretrain import distributed
from pretrain.main import build_engine, prepare
from pretrain.trainer import Trainer, to_device

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "tiny-gpt.json", "125m-shape": "gpt-125m.json"}
RECIPES = {
    "zero0-fp32": ("zero0.json", None),
    "zero1-fp32": ("zero1.json", None),
    "zero0-bf16": ("zero0.json", "bf16"),
    "zero1-bf16": ("zero1.json", "bf16"),
}


def ds_config_file(base, precision, micro_batch, accumulation, workdir):
    config = json.loads((REPO / "ds_configs" / base).read_text())
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulation)
    config.pop("train_batch_size", None)
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    path = Path(workdir) / f"{base}-{precision}.json"
    path.write_text(json.dumps(config))
    return path


def plain_loop(task, plan, lr, precision, device):
    """What a user would write without DeepSpeed: AdamW, accumulation, clipping, optional bf16 autocast, on the task's
    model (drawn from the global RNG as it is) moved to ``device``, each batch moved there as the Trainer moves it."""
    model = task.build_model().to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8
    )
    consumed = [0]

    def step():
        for micro in range(plan.grad_accum_steps):
            batch = to_device(task.train_batch(consumed[0], micro, plan.micro_batch_size, 0, 1), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = task.loss(model(task.inputs(batch)), batch)
            (loss / plan.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        consumed[0] += plan.train_batch_size

    step.model, step.optimizer = model, optimizer  # for --phases
    return step


def measure(model_name, recipe, opts, workdir):
    base, precision = RECIPES[recipe]
    ds = ds_config_file(base, precision, opts.micro_batch, opts.accumulation, workdir)
    model_config = REPO / "models" / "configs" / MODELS[model_name]
    seq_len = min(opts.seq_len, json.loads(model_config.read_text())["max_seq_len"])
    argv = [
        "--ds_config",
        str(ds),
        "--model_config",
        str(model_config),
        "--train_data",
        str(REPO / "data" / "tinyshakespeare.txt"),
        "--max_steps",
        "1",
        "--save_dir",
        str(Path(workdir) / "run"),
        "--seq_len",
        str(seq_len),
    ]
    args, model_config, ds_config, plan, task = prepare(argv)
    engine, _ = build_engine(args, model_config, ds_config, plan, task)
    trainer = Trainer(engine, task, plan, args, logger=None, flops_per_token=0)

    def switchyard_step():
        trainer.take_step()

    torch.manual_seed(args.seed)
    tokens = plan.train_batch_size * task.seq_len
    lr = ds_config["optimizer"]["params"]["lr"]
    plain_step = plain_loop(task, plan, lr, precision, engine.device)  # where the engine's model is: the same device is measured
    # tokens/s by wall clock, by process CPU time (None on a GPU: its kernels are not in the process's CPU time)
    best = {"plain": (0.0, 0.0), "switchyard": (0.0, 0.0)}
    for _ in range(opts.rounds):  # interleaved, best of each: both see the same machine load
        for name, step in (("plain", plain_step), ("switchyard", switchyard_step)):
            timed = time_steps(step, opts.steps, opts.warmup, engine.device)
            cpu = timed.cpu_s(engine.device)
            best[name] = (max(best[name][0], tokens / timed.wall_s), None if cpu is None else max(best[name][1], tokens / cpu))
    if opts.profile:
        print_profile(f"{model_name} {recipe}: Switchyard step", switchyard_step, opts.steps, engine.device)
        print_profile(f"{model_name} {recipe}: plain step", plain_step, opts.steps, engine.device)
    if opts.phases:
        print_phases(f"{model_name} {recipe}", engine, switchyard_step, plain_step, opts.steps)
    return best["plain"], best["switchyard"]


class PhaseClock:
    """Process CPU seconds spent inside wrapped functions, by phase name; unwraps on exit."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.names = []  # in the order wrapped, which is the order printed
        self.undo = contextlib.ExitStack()

    def wrap(self, owner, attr, name):
        original = getattr(owner, attr)
        self.names.append(name)
        had_own = attr in vars(owner) if hasattr(owner, "__dict__") else True

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.process_time() - start

        setattr(owner, attr, timed)
        self.undo.callback(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo.close()


def print_phases(title, engine, switchyard_step, plain_step, steps):
    """Process CPU ms per step in each phase of both loops; an indented phase runs inside the one above it."""
    import pretrain.trainer as trainer_module
    from switchyard.deepspeed_compat import engine_inner_phases

    rows = []
    with PhaseClock() as clock:
        in_backward, in_step = engine_inner_phases(engine)
        clock.wrap(engine, "forward", "forward")
        clock.wrap(engine, "backward", "engine.backward")
        for owner, attribute, name in in_backward:
            clock.wrap(owner, attribute, "  " + name)
        clock.wrap(trainer_module, "grad_norm", "Switchyard grad_norm")
        clock.wrap(engine, "step", "engine.step")
        for owner, attribute, name in in_step:
            clock.wrap(owner, attribute, "  " + name)
        total = time_steps(switchyard_step, steps, 0, engine.device).process_cpu_s
        rows.append(("Switchyard", total, [(n, clock.seconds[n]) for n in clock.names if n in clock.seconds]))
    with PhaseClock() as clock:
        clock.wrap(plain_step.model, "forward", "forward")
        clock.wrap(torch.Tensor, "backward", "backward")
        clock.wrap(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_")
        clock.wrap(plain_step.optimizer, "step", "AdamW")
        total = time_steps(plain_step, steps, 0, engine.device).process_cpu_s
        rows.append(("plain", total, [(n, clock.seconds[n]) for n in clock.names if n in clock.seconds]))
    print(f"\n--- {title}: process CPU ms per step, {steps} steps")
    for name, total, seconds in rows:
        print(f"{name:12s} {total * 1000:10.1f}")
        for phase, value in seconds:
            print(f"  {phase:44s} {value / steps * 1000:10.1f}")


def print_profile(title, step, steps, device):
    """The operators that take the most time on ``device`` in `steps` steps, self time first (where the time really goes)."""
    from torch.profiler import profile

    with profile(activities=profiler_activities()) as prof:
        for _ in range(steps):
            step()
        synchronize(device)  # the last step's kernels inside the profile
    print(f"\n--- {title}, {steps} steps")
    print(prof.key_averages().table(sort_by="self_" + profiled_time_field(device), row_limit=15))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators for each case")
    p.add_argument("--phases", action="store_true", help="print the process CPU time of each phase of both steps")
    p.add_argument("--smoke", action="store_true", help="3 steps of the tiny model, ZeRO-0 fp32 only")
    opts = p.parse_args()
    if opts.smoke:
        opts.models, opts.recipes, opts.steps, opts.warmup, opts.rounds, opts.seq_len = ["tiny"], ["zero0-fp32"], 3, 1, 1, 64
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    distributed.init()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in opts.models:
            for recipe in opts.recipes:
                plain, ours = measure(model_name, recipe, opts, workdir)
                rows.append((model_name, recipe, plain, ours))
    if on_cuda(distributed.device()):  # process CPU time holds none of the GPU's work: wall clock of synchronized steps only
        print(f"\n{'':25s} {'wall clock (synchronized)':>29s}")
        print(f"{'model':12s} {'recipe':12s} {'plain tok/s':>12s} {'switchyard tok/s':>17s}")
        for model_name, recipe, plain, ours in rows:
            print(f"{model_name:12s} {recipe:12s} {plain[0]:12.1f} {ours[0]:17.1f}")
    else:
        print(f"\n{'':25s} {'wall clock':>29s} {'process CPU time':>29s}")
        print(f"{'model':12s} {'recipe':12s} {'plain tok/s':>12s} {'switchyard tok/s':>17s} {'plain tok/s':>12s} {'switchyard tok/s':>17s}")
        for model_name, recipe, plain, ours in rows:
            print(f"{model_name:12s} {recipe:12s} {plain[0]:12.1f} {ours[0]:17.1f} {plain[1]:12.1f} {ours[1]:17.1f}")
        print("\nratios by process CPU time (switchyard / plain PyTorch, target >= 0.95):")
        for model_name, recipe, plain, ours in rows:
            print(f"{model_name} {recipe} (cpu): {ours[1] / plain[1]:.3f}")
    print("\nratios by wall clock (switchyard / plain PyTorch, target >= 0.95):")
    for model_name, recipe, plain, ours in rows:
        print(f"{model_name} {recipe}: {ours[0] / plain[0]:.3f}")
    distributed.finish(0)


if __name__ == "__main__":
    main()
