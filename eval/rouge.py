"""ROUGE of summaries with Google's rouge-score, with bootstrap confidence intervals.

    python -m eval.rouge --hyp hyps.txt --ref refs.txt [--ref refs2.txt ...]
    python -m eval.rouge --hyp hyps.txt --ref dialogsum.test.jsonl --ref_fields summary1,summary2,summary3
    python -m eval.rouge RUN_DIR --src dialogsum.test.jsonl --src_field dialogue \
        --ref dialogsum.test.jsonl --ref_fields summary1,summary2,summary3 [--beam 4 --max_len_b 80 --hyp_output FILE]

With RUN_DIR (a pretrain/main.py --task translation run trained on document/summary pairs) the
summaries are first generated from --src (text, one document per line, or a JSON Lines file and
its --src_field) by beam search with incremental decoding, as eval.bleu translates (max length =
max_len_a x source tokens + max_len_b; documents longer than the model's positions are cut with a
warning), and written one per line to --hyp_output (default RUN_DIR/summaries.TAG.txt).

Hypotheses: one summary per line. References: text files with one summary per line (several
--ref files are several references per summary), files of one JSON list of references per line
(PREFIX.refs.jsonl of pretrain.preprocess_pairs), or a JSON Lines file whose --ref_fields hold the
references (a field may be a string or a list of strings, as SciTLDR's ``target`` is); JSON Lines
objects without --ref_fields are refused, not scored as text. With
several references a summary scores the best F-measure against any of them (rouge-score's
score_multi). Stemming is on by default (Porter, as in the ROUGE-1.5.5 script's -m).

ROUGE-Lsum is the summary-level LCS over sentences: rouge-score splits on newlines, so each
summary is first split into sentences after ., ! or ? followed by whitespace (one line per
summary in the files makes that split necessary). The other variants ignore the split.

Printed last, as one JSON object: rouge1, rouge2, rougeL, rougeLsum (F-measure x 100, the
bootstrap's mid estimate, which is the mean over summaries), and for each a [low, high] interval
(--confidence, --bootstrap resamples, --seed), precision and recall x 100, and the counts.
"""

import json
import os
import re

import numpy as np
from rouge_score import rouge_scorer, scoring

from eval.bleu import generate, search_options  # a summarizer is a translation-task model
from eval.cli import fail, fire_command, print_result, read_lines, write_atomically

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_on_lines(text):
    """The text with one sentence per line, which is how ROUGE-Lsum finds sentence boundaries."""
    return "\n".join(s for s in SENTENCE_END.split(text.strip()) if s)


def _json_records(path, lines, needs):
    """(line number, record) of each line of a JSON Lines file; a line that is not JSON is a one-line error."""
    for line, text in enumerate(lines, 1):
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"{path} line {line} is not JSON ({e.msg}); {needs}")


def _field_references(record, fields, path, line):
    if not isinstance(record, dict):
        fail(
            f"{path} line {line} is a JSON {type(record).__name__}, not an object with --ref_fields; drop --ref_fields "
            f"for a file of JSON lists of references (PREFIX.refs.jsonl of pretrain.preprocess_pairs)"
        )
    references = []
    for field in fields:
        if field not in record:
            fail(f"{path} line {line} has no field {field!r} (it has: {', '.join(record)}); pass the right --ref_fields")
        value = record[field]
        references.extend(value if isinstance(value, list) else [value])
    if not references or not all(isinstance(r, str) for r in references):
        fail(f"{path} line {line}: the fields {', '.join(fields)} must hold a string or a list of strings")
    return references


def _is_json_lines(path, lines):
    if path.endswith(".jsonl"):
        return True
    try:
        return bool(lines) and isinstance(json.loads(lines[0]), (dict, list))
    except json.JSONDecodeError:
        return False


def _file_references(path):
    """[[reference, ...] per line] of one --ref file read without --ref_fields.

    A text file holds one reference a line. A JSON Lines file is never scored as text (its JSON syntax would pass
    for words and give a plausible score): lists of strings, as pretrain.preprocess_pairs writes PREFIX.refs.jsonl,
    are each line's references; objects are refused, since which of their fields hold references must be named
    (a DialogSum record holds its dialogue and topic beside three summaries)."""
    lines = read_lines(path, "reference")
    if not _is_json_lines(path, lines):
        return [[line] for line in lines]
    rows = []
    for line, record in _json_records(path, lines, "a .jsonl --ref file must be JSON Lines"):
        if isinstance(record, dict):
            fail(
                f"reference file {path} is JSON Lines; pass --ref_fields FIELD[,FIELD...] naming the fields that hold "
                f"the references (line {line} has: {', '.join(record)})"
            )
        if not isinstance(record, list) or not record or not all(isinstance(r, str) for r in record):
            fail(
                f"{path} line {line} is not a JSON list of reference strings (the PREFIX.refs.jsonl format of "
                f"pretrain.preprocess_pairs) nor a JSON object (pass --ref_fields for those)"
            )
        rows.append(record)
    return rows


