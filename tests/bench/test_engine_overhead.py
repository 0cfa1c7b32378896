"""bench/engine_overhead.py's plain PyTorch baseline runs on the engine's device (the smoke run is in test_smoke.py).

No GPU here: the test stands in for a GPU run by handing plain_loop the device "cuda" and recording, instead of
doing, what would need one (moving the model and the batches, the autocast region), so the loop itself runs on the CPU.
"""

import contextlib
from types import SimpleNamespace

import torch

from bench import engine_overhead


class RecordedModel(torch.nn.Module):
    """A tiny LM whose .to() records the device it is sent to (none is needed here)."""

    def __init__(self, moved_to):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 8)
        self.moved_to = moved_to

    def to(self, device):
        self.moved_to.append(device)
        return self

    def forward(self, inputs):
        return self.embed(inputs)


class ToyTask:
    seq_len = 4

    def __init__(self, moved_to):
        self.moved_to = moved_to

    def build_model(self):
        return RecordedModel(self.moved_to)

    def train_batch(self, consumed, micro, micro_batch_size, dp_rank, dp_size):
        return torch.arange(micro_batch_size * (self.seq_len + 1)).reshape(micro_batch_size, -1) % 8

    @staticmethod
    def inputs(batch):
        return batch[:, :-1]

    def loss(self, logits, batch):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 8), batch[:, 1:].reshape(-1)), {}


def test_plain_loop_builds_feeds_and_autocasts_on_the_engines_device(monkeypatch):
    moved, autocast_devices = [], []
    monkeypatch.setattr(engine_overhead, "to_device", lambda batch, target: moved.append(target) or batch)

    @contextlib.contextmanager
    def recorded_autocast(device_type, dtype, enabled):
        autocast_devices.append((device_type, dtype, enabled))
        yield

    monkeypatch.setattr(torch, "autocast", recorded_autocast)
    plan = SimpleNamespace(grad_accum_steps=2, micro_batch_size=2, train_batch_size=4)  # the LaunchPlan fields it reads
    cuda = torch.device("cuda")
    step = engine_overhead.plain_loop(ToyTask(moved), plan, lr=1e-3, precision="bf16", device=cuda)
    step()
    assert moved == [cuda, cuda, cuda]  # the model, then each micro-batch
    assert autocast_devices == [("cuda", torch.bfloat16, True)] * 2
