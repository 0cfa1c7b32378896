"""Faults: stop signals, kills at random moments (also while saving), damaged checkpoints, NaN steps."""

import json
import os
import random
import shutil
import signal
import time

import pytest
import torch

from pretrain.run_dir import checkpoint_state_dict, load_model, recorded_model_config, require_run_config, sha256
from tests.distributed import REPO, read_metrics, run_ranks, start_ranks, stop_ranks, train_args, wait_ranks

HERE = REPO / "tests" / "pretrain"
MODEL = "tiny-gpt-dropout.json"
# Long enough that 6 kills, each after at least one new checkpoint and a random pause in which a
# fast machine trains several steps, land before the end of the run.
STEPS = 40


def latest(save_dir):
    return int((save_dir / "latest").read_text().strip().removeprefix("global_step"))


def wait_for_step(save_dir, procs, step, timeout=300):
    deadline = time.monotonic() + timeout
    while not (save_dir / "metrics.jsonl").exists() or max(read_metrics(save_dir), default=0) < step:
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), "run ended early"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    run_ranks(train_args(tmp, "zero1.json", MODEL, STEPS, save_dir=tmp / "run"), 2, tmp / "logs")
    return read_metrics(tmp / "run")


def test_sigusr1_saves_exits_for_requeue_and_resumes(tmp_path, uninterrupted):
    run = tmp_path / "run"
    procs = start_ranks(train_args(tmp_path, "zero1.json", MODEL, 1000, save_dir=run), 2, tmp_path / "l1")
    wait_for_step(run, procs, 3)
    os.kill(procs[1][0].pid, signal.SIGUSR1)  # one rank only: the ranks must agree among themselves
    results = wait_ranks(procs, tmp_path / "l1")
    assert [r.returncode for r in results] == [75, 75], results[0].output[-3000:]
    saved = latest(run)
    assert saved >= 3 and max(read_metrics(run)) == saved  # finished the step it was in, saved it, stopped
    assert saved + 2 <= STEPS
    resumed = run_ranks(train_args(tmp_path, "zero1.json", MODEL, saved + 2, "--resume", save_dir=run), 2, tmp_path / "l2")
    assert f"resumed from step {saved}" in resumed[0].output
    losses = read_metrics(run)
    assert [losses[s] for s in (saved + 1, saved + 2)] == [uninterrupted[s] for s in (saved + 1, saved + 2)]


