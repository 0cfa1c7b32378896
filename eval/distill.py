"""How much of a Switch teacher's gain a distilled dense student keeps, on held-out data.

    python -m eval.distill --teacher runs/switch --student runs/student --baseline runs/dense --text heldout.txt
    python -m eval.distill --teacher runs/switch-mt --student runs/student-mt --baseline runs/dense-mt --pairs data/m30k.valid

The three runs are the teacher (pretrain/main.py), the student (pretrain/main.py --task distill
--teacher ...) and the baseline (the student's model trained as long without the teacher). Language
models are scored by eval.perplexity on the same data (--text, --tokens or --dataset, as there);
translation models by their mean cross entropy (no label smoothing) per target token over every pair
of --pairs (a python -m pretrain.preprocess_pairs PREFIX made with their tokenizer; pairs longer than
the model's positions are left out and counted). The result is the Switch paper's Table 6 figure:

    kept = (baseline loss - student loss) / (baseline loss - teacher loss) x 100  [%]

of the teacher's improvement over the baseline in held-out loss, with each model's loss,
perplexity and parameters (total, and active per token) and the student's compression (its
parameters / the teacher's). Printed as one JSON object last.
"""

import math

import torch
import torch.nn.functional as F

from eval.cli import fail, fire_command, print_result
from eval.perplexity import evaluate
from models import build_model
from pretrain.distributed import local_device
from pretrain.run_dir import UnsafeCheckpoint, recorded_model_config, require_run_config
from switchyard.errors import ConfigError


def kept_percent(baseline_loss, student_loss, teacher_loss):
    gain = baseline_loss - teacher_loss
    if gain <= 0:
        raise ConfigError(
            f"the teacher (held-out loss {teacher_loss:.4f}) is no better than the baseline "
            f"({baseline_loss:.4f}); there is no gain to keep: train the teacher longer"
        )
    return 100 * (baseline_loss - student_loss) / gain


@torch.no_grad()
def pair_loss(run_dir, prefix, max_tokens=4096):
    """Mean cross entropy per target token of translation run RUN_DIR over every pair of PREFIX that fits, on this
    process's device (its GPU, else the CPU)."""
    from eval.bleu import translation_model
    from pretrain.data.pairs import PairDataset, TokenBudgetBatches

    model, config, src_tokenizer, tgt_tokenizer = translation_model(run_dir, None)
    pairs = PairDataset(prefix)
    if (pairs.src_tokenizer_spec, pairs.tgt_tokenizer_spec) != (src_tokenizer.spec, tgt_tokenizer.spec):
        raise ConfigError(
            f"{prefix} was made with other tokenizers than {run_dir}'s; preprocess it with "
            f"{src_tokenizer.model_path} (source) and {tgt_tokenizer.model_path} (target)"
        )
    batches = TokenBudgetBatches(
        pairs, max(max_tokens, config.max_seq_len), config.max_seq_len, tgt_tokenizer.sp.pad_id(), tgt_tokenizer.sp.bos_id(), seed=0
    )
    device = local_device()
    nll, tokens = pair_sums(model.to(device), (batches.batch(k) for k in range(len(batches))), device)
    nll, tokens = nll.item(), int(tokens)  # the one read of the device, at the end
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens, "data": str(prefix), "skipped_pairs": batches.skipped}


def pair_sums(model, batches, device):
    """(summed NLL in float64, target tokens) of translation ``model`` over ``batches`` (one epoch on one rank:
    every pair that fits, once), both on ``device``: masked sums, no boolean indexing, nothing read back."""
    from pretrain.tasks.translation import TranslationTask, positions_past
    from pretrain.trainer import to_device

    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(*TranslationTask.inputs(batch))[0].float()
        real = ~positions_past(batch["tgt_lengths"], batch["tgt_out"].shape[1])
        per_token = F.cross_entropy(logits.transpose(1, 2), batch["tgt_out"].masked_fill(~real, 0), reduction="none")
        nll += torch.where(real, per_token, 0.0).sum()
        tokens += real.sum()
    return nll, tokens


def parameter_counts(run_dir):
    """(total, active per token) of the run's model, from its config alone: the weights are read once, to score."""
    config = recorded_model_config(require_run_config(run_dir), run_dir)
    with torch.device("meta"):  # shapes only, no memory
        return build_model(config).param_counts()


def report(teacher, student, baseline, pairs=None, **data):
    rows = {}
    for role, run in (("teacher", teacher), ("student", student), ("baseline", baseline)):
        total, active = parameter_counts(str(run))
        figures = pair_loss(str(run), str(pairs)) if pairs is not None else evaluate(str(run), **data)
        rows[role] = {
            "run_dir": str(run),
            "loss": figures["loss"],
            "perplexity": figures["perplexity"],
            "parameters": total,
            "active_parameters": active,
        }
    return {
        **rows,
        "tokens": figures["tokens"],
        "data": figures["data"],
        "kept_percent": kept_percent(rows["baseline"]["loss"], rows["student"]["loss"], rows["teacher"]["loss"]),
        "compression_percent": 100 * (1 - rows["student"]["parameters"] / rows["teacher"]["parameters"]),
    }


def main(
    teacher,
    student,
    baseline,
    text=None,
    tokens=None,
    dataset=None,
    pairs=None,
    split="validation",
    field="text",
    per_line=False,
    context=None,
    stride=None,
    batch_size=8,
    output=None,
):
    """Score the three runs on the same held-out data; prints one JSON object last.

    Args:
        teacher: the teacher's run directory.
        student: the distilled student's run directory.
        baseline: the run of the student's model trained without the teacher.
        text, tokens, dataset, split, field, per_line, context, stride, batch_size: as in eval.perplexity (LMs).
        pairs: a preprocessed PREFIX of held-out sentence pairs (translation models).
        output: also write the JSON object to this file.
    """
    data = dict(
        text=None if text is None else str(text),
        tokens=None if tokens is None else str(tokens),
        dataset=dataset,
        split=split,
        field=field,
        per_line=per_line,
        context=context,
        stride=stride,
        batch_size=batch_size,
    )
    try:
        result = report(teacher, student, baseline, None if pairs is None else str(pairs), **data)
    except (ConfigError, UnsafeCheckpoint) as e:
        fail(str(e))
    print_result(result, output)


if __name__ == "__main__":
    fire_command(main, "eval.distill")
