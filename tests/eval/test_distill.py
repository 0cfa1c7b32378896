"""python -m eval.distill: the kept share of the teacher's gain, from each run's held-out loss."""

import json
import subprocess
import sys

import pytest
import torch

from eval.distill import kept_percent
from eval.perplexity import evaluate
from switchyard.errors import ConfigError
from tests.distributed import CORPUS, REPO


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    text = CORPUS.read_text()
    path.write_text(text[text.index("\n\n", len(text) - 8000) + 2 :])
    return path


def distill_report(*args):
    proc = subprocess.run([sys.executable, "-m", "eval.distill", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)
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
    losses = {
        role: evaluate(str(run), text=str(heldout))["loss"] for role, run in (("teacher", teacher), ("student", student), ("baseline", baseline))
    }
    assert {role: result[role]["loss"] for role in losses} == losses
    assert result["kept_percent"] == pytest.approx(kept_percent(losses["baseline"], losses["student"], losses["teacher"]))
    assert result["teacher"]["parameters"] == result["teacher"]["active_parameters"] > 0


def test_a_teacher_worse_than_the_baseline_is_one_line(trained, heldout):
    proc, _ = distill_report("--teacher", trained("zero3"), "--student", trained("pipeline"), "--baseline", trained("dense"), "--text", heldout)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the teacher (held-out loss") and "no better than the baseline" in lines[-1]


def test_translation_runs_are_scored_by_cross_entropy_over_every_held_out_pair(translation_run, pair_data, tmp_path):
    """--pairs: each model's loss is the mean NLL over every target token of the held-out pairs; checked here
    against scoring the pairs one at a time, without padding."""
    import torch.nn.functional as F

    from eval.bleu import translation_model
    from eval.distill import pair_loss
    from pretrain.data.pairs import PairDataset

    _, val, _ = pair_data
    figures = pair_loss(str(translation_run), str(val), max_tokens=256)
    model, _, _, tokenizer = translation_model(str(translation_run), None)
    pairs, nll, tokens = PairDataset(val), 0.0, 0
    with torch.no_grad():
        for i in range(len(pairs)):
            src, tgt = (torch.from_numpy(x.astype("int64"))[None] for x in (pairs.src(i), pairs.tgt(i)))
            tgt_in = torch.cat([torch.tensor([[tokenizer.sp.bos_id()]]), tgt[:, :-1]], dim=1)
            logits = model(src, torch.zeros_like(src, dtype=torch.bool), tgt_in)[0]
            nll += F.cross_entropy(logits[0].float(), tgt[0], reduction="sum").item()
            tokens += tgt.shape[1]
    assert figures["skipped_pairs"] == 0 and figures["tokens"] == tokens
    assert figures["loss"] == pytest.approx(nll / tokens, rel=1e-5)

    proc, result = distill_report("--teacher", translation_run, "--student", translation_run, "--baseline", translation_run, "--pairs", val)
    assert proc.returncode == 2 and "no better than the baseline" in proc.stderr  # one run in all three roles: no gain


def test_translation_pairs_are_scored_on_the_process_device(translation_run, pair_data, monkeypatch):
    """Stands in for a GPU: the device pair scoring is given is "meta", where an op mixing in a CPU tensor (a batch
    or a weight left behind) raises, and a read (.item(), a boolean index) is impossible; the sums come back on it.
    And pair_loss hands the model and the batches to the device its process has (pretrain.distributed.local_device)."""
    import eval.distill
    from eval.bleu import translation_model
    from pretrain.data.pairs import PairDataset, TokenBudgetBatches

    _, val, _ = pair_data
    model, config, _, tokenizer = translation_model(str(translation_run), None)
    batches = TokenBudgetBatches(PairDataset(val), 256, config.max_seq_len, tokenizer.sp.pad_id(), tokenizer.sp.bos_id(), seed=0)
    meta = torch.device("meta")
    nll, tokens = eval.distill.pair_sums(model.to(meta), (batches.batch(k) for k in range(len(batches))), meta)
    assert (nll.device, nll.dtype, tokens.device) == (meta, torch.float64, meta)

    handed = {}

    def recording_pair_sums(model, batches, device):
        handed.update(model_device=next(model.parameters()).device, device=device)
        return torch.tensor(1.0, dtype=torch.float64), torch.tensor(1)

    monkeypatch.setattr(eval.distill, "local_device", lambda: meta)
    monkeypatch.setattr(eval.distill, "pair_sums", recording_pair_sums)
    eval.distill.pair_loss(str(translation_run), str(val))
    assert handed == {"model_device": meta, "device": meta}
