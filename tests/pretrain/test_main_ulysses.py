"""DeepSpeed-Ulysses through pretrain/main.py (ds_configs/ulysses2_zero1.json): 2 ranks, each holding half of every
sequence of the same samples, train as one rank on whole sequences; the checkpoint records the data- and
sequence-parallel sizes, and it resumes on 2 data-parallel ranks without sequence parallelism (the same 2 ZeRO
partitions) where the one-rank run goes on; at another partition count the resume is refused (DeepSpeed's universal
converter cannot read a sequence-parallel checkpoint).

tiny-gpt has learned positions: each rank adds the positions of its slice (models/ulysses.py). The data path is
the one under test here; tests/models/test_ulysses.py trains rotary grouped-query attention (tiny-llama)."""

import json

import pytest

from pretrain.ds_config import plan_resume
from pretrain.main import prepare
from pretrain.run_dir import MANIFEST, read_latest
from switchyard.errors import ConfigError
from tests.distributed import REPO, read_metrics, run_ranks, train_args

STEPS = 3
MODEL = "tiny-gpt.json"
RTOL = 1e-6  # measured: 1e-7 (the same sums, in another order where the two halves' gradients are added)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-rank run of STEPS + 1 steps; a 2-rank sequence-parallel run of STEPS, resumed on 2 data-parallel ranks
    for one more."""
    tmp = tmp_path_factory.mktemp("ulysses")
    whole, split = tmp / "whole", tmp / "split"
    every = ("--eval_interval", STEPS)  # validation at step STEPS in both
    run_ranks(train_args(tmp, "zero1.json", MODEL, STEPS + 1, *every, save_dir=whole), 1, tmp / "logs_whole")
    run_ranks(train_args(tmp, "ulysses2_zero1.json", MODEL, STEPS, *every, save_dir=split), 2, tmp / "logs_split")
    manifest = json.loads((split / read_latest(split) / MANIFEST).read_text())
    resumed = run_ranks(train_args(tmp, "zero1.json", MODEL, STEPS + 1, "--resume", save_dir=split), 2, tmp / "logs_resumed")
    return whole, split, manifest, resumed[0].output


def test_two_sequence_parallel_ranks_train_as_one_rank(runs):
    whole, split, _, _ = runs
    one, two = read_metrics(whole), read_metrics(split, "train/lm_loss")
    assert [two[s] for s in range(1, STEPS + 1)] == pytest.approx([one[s] for s in range(1, STEPS + 1)], rel=RTOL)
    assert read_metrics(split, "val/loss")[STEPS] == pytest.approx(read_metrics(whole, "val/loss")[STEPS], rel=RTOL)


def test_checkpoint_records_the_data_and_sequence_parallel_sizes(runs):
    _, _, manifest, _ = runs
    assert (manifest["dp_size"], manifest["sequence_parallel_size"]) == (1, 2)


def test_resumes_on_two_data_parallel_ranks_where_the_one_rank_run_goes_on(runs):
    whole, split, _, output = runs
    assert f"resumed from step {STEPS}" in output
    assert read_metrics(split)[STEPS + 1] == pytest.approx(read_metrics(whole)[STEPS + 1], rel=RTOL)


def prepare_at(monkeypatch, tmp_path, world, ds_config, model_config=MODEL, *extra, save_dir=None):
    """What pretrain/main.py checks before any rank starts, at world size WORLD."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return prepare([str(a) for a in train_args(tmp_path, ds_config, model_config, 2, *extra, save_dir=save_dir)])


def test_plan_counts_sequence_parallel_groups_as_data_parallel_ranks(monkeypatch, tmp_path):
    plan = prepare_at(monkeypatch, tmp_path, 4, "ulysses2_zero1.json")[3]
    assert (plan.dp_size, plan.sequence_parallel_size, plan.grad_accum_steps) == (2, 2, 2)
    assert [(plan.data_parallel_rank(r), plan.sequence_parallel_rank(r)) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_sequence_length_the_size_does_not_divide_is_refused(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="--seq_len 63 is not divisible by sequence_parallel_size 2"):
        prepare_at(monkeypatch, tmp_path, 2, "ulysses2_zero1.json", MODEL, "--seq_len", 63)


def test_resume_at_another_zero_partition_count_is_refused(monkeypatch, tmp_path, runs):
    """Either side sequence-parallel: the resumed run's latest checkpoint (2 data-parallel ranks) into 2 x 2 ranks,
    and a checkpoint of 1 x 2 (the sizes the sequence-parallel run recorded) into one rank."""
    _, split, manifest, _ = runs
    with pytest.raises(ConfigError, match="partitioned over 2 ranks and this launch partitions it over 4"):
        prepare_at(monkeypatch, split.parent, 4, "ulysses2_zero1.json", MODEL, "--resume", save_dir=split)
    _, model_config, ds_config, plan, _ = prepare_at(monkeypatch, tmp_path, 1, "zero1.json")
    with pytest.raises(ConfigError, match="partitioned over 2 ranks and this launch partitions it over 1"):
        plan_resume(plan, ds_config, "zero1.json", manifest["dp_size"], model_config, saved_sp_size=manifest["sequence_parallel_size"])


def with_seqlen_warmup(tmp_path, ds_config, difficulty_step):
    """DS_CONFIG plus a warmup from 16 tokens to the run's 64 over STEPS steps, written under tmp_path."""
    config = json.loads((REPO / "ds_configs" / ds_config).read_text())
    schedule = {"total_curriculum_step": STEPS, "difficulty_step": difficulty_step}
    config["seqlen_warmup"] = {"min_difficulty": 16, "max_difficulty": "auto", "schedule_type": "fixed_linear", "schedule_config": schedule}
    path = tmp_path / f"warmup_{ds_config}"
    path.write_text(json.dumps(config))
    return path


def test_sequence_length_warmup_cuts_the_windows_before_the_ranks_split_them(tmp_path):
    """Each step's windows are cut to the scheduled length first, then halved: 2 sequence-parallel ranks train as one
    rank under the same warmup."""
    for name, ds_config, ranks in (("whole", "zero1.json", 1), ("split", "ulysses2_zero1.json", 2)):
        run_ranks(
            train_args(tmp_path, with_seqlen_warmup(tmp_path, ds_config, 8), MODEL, STEPS, save_dir=tmp_path / name), ranks, tmp_path / f"logs_{name}"
        )
    lengths = read_metrics(tmp_path / "whole", "train/seq_len")
    assert read_metrics(tmp_path / "split", "train/seq_len") == lengths and lengths[1] < 64, lengths
    one, two = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split", "train/lm_loss")
    assert [two[s] for s in range(1, STEPS + 1)] == pytest.approx([one[s] for s in range(1, STEPS + 1)], rel=RTOL)


def test_a_warmup_length_the_ranks_cannot_halve_is_refused(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="difficulty_step 1 is not a multiple of the sequence-parallel size 2"):
        prepare_at(monkeypatch, tmp_path, 2, with_seqlen_warmup(tmp_path, "ulysses2_zero1.json", 1))