def read_references(paths, fields=None):
    """[[reference, ...] per summary] from text files (one reference a line), files of JSON lists of references
    (PREFIX.refs.jsonl), or the --ref_fields of one JSON Lines file."""
    if fields:
        if len(paths) != 1:
            fail("--ref_fields reads the references of each summary from one JSON Lines --ref file; pass exactly one")
        lines = read_lines(paths[0], "reference")
        return [
            _field_references(record, fields, paths[0], line)
            for line, record in _json_records(paths[0], lines, "--ref_fields needs a JSON Lines file")
        ]
    files = [_file_references(path) for path in paths]
    for path, rows in zip(paths[1:], files[1:]):
        if len(rows) != len(files[0]):
            fail(
                f"reference files {paths[0]} ({len(files[0])} lines) and {path} ({len(rows)} lines) differ in length; "
                f"each must hold one line per summary"
            )
    return [[ref for refs in row for ref in refs] for row in zip(*files)]


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
    result.update(
        summaries=len(hypotheses), references_per_summary=max(len(r) for r in references), stemming=stem, bootstrap=bootstrap, confidence=confidence
    )
    return result


def read_sources(path, field=None):
    """The documents to summarize: the lines of a text file, or ``field`` of each JSON Lines record."""
    lines = read_lines(path, "source")
    if field is None:
        return lines
    documents = []
    for line, text in enumerate(lines, 1):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"{path} line {line} is not JSON ({e.msg}); --src_field needs a JSON Lines file")
        if not isinstance(record.get(field), str):
            fail(f"{path} line {line} has no text field {field!r}; pass the right --src_field")
        documents.append(record[field])
    return documents


def summarize(run_dir, src, src_field, tag, batch_size, options, hyp_output):
    """Generate a summary of every --src document with RUN_DIR's checkpoint; returns (summaries, tag, output path)."""
    documents = read_sources(src, src_field)
    if not documents:
        fail(f"source file {src} is empty; it must hold one document per line")
    hypotheses, tag, _ = generate(run_dir, tag, documents, src, batch_size, options)
    summaries = [" ".join(hyps[0][0].split()) if hyps else "" for hyps in hypotheses]  # the best, on one line
    output = str(hyp_output) if hyp_output is not None else os.path.join(run_dir, f"summaries.{tag}.txt")
    write_atomically(output, "".join(s + "\n" for s in summaries))
    return summaries, tag, output


def main(
    run_dir=None,
    hyp=None,
    src=None,
    src_field=None,
    ref=(),
    ref_fields=None,
    tag=None,
    beam=4,
    lenpen=1.0,
    max_len_a=0.0,
    max_len_b=100,
    batch_size=16,
    hyp_output=None,
    stem=True,
    bootstrap=1000,
    confidence=0.95,
    seed=0,
    output=None,
):
    """Score a hypothesis file against references, or summarize --src with RUN_DIR first; prints one JSON object last.

    Args:
        run_dir: a pretrain/main.py --task translation --save_dir trained on summarization pairs (generate mode).
        hyp: the summaries, one per line (score mode).
        src: documents to summarize: one per line, or JSON Lines with --src_field (generate mode).
        src_field: the JSON Lines field holding each document.
        tag: the checkpoint (global_stepN; default: the one ``latest`` names).
        beam: beam size.
        lenpen: length penalty: hypotheses are ranked by log-probability / length ** lenpen.
        max_len_a: maximum summary length = max_len_a x document tokens + max_len_b.
        max_len_b: see max_len_a.
        batch_size: documents per beam search.
        hyp_output: where generated summaries go (default RUN_DIR/summaries.TAG.txt).
        ref: reference file(s): text, or a JSON list of references a line (PREFIX.refs.jsonl); repeat --ref for several.
        ref_fields: comma-separated JSON Lines fields holding the references (with one --ref JSON Lines file).
        stem: Porter stemming (default on).
        bootstrap: resamples for the confidence intervals.
        confidence: the intervals' level.
        seed: the resampling seed (the intervals are reproducible).
        output: also write the JSON object to this file.
    """
    if not ref or (run_dir is None) == (hyp is None) or (run_dir is not None) != (src is not None):
        fail("pass --hyp FILE --ref FILE to score summaries, or RUN_DIR --src FILE --ref FILE to generate and score them")
    if bootstrap < 1 or not 0 < confidence < 1:
        fail(f"--bootstrap must be >= 1 and --confidence in (0, 1), got {bootstrap} and {confidence}")
    fields = (list(ref_fields) if isinstance(ref_fields, (list, tuple)) else str(ref_fields).split(",")) if ref_fields else None
    options = search_options("beam", beam, lenpen, 1, 1, max_len_a, max_len_b, 1.0, 0, 0, batch_size)
    references = read_references([str(r) for r in ref], fields)
    generated = {}
    if run_dir is not None:
        hypotheses, tag, hyp = summarize(str(run_dir), str(src), src_field, tag, batch_size, options, hyp_output)
        generated = dict(run_dir=str(run_dir), tag=tag, src=str(src), beam=beam, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b)
    else:
        hypotheses = read_lines(str(hyp), "hypothesis")
        if not hypotheses:
            fail(f"hypothesis file {hyp} is empty; it must hold one summary per line")
    if len(references) != len(hypotheses):
        fail(
            f"{'source' if run_dir else 'hypothesis'} file {src if run_dir else hyp} has {len(hypotheses)} "
            f"{'documents' if run_dir else 'lines'} but the references ({', '.join(map(str, ref))}) have "
            f"{len(references)}; they must be line-aligned"
        )
    result = score(hypotheses, references, stem, bootstrap, confidence, seed)
    result.update(hyp=str(hyp), ref=[str(r) for r in ref], **generated)
    print_result(result, output)


if __name__ == "__main__":
    fire_command(main, "eval.rouge", repeated=("ref",))
