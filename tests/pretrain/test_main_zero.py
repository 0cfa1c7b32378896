"""ZeRO stages 0-3: a 2-rank run sees the same global batches as a 1-rank run (the 1-rank run
accumulates 4 micro-batches, each of the 2 ranks 2), so their losses must agree.

Tolerance: the runs differ only in the order of floating-point sums (gradients reduced across
ranks vs. accumulated on one, ZeRO's flattened buffers). fp32 sums of ~1e5 terms differ in the
~1e-7 relative range; Adam's update divides by sqrt(v), which amplifies such differences in
near-zero gradients over steps. Measured here (2-core CPU, torch 2.13, DeepSpeed 0.19.8): the
worst relative gap over 6 steps is 9.1e-8 for every stage, offload included, most steps 0.0.
RTOL = 1e-5 is ~100x that and still far below a real bug (a wrong batch, a missing all-reduce or a
lost shard moves the loss by >1e-3 in the first steps).
"""

import json
from pathlib import Path

import pytest
import torch

from pretrain.main import prepare
from pretrain.run_dir import load_model
from tests.distributed import REPO, read_metrics, run_ranks, start_ranks, train_args, translation_args, wait_ranks

HERE = Path(__file__).resolve().parent

STEPS = 6
RTOL = 1e-5


@pytest.mark.parametrize("ds_config", ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"])
def test_two_ranks_match_one_rank(tmp_path, ds_config):
    losses = {}
    for world in (1, 2):
        save_dir = tmp_path / f"world{world}"
        run_ranks(train_args(tmp_path, ds_config, "tiny-gpt.json", STEPS, save_dir=save_dir), world, tmp_path / f"logs{world}")
        losses[world] = read_metrics(save_dir)
    assert sorted(losses[1]) == list(range(1, STEPS + 1))
    assert losses[1][1] > 5.0  # untrained byte-level model: ~ln(257)
    gaps = [abs(losses[1][s] - losses[2][s]) / abs(losses[1][s]) for s in range(1, STEPS + 1)]
    print(ds_config, "relative gaps per step", gaps)
    assert max(gaps) < RTOL, f"relative gaps per step {gaps}"
    assert losses[1][STEPS] < losses[1][1]  # it trains


# ------------------------------------------------------------------------------------------
# ZeRO-3 builds the model partitioned (pretrain/main.py: deepspeed.zero.Init), with a plain build's weights.


def built_weights(tmp_path, args, world=2):
    """{"state": the engine's weights gathered whole, "held": per rank, what it held right after the build}."""
    out = tmp_path / "built.pt"
    results = wait_ranks(start_ranks([out, *args], world, tmp_path / "built-logs", script=HERE / "built_weights.py"), tmp_path / "built-logs")
    assert [r.returncode for r in results] == [0] * world, results[0].output[-4000:]
    return torch.load(out, weights_only=True), results[0].output


def zero_config(tmp_path, name, **changes):
    config = json.loads((REPO / "ds_configs" / name).read_text())
    config.update(changes)
    path = tmp_path / f"ds-{len(list(tmp_path.glob('ds-*')))}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("model, precision", [("tiny-gpt.json", "fp32"), ("tiny-gpt.json", "bf16"), ("tiny-transformer.json", "fp32")])
def test_zero3_builds_the_plain_weights_partitioned(tmp_path, pair_data, model, precision):
    """Each of 2 ranks holds about half of the model right after it is built (without zero.Init: all of
    it), and the weights are bit-identical to a plain build from the same seed (cast as the engine casts)."""
    ds = zero_config(tmp_path, "zero3.json", **({"bf16": {"enabled": True}} if precision == "bf16" else {}))
    if model == "tiny-transformer.json":
        args = [str(a) for a in translation_args(tmp_path, pair_data, "zero3.json", model, 1)]
    else:
        args = [str(a) for a in train_args(tmp_path, "zero3.json", model, 1)]
    args[args.index("--ds_config") + 1] = str(ds)
    built, output = built_weights(tmp_path, args)
    assert "(ZeRO-3: partitioned while built, deepspeed.zero.Init)" in output
    assert f": {built['held'][0]['full']:,} parameters, " in output  # the whole model's count, not the partition's
    for held in built["held"]:
        assert held["partitioned"] == held["tensors"] > 10  # stage3_param_persistence_threshold 0: every tensor
        # 1/2 of each tensor, rounded up (DeepSpeed pads each to a multiple of the world size)
        assert held["full"] / 2 <= held["values"] <= held["full"] / 2 + held["tensors"], held

    args_, _, _, _, task = prepare(args)
    torch.manual_seed(args_.seed)
    plain = dict(task.build_model().named_parameters())
    state = built["state"]
    assert state.keys() == plain.keys() and sum(t.numel() for t in state.values()) == built["held"][0]["full"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert all(t.dtype == dtype for t in state.values())
    assert [name for name in state if not torch.equal(state[name], plain[name].detach().to(dtype))] == []


def test_zero0_builds_whole(tmp_path):
    built, output = built_weights(tmp_path, [str(a) for a in train_args(tmp_path, "zero0.json", "tiny-gpt.json", 1)])
    assert all(held["values"] == held["full"] and held["partitioned"] == 0 for held in built["held"])
    assert "rank 0 holds" in output and "100.0% of the model" in output


def test_zero3_distillation_student_starts_from_the_teacher(tmp_path):
    """The student, built partitioned, is gathered for the copy of the teacher's weights (pretrain/tasks/distill.py)."""
    teacher = tmp_path / "teacher"
    run_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 2, save_dir=teacher), 1, tmp_path / "teacher-logs")
    args = [str(a) for a in train_args(tmp_path, "zero3.json", "tiny-gpt.json", 1, "--task", "distill", "--teacher", teacher)]
    built, output = built_weights(tmp_path, args)
    assert "student initialized from teacher" in output and "(ZeRO-3: partitioned while built" in output
    expected = load_model(teacher)[0].state_dict()
    state = built["state"]
    assert state.keys() <= expected.keys()
    assert [name for name in state if not torch.equal(state[name], expected[name])] == []


