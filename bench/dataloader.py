"""Data-loader throughput against the training step: how much faster batches are made than the tiny
model consumes them, measured in the same run on one process.

    python -m bench.dataloader            # LM loader (one corpus, two blended), token-budget pair batches
    python -m bench.dataloader --smoke    # a few batches and steps (CI runs this)

Cases: the LM task's micro-batches (pretrain/tasks/lm.py on Tiny Shakespeare, bytes, seq_len
--seq_len), the same from two corpora blended 0.7/0.3, and TokenBudgetBatches.batch (pretrain/data/
pairs.py) on Multi30k train (de-en, bytes) when ../shared/data is present, else on Tiny Shakespeare's
lines paired with the next line. The reference is Switchyard's training step of tiny-gpt (ZeRO-0,
fp32, micro-batch --micro_batch, accumulation --accumulation). Prints batches/s for each loader
and the step rate, then the ratios last: loader micro-batches/s / micro-batches the step consumes
per second (above 1: the loader keeps up with room to spare).
"""

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.data.pairs import PairDataset, TokenBudgetBatches
from pretrain.main import build_engine, prepare
from pretrain.preprocess_pairs import preprocess_pairs
from pretrain.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
MULTI30K = REPO.parent / "shared" / "data" / "multi30k" / "raw"


def rate(make, count, rounds):
    """Best calls per second of ``make(i)`` over ``rounds`` runs of ``count`` calls (i counting on)."""
    best, i = 0.0, 0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            make(i)
            i += 1
        best = max(best, count / (time.perf_counter() - start))
    return best


def prepared(workdir, opts, *train_data):
    ds = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=opts.micro_batch, gradient_accumulation_steps=opts.accumulation)
    ds.pop("train_batch_size", None)
    ds_path = Path(workdir) / "ds.json"
    ds_path.write_text(json.dumps(ds))
    argv = [
        "--ds_config",
        str(ds_path),
        "--model_config",
        str(REPO / "models" / "configs" / "tiny-gpt.json"),
        "--train_data",
        *map(str, train_data),
        "--max_steps",
        "1",
        "--save_dir",
        str(Path(workdir) / "run"),
        "--seq_len",
        str(opts.seq_len),
    ]
    if len(train_data) > 1:
        argv += ["--train_data_weights", "0.7", "0.3"]
    with contextlib.redirect_stdout(io.StringIO()):  # the blend's share lines
        return prepare(argv)


def pair_files(workdir):
    if MULTI30K.is_dir():
        return MULTI30K / "train.de", MULTI30K / "train.en", "Multi30k train de-en"
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()]
    source, target = Path(workdir) / "pairs.src", Path(workdir) / "pairs.tgt"
    source.write_text("\n".join(lines[:-1]) + "\n")
    target.write_text("\n".join(lines[1:]) + "\n")
    return source, target, "Tiny Shakespeare line pairs"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=2000, help="batches per loader round")
    p.add_argument("--steps", type=int, default=30, help="training steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--max_tokens", type=int, default=2048, help="token budget of a pair batch")
    p.add_argument("--smoke", action="store_true", help="a few batches and steps, one round")
    opts = p.parse_args()
    if opts.smoke:
        opts.batches, opts.steps, opts.rounds = 20, 2, 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as workdir:
        # Before the process group starts: the worker pool forks, and a fork of a process with gloo's threads can hang.
        source, target, pairs_name = pair_files(workdir)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            preprocess_pairs(source=str(source), target=str(target), output_prefix=str(Path(workdir) / "pairs"), workers=1)
        distributed.init()
        args, model_config, ds_config, plan, task = prepared(workdir, opts, SHAKESPEARE)
        engine, _ = build_engine(args, model_config, ds_config, plan, task)
        trainer = Trainer(engine, task, plan, args, logger=None, flops_per_token=0)

        def train_step(_):
            trainer.take_step()

        train_step(0)  # warm-up: first-step allocations
        steps_per_s = rate(train_step, opts.steps, opts.rounds)
        consumed_per_s = steps_per_s * plan.grad_accum_steps  # micro-batches the training step takes per second

        blended = prepared(workdir, opts, SHAKESPEARE, SHAKESPEARE)[-1]
        budget = TokenBudgetBatches(PairDataset(Path(workdir) / "pairs"), opts.max_tokens, max_positions=256, pad_id=0, bos_id=256, seed=1)
        mbs = plan.micro_batch_size
        loaders = {
            "lm": lambda i: task.train_batch(i * mbs, 0, mbs, 0, 1),
            "lm-blend-2": lambda i: blended.train_batch(i * mbs, 0, mbs, 0, 1),
            "pairs": lambda i: budget.batch(i),
        }
        loader_rates = {name: rate(make, opts.batches, opts.rounds) for name, make in loaders.items()}
    print(
        f"tiny-gpt step (seq {task.seq_len}, micro-batch {mbs} x {plan.grad_accum_steps}): {steps_per_s:.1f} steps/s, "
        f"{consumed_per_s:.1f} micro-batches/s"
    )
    print(
        f"pairs: {pairs_name}, max_tokens {opts.max_tokens}: {len(budget)} batches, "
        f"padding {budget.padding_fraction:.1%}, {budget.skipped} pairs over 256 tokens skipped"
    )
    for name, batches_per_s in loader_rates.items():
        print(f"{name:12s} {batches_per_s:10.0f} batches/s")
    print(
        f"load average over the last 1/5/15 minutes: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs (a shared machine makes the figures noisy)"
    )
    print("\nratios (loader batches/s / micro-batches/s the training step consumes):")
    for name, batches_per_s in loader_rates.items():
        print(f"{name}: {batches_per_s / consumed_per_s:.1f}")
    distributed.finish(0)


if __name__ == "__main__":
    main()
