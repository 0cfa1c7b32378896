"""Generation speed: incremental decoding (cached self-attention keys/values, cross-attention
keys/values once per sentence) against recomputing the whole prefix at every step, measured in the
same run on the same randomly initialized model, sources and settings (models/generation.py).

    python -m bench.generation                     # tiny and Transformer-base shapes, greedy and beam 5, 200 tokens out
    python -m bench.generation --smoke             # a few tokens of the tiny model (CI runs this)
    python -m bench.generation --out_len 400 --batch 16

Every sentence is made to run to the full output length (EOS forbidden by min_len), so both modes
generate the same number of tokens and the figure is tokens/s over out_len tokens per sentence.
Prints a table, then the ratios (incremental tokens/s / full recomputation tokens/s) last.
"""

import argparse
import time
from pathlib import Path

import torch

from models import build_model, load_model_config
from models.generation import beam_search, greedy

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "tiny-transformer.json", "base-shape": "transformer-base.json"}
PAD, BOS, EOS = 0, 1, 2


def make_model(name, positions, device):
    config = load_model_config(REPO / "models" / "configs" / MODELS[name], {"max_seq_len": positions, "dropout": 0.0})
    torch.manual_seed(0)
    return build_model(config).eval().to(device)


def sources(batch, src_len, vocab, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (batch, src_len), generator=gen)
    return src.to(device), torch.zeros(batch, src_len, dtype=torch.bool, device=device)


def tokens_per_s(model, src, mask, search, out_len, incremental):
    settings = dict(bos=BOS, eos=EOS, pad=PAD, min_len=out_len, max_len_b=out_len, incremental=incremental)
    if search == "beam5":
        run = lambda: beam_search(model, src, mask, beam=5, **settings)  # noqa: E731
    else:
        run = lambda: greedy(model, src, mask, **settings)  # noqa: E731
    start = time.perf_counter()
    hypotheses = run()  # ends with .tolist() of the tokens, which waits for a GPU
    elapsed = time.perf_counter() - start
    generated = sum(len(h[0].tokens) + 1 for h in hypotheses)  # + the EOS
    return generated / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--searches", nargs="+", default=["greedy", "beam5"], choices=["greedy", "beam5"])
    p.add_argument("--batch", type=int, default=8, help="sentences per batch")
    p.add_argument("--src_len", type=int, default=30)
    p.add_argument("--out_len", type=int, default=200, help="tokens generated per sentence (before EOS)")
    p.add_argument("--smoke", action="store_true", help="tiny model, greedy, 2 sentences, 8 tokens")
    opts = p.parse_args()
    if opts.smoke:
        opts.models, opts.searches, opts.batch, opts.out_len = ["tiny"], ["greedy"], 2, 8
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    ratios = []
    print(f"{'model':12} {'search':7} {'full tok/s':>11} {'incremental tok/s':>18}")
    for name in opts.models:
        model = make_model(name, max(opts.src_len, opts.out_len + 1), device)
        src, mask = sources(opts.batch, opts.src_len, model.config.vocab_size, device)
        for search in opts.searches:
            full = tokens_per_s(model, src, mask, search, opts.out_len, incremental=False)
            incremental = tokens_per_s(model, src, mask, search, opts.out_len, incremental=True)
            print(f"{name:12} {search:7} {full:11.1f} {incremental:18.1f}", flush=True)
            ratios.append((f"{name} {search}", incremental / full))
    print(f"speed-up of incremental decoding over full recomputation, {opts.out_len} tokens out, on {device}:")
    for label, ratio in ratios:
        print(f"{label}: {ratio:.2f}")


if __name__ == "__main__":
    main()
