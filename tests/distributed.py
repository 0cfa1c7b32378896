"""The tests' runs of pretrain/main.py: argument lists, metrics, and real ranks started through
pretrain/local_ranks.py (whose names the tests import from here)."""

import json
from pathlib import Path

from pretrain.local_ranks import MAIN, REPO, RankResult, free_port, rank_env, start_ranks, stop_ranks, wait_ranks

__all__ = [
    "MAIN",
    "REPO",
    "RankResult",
    "free_port",
    "rank_env",
    "start_ranks",
    "stop_ranks",
    "wait_ranks",
    "CORPUS",
    "run_ranks",
    "train_args",
    "translation_args",
    "with_schedule_length",
    "bleu_args",
    "read_metrics",
]

CORPUS = REPO / "data" / "tinyshakespeare.txt"


def run_ranks(args, world_size, log_dir, extra_env=None, timeout=600, check=True):
    results = wait_ranks(start_ranks(args, world_size, log_dir, extra_env), log_dir, timeout)
    if check:
        for r in results:
            assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}"
    return results


def train_args(tmp_path, ds_config, model_config, max_steps, *extra, save_dir=None):
    """pretrain/main.py's arguments for a run; it logs every step (--log_interval 1, which EXTRA may override): the
    tests read per-step metrics, and a stop signal is acted on at a log step."""
    return [
        "--ds_config",
        REPO / "ds_configs" / ds_config,
        "--model_config",
        REPO / "models" / "configs" / model_config,
        "--train_data",
        CORPUS,
        "--max_steps",
        max_steps,
        "--save_dir",
        save_dir or tmp_path / "run",
        "--log_interval",
        1,
        *extra,
    ]


# The toy-pair translation tests were tuned at nearly the peak learning rate of a 1000-step cosine: annealed over
# their own 100-150 steps (the shipped configs' "auto" length) they learn the pair to about a fifth of the BLEU.
TOY_PAIR_SCHEDULE_STEPS = 1000


def with_schedule_length(ds_config, total_steps, directory):
    """A copy of ds_configs/DS_CONFIG, in DIRECTORY, whose learning-rate schedule is TOTAL_STEPS long whatever the
    run's --max_steps."""
    config = json.loads((REPO / "ds_configs" / ds_config).read_text())
    config["scheduler"]["params"]["total_num_steps"] = total_steps
    path = Path(directory) / f"{Path(ds_config).stem}-{total_steps}-step-schedule.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def translation_args(tmp_path, pair_data, ds_config, model_config, steps, *extra):
    train, val, _ = pair_data
    return [
        "--task",
        "translation",
        "--ds_config",
        with_schedule_length(ds_config, TOY_PAIR_SCHEDULE_STEPS, tmp_path),
        "--model_config",
        REPO / "models" / "configs" / model_config,
        "--train_data",
        train,
        "--val_data",
        val,
        "--max_steps",
        steps,
        "--save_dir",
        tmp_path / "run",
        "--eval_interval",
        steps,
        "--log_interval",
        1,
        *extra,
    ]


def bleu_args(pair_data, beam=4):
    """Validation BLEU flags on the toy pair's validation text (tests/conftest.py writes it beside the data)."""
    directory = pair_data[0].parent
    return ["--bleu_src", directory / "pairs2.src", "--bleu_ref", directory / "pairs2.tgt", "--bleu_beam", beam]


def read_metrics(save_dir, key="train/loss"):
    """step -> value of ``key`` from DIR/metrics.jsonl (the last record of a step wins, as after a resume)."""
    values = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            values[record["step"]] = record[key]
    return values
