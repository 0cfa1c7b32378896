"""Sequence-length warmup (pretrain/seqlen_warmup.py): the length follows DeepSpeed's CurriculumScheduler, each
step trains on exactly the first L tokens of its samples, tokens/s counts those, a kill mid-warmup resumes
bit-exactly, and what it cannot apply to is refused before any model is built."""

import json
import time

import pytest
import torch

from pretrain import ds_schema
from pretrain.main import prepare
from pretrain.run_dir import load_model
from pretrain.seqlen_warmup import SeqlenWarmup
from pretrain.tasks.lm import lm_loss
from switchyard.errors import ConfigError
from tests.distributed import CORPUS, REPO, read_metrics, run_ranks, start_ranks, stop_ranks, train_args, wait_ranks
from tests.pretrain.test_reliability import latest

CONFIG = "seqlen_warmup.json"  # 8 -> the run's 64 tokens (tiny-gpt) over 20 steps, difficulty_step 8; ZeRO-1
MODEL = "tiny-gpt.json"
STEPS = 24  # past the warmup's end (step 20), so the full length is reached and kept
SECTION = json.loads((REPO / "ds_configs" / CONFIG).read_text())["seqlen_warmup"]


def schedule(step):
    """fixed_linear by its definition: the fraction of total_curriculum_step done, scaled from min to max and floored
    to a multiple of difficulty_step; step k trains at the length of global step k (k - 1 completed)."""
    low, high, total, unit = 8, 64, SECTION["schedule_config"]["total_curriculum_step"], SECTION["schedule_config"]["difficulty_step"]
    return min(high, max(low, int(step / total * (high - low) + low) // unit * unit))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seqwarm")
    run = tmp / "run"
    run_ranks(train_args(tmp, CONFIG, MODEL, STEPS, "--save_interval", 6, "--keep_checkpoints", 4, save_dir=run), 2, tmp / "logs")
    return run


def test_the_length_follows_the_schedule_and_tokens_per_s_counts_the_trained_tokens(uninterrupted):
    lengths = read_metrics(uninterrupted, "train/seq_len")
    assert lengths == {step: schedule(step) for step in range(1, STEPS + 1)}
    assert lengths[1] == 8 and lengths[19] < 64 and lengths[20] == lengths[STEPS] == 64
    assert [SeqlenWarmup(SECTION, 64).length_at(step - 1) for step in range(1, STEPS + 1)] == list(lengths.values())
    tokens_per_s = read_metrics(uninterrupted, "perf/tokens_per_s")
    step_time = read_metrics(uninterrupted, "perf/step_time_s")
    for step, length in lengths.items():  # a log step per step: its tokens are the global batch of 8 at its length
        assert tokens_per_s[step] * step_time[step] == pytest.approx(8 * length, rel=1e-6)


def test_each_step_trains_on_the_first_tokens_of_its_samples(uninterrupted, tmp_path):
    """Step 13's logged loss is the loss, under the weights saved at step 12, of step 13's samples cut in the test to
    their first length + 1 tokens (2 ranks x 2 micro-batches of 2); the samples whole give another loss."""
    task = prepare([str(a) for a in train_args(tmp_path, CONFIG, MODEL, STEPS)])[-1]
    model = load_model(uninterrupted, "global_step12")[0]
    length = schedule(13)
    assert 8 < length < 64

    def loss(cut):
        with torch.no_grad():
            losses = []
            for dp_rank in range(2):
                for micro in range(2):
                    batch = task.train_batch(12 * 8, micro, 2, dp_rank, 2)[:, : cut + 1]
                    losses.append(float(lm_loss(model(batch[:, :-1])[0], batch[:, 1:])))
        return sum(losses) / len(losses)

    logged = read_metrics(uninterrupted, "train/lm_loss")[13]
    assert loss(length) == pytest.approx(logged, rel=1e-5, abs=1e-6)
    assert abs(loss(64) - logged) > 1e-3


def test_a_kill_mid_warmup_resumes_bit_exactly(uninterrupted, tmp_path):
    run = tmp_path / "run"
    args = train_args(tmp_path, CONFIG, MODEL, STEPS, "--save_interval", 2, save_dir=run)
    procs = start_ranks(args, 2, tmp_path / "l1")
    while not (run / "latest").exists() or latest(run) < 6:
        assert all(p.poll() is None for p, _ in procs), (tmp_path / "l1" / "rank0.log").read_text()[-3000:]
        time.sleep(0.01)
    stop_ranks(procs)  # SIGKILL
    wait_ranks(procs, tmp_path / "l1")
    saved = latest(run)
    assert schedule(saved + 1) < 64, f"killed at step {saved}, after the warmup"
    resumed = run_ranks(args + ["--resume"], 2, tmp_path / "l2")
    assert f"resumed from step {saved}" in resumed[0].output
    for key in ("train/lm_loss", "train/seq_len", "train/grad_norm"):
        after, before = read_metrics(run, key), read_metrics(uninterrupted, key)
        assert {s: after[s] for s in range(saved + 1, STEPS + 1)} == {s: before[s] for s in range(saved + 1, STEPS + 1)}, key
    assert read_metrics(run, "val/loss")[STEPS] == read_metrics(uninterrupted, "val/loss")[STEPS]


def config_with(tmp_path, **section):
    config = json.loads((REPO / "ds_configs" / CONFIG).read_text())
    config["seqlen_warmup"] = {**config["seqlen_warmup"], **section}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def prepare_with(ds_config, *extra, model=MODEL):
    return prepare(
        [
            str(a)
            for a in (
                "--ds_config",
                ds_config,
                "--model_config",
                REPO / "models" / "configs" / model,
                "--train_data",
                CORPUS,
                "--max_steps",
                2,
                *extra,
            )
        ]
    )


@pytest.mark.parametrize(
    "section, extra, expected",
    [
        ({"max_difficulty": 128}, (), "seqlen_warmup.max_difficulty 128 is above the run's sequence length 64 (the samples' length); "),
        ({"max_difficulty": 32}, (), "max_difficulty 32 is below the run's sequence length 64; the warmup ends at the full length: set it to 64"),
        ({}, ("--seq_len", 60), 'the run\'s sequence length 60 (max_difficulty "auto") is not a multiple of difficulty_step 8'),
        (
            {"min_difficulty": 12, "max_difficulty": 64, "schedule_config": {"total_curriculum_step": 20, "difficulty_step": 12}},
            (),
            "difficulty_step 12 does not divide max_difficulty 64; pick a difficulty_step that divides it",
        ),
        ({"min_difficulty": 12}, (), "difficulty_step 8 does not divide min_difficulty 12; set min_difficulty to a multiple of 8"),
        ({"schedule_type": "fixed_discrete"}, (), "schedule_type must be one of fixed_linear, fixed_root, got 'fixed_discrete'"),
        ({"schedule_config": {"total_curriculum_step": 20}}, (), "schedule_config.difficulty_step must be a positive integer, got None"),
        (
            {"schedule_config": {"total_curriculum_step": 20, "difficulty_step": 8, "root_degree": 2}},
            (),
            "root_degree is not read by the fixed_linear",
        ),
        ({"min_difficulty": 0}, (), "min_difficulty must be a positive integer"),
    ],
)
def test_bad_schedules_are_refused_before_any_model_is_built(tmp_path, section, extra, expected):
    with pytest.raises(ConfigError) as refused:
        prepare_with(config_with(tmp_path, **section), "--save_dir", tmp_path / "run", *extra)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_what_warmup_cannot_apply_to_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as translation:
        prepare_with(REPO / "ds_configs" / CONFIG, "--task", "translation", "--save_dir", tmp_path / "t", model="tiny-transformer.json")
    assert "--task translation trains on other batches (translation: padded sentence pairs)" in str(translation.value)
    config = json.loads((REPO / "ds_configs" / CONFIG).read_text())
    config["pipeline"] = {"stages": 2}
    (tmp_path / "pipe.json").write_text(json.dumps(config))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as pipeline:
        prepare_with(tmp_path / "pipe.json", "--save_dir", tmp_path / "p")
    assert "DeepSpeed's pipeline engine fixes the shape" in str(pipeline.value)


def test_the_section_keys_are_checked_and_deepspeeds_curriculum_learning_points_to_it():
    config = json.loads((REPO / "ds_configs" / CONFIG).read_text())
    ds_schema.check(config, "x.json")  # the shipped config passes
    misspelled = {**config, "seqlen_warmup": {**SECTION, "max_dificulty": 64}}
    with pytest.raises(ConfigError, match=r"unknown key 'seqlen_warmup.max_dificulty' \(did you mean 'seqlen_warmup.max_difficulty'\?\)"):
        ds_schema.check(misspelled, "x.json")
    legacy = {**config, "curriculum_learning": {"enabled": True, "curriculum_type": "seqlen"}}
    with pytest.raises(ConfigError, match=r"'curriculum_learning': DeepSpeed 0.19 removed it; for sequence-length warmup write .*\"seqlen_warmup\""):
        ds_schema.check(legacy, "x.json")
