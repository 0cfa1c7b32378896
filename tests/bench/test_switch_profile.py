"""bench/switch_vs_dense.py's profile reads the Switch layer's own labels (switch/<part>); in one process, no ranks."""

import torch
from torch.profiler import record_function

from bench.switch_vs_dense import SWITCH_PARTS, profile_steps


def step_with(labels):
    """A step whose forward does a matmul inside each of ``labels``, one after the other."""

    def step():
        with record_function("forward"):
            x = torch.randn(64, 64)
            for name in labels:
                with record_function(name):
                    x = x @ x.T

    return step


def test_the_switch_layers_labels_are_read_and_others_are_not():
    parts = profile_steps(step_with(["switch/router", "deepspeed/experts"]), 2, torch.device("cpu"))
    assert 0 < parts["router"] <= parts["forward"] <= parts["step"]
    assert all(parts[part] == 0 for part in SWITCH_PARTS if part != "router")


def test_a_dense_step_has_no_switch_parts():
    parts = profile_steps(step_with([]), 2, torch.device("cpu"))
    assert all(parts[part] == 0 for part in SWITCH_PARTS) and parts["forward"] > 0
