"""python -m eval.rouge: figures worked out by hand, several references, stemming, ROUGE-Lsum's sentences, bad input."""

import json
import subprocess
import sys

import pytest

from eval.rouge import score
from pretrain.preprocess_pairs import preprocess_pairs
from tests.distributed import REPO
from tests.eval.test_bleu import toy_test_files

DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.test.jsonl"


def rouge(*args):
    proc = subprocess.run([sys.executable, "-m", "eval.rouge", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_two_references_take_the_best_match_per_summary(tmp_path):
    hyp = write(tmp_path / "hyp.txt", ["the cat sat on the mat. it was happy.", "hello world"])
    ref1 = write(tmp_path / "ref1.txt", ["the cats sat on a mat. it was glad.", "hello there world"])
    ref2 = write(tmp_path / "ref2.txt", ["a cat was on the mat.", "world hello"])
    proc, result = rouge("--hyp", hyp, "--ref", ref1, "--ref", ref2, "--output", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    # Summary 1: 7 of 9 unigrams shared with ref1 once "cats" is stemmed (F 7/9; ref2 gives 2/3).
    # Summary 2: ref2 has the same unigrams (F 1; ref1 gives 0.8). The mean is reported x 100.
    assert result["rouge1"] == pytest.approx(100 * (7 / 9 + 1) / 2)
    # Bigrams: summary 1 shares 5 of its 8 with ref1 (the cat, cat sat, sat on, mat it, it was; both have 8);
    # summary 2's one bigram is in neither reference.
    assert result["rouge2"] == pytest.approx(100 * (5 / 8 + 0) / 2)
    assert (result["summaries"], result["references_per_summary"], result["stemming"]) == (2, 2, True)
    assert json.loads((tmp_path / "r.json").read_text()) == result


def test_stemming_is_on_by_default():
    stemmed = score(["the cats were running"], [["the cat was run"]])
    plain = score(["the cats were running"], [["the cat was run"]], stem=False)
    assert stemmed["rouge1"] == pytest.approx(100 * 3 / 4)  # the, cat, run (was/were stem differently)
    assert plain["rouge1"] == pytest.approx(100 * 1 / 4)


def test_rouge_lsum_matches_sentence_by_sentence():
    """Sentences in the other order: the whole-text LCS finds one of them, the summary-level LCS both."""
    result = score(["alpha beta gamma. delta epsilon zeta."], [["delta epsilon zeta. alpha beta gamma."]])
    assert result["rougeL"] == pytest.approx(50.0)
    assert result["rougeLsum"] == pytest.approx(100.0)


def test_intervals_bracket_the_mean_and_repeat_with_the_seed():
    hyps = ["a b c d", "a b x y", "p q r s", "a x c y", "b c d e", "q r s t"]
    refs = [["a b c d"], ["a b c d"], ["a b c d"], ["a b c d"], ["a b c d"], ["p q r s"]]
    first, again, other = score(hyps, refs, seed=1), score(hyps, refs, seed=1), score(hyps, refs, seed=2)
    low, high = first["interval"]["rouge1"]
    assert low < first["rouge1"] < high
    assert first == again and first["interval"] != other["interval"]


def test_references_from_json_lines_fields_strings_or_lists(tmp_path):
    records = [{"s1": "the cat sat", "s2": ["a dog ran", "the cat ran"]}, {"s1": "red sky", "s2": ["blue sea"]}]
    refs = write(tmp_path / "refs.jsonl", [json.dumps(r) for r in records])
    hyp = write(tmp_path / "hyp.txt", ["the cat ran", "blue sea"])
    proc, result = rouge("--hyp", hyp, "--ref", refs, "--ref_fields", "s1,s2")
    assert proc.returncode == 0, proc.stderr
    assert result["rouge1"] == pytest.approx(100.0) and result["references_per_summary"] == 3


def test_references_kept_by_preprocess_pairs_are_read_as_lists(tmp_path):
    """PREFIX.refs.jsonl holds one JSON list of references a line: each list is that summary's references, as
    the --ref_fields of the JSON Lines it was made from give them (not the JSON text scored as words)."""
    records = [{"doc": "d1", "s1": "the cat sat", "s2": "the cat ran"}, {"doc": "d2", "s1": "red sky", "s2": "blue sea"}]
    data = write(tmp_path / "data.jsonl", [json.dumps(r) for r in records])
    preprocess_pairs(jsonl=str(data), source_field="doc", target_field="s1,s2", output_prefix=str(tmp_path / "p"), workers=1)
    hyp = write(tmp_path / "hyp.txt", ["the cat ran", "blue sea"])
    proc, from_lists = rouge("--hyp", hyp, "--ref", tmp_path / "p.refs.jsonl")
    assert proc.returncode == 0, proc.stderr
    _, from_fields = rouge("--hyp", hyp, "--ref", data, "--ref_fields", "s1,s2")
    assert from_lists["rouge1"] == from_fields["rouge1"] == pytest.approx(100.0)
    assert from_lists["references_per_summary"] == 2


@pytest.mark.skipif(not DIALOGSUM.exists(), reason="../shared/data/dialogsum is not present")
def test_dialogsum_references_and_a_lead_baseline(tmp_path):
    records = [json.loads(line) for line in DIALOGSUM.read_text().splitlines()]
    own = write(tmp_path / "summary1.txt", [r["summary1"] for r in records])
    proc, result = rouge("--hyp", own, "--ref", DIALOGSUM, "--ref_fields", "summary1,summary2,summary3")
    assert proc.returncode == 0, proc.stderr
    assert all(result[key] == pytest.approx(100.0) for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    # Lead baseline: the first utterance of each dialogue, speaker tag removed.
    lead = write(tmp_path / "lead.txt", [r["dialogue"].split("\n")[0].split(":", 1)[1].strip() for r in records])
    proc, lead_result = rouge("--hyp", lead, "--ref", DIALOGSUM, "--ref_fields", "summary1,summary2,summary3")
    assert proc.returncode == 0, proc.stderr
    print("DialogSum test, lead-1 baseline:", {k: round(lead_result[k], 2) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")})
    assert 5 < lead_result["rouge1"] < 60 and lead_result["rouge2"] < lead_result["rouge1"]


def test_bad_input_is_one_line_and_leaves_no_output(tmp_path):
    hyp = write(tmp_path / "hyp.txt", ["one", "two"])
    short = write(tmp_path / "short.txt", ["one"])
    empty = write(tmp_path / "empty.txt", [])
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    jsonl = write(tmp_path / "refs.jsonl", [json.dumps({"summary": "one"}), json.dumps({"other": "two"})])
    lists = write(tmp_path / "p.refs.jsonl", [json.dumps(["one"]), json.dumps(["two"])])
    out = tmp_path / "out.json"
    cases = [
        (("--hyp", hyp, "--ref", short), f"hypothesis file {hyp} has 2 lines but the references ({short}) have 1"),
        (("--hyp", empty, "--ref", short), f"hypothesis file {empty} is empty"),
        (("--hyp", hyp, "--ref", tmp_path / "latin1.txt"), "is not UTF-8 (line 2)"),
        (("--hyp", hyp, "--ref", jsonl, "--ref_fields", "summary"), f"{jsonl} line 2 has no field 'summary'"),
        (
            ("--hyp", hyp, "--ref", jsonl),
            f"reference file {jsonl} is JSON Lines; pass --ref_fields FIELD[,FIELD...] naming "
            f"the fields that hold the references (line 1 has: summary)",
        ),
        (("--hyp", hyp, "--ref", lists, "--ref_fields", "summary"), f"{lists} line 1 is a JSON list, not an object"),
        (("--hyp", tmp_path / "missing.txt", "--ref", short), "hypothesis file"),
        (("--hyp", hyp, "--ref", hyp, "--ref", short), f"reference files {hyp} (2 lines) and {short} (1 lines) differ"),
        (("--hyp", hyp), "pass --hyp FILE --ref FILE to score summaries, or RUN_DIR --src FILE --ref FILE"),
    ]
    for args, expected in cases:
        proc, _ = rouge(*args, "--output", out)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, proc.stderr)
        assert not out.exists()


def test_generate_mode_summarizes_json_lines_documents_like_eval_bleu_translates(tmp_path, translation_run, pair_data):
    """The toy translation run stands in for a summarizer: documents from a JSON Lines field, beam search,
    one summary per line, scored against the reference field; the same outputs as eval.bleu's."""
    sources, targets = toy_test_files(tmp_path, pair_data)
    data = write(tmp_path / "pairs.jsonl", [json.dumps({"document": s, "summary": t}) for s, t in zip(sources, targets)])
    proc, result = rouge(
        translation_run,
        "--src",
        data,
        "--src_field",
        "document",
        "--ref",
        data,
        "--ref_fields",
        "summary",
        "--beam",
        4,
        "--max_len_a",
        1.2,
        "--max_len_b",
        10,
        "--hyp_output",
        tmp_path / "summaries.txt",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = (tmp_path / "summaries.txt").read_text().splitlines()
    assert len(summaries) == len(sources) == result["summaries"] and result["tag"] == "global_step150"
    translated = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.bleu",
            str(translation_run),
            "--src",
            str(write(tmp_path / "src", sources)),
            "--ref",
            str(write(tmp_path / "ref", targets)),
            "--beam",
            "4",
            "--hyp_output",
            str(tmp_path / "hyps.txt"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert translated.returncode == 0, translated.stderr[-3000:]
    assert summaries == (tmp_path / "hyps.txt").read_text().splitlines()
    _, rescored = rouge("--hyp", tmp_path / "summaries.txt", "--ref", data, "--ref_fields", "summary")
    assert all(rescored[key] == result[key] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert result["rouge1"] > 30, result  # the toy pair is being learned


def test_generate_mode_refuses_a_language_model_and_a_missing_source_field(tmp_path, trained):
    data = write(tmp_path / "pairs.jsonl", [json.dumps({"text": "a b", "summary": "a"})])
    proc, _ = rouge(trained("zero3"), "--src", data, "--src_field", "text", "--ref", data, "--ref_fields", "summary")
    assert proc.returncode == 2 and "not a translation model" in proc.stderr.strip().splitlines()[-1]
    proc, _ = rouge(trained("zero3"), "--src", data, "--src_field", "document", "--ref", data, "--ref_fields", "summary")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {data} line 1 has no text field 'document'; pass the right --src_field"
    ]
