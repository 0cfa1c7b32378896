"""pretrain/trainer.py: helpers that need no ranks, fp32-without-ZeRO's own optimizer step on a stand-in engine, and
when a stop signal is acted on (real ranks)."""

import contextlib
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

from pretrain.trainer import Trainer, to_device
from tests.distributed import read_metrics, start_ranks, stop_ranks, train_args, wait_ranks


def test_to_device_moves_every_tensor_of_a_nested_batch_and_keeps_its_shape():
    # "meta" stands in for a GPU: moving there changes the device and nothing else.
    batch = {"src": torch.ones(2, 3, dtype=torch.long), "lengths": (torch.tensor([3, 2]), [torch.zeros(1)]), "name": "b0"}
    moved = to_device(batch, torch.device("meta"))
    assert moved["src"].device.type == "meta" and moved["src"].shape == (2, 3) and moved["src"].dtype == torch.long
    assert isinstance(moved["lengths"], tuple) and isinstance(moved["lengths"][1], list)
    assert moved["lengths"][0].device.type == "meta" and moved["lengths"][1][0].device.type == "meta"
    assert moved["name"] == "b0" and batch["src"].device.type == "cpu"  # the original is left as it was


class StandInEngine:
    """What Trainer.own_step uses of a DeepSpeed engine in fp32 without ZeRO: its module, clipping, step, zero_grad;
    ``stepped`` records the clipping the engine's step would have applied itself."""

    def __init__(self, module, max_norm):
        self.module, self.device = module, torch.device("cpu")
        self._config = SimpleNamespace(gradient_clipping=max_norm)
        self.stepped = []

    def gradient_clipping(self):
        return self._config.gradient_clipping

    def step(self):
        self.stepped.append(self._config.gradient_clipping)

    def zero_grad(self):
        for p in self.module.parameters():
            p.grad = None


def own_step_on(grads, max_norm):
    """Trainer.own_step on a module with these gradients; returns (the gradients after it, the engine, the trainer)."""
    module = torch.nn.Linear(grads[0].shape[1], grads[0].shape[0])
    for p, g in zip(module.parameters(), grads):
        p.grad = g.clone()
    trainer = Trainer.__new__(Trainer)  # only what own_step reads
    trainer.engine, trainer.plan = StandInEngine(module, max_norm), SimpleNamespace(expert_parallel_size=1)
    trainer.clips_itself, trainer.own_skipped_steps = True, 0
    trainer.own_step()
    return [p.grad for p in module.parameters()], trainer.engine, trainer


def gradients(scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 7, generator=generator) * scale, torch.randn(5, generator=generator) * scale]


def test_own_step_clips_exactly_as_the_host_read_norm_did():
    """The clip factor, kept on the device, is the float32 cast of the Python double max / (norm + 1e-6) that the
    trainer computed from the norm read to the host (and torch cast to multiply float32 gradients): the clipped
    gradients are the same bits. Gradients of norm about 6-130 against a max of 1, 20 draws (a float32 factor computed on
    the device differs in some of them)."""
    for seed in range(20):
        grads = gradients(scale=1.0 + seed, seed=seed)
        after, engine, trainer = own_step_on(grads, max_norm=1.0)
        norm = float(trainer.own_grad_norm)  # grad_norm's value, as the trainer read it to the host before
        assert norm > 1.0
        expected = [g.clone() for g in grads]
        torch._foreach_mul_(expected, 1.0 / (norm + 1e-6))  # the host's factor, as before
        assert all(torch.equal(a, e) for a, e in zip(after, expected)), seed
        assert engine.stepped == [0.0]  # DeepSpeed's own clipping off for the step: it would compute the norm again
        assert trainer.own_grad_norm.shape == () and trainer.own_grad_norm.dtype == torch.float32


def test_own_step_leaves_gradients_under_the_limit_untouched():
    grads = gradients(scale=1e-3, seed=0)
    after, engine, _ = own_step_on(grads, max_norm=1.0)
    assert all(torch.equal(a, g) for a, g in zip(after, grads)) and engine.stepped == [0.0]


def test_own_step_without_clipping_still_skips_a_non_finite_step():
    grads = gradients(scale=1.0, seed=1)
    grads[1][2] = float("nan")
    after, engine, trainer = own_step_on(grads, max_norm=0.0)
    assert after == [None, None] and trainer.own_skipped_steps == 1  # gradients dropped: the optimizer moves nothing
    assert engine.stepped == [0.0]


def logged_step_4(run):
    return (run / "metrics.jsonl").exists() and max(read_metrics(run), default=0) >= 4


def saved_step_3(run):
    return (run / "global_step3").is_dir()  # renamed from .partial once complete


@pytest.mark.parametrize(
    "intervals,reached,period",
    [
        (("--log_interval", 4), logged_step_4, 4),  # agreed in the log step's all-reduce
        (("--log_interval", 1000, "--save_interval", 3), saved_step_3, 3),  # and at a checkpoint step
    ],
)
def test_a_stop_signal_lands_at_the_next_log_or_checkpoint_step(tmp_path, intervals, reached, period):
    """Ranks agree on a stop signal only at log, validation and checkpoint steps (not at every step, where it would
    wait for the GPU): SIGUSR1 once step 4 is logged (or checkpoint 3 saved) stops the run at a later such step."""
    run = tmp_path / "run"
    procs = start_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 1000, *intervals, save_dir=run), 1, tmp_path / "logs")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop_ranks, procs)
        deadline = time.monotonic() + 300
        while not reached(run):
            assert time.monotonic() < deadline and procs[0][0].poll() is None, f"the run ended or hung before {reached.__name__}"
            time.sleep(0.05)
        os.kill(procs[0][0].pid, signal.SIGUSR1)
        (result,) = wait_ranks(procs, tmp_path / "logs")
    assert result.returncode == 75, result.output[-3000:]
    saved = int((run / "latest").read_text().removeprefix("global_step"))
    assert saved > period and saved % period == 0, result.output[-3000:]
    assert f"stop signal (SIGUSR1) at step {saved}" in result.output