def test_zero3_trains_as_zero0(tmp_path):
    """The same 2-rank run under ZeRO-0 and ZeRO-3 (built partitioned): the same losses within RTOL."""
    losses = {}
    for ds_config in ("zero0.json", "zero3.json"):
        save_dir = tmp_path / ds_config
        run_ranks(train_args(tmp_path, ds_config, "tiny-gpt.json", STEPS, save_dir=save_dir), 2, tmp_path / f"logs-{ds_config}")
        losses[ds_config] = read_metrics(save_dir)
    gaps = [abs(losses["zero0.json"][s] - losses["zero3.json"][s]) / abs(losses["zero0.json"][s]) for s in range(1, STEPS + 1)]
    print("zero0 vs zero3 relative gaps per step", gaps)
    assert max(gaps) < RTOL, f"relative gaps per step {gaps}"


def test_hpz_keeps_a_half_partition_per_pair_of_ranks_and_trains_as_zero3(tmp_path):
    """ZeRO++ hpZ (ds_configs/zero3_hpz.json, zero_hpz_partition_size 2) on 4 ranks: each rank holds its quarter
    of every tensor and, for the all-gathers within its pair, a second partition of half of it; the losses are
    plain ZeRO-3's (hpZ moves where the gathers come from, not the arithmetic). On 2 ranks it would degenerate."""
    built, _ = built_weights(tmp_path, [str(a) for a in train_args(tmp_path, "zero3_hpz.json", "tiny-gpt.json", 1)], world=4)
    for held in built["held"]:
        assert held["full"] / 4 <= held["values"] <= held["full"] / 4 + 3 * held["tensors"], held
        assert held["full"] / 2 <= held["secondary"] <= held["full"] / 2 + held["tensors"], held
    losses = {}
    for config in ("zero3.json", "zero3_hpz.json"):
        run = tmp_path / config
        run_ranks(train_args(tmp_path, config, "tiny-gpt.json", 4, save_dir=run), 4, tmp_path / f"logs-{config}")
        losses[config] = read_metrics(run)
    assert len(losses["zero3.json"]) == 4 and losses["zero3_hpz.json"] == pytest.approx(losses["zero3.json"], rel=1e-6)


def test_twin_flow_partial_offload_trains_as_full_offload(tmp_path):
    """ZeRO-Offload++ twin-flow (ds_configs/zero3_twinflow.json, offload_optimizer.ratio 0.3): DeepSpeed keeps the
    first 70% of each rank's optimizer sub-groups on the accelerator and steps the rest with its CPU Adam. On the CPU
    both halves are on the CPU, so it degenerates, but it is accepted and trains as full offload does, here with
    sub-groups small enough (20000 values) that each rank has several."""
    twin_flow = json.loads((REPO / "ds_configs" / "zero3_twinflow.json").read_text())
    assert twin_flow["zero_optimization"]["offload_optimizer"]["ratio"] < 1
    twin_flow["zero_optimization"]["sub_group_size"] = 20000
    (tmp_path / "twin_flow.json").write_text(json.dumps(twin_flow))
    losses = {}
    for config in ("zero3_offload.json", tmp_path / "twin_flow.json"):
        run = tmp_path / f"run-{Path(config).stem}"
        run_ranks(train_args(tmp_path, config, "tiny-gpt.json", 4, save_dir=run), 2, tmp_path / f"logs-{Path(config).stem}")
        losses[Path(config).stem] = read_metrics(run)
    assert len(losses["zero3_offload"]) == 4 and losses["twin_flow"] == pytest.approx(losses["zero3_offload"], rel=1e-6)


