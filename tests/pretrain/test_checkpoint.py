"""A save that finds the disk full says so in one line and leaves the previous checkpoint intact
(pretrain/checkpoint.py). The disk is a real one: a small tmpfs mounted as the run directory."""

import subprocess

import pytest

from pretrain.run_dir import damage
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
