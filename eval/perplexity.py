"""Loss and perplexity of an LM checkpoint on a text file, preprocessed tokens or a datasets split.

    python -m eval.perplexity RUN_DIR --text FILE [--context N] [--stride S] [--batch_size B] [--output FILE]
    python -m eval.perplexity RUN_DIR --tokens PREFIX                  # python -m pretrain.preprocess output
    python -m eval.perplexity RUN_DIR --dataset NAME_OR_DIR --split validation --field text
    torchrun --nproc_per_node 4 -m eval.perplexity RUN_DIR --text FILE   # batches shared out over ranks

RUN_DIR is a pretrain/main.py --save_dir (dense, Switch or pipeline, any ZeRO stage); --tag picks a
checkpoint other than ``latest``. Text is tokenized with the tokenizer the run recorded, document by
document as pretrain reads it (blank-line-separated paragraphs, --per_line, a JSON Lines --field),
each document followed by EOS. The stream starts with an EOS too, so the first token is scored
from the same start a document has in training (after the previous document's EOS).

Windows of --context tokens (default: the model's max_seq_len) advance by --stride (default: the
context, non-overlapping). The first window scores all its tokens, each later one only its last
``stride`` (the tokens not scored yet), so with a smaller stride every token is predicted from at
least context - stride tokens before it (the sliding-window recipe of Hugging Face's perplexity
guide). The last window ends at the last token and keeps the full context.

Result, printed as one JSON object on the last line of stdout (and written to --output):
loss (mean NLL per scored token, nats), perplexity = exp(loss), tokens; with text (not --tokens)
also bytes (UTF-8) and words (whitespace-separated) of the documents, bits_per_byte = total NLL /
(bytes ln 2) and word_perplexity = exp(total NLL / words), which do not depend on the tokenizer,
so models with different tokenizers compare.

Under torchrun or the deepspeed launcher (WORLD_SIZE > 1) batches are formed first and dealt out
to ranks, and the NLL sums are all-reduced, so the figures equal one rank's: a Switch layer's
capacity depends on the tokens of its forward pass, so every batch must be the same at any rank count.
"""

import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from eval.cli import EXIT_BAD_INPUT, fire_command, print_result
from pretrain.data.indexed import IndexedTokens
from pretrain.data.lm_dataset import read_corpus
from pretrain.distributed import finish, local_device
from pretrain.run_dir import UnsafeCheckpoint, load_model, resolve_tag
from switchyard.errors import ConfigError


def token_stream(tokenizer, text=None, tokens=None, dataset=None, dataset_config=None, split="validation", field="text", per_line=False):
    """(EOS + the documents' tokens, each ending with EOS; {"bytes", "words"} of the text, or None for --tokens)."""
    if sum(source is not None for source in (text, tokens, dataset)) != 1:
        raise ConfigError("pass one of --text FILE, --tokens PREFIX or --dataset NAME_OR_DIR")
    eos = tokenizer.eos_id
    if tokens is not None:
        data = IndexedTokens(tokens)
        spec = data.tokenizer_spec
        if (spec["type"], spec.get("sha256")) != (tokenizer.spec["type"], tokenizer.spec.get("sha256")):
            raise ConfigError(
                f"{data.idx_path} was made with tokenizer {spec.get('path', spec['type'])}, not the one the "
                f"checkpoint was trained with; preprocess the data with the run's tokenizer"
            )
        return np.concatenate([np.array([eos], data.dtype), data.tokens]), None  # in memory, in the file's dtype
    ids, counts = [eos], {"bytes": 0, "words": 0}
    for document, _ in read_corpus([text] if text is not None else (), dataset, dataset_config, split, field, per_line):
        ids.extend(tokenizer.encode(document))
        ids.append(eos)
        counts["bytes"] += len(document.encode("utf-8"))
        counts["words"] += len(document.split())
    return np.asarray(ids, dtype=np.int64), counts


def windows(num_targets, context, stride):
    """[(start, scored)] over a stream of num_targets + 1 tokens: a window reads stream[start : start + context + 1]
    (inputs and shifted targets) and scores its last ``scored`` targets; every target is scored exactly once."""
    if num_targets <= context:
        return [(0, num_targets)]  # one window, shorter than the context
    spans, end = [(0, context)], context  # targets 1..end are scored
    while end < num_targets:
        new_end = min(end + stride, num_targets)
        spans.append((new_end - context, new_end - end))
        end = new_end
    return spans


