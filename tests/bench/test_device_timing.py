"""bench/device_timing.py: what the benchmarks measure on a GPU, checked on this CPU-only machine.

There is no GPU here, so torch's CUDA answers (torch.cuda.synchronize, is_available, the allocator's statistics)
are replaced by recorders: each test stands in for a GPU run and shows which calls the CUDA branch makes, and
that the CPU branch makes none of them.
"""

import time

import pytest
import torch
from torch.profiler import ProfilerActivity

from bench import device_timing

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def events(monkeypatch):
    """The order of steps and synchronizations: torch.cuda.synchronize replaced by a recorder."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("synchronize", device)))
    return log


def test_time_steps_synchronizes_before_each_clock_on_cuda(events):
    timed = device_timing.time_steps(lambda: events.append("step"), steps=2, warmup=1, device=CUDA, barrier=lambda: events.append("barrier"))
    # warm-up, then the queued work waited for (then the ranks) before the start and before the end is read
    assert events == ["step", ("synchronize", CUDA), "barrier", "step", "step", ("synchronize", CUDA), "barrier"]
    assert timed.wall_s >= 0
    assert timed.cpu_s(CUDA) is None  # a GPU's work is not in the process's CPU time: no such figure there


def test_time_steps_on_cpu_never_synchronizes_and_keeps_cpu_time(events):
    def busy():
        end = time.process_time() + 0.01
        while time.process_time() < end:
            pass

    timed = device_timing.time_steps(busy, steps=2, warmup=0, device=CPU)
    assert events == []
    assert timed.cpu_s(CPU) == timed.process_cpu_s >= 0.01


def test_memory_figures_come_from_the_cuda_allocator_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    device_timing.reset_peak_memory(CUDA)
    assert calls == [("reset", CUDA)]
    assert device_timing.device_memory_bytes(CUDA) == 3 << 30
    assert device_timing.device_memory_bytes(CUDA, peak=False) == 1 << 30
    device_timing.reset_peak_memory(CPU)
    assert calls == [("reset", CUDA)] and device_timing.device_memory_bytes(CPU) is None


def test_profiler_records_cuda_activity_when_a_gpu_is_there(monkeypatch):
    assert device_timing.profiler_activities() == [ProfilerActivity.CPU]  # this machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_timing.profiler_activities() == [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    assert device_timing.profiled_time_field(CUDA) == "device_time_total"
    assert device_timing.profiled_time_field(CPU) == "cpu_time_total"
