"""Test-only rank: pretrain/main.py's runs of several recipes, one after another in this one process, with the
host-device syncs Switchyard's own code makes while training counted, step by step; the counts into one file.

    python tests/pretrain/sync_counts.py OUT.json RECIPES.json   (RECIPES: name -> main.py arguments, run in order;
                                                                  started as one rank by tests/pretrain/test_syncs.py)

On a GPU a sync is the host waiting for the device. On this CPU suite there is no device to wait for, so what is
counted is what would wait on one (SyncCounter): the ops that give the host a tensor's value (``.item()``,
``float()``, ``bool()``, ``int()`` and ``math.isfinite`` of a tensor all dispatch ``aten._local_scalar_dense``;
``torch.equal``), the ops whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique``,
indexing by a boolean mask, ``repeat_interleave`` without an output size), and ``Tensor.tolist``, which reads a CPU
tensor's memory without dispatching any op (on a GPU it copies to the host first), so it is counted where it is
called.

Only Switchyard's own syncs count: each one is attributed to the innermost frame of the Python stack that is either
Switchyard's (pretrain/, models/, switchyard/) or DeepSpeed's, and counted when it is Switchyard's. So the syncs
DeepSpeed makes inside engine.forward/backward/step (its MoE gate, ZeRO's overflow check) are left out, while
Switchyard code running inside them (a model's forward) is still counted; pausing the count around whole engine
calls would hide the latter. Counting runs only inside Trainer.train, paused in what does not
run at every step or does not touch the device: validation and checkpoints (at their intervals and at the end, and
waiting for the device anyway) and building each micro-batch (tasks build batches on the CPU; to_device moves them).
"""

import contextlib
import json
import sys
import threading
from pathlib import Path

import deepspeed
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pretrain.main
from pretrain.trainer import StopSignals, Trainer

REPO = Path(__file__).resolve().parents[2]
SWITCHYARD = tuple(str(REPO / package) + "/" for package in ("pretrain", "models", "switchyard"))
DEEPSPEED = str(Path(deepspeed.__file__).resolve().parent) + "/"

aten = torch.ops.aten
SYNCING_OPS = {
    aten._local_scalar_dense.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


def indexes_by_mask(func, args):
    return func is aten.index.Tensor and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])


class SyncCounter(TorchDispatchMode):
    """Records (step, what, where) for each of Switchyard's syncs while on, on the thread that trains."""

    def __init__(self):
        super().__init__()
        self.syncs = []
        self.step = 0  # steps begun (Trainer.take_step calls): a log step's syncs land on the step they log
        self.paused = 0
        self.thread = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS or indexes_by_mask(func, args):
            self.record(str(func))
        return func(*args, **(kwargs or {}))

    def record(self, what):
        if self.paused or threading.get_ident() != self.thread:
            return
        frame = sys._getframe(1)
        while frame is not None:
            filename = str(Path(frame.f_code.co_filename).resolve())
            if filename.startswith(DEEPSPEED):
                return
            if filename.startswith(SWITCHYARD):
                self.syncs.append((self.step, what, f"{Path(filename).relative_to(REPO)}:{frame.f_lineno} {frame.f_code.co_name}"))
                return
            frame = frame.f_back  # torch, the standard library, other libraries, this file: who called them

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def install(counter):
    """Count inside Trainer.train, step by step, except where the module docstring says; Tensor.tolist counted."""
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.record("Tensor.tolist")
        return tolist(tensor)

    torch.Tensor.tolist = counted_tolist
    train, take_step, micro_batches = Trainer.train, Trainer.take_step, Trainer.micro_batches

    def counted_train(self):
        counter.paused = 0
        with counter:
            try:
                return train(self)
            finally:
                counter.paused = 1  # after the run: its end, the next recipe's set-up

    def counted_take_step(self):
        counter.step += 1
        return take_step(self)

    def batches_uncounted(self):
        batches = micro_batches(self)
        while True:
            with counter.pause():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    Trainer.train, Trainer.take_step, Trainer.micro_batches = counted_train, counted_take_step, batches_uncounted
    for name in ("validate", "save"):
        original = getattr(Trainer, name)

        def uncounted(self, *args, _original=original, **kwargs):
            with counter.pause():
                return _original(self, *args, **kwargs)

        setattr(Trainer, name, uncounted)


def main():
    out, recipes = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    counter = SyncCounter()
    counter.paused = 1
    install(counter)
    counts = {}
    for name, argv in recipes.items():
        counter.syncs, counter.step = [], 0
        outcome, watchdog = pretrain.main.run(*pretrain.main.prepare([str(a) for a in argv]), StopSignals())
        watchdog.stop()
        assert outcome == "done", outcome
        counts[name] = {"steps": counter.step, "syncs": counter.syncs}
    out.write_text(json.dumps(counts))
    from pretrain import distributed

    distributed.finish(0)


if __name__ == "__main__":
    main()
