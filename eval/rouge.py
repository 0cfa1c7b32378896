"""ROUGE of summaries with Google's rouge-score, with bootstrap confidence intervals.

    python -m eval.rouge --hyp hyps.txt --ref refs.txt [--ref refs2.txt ...]
    python -m eval.rouge --hyp hyps.txt --ref dialogsum.test.jsonl --ref_fields summary1,summary2,summary3

Hypotheses: one summary per line. References: text files with one summary per line (several
--ref files are several references per summary), or a JSON Lines file whose --ref_fields hold the
references (a field may be a string or a list of strings, as SciTLDR's ``target`` is). With
several references a summary scores the best F-measure against any of them (rouge-score's
score_multi). Stemming is on by default (Porter, as in the ROUGE-1.5.5 script's -m).

ROUGE-Lsum is the summary-level LCS over sentences: rouge-score splits on newlines, so each
summary is first split into sentences after ., ! or ? followed by whitespace (one line per
summary in the files makes that split necessary). The other variants ignore the split.

Printed last, as one JSON object: rouge1, rouge2, rougeL, rougeLsum (F-measure x 100, the
bootstrap's mid estimate, which is the mean over summaries), and for each a [low, high] interval
(--confidence, --bootstrap resamples, --seed), precision and recall x 100, and the counts.
"""
import functools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path as well as with -m

import fire  # noqa: E402
import numpy as np  # noqa: E402
from rouge_score import rouge_scorer, scoring  # noqa: E402

from eval.cli import fail, print_result, read_lines, repeated_flag  # noqa: E402

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_on_lines(text):
    """The text with one sentence per line, which is how ROUGE-Lsum finds sentence boundaries."""
    return "\n".join(s for s in SENTENCE_END.split(text.strip()) if s)


def _field_references(record, fields, path, line):
    references = []
    for field in fields:
        if field not in record:
            fail(f"{path} line {line} has no field {field!r} (it has: {', '.join(record)}); pass the right --ref_fields")
        value = record[field]
        references.extend(value if isinstance(value, list) else [value])
    if not references or not all(isinstance(r, str) for r in references):
        fail(f"{path} line {line}: the fields {', '.join(fields)} must hold a string or a list of strings")
    return references


def read_references(paths, fields=None):
    """[[reference, ...] per summary] from text files (one reference each) or one JSON Lines file."""
    if fields:
        if len(paths) != 1:
            fail("--ref_fields reads the references of each summary from one JSON Lines --ref file; pass exactly one")
        rows = []
        for line, text in enumerate(read_lines(paths[0], "reference"), 1):
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                fail(f"{paths[0]} line {line} is not JSON ({e.msg}); --ref_fields needs a JSON Lines file")
            rows.append(_field_references(record, fields, paths[0], line))
        return rows
    columns = [read_lines(path, "reference") for path in paths]
    for path, column in zip(paths[1:], columns[1:]):
        if len(column) != len(columns[0]):
            fail(f"reference files {paths[0]} ({len(columns[0])} lines) and {path} ({len(column)} lines) differ in length; "
                 f"each must hold one reference per summary")
    return [list(refs) for refs in zip(*columns)]


def score(hypotheses, references, stem=True, bootstrap=1000, confidence=0.95, seed=0):
    """The figures (see the module docstring) of ``hypotheses`` against ``references`` (a list of lists)."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)
    aggregator = scoring.BootstrapAggregator(confidence_interval=confidence, n_samples=bootstrap)
    for hypothesis, refs in zip(hypotheses, references):
        aggregator.add_scores(scorer.score_multi([sentences_on_lines(r) for r in refs], sentences_on_lines(hypothesis)))
    np.random.seed(seed)  # rouge-score resamples with numpy's global generator
    aggregate = aggregator.aggregate()
    result = {key: 100 * aggregate[key].mid.fmeasure for key in ROUGE_TYPES}
    result["interval"] = {key: [100 * aggregate[key].low.fmeasure, 100 * aggregate[key].high.fmeasure] for key in ROUGE_TYPES}
    result["precision"] = {key: 100 * aggregate[key].mid.precision for key in ROUGE_TYPES}
    result["recall"] = {key: 100 * aggregate[key].mid.recall for key in ROUGE_TYPES}
    result.update(summaries=len(hypotheses), references_per_summary=max(len(r) for r in references), stemming=stem,
                  bootstrap=bootstrap, confidence=confidence)
    return result


def main(hyp=None, ref=(), ref_fields=None, stem=True, bootstrap=1000, confidence=0.95, seed=0, output=None):
    """Score a hypothesis file against references; prints one JSON object last.

    Args:
        hyp: the summaries, one per line.
        ref: reference file(s); repeat --ref for several references per summary.
        ref_fields: comma-separated JSON Lines fields holding the references (with one --ref JSON Lines file).
        stem: Porter stemming (default on).
        bootstrap: resamples for the confidence intervals.
        confidence: the intervals' level.
        seed: the resampling seed (the intervals are reproducible).
        output: also write the JSON object to this file.
    """
    if hyp is None or not ref:
        fail("pass --hyp FILE and at least one --ref FILE")
    if bootstrap < 1 or not 0 < confidence < 1:
        fail(f"--bootstrap must be >= 1 and --confidence in (0, 1), got {bootstrap} and {confidence}")
    fields = [f for f in (ref_fields if isinstance(ref_fields, (list, tuple)) else str(ref_fields).split(","))] \
        if ref_fields else None
    hypotheses = read_lines(str(hyp), "hypothesis")
    if not hypotheses:
        fail(f"hypothesis file {hyp} is empty; it must hold one summary per line")
    references = read_references([str(r) for r in ref], fields)
    if len(references) != len(hypotheses):
        fail(f"hypothesis file {hyp} has {len(hypotheses)} lines but the references ({', '.join(map(str, ref))}) have "
             f"{len(references)}; they must be line-aligned")
    result = score(hypotheses, references, stem, bootstrap, confidence, seed)
    result.update(hyp=str(hyp), ref=[str(r) for r in ref])
    print_result(result, output)


if __name__ == "__main__":
    argv, refs = repeated_flag(sys.argv[1:], "ref")
    fire.Fire(functools.partial(main, ref=refs), command=argv, name="eval.rouge")
