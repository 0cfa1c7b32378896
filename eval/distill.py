"""How much of a Switch teacher's gain a distilled dense student keeps, on held-out data.

    python -m eval.distill --teacher runs/switch --student runs/student --baseline runs/dense --text heldout.txt

The three runs are LM run directories: the teacher (pretrain/main.py), the student (pretrain/main.py
--task distill --teacher ...) and the baseline (the student's model trained as long without the
teacher). Each is scored by eval.perplexity on the same data (--text, --tokens or --dataset, as
there), and the result is the Switch paper's Table 6 figure:

    kept = (baseline loss - student loss) / (baseline loss - teacher loss) x 100  [%]

of the teacher's improvement over the baseline in held-out loss, with each model's loss,
perplexity and parameters (total, and active per token) and the student's compression (its
parameters / the teacher's). Printed as one JSON object last.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path as well as with -m

import fire  # noqa: E402

from eval.checkpoint import load_model  # noqa: E402
from eval.cli import fail, print_result  # noqa: E402
from eval.perplexity import evaluate  # noqa: E402
from models import ConfigError  # noqa: E402
from pretrain.checkpoint import UnsafeCheckpoint  # noqa: E402


def kept_percent(baseline_loss, student_loss, teacher_loss):
    gain = baseline_loss - teacher_loss
    if gain <= 0:
        raise ConfigError(f"the teacher (held-out loss {teacher_loss:.4f}) is no better than the baseline "
                          f"({baseline_loss:.4f}); there is no gain to keep: train the teacher longer")
    return 100 * (baseline_loss - student_loss) / gain


def report(teacher, student, baseline, **data):
    rows = {}
    for role, run in (("teacher", teacher), ("student", student), ("baseline", baseline)):
        model, _, _ = load_model(str(run))
        total, active = model.param_counts()
        figures = evaluate(str(run), **data)
        rows[role] = {"run_dir": str(run), "loss": figures["loss"], "perplexity": figures["perplexity"],
                      "parameters": total, "active_parameters": active}
    return {**rows, "tokens": figures["tokens"], "data": figures["data"],
            "kept_percent": kept_percent(rows["baseline"]["loss"], rows["student"]["loss"], rows["teacher"]["loss"]),
            "compression_percent": 100 * (1 - rows["student"]["parameters"] / rows["teacher"]["parameters"])}


def main(teacher, student, baseline, text=None, tokens=None, dataset=None, split="validation", field="text",
         per_line=False, context=None, stride=None, batch_size=8, output=None):
    """Score the three runs on the same held-out data; prints one JSON object last.

    Args:
        teacher: the teacher's run directory.
        student: the distilled student's run directory.
        baseline: the run of the student's model trained without the teacher.
        text, tokens, dataset, split, field, per_line, context, stride, batch_size: as in eval.perplexity.
        output: also write the JSON object to this file.
    """
    data = dict(text=None if text is None else str(text), tokens=None if tokens is None else str(tokens),
                dataset=dataset, split=split, field=field, per_line=per_line, context=context, stride=stride,
                batch_size=batch_size)
    try:
        result = report(teacher, student, baseline, **data)
    except (ConfigError, UnsafeCheckpoint) as e:
        fail(str(e))
    print_result(result, output)


if __name__ == "__main__":
    fire.Fire(main, name="eval.distill")
