"""What the benchmarks measure, on the device they run on: step times, peak memory and profiler activities.

On the CPU a step's work is done when its call returns, so the clocks are read straight after it and
the process's CPU time (time.process_time) is a figure of its own: other processes' load disturbs it
far less than the wall clock. On a GPU the kernels run asynchronously: a clock read when the call
returns measures how fast Python queued them, so every clock is read after torch.cuda.synchronize,
and process CPU time says nothing about the GPU's work (only the wall time of synchronized steps counts).
torch keeps no allocator statistics for CPU memory, so device memory figures exist on CUDA alone.
"""

import time
from dataclasses import dataclass

import torch


def on_cuda(device):
    """Whether ``device`` (a torch.device or its name) is a GPU, whose work is asynchronous."""
    return torch.device(device).type == "cuda"


def synchronize(device):
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if on_cuda(device):
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StepTime:
    wall_s: float  # per step, the device's queued work included
    process_cpu_s: float  # per step: this process's CPU time, a device figure on the CPU only (see cpu_s)

    def cpu_s(self, device):
        """Process CPU seconds per step where they measure the step's work (the CPU), else None (a GPU's work is not in them)."""
        return None if on_cuda(device) else self.process_cpu_s


def time_steps(step, steps, warmup, device, barrier=None):
    """StepTime of ``steps`` calls of ``step`` after ``warmup`` untimed ones; the device is synchronized (and then
    ``barrier`` called, so the slowest rank sets the time) before each clock is read."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if barrier:
        barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    if barrier:
        barrier()
    return StepTime((time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps)


def reset_peak_memory(device):
    """Start a new high-water mark of the device's allocated memory (CUDA only: see the module's docstring)."""
    if on_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def device_memory_bytes(device, peak=True):
    """Bytes torch's allocator holds for tensors on ``device``: the high-water mark since reset_peak_memory (``peak``)
    or now; None on the CPU."""
    if not on_cuda(device):
        return None
    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


def profiler_activities():
    """torch.profiler activities: the CPU's, and the GPU's kernels when there is a GPU."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]


def profiled_time_field(device):
    """The profiler's per-event total that measures work on ``device``: its kernels' time on a GPU, CPU time on the CPU
    (microseconds; "self_" + it is the same without children's time)."""
    return "device_time_total" if on_cuda(device) else "cpu_time_total"
