"""pretrain/main.py end to end with real ranks: Switch with expert parallelism, bf16, resume after a kill."""
import math
import time

import pytest

from tests.distributed import read_metrics, run_ranks, start_ranks, stop_ranks, train_args, wait_ranks

STEPS = 6


def test_switch_expert_parallel_two_ranks_match_one_rank(tmp_path):
    """EP=2 on 2 ranks splits the 4 experts 2+2 and moves tokens by all-to-all; the 1-rank run holds all
    4. Expert init is seeded by global expert index and capacity is per micro-batch, so the two runs
    compute the same function: losses agree to the tolerance of the ZeRO tests (see test_main_zero)."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    run_ranks(train_args(tmp_path, "zero2.json", "tiny-switch.json", STEPS, save_dir=one), 1, tmp_path / "l1")
    run_ranks(train_args(tmp_path, "moe_ep2_zero2.json", "tiny-switch.json", STEPS, save_dir=two), 2, tmp_path / "l2")
    loss1, loss2 = read_metrics(one), read_metrics(two)
    gaps = [abs(loss1[s] - loss2[s]) / loss1[s] for s in range(1, STEPS + 1)]
    print("switch ep2 vs ep1 relative gaps", gaps)
    assert max(gaps) < 1e-4, gaps
    assert loss2[STEPS] < loss2[1]
    aux = read_metrics(two, "train/aux_loss")
    assert all(0 < a < 0.1 for a in aux.values())  # 0.01 * N * sum f_i P_i, ~0.01 when balanced
    fractions = read_metrics(two, "moe/layer0/max_expert_fraction")
    dropped = read_metrics(two, "moe/layer0/dropped_fraction")
    assert all(0.25 <= f <= 1.0 for f in fractions.values())
    assert all(0.0 <= d < 1.0 for d in dropped.values())


def test_bf16_trains_on_cpu(tmp_path):
    run_ranks(train_args(tmp_path, "bf16_zero1.json", "tiny-gpt.json", STEPS), 2, tmp_path / "logs")
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1]


def test_resume_after_kill_is_bit_exact(tmp_path):
    """Kill a 2-rank run (SIGKILL) after its first checkpoint, resume, and compare with an uninterrupted
    run: in fp32 the losses after the resume must be bit-identical (data position, RNG with dropout on,
    optimizer and LR schedule all restored)."""
    model = "tiny-gpt-dropout.json"
    full = tmp_path / "full"
    run_ranks(train_args(tmp_path, "zero1.json", model, 20, save_dir=full), 2, tmp_path / "lf")

    killed = tmp_path / "killed"
    procs = start_ranks(train_args(tmp_path, "zero1.json", model, 1000, "--save_interval", 3, save_dir=killed), 2, tmp_path / "lk")
    deadline = time.monotonic() + 300
    while not (killed / "latest").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), "run ended before its first checkpoint"
        time.sleep(0.02)
    stop_ranks(procs)
    wait_ranks(procs, tmp_path / "lk")
    saved_step = int((killed / "latest").read_text().strip().removeprefix("global_step"))
    assert saved_step % 3 == 0 and saved_step + 3 <= 20

    run_ranks(train_args(tmp_path, "zero1.json", model, saved_step + 3, "--resume", save_dir=killed), 2, tmp_path / "lr")
    uninterrupted, resumed = read_metrics(full), read_metrics(killed)
    for step in range(saved_step + 1, saved_step + 4):
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])
