"""Switchyard's own host-device syncs while training (pretrain/trainer.py, the tasks' losses, the models): at most
one per log interval for every recipe, plus, in fp32 without ZeRO, the one flag a step reads to know whether to skip
itself (a non-finite gradient norm). Each sync is the host waiting for the GPU, so a sync per step or per micro-batch
is a GPU idling between steps; this CPU suite has no GPU, and the counts of the ops that would wait on one
(tests/pretrain/sync_counts.py says which, and why DeepSpeed's own are left out) stand in for a profile taken on one."""

import json

from tests.distributed import REPO, start_ranks, train_args, translation_args, wait_ranks

STEPS, LOG_INTERVAL = 4, 2
HERE = REPO / "tests" / "pretrain"


def recipes(tmp_path, pair_data):
    """name -> (main.py arguments, whether a step may read its skip flag). In order: the first run is the distillation's teacher."""
    log = ("--log_interval", LOG_INTERVAL)
    lm = {
        "fp32_zero0": ("zero0.json", "tiny-gpt.json", ()),
        "fp32_zero1": ("zero1.json", "tiny-gpt.json", ()),
        "bf16_zero1": ("bf16_zero1.json", "tiny-gpt.json", ()),
        "distillation": ("zero1.json", "tiny-gpt.json", ("--task", "distill", "--teacher", tmp_path / "fp32_zero0")),
        "switch_lm_zero2": ("zero2.json", "tiny-switch.json", ()),
        "seqlen_warmup_zero1": ("seqlen_warmup.json", "tiny-gpt.json", ()),  # a new length each step: no sync for it
    }
    runs = {
        name: (train_args(tmp_path, ds, model, STEPS, *extra, *log, save_dir=tmp_path / name), name == "fp32_zero0")
        for name, (ds, model, extra) in lm.items()
    }
    translation = translation_args(tmp_path / "translation", pair_data, "zero1.json", "tiny-switch-transformer.json", STEPS, *log)
    runs["switch_translation_zero1"] = (translation, False)
    return runs


def test_at_most_one_sync_per_log_interval_in_every_recipe(tmp_path, pair_data):
    runs = recipes(tmp_path, pair_data)
    recipes_file, out = tmp_path / "recipes.json", tmp_path / "counts.json"
    recipes_file.write_text(json.dumps({name: [str(a) for a in args] for name, (args, _) in runs.items()}))
    (result,) = wait_ranks(start_ranks([out, recipes_file], 1, tmp_path / "logs", script=HERE / "sync_counts.py"), tmp_path / "logs")
    assert result.returncode == 0, result.output[-4000:]
    counts = json.loads(out.read_text())
    for name, (_, reads_skip_flag) in runs.items():
        syncs = counts[name]["syncs"]
        assert counts[name]["steps"] == STEPS, name
        for step in range(1, STEPS + 1):
            at_step = [where for s, _, where in syncs if s == step]
            logs = step % LOG_INTERVAL == 0 or step == STEPS
            assert len(at_step) <= logs + reads_skip_flag, f"{name}, step {step}: {at_step}"
            if logs:  # the log's one read is seen: the count is no blind one
                assert any("log_train" in where for where in at_step), f"{name}, step {step}: {at_step}"
