"""pretrain/checkpoint.py: a save that finds the disk full says so in one line and leaves the previous checkpoint
intact (the disk is a real one: a small tmpfs mounted as the run directory); the random generators a resume
restores, the accelerator's included."""

import subprocess

import deepspeed.accelerator
import pytest
import torch

from pretrain.checkpoint import restore_rng_states, rng_states
from pretrain.run_dir import damage, safe_load
from tests.distributed import read_metrics, run_ranks, train_args


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB filesystem: room for one checkpoint of tiny-gpt (1.5 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, small_disk):
    run = small_disk / "run"
    results = run_ranks(
        train_args(tmp_path, "zero0.json", "tiny-gpt.json", 10, "--save_interval", 2, save_dir=run), 1, tmp_path / "logs", check=False
    )
    output = results[0].output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert results[0].returncode == 74 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank 0: no space left for checkpoint global_step4 in {run}")
    assert "the previous checkpoint global_step2 is intact" in errors[0]
    assert (run / "latest").read_text() == "global_step2" and damage(str(run), "global_step2") is None
    assert max(read_metrics(run)) == 4 and not (run / "run.lock").exists()


class GeneratorOfItsOwn:
    """Stands in for DeepSpeed's CUDA accelerator, whose generator (torch.cuda's, which draws dropout masks on a GPU)
    is not the CPU's: the same get/set_rng_state interface over a torch.Generator of its own."""

    def __init__(self, name="cuda"):
        self.name, self.generator = name, torch.Generator()

    def device_name(self, device_index=None):
        return self.name

    def get_rng_state(self, device_index=None):
        return self.generator.get_state()

    def set_rng_state(self, new_state, device_index=None):
        self.generator.set_state(new_state)


def draws(accelerator):
    return torch.rand(4), torch.rand(4, generator=accelerator.generator)


def test_a_resume_restores_the_accelerators_generator_too(tmp_path, monkeypatch):
    accelerator = GeneratorOfItsOwn()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    torch.manual_seed(1)
    accelerator.generator.manual_seed(2)
    draws(accelerator)  # some steps in
    torch.save(rng_states(), tmp_path / "rng_state_rank0.pt")
    expected = draws(accelerator)

    torch.manual_seed(1)  # a new process, seeded as a start is
    accelerator.generator.manual_seed(2)
    assert restore_rng_states(safe_load(tmp_path / "rng_state_rank0.pt")) is None
    cpu, device = draws(accelerator)
    assert torch.equal(cpu, expected[0]) and torch.equal(device, expected[1])

    cpu_saved = {"torch": torch.get_rng_state()}  # what a CPU run saves: no accelerator state
    notice = restore_rng_states(cpu_saved)
    assert notice == "notice: the checkpoint's cuda random state was saved without it: dropout continues from the seed, not bit-exactly"
    on_another = restore_rng_states({**rng_states(), "accelerator": {"device": "xpu", "state": torch.get_rng_state()}})
    assert on_another.startswith("notice: the checkpoint's cuda random state was saved on xpu:")


def test_a_cpu_checkpoint_holds_the_cpu_generator_only():
    """On the CPU the accelerator's generator is the CPU's: saved once, as before (checkpoints of earlier versions load)."""
    assert rng_states().keys() == {"torch"} and torch.equal(rng_states()["torch"], torch.get_rng_state())
    assert restore_rng_states({"torch": torch.get_rng_state()}) is None