def async_io_problem():
    """Why DeepSpeed's async_io op (ZeRO-Infinity's NVMe swapping) cannot be built here, or None."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return None if AsyncIOBuilder().is_compatible(verbose=False) else "DeepSpeed's async_io op needs libaio: apt-get install libaio-dev"


# A GPT whose FFN matrices (256 x 4096) split into 2 MiB partitions per rank, above DeepSpeed's 1 MiB minimum for
# swapping (MIN_AIO_BYTES, aio.block_size); its other tensors' partitions are smaller and stay in host memory.
NVME_GPT = {"family": "gpt", "vocab_size": 320, "max_seq_len": 64, "d_model": 256, "n_layers": 1, "n_heads": 4, "d_ff": 4096}
MIB = 2**20


def nvme_config(tmp_path, swap):
    """ds_configs/zero3_nvme.json swapping into ``swap``, with swap buffers of 1M values (DeepSpeed's default is 100M)."""
    config = json.loads((REPO / "ds_configs" / "zero3_nvme.json").read_text())
    for key in ("offload_optimizer", "offload_param"):
        assert config["zero_optimization"][key]["device"] == "nvme"
        config["zero_optimization"][key]["nvme_path"] = str(swap)
    config["zero_optimization"]["offload_param"].update(buffer_size=MIB, buffer_count=4)
    path = tmp_path / "zero3_nvme.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.skipif(async_io_problem() is not None, reason=str(async_io_problem()))
def test_zero_infinity_puts_the_large_partitions_on_nvme_and_trains_as_zero3(tmp_path):
    """ZeRO-Infinity (ds_configs/zero3_nvme.json) on 2 ranks: each rank's partitions of at least 1 MiB live in swap
    files under nvme_path (DeepSpeed's final_location nvme, nothing of them in memory: offload_param.max_in_cpu 0, or
    DeepSpeed copies them back into host memory at initialize), the smaller ones in host
    memory; the optimizer states are swapped too; and the losses are ZeRO-3's without offload."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    # Built here, once, as tests/conftest.py builds the other ops: its JIT build (minutes on 2 cores) must not run
    # inside the ranks' time-out, where a rank killed mid-build would leave torch's build lock behind.
    AsyncIOBuilder().load(verbose=False)
    model = tmp_path / "nvme-gpt.json"
    model.write_text(json.dumps(NVME_GPT))
    swap = tmp_path / "swap"
    swap.mkdir()
    ds = nvme_config(tmp_path, swap)
    out = tmp_path / "placement.pt"
    args = [str(a) for a in train_args(tmp_path, ds, model, 1, save_dir=tmp_path / "placement-run")]
    results = wait_ranks(start_ranks([out, *args], 2, tmp_path / "placement-logs", script=HERE / "nvme_placement.py"), tmp_path / "placement-logs")
    assert [r.returncode for r in results] == [0, 0], results[0].output[-4000:]
    for rank, held in enumerate(torch.load(out, weights_only=False)):
        on_nvme = {name for name, p in held["placement"].items() if p["final_location"] == "OffloadDeviceEnum.nvme"}
        large = {name for name, p in held["placement"].items() if p["partition_bytes"] >= MIB}
        assert on_nvme == large == {"blocks.0.ffn.fc.weight", "blocks.0.ffn.proj.weight"}, held["placement"]
        # NOT_AVAILABLE: only the swap file holds it; what is left in memory is DeepSpeed's 1-value placeholder
        assert all(held["placement"][name]["status"] == "NOT_AVAILABLE" and held["placement"][name]["in_memory"] <= 1 for name in on_nvme)
        assert all(p["in_memory"] == p["partition_bytes"] // 4 for name, p in held["placement"].items() if name not in on_nvme)
        swapped = [f for f in held["files"] if f.startswith(f"zero_stage_3/float32params/rank{rank}/") and f.endswith(".swp")]
        assert len(swapped) == 2, held["files"]
        assert sum((swap / f).stat().st_size for f in swapped) >= 2 * 2 * MIB

    losses = {}
    for name, config in (("zero3", "zero3.json"), ("nvme", ds)):
        run = tmp_path / f"run-{name}"
        run_ranks(train_args(tmp_path, config, model, 3, save_dir=run), 2, tmp_path / f"logs-{name}")
        losses[name] = read_metrics(run)
    optimizer_files = [p for p in swap.rglob("*") if p.is_file() and "optimizer" in str(p.relative_to(swap))]
    assert len(optimizer_files) > 0, sorted(str(p) for p in swap.rglob("*"))
    assert len(losses["zero3"]) == 3 and losses["nvme"] == pytest.approx(losses["zero3"], rel=RTOL)
