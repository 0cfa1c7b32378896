"""Preprocessing throughput: python -m pretrain.preprocess with N worker processes against 1 worker,
and python -m pretrain.preprocess_pairs likewise, on the same input in the same run.

    python -m bench.preprocess_throughput                      # 20 MB of Tiny Shakespeare, BPE 2000, N = cpu count
    python -m bench.preprocess_throughput --workers 8 --mb 200 --tokenizer my.model
    python -m bench.preprocess_throughput --smoke              # 1 MB, one round (CI runs this)

The corpus is data/tinyshakespeare.txt repeated to --mb megabytes; the pairs are its lines, each
paired with the next. Without --tokenizer a BPE sentencepiece model is trained on the shipped file
first (not timed). Rounds alternate 1 and N workers so both see the same machine load; the best
round of each counts. Prints MB/s and tokens/s per case, then the ratios (N workers / 1 worker) last.
"""

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

from pretrain.data.indexed import IndexedTokens
from pretrain.preprocess import preprocess
from pretrain.preprocess_pairs import preprocess_pairs
from pretrain.tokenizer import train

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"


def make_inputs(workdir, megabytes):
    """A text corpus of about ``megabytes`` MB and line-aligned source/target files made from it."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    copies = max(1, round(megabytes * 1e6 / len(text.encode("utf-8"))))
    corpus = Path(workdir) / "corpus.txt"
    corpus.write_text(text * copies, encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()] * copies
    source, target = Path(workdir) / "pairs.src", Path(workdir) / "pairs.tgt"
    source.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    target.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    return corpus, source, target


def timed(run):
    """Seconds of one run, its own report (stdout) and progress bar (stderr) kept off the benchmark's output."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="N, compared with 1 worker")
    p.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    p.add_argument("--tokenizer", default=None, help="a sentencepiece .model or 'bytes' (default: train a BPE of 2000 pieces)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="1 MB, one round")
    opts = p.parse_args()
    if opts.smoke:
        opts.mb, opts.rounds = 1.0, 1
    with tempfile.TemporaryDirectory() as workdir:
        corpus, source, target = make_inputs(workdir, opts.mb)
        tokenizer = opts.tokenizer
        if tokenizer is None:
            with contextlib.redirect_stdout(io.StringIO()):
                train(str(SHAKESPEARE), vocab_size=2000, output=str(Path(workdir) / "bpe"), num_threads=os.cpu_count())
            tokenizer = str(Path(workdir) / "bpe.model")
        cases = {
            "lm": (corpus.stat().st_size, lambda workers, out: preprocess(str(corpus), tokenizer=tokenizer, output_prefix=out, workers=workers)),
            "pairs": (
                source.stat().st_size + target.stat().st_size,
                lambda workers, out: preprocess_pairs(
                    source=str(source), target=str(target), tokenizer=tokenizer, output_prefix=out, workers=workers
                ),
            ),
        }
        print(f"input: {opts.mb:g} MB of Tiny Shakespeare, tokenizer {Path(tokenizer).name}, {os.cpu_count()} CPUs visible")
        print(f"\n{'case':8s} {'workers':>7s} {'MB/s':>8s} {'tokens/s':>12s}")
        ratios = {}
        for name, (nbytes, run) in cases.items():
            best = {}
            for _ in range(opts.rounds):
                for workers in (1, opts.workers):
                    out = str(Path(workdir) / f"{name}.w{workers}")
                    best[workers] = min(best.get(workers, float("inf")), timed(lambda: run(workers, out)))
            for workers, seconds in best.items():
                out = Path(workdir) / f"{name}.w{workers}"
                tokens = sum(IndexedTokens(f"{out}{side}").footer["num_tokens"] for side in ([""] if name == "lm" else [".src", ".tgt"]))
                print(f"{name:8s} {workers:7d} {nbytes / 1e6 / seconds:8.2f} {tokens / seconds:12,.0f}")
            ratios[name] = best[1] / best[opts.workers]
    print(
        f"load average over the last 1/5/15 minutes: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs (a shared machine makes the figures noisy)"
    )
    print(f"\nratios (MB/s with {opts.workers} workers / MB/s with 1 worker):")
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
