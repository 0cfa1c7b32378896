"""pretrain/main.py end to end with real ranks: Switch with expert parallelism, the dense Llama, bf16. (Resumes after a kill are
tests/pretrain/test_reliability.py's.)"""

import json
import math

import pytest
import torch

from pretrain.run_dir import safe_load
from tests.distributed import REPO, read_metrics, run_ranks, train_args

STEPS = 6


def test_switch_expert_parallel_two_ranks_match_one_rank(tmp_path):
    """EP=2 on 2 ranks splits the 4 experts 2+2 and moves tokens by all-to-all; the 1-rank run holds all 4.
    Expert init is seeded by global expert index, so the two runs compute the same function: losses agree to
    the tolerance of the ZeRO tests (see test_main_zero). With the modern routing options on (top-2 dropless,
    SwiGLU experts, a shared expert, the router bias): the all-to-all's variable splits, the bias's update from
    the global batch's load after each step, and its place in the checkpoint."""
    config = json.loads((REPO / "models" / "configs" / "tiny-switch.json").read_text())
    config.update(top_k=2, dropless=True, expert_activation="swiglu", shared_expert=True, router_bias_rate=0.001)
    model_config = tmp_path / "modern-switch.json"
    model_config.write_text(json.dumps(config))
    one = tmp_path / "one"
    two = tmp_path / "two"
    run_ranks(train_args(tmp_path, "zero2.json", model_config, STEPS, save_dir=one), 1, tmp_path / "l1")
    run_ranks(train_args(tmp_path, "moe_ep2_zero2.json", model_config, STEPS, save_dir=two), 2, tmp_path / "l2")
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
    assert all(d == 0.0 for d in dropped.values())  # dropless
    biases = [safe_load(run / f"global_step{STEPS}" / "mp_rank_00_model_states.pt")["module"]["blocks.1.ffn.router_bias_steps"] for run in (one, two)]
    assert torch.equal(biases[0], biases[1]) and biases[0].abs().sum() > 0, biases  # moved, alike at both sizes
    assert biases[0].abs().max() <= STEPS  # one step of the rate per optimizer step at most


def test_llama_two_ranks_match_one_rank(tmp_path):
    """The dense Llama under ZeRO-2: 2 ranks see the 1-rank run's global batches (as tests/pretrain/test_main_zero.py's
    GPT runs, at their tolerance)."""
    losses = {}
    for world in (1, 2):
        run_ranks(train_args(tmp_path, "zero2.json", "tiny-llama.json", STEPS, save_dir=tmp_path / f"w{world}"), world, tmp_path / f"l{world}")
        losses[world] = read_metrics(tmp_path / f"w{world}")
    gaps = [abs(losses[1][s] - losses[2][s]) / losses[1][s] for s in range(1, STEPS + 1)]
    print("llama 2 ranks vs 1 relative gaps", gaps)
    assert sorted(losses[2]) == list(range(1, STEPS + 1)) and max(gaps) < 1e-5, gaps
    assert losses[1][STEPS] < losses[1][1]


@pytest.mark.parametrize("model_config", ["tiny-gpt.json", "tiny-llama.json"])
def test_bf16_trains_on_cpu(tmp_path, model_config):
    """The model trains in bf16 with an fp32 master copy: finite, falling losses alone would also pass in fp32."""
    run_ranks(train_args(tmp_path, "bf16_zero1.json", model_config, STEPS), 2, tmp_path / "logs")
    step = tmp_path / "run" / f"global_step{STEPS}"
    # DeepSpeed saves the module it trained (bf16 here, fp32 in an fp32 run) and, per rank, the fp32 partition
    # the optimizer updates (its bf16 optimizer's files).
    module = safe_load(step / "mp_rank_00_model_states.pt")["module"]
    assert {t.dtype for t in module.values()} == {torch.bfloat16}, {n: t.dtype for n, t in module.items()}
    for rank in range(2):
        master = safe_load(step / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        assert {t.dtype for t in master["single_partition_of_fp32_groups"]} == {torch.float32}
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1]


def test_a_stale_build_lock_is_named_at_start(tmp_path, monkeypatch, capsys):
    """A JIT build killed mid-way (a job's time limit, scancel) leaves torch's lock file, and every start needing
    that op then hangs on it without a word: the start names a lock older than 15 minutes, and only such."""
    import os
    import time

    from pretrain.main import prepare, stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    old, fresh = tmp_path / "ext" / "fused_adam" / "lock", tmp_path / "ext" / "py311_cu128" / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    (warning,) = stale_build_locks()
    assert warning.startswith(f"warning: {old} is 60 minutes old: a JIT build of a DeepSpeed op killed mid-way")
    assert len(stale_build_locks(now=time.time() + 3600)) == 2  # the torch-default layout (py311_cu128/NAME) too

    prepare([str(a) for a in train_args(tmp_path, "zero0.json", "tiny-gpt.json", 1)])
    assert [line for line in capsys.readouterr().err.splitlines() if "lock" in line] == [warning]


def test_weight_decay_falls_on_matrices_and_each_experts_matrices_only():
    from models import config_from_dict
    from models.registry import family_of
    from pretrain.main import optimizer_param_groups

    config = config_from_dict({"family": "switch", "d_model": 8, "d_ff": 16, "n_heads": 2, "n_layers": 2, "vocab_size": 32, "shared_expert": True})
    model = family_of(config).model_cls(config)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer_param_groups(model) if g.get("weight_decay", None) != 0.0 for p in g["params"]}
    switch = "blocks.1.ffn."
    experts = switch + "moe.deepspeed_moe.experts."
    assert {experts + "fc_weight", experts + "proj_weight", switch + "shared.fc_weight", switch + "shared.proj_weight"} <= decayed
    # stacked biases are 2-D ([experts, d]) but each expert's is a vector, as the dense FFN's biases and LayerNorms
    assert not decayed & {experts + "fc_bias", experts + "proj_bias", switch + "shared.fc_bias", "blocks.1.ln_ffn.weight"}
