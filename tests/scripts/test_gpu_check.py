"""scripts/gpu_check.py: its CPU dry run end to end (the code path the GPU run takes, at tiny models), and the parts
a CPU cannot show by running: the micro-batch search's stop at out-of-memory, one failure not stopping the rest,
the file rewritten after every figure, bad arguments."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import deepspeed
import pytest
import torch

from tests.distributed import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()


def run_script(*args, code=None, returncode=0):
    """The script in a process of its own (it starts a process group and ends with os._exit); ``code`` runs first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a world of one of its own
    command = [sys.executable, str(SCRIPT), *args]
    if code:
        command = [
            sys.executable,
            "-c",
            f"{code}\nimport runpy, sys\nsys.argv = {[str(SCRIPT), *args]!r}\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')",
        ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == returncode, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_dry_run_measures_everything_and_records_what_the_cpu_cannot(tmp_path):
    out = tmp_path / "out" / "gpu_check.json"
    proc = run_script("--dry_run", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["finished"]
    env = report["environment"]
    assert (env["torch"], env["deepspeed"], env["gpu"]) == (torch.__version__, deepspeed.__version__, None)
    assert {"python", "cuda", "cudnn"} <= set(env)
    found = report["measurements"]
    assert list(found) == gpu_check.MEASUREMENTS

    for dtype in ("bfloat16", "float16"):  # every backend tried alone; the math one runs anywhere
        assert set(found["sdpa"][dtype]) == {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"}
        assert found["sdpa"][dtype]["MATH"] == "ok"

    bf16 = found["bf16_steps"]
    assert bf16["ok"] and bf16["precision"] == "bf16" and len(bf16["steps"]) == 2
    assert bf16["losses_finite"] and all(math.isfinite(step["loss"]) and step["loss"] > 0 for step in bf16["steps"])
    assert any("scaled_dot_product" in op for op in bf16["attention_in_training_step"]["ops"])  # the LM's attention, profiled

    # This CPU has no fp16: recorded as the measurement's error, and the measurements after it still ran.
    assert not found["fp16_steps"]["ok"] and "fp16" in found["fp16_steps"]["error"]

    for preset in gpu_check.MFU_PRESETS:
        mfu = found[f"mfu/{preset}"]
        assert mfu["ok"] and [size["micro_batch"] for size in mfu["sizes"]] == [1, 2], mfu
        assert mfu["stopped"] == "--max_micro_batch 2 reached"
        assert all(size["tokens_per_s"] > 0 and size["mfu"] is None for size in mfu["sizes"])  # no peak FLOP/s for a CPU
        assert mfu["best"] in mfu["sizes"] and mfu["flops_per_token"] > 0
    assert found["mfu/switch-base-8"]["model_config"] == "tiny-switch.json"  # the Switch preset's stand-in is a Switch model
    assert proc.stdout.rstrip().splitlines()[-1].startswith("gpu_check: 6 of 7 measurements ok; not: fp16_steps")


def test_fp16_steps_report_the_loss_scale(tmp_path):
    # This CPU has no mkldnn fp16 and DeepSpeed refuses it; the loss scaler's logic does not depend on the hardware,
    # so, as tests/pretrain/fp16_on_cpu.py does, only the capability query is patched, standing in for a GPU's answer.
    out = tmp_path / "gpu_check.json"
    patch = "from deepspeed.accelerator import get_accelerator\nget_accelerator().is_fp16_supported = lambda: True"
    run_script("--dry_run", "--only", "fp16_steps", "--out", str(out), code=patch)
    fp16 = json.loads(out.read_text())["measurements"]["fp16_steps"]
    assert fp16["ok"] and fp16["precision"] == "fp16"
    scales = [step["loss_scale"] for step in fp16["steps"]]
    assert len(scales) == 2 and all(0 < scale <= 2.0**16 for scale in scales)  # fp16_zero1.json starts at 2^16
    assert all("skipped_steps" in step for step in fp16["steps"])


def test_without_deepspeed_the_file_says_so_and_the_exit_is_1(tmp_path):
    # Stands in for the GPU machine before DeepSpeed has been carried there: its import fails.
    out = tmp_path / "gpu_check.json"
    proc = run_script("--dry_run", "--out", str(out), code="import sys\nsys.modules['deepspeed'] = None", returncode=1)
    report = json.loads(out.read_text())
    assert report["environment"]["deepspeed"] is None and report["environment"]["torch"] == torch.__version__
    assert report["error"].startswith("DeepSpeed is not importable here (ModuleNotFoundError") and report["measurements"] == {}
    assert proc.stderr.strip().splitlines()[-1] == f"error: {report['error']}"


class CountingReport:
    def __init__(self, deadline=float("inf")):
        self.deadline, self.writes = deadline, 0

    def write(self):
        self.writes += 1


def test_micro_batch_search_keeps_the_fastest_and_stops_at_out_of_memory():
    # Stands in for a GPU that runs out of memory at micro-batch 8: torch raises the same error there.
    tokens_per_s = {1: 100.0, 2: 180.0, 4: 170.0}

    def measure_size(micro_batch):
        if micro_batch == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"tokens_per_s": tokens_per_s[micro_batch]}

    entry, report = {}, CountingReport()
    gpu_check.search_micro_batches(measure_size, 128, entry, report)
    assert [size["micro_batch"] for size in entry["sizes"]] == [1, 2, 4, 8]
    assert entry["sizes"][-1] == {"micro_batch": 8, "error": "out of memory"}
    assert entry["stopped"] == "out of memory at micro-batch 8"
    assert entry["best"] == {"micro_batch": 2, "tokens_per_s": 180.0}
    assert report.writes == 3  # each size's figures in the file as soon as measured


def test_micro_batch_search_starts_nothing_after_the_deadline():
    entry = {}
    gpu_check.search_micro_batches(lambda micro_batch: {"tokens_per_s": 1.0}, 128, entry, CountingReport(deadline=time.monotonic() - 1))
    assert entry == {"sizes": [], "stopped": "--deadline_s passed before micro-batch 1"}


def test_a_failed_measurement_is_recorded_and_the_file_holds_each_figure(tmp_path):
    path = tmp_path / "check.json"
    report = gpu_check.Report(path, deadline=float("inf"), header={"environment": {}})
    seen_in_file = []

    def fails_after_a_figure(entry, report):
        entry["first"] = 1.5
        report.write()
        seen_in_file.append(json.loads(path.read_text())["measurements"]["broken"]["first"])
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    cpu = torch.device("cpu")
    report.measure("broken", fails_after_a_figure, cpu)
    report.measure("fine", lambda entry, report: entry.update(value=2), cpu)
    found = json.loads(path.read_text())["measurements"]
    assert seen_in_file == [1.5]
    assert found["broken"]["ok"] is False and found["broken"]["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert found["broken"]["first"] == 1.5  # what it measured before failing stays
    assert found["fine"]["ok"] and found["fine"]["value"] == 2


def test_a_measurement_after_the_deadline_is_skipped(tmp_path):
    report = gpu_check.Report(tmp_path / "check.json", deadline=time.monotonic() - 1, header={})
    entry = report.measure("late", lambda entry, report: pytest.fail("started after the deadline"), torch.device("cpu"))
    assert entry == {"ok": False, "skipped": "--deadline_s passed before it started"}


def test_an_unknown_measurement_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "x.json"), "--only", "mfu/gpt-2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only mfu/gpt-2: no such measurement; choose from sdpa,") and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()  # refused before anything ran