def test_random_kills_even_while_saving_always_resume_from_a_complete_checkpoint(tmp_path, uninterrupted):
    """SIGKILL both ranks, alternately at a random moment and as soon as a save is seen in progress
    (a random pause alone missed every save on a slower machine), resume each time, and finish: the
    final losses equal the uninterrupted run's."""
    rng = random.Random(0)
    run = tmp_path / "run"
    kills = during_save = 0
    args = train_args(tmp_path, "zero1.json", MODEL, STEPS, "--save_interval", 1, "--keep_checkpoints", 2, save_dir=run)
    while kills < 6 or during_save < 1:
        assert kills < 12, f"none of {kills} kills landed inside a save"
        before = latest(run) if (run / "latest").exists() else 0
        assert before < STEPS, f"the run reached its end after {kills} kills; make STEPS larger"
        logs = tmp_path / f"k{kills}"
        procs = start_ranks(args + (["--resume"] if before else []), 2, logs)
        deadline = time.monotonic() + 300
        while not (run / "latest").exists() or latest(run) == before:  # a checkpoint newer than the last one
            if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
                stop_ranks(procs)
                pytest.fail(f"run ended or hung before saving past step {before}:\n{(logs / 'rank0.log').read_text()[-3000:]}")
            time.sleep(0.01)
        if kills % 2:
            while not list(run.glob("global_step*.partial")) and time.monotonic() < deadline:
                time.sleep(0.001)  # the next step's save has begun: kill inside it
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        stop_ranks(procs)
        wait_ranks(procs, logs)
        kills += 1
        during_save += bool(list(run.glob("global_step*.partial")))  # killed while writing a checkpoint
        assert (run / f"global_step{latest(run)}" / "manifest.json").exists()  # latest names a complete checkpoint
    run_ranks(args + ["--resume"], 2, tmp_path / "final")
    losses = read_metrics(run)
    print(f"survived {kills} kills, {during_save} of them during a save")
    assert losses[STEPS] == uninterrupted[STEPS]
    assert sorted(p.name for p in run.glob("global_step*") if not p.name.endswith(".partial")) == [f"global_step{STEPS - 1}", f"global_step{STEPS}"]


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    run = tmp_path / "run"
    run_ranks(train_args(tmp_path, "zero1.json", MODEL, 6, "--save_interval", 2, save_dir=run), 2, tmp_path / "l1")
    assert latest(run) == 6
    shard = next((run / "global_step6").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    results = run_ranks(train_args(tmp_path, "zero1.json", MODEL, 8, "--resume", save_dir=run), 2, tmp_path / "l2")
    assert f"checkpoint {run / 'global_step6'} is damaged ({shard.name} has 100 bytes" in results[0].output
    assert "resumed from step 4" in results[0].output
    losses = read_metrics(run)
    assert [losses[s] for s in (5, 6, 7, 8)] == [uninterrupted[s] for s in (5, 6, 7, 8)]


@pytest.mark.parametrize("ds_config, gas", [("zero0.json", 2), ("zero1.json", 2), ("bf16_zero1.json", 2)])
def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path, ds_config, gas):
    """Step 4's loss is NaN on rank 0: every rank skips it, and no weight moves (a skip that still applied the
    optimizer, with zeroed gradients, would move them by momentum and weight decay and keep the loss finite)."""
    env = {"SWITCHYARD_TEST_NAN_STEPS": "4", "SWITCHYARD_TEST_GAS": str(gas)}
    # Validation after every step, on the same micro-batch each time: a function of the weights alone. (A skipped
    # step is never checkpointed, so the weights are compared through it.)
    args = train_args(tmp_path, ds_config, "tiny-gpt.json", 6, "--eval_interval", 1, "--eval_iters", 1)
    procs = start_ranks(args, 2, tmp_path / "logs", env, script=HERE / "poisoned_loss.py")
    results = wait_ranks(procs, tmp_path / "logs")
    assert all(r.returncode == 0 for r in results), results[0].output[-3000:]
    skipped = read_metrics(tmp_path / "run", "train/skipped_steps")
    losses = read_metrics(tmp_path / "run", "train/lm_loss")
    val = read_metrics(tmp_path / "run", "val/loss")
    assert [skipped[s] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert "step 4 skipped (non-finite loss or gradient norm)" in results[0].output
    # Bit for bit, the skipped step left the weights as step 3 made them, while the steps on either side
    # moved them (so the equality is no warm-up step at learning rate 0).
    assert val[2] != val[3] == val[4] != val[5] != val[6], val
    assert all(losses[s] == losses[s] for s in (5, 6))
    assert losses[6] < losses[1]


def test_consecutive_nan_steps_stop_the_run_without_saving(tmp_path):
    env = {"SWITCHYARD_TEST_NAN_STEPS": "3-", "SWITCHYARD_TEST_GAS": "2"}
    args = train_args(tmp_path, "zero1.json", "tiny-gpt.json", 20, "--save_interval", 2, "--max_bad_steps", 3)
    procs = start_ranks(args, 2, tmp_path / "logs", env, script=HERE / "poisoned_loss.py")
    results = wait_ranks(procs, tmp_path / "logs")
    assert [r.returncode for r in results] == [3, 3]
    errors = [line for line in results[0].output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 consecutive steps skipped" in errors[0] and "last good checkpoint: step 2" in errors[0]
    assert latest(tmp_path / "run") == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("global_step*")) == ["global_step2"]


def test_switch_resume_restores_every_expert_of_every_expert_parallel_rank(tmp_path):
    """EP=2: each rank saves its own 2 of the 4 experts. Resume at the last step (nothing to train),
    which saves the loaded weights again: every expert file must come back identical, so no rank
    loaded another rank's experts."""
    import torch

    run = tmp_path / "run"
    run_ranks(train_args(tmp_path, "moe_ep2_zero2.json", "tiny-switch.json", 3, save_dir=run), 2, tmp_path / "l1")
    files = sorted((run / "global_step3").glob("*expert_*model_states.pt"))
    assert len(files) == 4, [f.name for f in files]  # 1 Switch layer x 4 experts
    saved = {f.name: torch.load(f, weights_only=True) for f in files}
    weights = [next(t for k, t in sd.items() if k.endswith("fc.weight")) for sd in saved.values()]
    assert all(not torch.equal(weights[i], weights[j]) for i in range(4) for j in range(i + 1, 4))

    run_ranks(train_args(tmp_path, "moe_ep2_zero2.json", "tiny-switch.json", 3, "--resume", save_dir=run), 2, tmp_path / "l2")
    for name, state in saved.items():
        again = torch.load(run / "global_step3" / name, weights_only=True)
        assert state.keys() == again.keys()
        assert all(torch.equal(state[k], again[k]) for k in state), name


@pytest.fixture(scope="module")
def dense_two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense2")
    run_ranks(train_args(tmp, "zero1.json", "tiny-gpt.json", 5, save_dir=tmp / "run"), 2, tmp / "logs")
    return read_metrics(tmp / "run")


@pytest.mark.parametrize("ds_config", ["zero0.json", "zero1.json", "zero2.json"])
def test_dense_run_resumes_at_another_data_parallel_size(tmp_path, ds_config, dense_two_ranks):
    """Saved on 2 ranks, resumed on 1 (ZeRO 1-2 through DeepSpeed's universal checkpoint): the same
    global batches follow, so the losses match the 2-rank run within the ZeRO tests' tolerance."""
    run = tmp_path / "run"
    run_ranks(train_args(tmp_path, ds_config, "tiny-gpt.json", 3, save_dir=run), 2, tmp_path / "l1")
    results = run_ranks(train_args(tmp_path, ds_config, "tiny-gpt.json", 5, "--resume", save_dir=run), 1, tmp_path / "l2")
    assert "resumed from step 3" in results[0].output
    losses = read_metrics(run)
    for step in (4, 5):
        assert losses[step] == pytest.approx(dense_two_ranks[step], rel=1e-5), (step, losses[step], dense_two_ranks[step])
    assert not list(run.glob("*_universal"))  # the conversion is removed once loaded


def test_switch_checkpoint_from_before_stacked_experts_is_refused_for_resume_and_still_evaluates(tmp_path):
    """A checkpoint whose expert files lack GroupedExperts' marker was saved by DeepSpeed's per-expert loop: same
    files and keys, but an optimizer state per expert parameter. Resuming it is refused in one line; its weights
    still load for evaluation."""
    from models.switch import GroupedExperts

    run = tmp_path / "run"
    run_ranks(train_args(tmp_path, "zero0.json", "tiny-switch.json", 2, save_dir=run), 1, tmp_path / "l1")
    files = sorted((run / "global_step2").glob("layer_*_expert_*_model_states.pt"))
    assert len(files) == 4
    for path in files:  # what the per-expert loop saved: the same keys without the marker
        state = torch.load(path, weights_only=True)
        torch.save({k: v for k, v in state.items() if not k.endswith("." + GroupedExperts.STACKED_KEY)}, path)
    manifest_path = run / "global_step2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for path in files:  # the manifest the old run wrote with them
        manifest["files"][path.name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest_path.write_text(json.dumps(manifest))
    results = run_ranks(train_args(tmp_path, "zero0.json", "tiny-switch.json", 4, "--resume", save_dir=run), 1, tmp_path / "l2", check=False)
    assert results[0].returncode == 2, results[0].output[-3000:]
    errors = [line for line in results[0].output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was saved before Switchyard stacked each layer's experts" in errors[0], errors
    assert "Traceback" not in results[0].output
    model, _, _ = load_model(run)
    saved = torch.load(files[2], weights_only=True)
    weight = model.blocks[1].ffn.local_experts().expert(2)["fc.weight"]
    assert torch.equal(weight, saved["blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.2.fc.weight"])


class Payload:
    """Unpickling this runs a shell command: what an unsafe torch.load would execute."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import json

    import torch

    from pretrain.run_dir import MANIFEST, sha256

    run = tmp_path / "run"
    run_ranks(train_args(tmp_path, "zero1.json", "tiny-gpt.json", 2, save_dir=run), 2, tmp_path / "l1")
    marker = tmp_path / "payload_ran"
    states = run / "global_step2" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, states)
    manifest = json.loads((run / "global_step2" / MANIFEST).read_text())  # a consistent, hostile checkpoint
    manifest["files"][states.name] = {"bytes": states.stat().st_size, "sha256": sha256(states)}
    (run / "global_step2" / MANIFEST).write_text(json.dumps(manifest))
    results = run_ranks(train_args(tmp_path, "zero1.json", "tiny-gpt.json", 4, "--resume", save_dir=run), 2, tmp_path / "l2", check=False)
    assert [r.returncode for r in results] == [2, 2]
    errors = [line for line in results[0].output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "asks to run posix.system" in errors[0] and "refusing it" in errors[0], results[0].output[-2000:]
    assert not marker.exists()


@pytest.mark.parametrize(
    "ds_config, model",
    [
        ("zero0.json", "tiny-gpt.json"),
        ("zero1.json", "tiny-gpt-dropout.json"),
        ("zero2.json", "tiny-gpt.json"),
        ("zero3.json", "tiny-gpt.json"),
        ("zero3_offload.json", "tiny-gpt.json"),
        ("bf16_zero1.json", "tiny-gpt.json"),
        ("pipeline2_zero1.json", "tiny-gpt.json"),
        ("moe_ep2_zero2.json", "tiny-switch.json"),
        ("moe_ep2_zero2.json", "tiny-llama-moe.json"),
    ],
)
def test_every_recipe_resumes_exactly_through_the_safe_loader(tmp_path, ds_config, model):
    """Each recipe's checkpoint loads with weights_only and the allow-list, and the resumed run ends
    with bit-identical weights to the uninterrupted one (optimizer state, the CPU Adam kernel's bias
    correction, LR schedule, data position and RNG all restored)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # Resumed at step 6: from step 7 on, the float32 product beta2^t of DeepSpeed's CPU Adam differs from pow(beta2, t).
    run_ranks(train_args(tmp_path, ds_config, model, 9, "--save_interval", 6, "--keep_checkpoints", 0, save_dir=full), 2, tmp_path / "l1")
    resumed.mkdir()
    shutil.copytree(full / "global_step6", resumed / "global_step6")
    (resumed / "latest").write_text("global_step6")
    results = run_ranks(train_args(tmp_path, ds_config, model, 9, "--resume", save_dir=resumed), 2, tmp_path / "l2")
    assert "resumed from step 6" in results[0].output
    assert sorted(read_metrics(resumed)) == [7, 8, 9]
    assert all(read_metrics(resumed)[s] == read_metrics(full)[s] for s in (7, 8, 9))
    config = recorded_model_config(require_run_config(full), full)
    expected, got = (checkpoint_state_dict(run, "global_step9", config) for run in (full, resumed))
    assert expected.keys() == got.keys()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []


def test_secrets_never_reach_the_run_directory_or_logs(tmp_path):
    secret = "sk-switchyard-test-4f1c9a"
    env = {"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "HF_TOKEN": secret}
    run = tmp_path / "run"
    results = run_ranks(
        train_args(tmp_path, "zero1.json", "tiny-gpt.json", 2, "--wandb_project", "t", save_dir=run), 2, tmp_path / "logs", extra_env=env
    )
    assert all(secret not in r.output for r in results)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "run_config.json" for p in files)
    assert [p for p in files if secret.encode() in p.read_bytes()] == []


def test_fp16_stops_when_overflows_persist_at_the_minimum_loss_scale(tmp_path):
    import json

    config = json.loads((REPO / "ds_configs" / "fp16_zero1.json").read_text())
    config["fp16"].update(initial_scale_power=3, hysteresis=1, min_loss_scale=1)  # 8 -> 4 -> 2 -> 1, then stuck
    ds = tmp_path / "fp16.json"
    ds.write_text(json.dumps(config))
    env = {"SWITCHYARD_TEST_NAN_STEPS": "3-", "SWITCHYARD_TEST_GAS": "2", "SWITCHYARD_TEST_FP16_ON_CPU": "1"}
    args = train_args(tmp_path, "zero1.json", "tiny-gpt.json", 30, "--max_bad_steps", 3)
    args[1] = ds
    results = wait_ranks(start_ranks(args, 2, tmp_path / "logs", env, script=HERE / "poisoned_loss.py"), tmp_path / "logs")
    assert [r.returncode for r in results] == [3, 3], results[0].output[-3000:]
    out = results[0].output
    assert "step 3 skipped (fp16 overflow, loss scale 4, minimum 1)" in out  # each skip is logged
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    # steps 3-4 lower the scale 8 -> 4 -> 2 (not bad yet), step 5 brings it to the minimum, 6-7 overflow
    # there: the third consecutive skip at the minimum stops the run.
    assert len(errors) == 1 and "stopping at step 7: 3 consecutive steps skipped (fp16 overflow, loss scale 1, minimum 1)" in errors[0]
