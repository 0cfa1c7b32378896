"""--task distill: the soft-target loss, the student's start from the teacher, a 2-rank run, refusals."""

import json
import math

import pytest
import torch

from pretrain.main import prepare
from pretrain.run_dir import load_model
from pretrain.tasks.distill import soft_target_loss
from switchyard.errors import ConfigError
from tests.distributed import read_metrics, run_ranks, train_args, translation_args


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Switch LM (4 experts in layer 1) trained 30 steps on one rank."""
    tmp = tmp_path_factory.mktemp("teacher")
    run_ranks(train_args(tmp, "zero1.json", "tiny-switch.json", 30, save_dir=tmp / "run"), 1, tmp / "logs")
    return tmp / "run"


def distill_args(tmp_path, teacher, steps, *extra, model="tiny-gpt.json", ds="zero1.json"):
    return [str(a) for a in train_args(tmp_path, ds, model, steps, "--task", "distill", "--teacher", teacher, *extra)]


def test_soft_target_loss_is_temperature_squared_kl():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, -100]])  # the second position is padding: not counted
    p = torch.softmax(teacher[0, 0] / 2, -1)
    q = torch.softmax(student[0, 0] / 2, -1)
    expected = 4 * float((p * (p / q).log()).sum())
    assert soft_target_loss(student, teacher, targets, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert soft_target_loss(teacher, teacher, torch.zeros(1, 2, dtype=torch.long), 1.0).item() == pytest.approx(0, abs=1e-7)


def test_student_starts_from_the_teachers_non_expert_weights(tmp_path, teacher):
    task = prepare(distill_args(tmp_path, teacher, 1))[-1]
    student = task.build_model().state_dict()
    teacher_state = load_model(teacher)[0].state_dict()
    copied = [name for name in student if name in teacher_state]
    assert "tok_emb.weight" in copied and "blocks.1.attn.qkv.weight" in copied
    assert "blocks.0.ffn.fc.weight" in copied  # layer 0 is dense in the teacher too
    assert "blocks.1.ffn.fc.weight" not in teacher_state  # layer 1's FFN is the teacher's experts
    assert all(torch.equal(student[name], teacher_state[name]) for name in copied)
    random_start = prepare(distill_args(tmp_path, teacher, 1, "--no-init_from_teacher"))[-1].build_model().state_dict()
    assert not torch.equal(random_start["tok_emb.weight"], teacher_state["tok_emb.weight"])


def test_two_rank_distillation_trains_and_logs_the_hard_loss(tmp_path, teacher):
    args = distill_args(tmp_path, teacher, 12, "--distill_temperature", 2.0, "--eval_interval", 12)
    results = run_ranks(args, 2, tmp_path / "logs")
    assert "student initialized from teacher" in results[0].output
    total, hard = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "run", "train/lm_loss")
    assert all(math.isfinite(total[s]) and total[s] != hard[s] for s in total)  # the soft term is in the total only
    assert hard[12] < hard[1]
    assert sorted(read_metrics(tmp_path / "run", "val/loss")) == [12]


def test_refusals(tmp_path, teacher, monkeypatch):
    with pytest.raises(ConfigError, match="--task distill needs --teacher RUN_DIR"):
        prepare([str(a) for a in train_args(tmp_path, "zero1.json", "tiny-gpt.json", 1, "--task", "distill")])
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({"family": "gpt", "vocab_size": 512, "max_seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256}))
    with pytest.raises(ConfigError, match="has a vocabulary of 320, the student"):
        prepare(distill_args(tmp_path, teacher, 1) + ["--model_config", str(wide)])
    with pytest.raises(ConfigError, match="--distill_alpha must be in"):
        prepare(distill_args(tmp_path, teacher, 1, "--distill_alpha", 1.5))
    monkeypatch.setenv("WORLD_SIZE", "2")  # 2 pipeline stages need 2 ranks
    with pytest.raises(ConfigError, match="does not run in pipeline stages"):
        prepare(distill_args(tmp_path, teacher, 1, ds="pipeline2_zero1.json"))


def test_a_switch_translation_teacher_distils_into_a_dense_transformer(tmp_path, pair_data):
    """--distill_task translation: the student's hard loss is the label-smoothed one on token-budget batches,
    the soft targets come from the Switch encoder-decoder teacher at the target positions that are not padding."""
    teacher_dir = tmp_path / "teacher"
    run_ranks(translation_args(teacher_dir, pair_data, "zero1.json", "tiny-switch-transformer.json", 20), 1, tmp_path / "teacher_logs")
    args = [str(a) for a in translation_args(tmp_path, pair_data, "zero1.json", "tiny-transformer.json", 12)]
    args[args.index("translation")] = "distill"
    results = run_ranks(args + ["--distill_task", "translation", "--teacher", str(teacher_dir / "run")], 2, tmp_path / "logs")
    assert "student initialized from teacher" in results[0].output
    total, hard = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "run", "train/lm_loss")
    assert all(math.isfinite(total[s]) and total[s] != hard[s] for s in total)
    assert hard[12] < hard[1]


def test_a_llama_moe_teacher_distils_into_a_dense_llama(tmp_path, trained):
    """The Llama families on either side: the student takes every non-expert tensor of the MoE teacher (attention,
    RMSNorms, embeddings, layer 0's dense SwiGLU) and trains against its soft targets."""
    teacher = trained("llama_moe")
    args = distill_args(tmp_path, teacher, 8, "--eval_interval", 8, model="tiny-llama.json")
    student = prepare(args)[-1].build_model().state_dict()
    teacher_state = load_model(teacher)[0].state_dict()
    copied = [name for name in student if name in teacher_state]
    assert {"tok_emb.weight", "output.weight", "norm.weight", "blocks.1.attn.wk.weight", "blocks.0.ffn.w1.weight"} <= set(copied)
    assert "blocks.1.ffn.w1.weight" in student and "blocks.1.ffn.w1.weight" not in teacher_state  # the teacher's experts
    assert all(torch.equal(student[name], teacher_state[name]) for name in copied)
    run_ranks(args, 1, tmp_path / "logs")
    total, hard = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "run", "train/lm_loss")
    assert all(math.isfinite(total[s]) and total[s] != hard[s] for s in total) and hard[8] < hard[1]
