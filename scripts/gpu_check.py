"""GPU check: what only a GPU shows about Switchyard, in one command sized for about five minutes on one GPU.

    PYTHONPATH=. python scripts/gpu_check.py --out $OUT/gpu_check.json  # on the GPU, from a copy of the tree (BENCHMARKS.md)
    python scripts/gpu_check.py --dry_run --out /tmp/gpu_check.json  # the same code path on the CPU: tiny models, no MFU
    python scripts/gpu_check.py --out ... --only mfu/gpt-1.3b         # some measurements only (a rerun of what a cut-short run missed)

Measurements, in this order, each in its own try, so one that fails (fp16 unsupported, out of memory) is
recorded with its error and the others still run:
  sdpa             causal attention at the LM's shape with only one SDPA backend allowed at a time (flash,
                   memory-efficient, cuDNN, math), forward and backward, in bf16 and fp16: which of them work;
  bf16_steps       a few training steps of gpt-125m with ds_configs/bf16_zero1.json as shipped: losses, step times,
                   peak GPU memory, and the attention kernels the profiler saw in one more step (the kernel SDPA
                   chose for the LM's causal attention in training);
  fp16_steps       the same with ds_configs/fp16_zero1.json, and the loss scale and skipped steps after each step;
  mfu/PRESET       for gpt-125m, gpt-350m, a Switch preset (switch-base-8) and gpt-1.3b at their max_seq_len, bf16,
                   ZeRO-1, no accumulation: tokens/s, MFU and peak GPU memory at micro-batch 1, 2, 4, ... up to
                   --max_micro_batch, stopping at the first that runs out of memory; the best of them.
Everything goes through the project's own training path: pretrain/main.py's prepare and build_engine, then
pretrain/trainer.Trainer.take_step, as a user's run does. MFU = training FLOPs per token (the model's own count,
as the trainer logs it) x tokens/s / the GPU's dense bf16 peak (pretrain/peak_flops.py; none for an unknown GPU).
Clocks are read after torch.cuda.synchronize (bench/device_timing.py).

The JSON file (--out) is rewritten after every figure (atomically), so a run cut short keeps what it measured;
it starts with the versions of Python, torch, CUDA, cuDNN and DeepSpeed and the GPU's name. Nothing is installed
and nothing is fetched; the process group is on the loopback interface (one rank). --deadline_s skips what
would start after it, recorded as skipped. The exit code is 0 when the check ran to its end, whatever it
found (the file says that); 1 when DeepSpeed cannot be imported (the file says why); 2 for bad arguments.

Each preset builds one engine; the micro-batch search feeds it batches of each size through a Trainer whose
plan says that size, after engine.set_train_micro_batch_size (at gradient accumulation 1 DeepSpeed's micro-batch
setting is bookkeeping): rebuilding gpt-1.3b for every size would spend most of the check's time on builds.
"""

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.device_timing import device_memory_bytes, on_cuda, profiler_activities, reset_peak_memory, synchronize, time_steps
from switchyard.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
CONFIGS = REPO / "models" / "configs"
GIB = 2**30
STEPS_PRESET = "gpt-125m"  # the bf16 and fp16 steps, and the attention shape of the sdpa check
MFU_PRESETS = ["gpt-125m", "gpt-350m", "switch-base-8", "gpt-1.3b"]  # smallest first: a cut-short run keeps the most
DRY_RUN_PRESETS = {"gpt-125m": "tiny-gpt", "gpt-350m": "tiny-gpt", "switch-base-8": "tiny-switch", "gpt-1.3b": "tiny-gpt"}
MEASUREMENTS = ["sdpa", "bf16_steps", "fp16_steps", *(f"mfu/{preset}" for preset in MFU_PRESETS)]
ATTENTION_NAME = re.compile(r"attention|attn|flash|fmha|sdpa", re.IGNORECASE)


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def first_line(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


class Report:
    """The check's JSON file, rewritten whole (through a temporary file and a rename) after every figure."""

    def __init__(self, path, deadline, header):
        self.path, self.deadline = Path(path), deadline
        self.data = {**header, "started": now(), "finished": None, "measurements": {}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self):
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(temporary, self.path)

    def measure(self, name, measurement, device):
        """Run ``measurement(entry, report)``, which fills ``entry`` (in the file from the start, so a figure it puts there
        and saves with report.write() stays even if it fails later); a failure is recorded in it and the check goes on."""
        entry = self.data["measurements"][name] = {}
        if time.monotonic() > self.deadline:
            entry.update(ok=False, skipped="--deadline_s passed before it started")
            self.write()
            return entry
        if on_cuda(device):  # what earlier measurements left allocated, if anything: it would shrink this one's memory
            entry["gpu_allocated_at_start_gib"] = device_memory_bytes(device, peak=False) / GIB
        start = time.perf_counter()
        try:
            measurement(entry, self)
            entry["ok"] = True
        except Exception as error:  # recorded, and the next measurement runs
            entry.update(ok=False, error=first_line(error), traceback=traceback.format_exc().splitlines()[-12:])
        entry["seconds"] = round(time.perf_counter() - start, 2)
        free_device_memory(device)
        self.write()
        print(f"gpu_check: {name}: {'ok' if entry['ok'] else entry['error']} ({entry['seconds']} s)", flush=True)
        return entry


def free_device_memory(device):
    """Drop what the last measurement's engines left behind (their cycles), and give the cached blocks back."""
    gc.collect()
    if on_cuda(device):
        torch.cuda.empty_cache()


def environment():
    """Versions and the device, first in the file: what the figures were measured with."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception as error:  # recorded: without DeepSpeed only the sdpa check can run
        env["deepspeed"] = None
        env["deepspeed_error"] = first_line(error)
    if torch.cuda.is_available():
        from pretrain.peak_flops import peak_tflops

        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=props.total_memory / GIB,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
            peak_bf16_tflops=peak_tflops(torch.cuda.get_device_name(0), "bf16", tf32=False),
        )
    else:
        env["gpu"] = None
    return env


# ---------------------------------------------------------------- the training path


def preset_path(preset, dry_run):
    return CONFIGS / f"{DRY_RUN_PRESETS[preset] if dry_run else preset}.json"


def build(model_config, ds_config, steps, workdir, name, entry):
    """pretrain/main.py's prepare and build_engine on Tiny Shakespeare (bytes), and the Trainer a run would make;
    entry["build_s"] is how long that took (the first build on a GPU includes DeepSpeed's JIT build of FusedAdam)."""
    from pretrain.main import build_engine, prepare
    from pretrain.trainer import Trainer

    start = time.perf_counter()
    argv = ["--ds_config", str(ds_config), "--model_config", str(model_config), "--train_data", str(SHAKESPEARE)]
    argv += ["--max_steps", str(steps), "--save_dir", str(Path(workdir) / f"run-{name}")]
    args, model_config, ds, plan, task = prepare(argv)
    engine, flops = build_engine(args, model_config, ds, plan, task)
    entry["build_s"] = round(time.perf_counter() - start, 2)
    return engine, Trainer(engine, task, plan, args, logger=None, flops_per_token=flops)


def attention_events(prof):
    """Names of the attention operators (on the CPU) and kernels (on the GPU) in a profile: which SDPA kernel ran."""
    from torch.autograd import DeviceType

    found = {"ops": set(), "kernels": set()}
    for event in prof.key_averages():
        if ATTENTION_NAME.search(event.key):
            found["kernels" if event.device_type == DeviceType.CUDA else "ops"].add(event.key)
    return {kind: sorted(names) for kind, names in found.items()}


def precision_steps(ds_name, opts, device, workdir, entry, report):
    """A few steps of the STEPS_PRESET with a shipped DeepSpeed config: losses, loss scale (fp16), memory, attention kernels."""
    from torch.profiler import profile

    from switchyard import deepspeed_compat

    model_config = preset_path(STEPS_PRESET, opts.dry_run)
    entry.update(model_config=model_config.name, ds_config=ds_name)
    engine, trainer = build(model_config, REPO / "ds_configs" / ds_name, opts.steps + 1, workdir, ds_name, entry)
    plan = trainer.plan
    entry.update(precision=plan.precision, seq_len=trainer.task.seq_len, micro_batch=plan.micro_batch_size, accumulation=plan.grad_accum_steps)
    reset_peak_memory(device)
    entry["steps"] = []
    for _ in range(opts.steps):
        start = time.perf_counter()
        lm_sum, aux_sum, _ = trainer.take_step()
        loss = float(lm_sum + aux_sum) / plan.grad_accum_steps  # a sum over micro-batches, as the trainer logs it
        synchronize(device)
        step = {"loss": loss, "seconds": round(time.perf_counter() - start, 4), "skipped_steps": trainer.skipped_steps()}
        if plan.precision == "fp16":
            step["loss_scale"] = deepspeed_compat.loss_scale(engine)
        entry["steps"].append(step)
        entry["losses_finite"] = all(math.isfinite(s["loss"]) for s in entry["steps"])
        entry["peak_gpu_memory_gib"] = gib(device_memory_bytes(device))
        report.write()
    with profile(activities=profiler_activities()) as prof:
        trainer.take_step()
        synchronize(device)
    entry["attention_in_training_step"] = attention_events(prof)


def gib(nbytes):
    return None if nbytes is None else nbytes / GIB


def mfu_search(preset, opts, device, workdir, entry, report):
    """tokens/s and MFU of ``preset`` in bf16 at each micro-batch size, up to the first out-of-memory one."""
    from pretrain.peak_flops import peak_tflops
    from pretrain.trainer import Trainer

    model_config = preset_path(preset, opts.dry_run)
    ds = json.loads((REPO / "ds_configs" / "bf16_zero1.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    ds.pop("train_batch_size")
    ds_path = Path(workdir) / f"mfu-{preset}.json"
    ds_path.write_text(json.dumps(ds))
    engine, trainer = build(model_config, ds_path, 1, workdir, f"mfu-{preset}", entry)
    seq_len, flops = trainer.task.seq_len, trainer.flops_per_token
    peak = peak_tflops(torch.cuda.get_device_name(), "bf16", tf32=False) if on_cuda(device) else None
    entry.update(model_config=model_config.name, seq_len=seq_len, flops_per_token=flops, peak_tflops=peak)

    def measure_size(micro_batch):
        engine.set_train_micro_batch_size(micro_batch)
        plan = dataclasses.replace(trainer.plan, micro_batch_size=micro_batch, train_batch_size=micro_batch)
        sized = Trainer(engine, trainer.task, plan, trainer.args, logger=None, flops_per_token=flops)
        reset_peak_memory(device)
        timed = time_steps(sized.take_step, opts.timed_steps, opts.warmup_steps, device)
        tokens_per_s = micro_batch * seq_len / timed.wall_s
        mfu = flops * tokens_per_s / (peak * 1e12) if peak else None
        return {"step_s": timed.wall_s, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_gpu_memory_gib": gib(device_memory_bytes(device))}

    search_micro_batches(measure_size, opts.max_micro_batch, entry, report)


def search_micro_batches(measure_size, max_micro_batch, entry, report):
    """``measure_size(micro_batch)``'s figures for micro-batch 1, 2, 4, ... up to ``max_micro_batch``, each in
    entry["sizes"] (and the file) as soon as measured, the fastest in entry["best"]; stops at the first size that
    runs out of GPU memory, or at the report's deadline, saying which in entry["stopped"]."""
    entry["sizes"] = []
    micro_batch = 1
    while True:
        if micro_batch > max_micro_batch:
            entry["stopped"] = f"--max_micro_batch {max_micro_batch} reached"
            return
        if time.monotonic() > report.deadline:
            entry["stopped"] = f"--deadline_s passed before micro-batch {micro_batch}"
            return
        try:
            size = {"micro_batch": micro_batch, **measure_size(micro_batch)}
        except torch.cuda.OutOfMemoryError:  # the search's end: every larger size needs more
            entry["sizes"].append({"micro_batch": micro_batch, "error": "out of memory"})
            entry["stopped"] = f"out of memory at micro-batch {micro_batch}"
            return
        entry["sizes"].append(size)
        entry["best"] = max((s for s in entry["sizes"] if "tokens_per_s" in s), key=lambda s: s["tokens_per_s"])
        report.write()
        micro_batch *= 2


def sdpa_backends(opts, device, entry, report):
    """Which SDPA backends run causal attention at the LM's shape, each allowed alone, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models import load_model_config

    config = load_model_config(preset_path(STEPS_PRESET, opts.dry_run))
    batch = 2 if opts.dry_run else 8
    shape = (batch, config.n_heads, config.max_seq_len, config.d_model // config.n_heads)
    entry["shape"] = list(shape)
    for dtype in (torch.bfloat16, torch.float16):
        works = entry[str(dtype).removeprefix("torch.")] = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            try:
                with sdpa_kernel([backend]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                synchronize(device)
                works[backend.name] = "ok"
            except RuntimeError as error:  # "no available kernel" and the like: that backend does not run here
                works[backend.name] = first_line(error)
            report.write()


# ---------------------------------------------------------------- the command


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON file to write (on the GPU machine: $OUT/gpu_check.json)")
    p.add_argument("--dry_run", action="store_true", help="on the CPU: tiny models, 2 steps, micro-batches 1 and 2, no MFU")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"measurements to run (default: all): {', '.join(MEASUREMENTS)}")
    p.add_argument("--steps", type=int, default=4, help="steps of bf16_steps and fp16_steps")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed steps at each micro-batch size of the MFU search")
    p.add_argument("--timed_steps", type=int, default=3, help="timed steps at each micro-batch size")
    p.add_argument("--max_micro_batch", type=int, default=128, help="the MFU search's largest micro-batch")
    p.add_argument("--deadline_s", type=float, default=480.0, help="seconds after which no further measurement or micro-batch starts")
    opts = p.parse_args(argv)
    unknown = sorted(set(opts.only or []) - set(MEASUREMENTS))
    if unknown:
        raise ConfigError(f"--only {' '.join(unknown)}: no such measurement; choose from {', '.join(MEASUREMENTS)}")
    for name in ("steps", "warmup_steps", "timed_steps", "max_micro_batch"):
        if getattr(opts, name) < (0 if name == "warmup_steps" else 1):
            raise ConfigError(f"--{name} {getattr(opts, name)} is too small; pass a positive number")
    if opts.dry_run:
        opts.steps, opts.warmup_steps, opts.timed_steps, opts.max_micro_batch = 2, 0, 1, 2
    return opts


def run_check(opts):
    started = time.monotonic()
    report = Report(opts.out, started + opts.deadline_s, {"argv": sys.argv[1:], "dry_run": opts.dry_run, "environment": environment()})
    if report.data["environment"]["deepspeed"] is None:  # every measurement but sdpa needs it, and the process group too
        report.data["error"] = f"DeepSpeed is not importable here ({report.data['environment']['deepspeed_error']}); see BENCHMARKS.md, GPU check"
        report.write()
        print(f"error: {report.data['error']}", file=sys.stderr)
        sys.exit(1)
    from pretrain import distributed

    distributed.init()  # one rank; MASTER_ADDR 127.0.0.1 (pretrain/distributed.py)
    device = distributed.device()
    report.data["device"] = str(device)
    chosen = opts.only or MEASUREMENTS
    with tempfile.TemporaryDirectory() as workdir:
        measurements = {
            "sdpa": functools.partial(sdpa_backends, opts, device),
            "bf16_steps": functools.partial(precision_steps, "bf16_zero1.json", opts, device, workdir),
            "fp16_steps": functools.partial(precision_steps, "fp16_zero1.json", opts, device, workdir),
            **{f"mfu/{preset}": functools.partial(mfu_search, preset, opts, device, workdir) for preset in MFU_PRESETS},
        }
        for name in MEASUREMENTS:
            if name in chosen:
                report.measure(name, measurements[name], device)
    report.data["finished"] = now()
    report.data["seconds"] = round(time.monotonic() - started, 1)
    report.write()
    failed = [name for name, entry in report.data["measurements"].items() if not entry["ok"]]
    print(f"gpu_check: {len(chosen) - len(failed)} of {len(chosen)} measurements ok{'; not: ' + ', '.join(failed) if failed else ''}; {opts.out}")
    distributed.finish(0)


def main(argv=None):
    try:
        opts = parse(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    run_check(opts)


if __name__ == "__main__":
    main()
