"""bench/switch_vs_dense.py's profile: a Switch layer's own labels (switch/<part>) are read when the step emits them,
else the labels the bench puts on DeepSpeed's MoE pieces (deepspeed/<part>); in one process, no ranks."""

import torch
from torch.profiler import record_function

from bench.switch_vs_dense import SWITCH_PARTS, profile_steps


def step_with(prefixes):
    """A step whose forward does a matmul inside "<prefix>router" for each prefix, one after the other."""

    def step():
        with record_function("forward"):
            x = torch.randn(64, 64)
            for prefix in prefixes:
                with record_function(f"{prefix}router"):
                    x = x @ x.T

    return step


def test_the_layers_own_labels_win_over_deepspeeds():
    parts = profile_steps(step_with(["switch/", "deepspeed/"]), 2, torch.device("cpu"))
    assert parts["labels"] == "switch"
    assert 0 < parts["router"] <= parts["forward"] <= parts["step"]
    assert all(parts[part] == 0 for part in SWITCH_PARTS if part != "router")


def test_deepspeeds_labels_without_the_layers_and_none_for_a_dense_step():
    parts = profile_steps(step_with(["deepspeed/"]), 2, torch.device("cpu"))
    assert parts["labels"] == "deepspeed" and parts["router"] > 0
    parts = profile_steps(step_with([]), 2, torch.device("cpu"))
    assert parts["labels"] is None and all(parts[part] == 0 for part in SWITCH_PARTS) and parts["forward"] > 0
