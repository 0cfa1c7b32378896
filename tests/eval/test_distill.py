"""python -m eval.distill: the kept share of the teacher's gain, from each run's held-out loss."""
import json
import subprocess
import sys

import pytest

from eval.distill import kept_percent
from eval.perplexity import evaluate
from models import ConfigError
from tests.distributed import CORPUS, REPO


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    text = CORPUS.read_text()
    path.write_text(text[text.index("\n\n", len(text) - 8000) + 2:])
    return path


def distill_report(*args):
    proc = subprocess.run([sys.executable, "-m", "eval.distill", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    return proc, (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None)


def test_kept_percent():
    assert kept_percent(baseline_loss=2.0, student_loss=1.9, teacher_loss=1.6) == pytest.approx(25.0)
    assert kept_percent(2.0, 2.1, 1.6) == pytest.approx(-25.0)  # a student worse than the baseline keeps nothing
    with pytest.raises(ConfigError, match="no better than the baseline"):
        kept_percent(2.0, 1.9, 2.0)


def test_report_scores_the_three_runs_on_the_same_data(trained, heldout):
    # Stand-ins for the three roles: a well-trained LM as teacher, two 3-step LMs as baseline and student.
    teacher, baseline, student = trained("dense"), trained("zero3"), trained("pipeline")
    proc, result = distill_report("--teacher", teacher, "--student", student, "--baseline", baseline, "--text", heldout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {role: evaluate(str(run), text=str(heldout))["loss"] for role, run in
              (("teacher", teacher), ("student", student), ("baseline", baseline))}
    assert {role: result[role]["loss"] for role in losses} == losses
    assert result["kept_percent"] == pytest.approx(kept_percent(losses["baseline"], losses["student"], losses["teacher"]))
    assert result["teacher"]["parameters"] == result["teacher"]["active_parameters"] > 0


def test_a_teacher_worse_than_the_baseline_is_one_line(trained, heldout):
    proc, _ = distill_report("--teacher", trained("zero3"), "--student", trained("pipeline"), "--baseline", trained("dense"),
                             "--text", heldout)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the teacher (held-out loss") and "no better than the baseline" in lines[-1]