@torch.no_grad()
def nll_sums(model, stream, spans, context, batch_size, rank=0, world_size=1, device="cpu"):
    """[sum of NLL in nats, tokens scored] over this rank's batches (batch b goes to rank b % world_size)."""
    length = min(context, len(stream) - 1)  # shorter only when the whole stream is one window
    totals = torch.zeros(2, dtype=torch.float64)
    num_batches = math.ceil(len(spans) / batch_size)
    for b in tqdm(range(rank, num_batches, world_size), desc="perplexity", unit="batch", disable=rank != 0):
        chunk = spans[b * batch_size : (b + 1) * batch_size]
        rows = torch.stack([torch.from_numpy(stream[start : start + length + 1].astype(np.int64)) for start, _ in chunk])
        rows = rows.to(device)
        logits = model(rows[:, :-1])[0]
        nll = F.cross_entropy(logits.float().transpose(1, 2), rows[:, 1:], reduction="none")  # (batch, length)
        scored = torch.tensor([s for _, s in chunk], device=device)
        mask = torch.arange(length, device=device) >= length - scored[:, None]  # the last ``scored`` of each row
        totals += torch.stack([nll[mask].double().sum(), mask.sum().double()]).cpu()
    return totals


def start_ranks():
    """(rank, world size, device): one process, or one of the WORLD_SIZE > 1 ranks torchrun or deepspeed started."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = local_device()
    if world_size == 1:
        return 0, 1, device
    if not dist.is_initialized():
        # RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the launcher; no DeepSpeed engine is needed.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def evaluate(
    run_dir,
    text=None,
    tokens=None,
    dataset=None,
    dataset_config=None,
    split="validation",
    field="text",
    per_line=False,
    tag=None,
    context=None,
    stride=None,
    batch_size=8,
):
    """The figures as a dict (see the module docstring); every rank returns them."""
    run_dir = str(run_dir)
    tag = resolve_tag(run_dir, tag)
    model, config, tokenizer = load_model(run_dir, tag, "decoder", "eval.perplexity")
    context = config.max_seq_len if context is None else context
    stride = context if stride is None else stride
    if context < 1:
        raise ConfigError(f"--context must be >= 1, got {context}")
    longest = config.longest_sequence()
    if longest is not None and context > longest:
        raise ConfigError(f"--context {context} is longer than the model's {longest} learned positions")
    if not 1 <= stride <= context:
        raise ConfigError(f"--stride must be in [1, --context {context}], got {stride}")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    stream, counts = token_stream(tokenizer, text, tokens, dataset, dataset_config, split, field, per_line)
    if len(stream) < 2:
        raise ConfigError(f"{text or tokens or dataset} holds no tokens to score")
    spans = windows(len(stream) - 1, context, stride)

    rank, world_size, device = start_ranks()
    totals = nll_sums(model.to(device), stream, spans, context, batch_size, rank, world_size, device)
    if world_size > 1:
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    nll, scored = totals.tolist()
    result = {"loss": nll / scored, "perplexity": math.exp(nll / scored), "tokens": int(scored)}
    if counts is not None:
        result.update(counts, bits_per_byte=nll / (counts["bytes"] * math.log(2)), word_perplexity=math.exp(nll / counts["words"]))
    result.update(run_dir=run_dir, tag=tag, data=str(text or tokens or dataset), context=context, stride=stride)
    return result


def main(
    run_dir,
    text=None,
    tokens=None,
    dataset=None,
    dataset_config=None,
    split="validation",
    field="text",
    per_line=False,
    tag=None,
    context=None,
    stride=None,
    batch_size=8,
    output=None,
    local_rank=None,
):
    """Loss and perplexity of the checkpoint in RUN_DIR; prints one JSON object (rank 0).

    Args:
        run_dir: a pretrain/main.py --save_dir.
        text: a UTF-8 text file (blank-line-separated documents) or JSON Lines file (see --field).
        tokens: a preprocessed PREFIX (PREFIX.bin/.idx of python -m pretrain.preprocess), made with the run's tokenizer.
        dataset: a Hugging Face dataset name, save_to_disk directory or local data folder.
        dataset_config: the dataset's configuration name, if it has several.
        split: the dataset split.
        field: the text field of JSON Lines records or dataset rows.
        per_line: each line of the text file is a document.
        tag: the checkpoint (global_stepN; default: the one ``latest`` names).
        context: tokens per window (default: the model's max_seq_len).
        stride: tokens between window starts (default: the context); smaller gives every token more context.
        batch_size: windows per forward pass.
        output: also write the JSON object to this file.
        local_rank: set by the deepspeed launcher; the rank comes from the environment.
    """
    # fire turns a file named 2024 into an int
    text, tokens, dataset = (None if path is None else str(path) for path in (text, tokens, dataset))
    try:
        result = evaluate(run_dir, text, tokens, dataset, dataset_config, split, field, per_line, tag, context, stride, batch_size)
    except (ConfigError, UnsafeCheckpoint) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same problem; one line is enough
            print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print_result(result, output)
    finish(0)  # barrier, flush, os._exit: gloo can abort at interpreter exit after a successful run


if __name__ == "__main__":
    fire_command(main, "eval.perplexity")
