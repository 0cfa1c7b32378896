"""Tokenize sentence pairs once into PREFIX.src.bin/.idx and PREFIX.tgt.bin/.idx (pretrain/data/pairs.py).

    # parallel text: line i of --source is the translation of line i of --target
    python -m pretrain.preprocess_pairs --source ../shared/data/multi30k/raw/train.de \\
        --target ../shared/data/multi30k/raw/train.en --tokenizer data/multi30k.bpe8000.model \\
        --output_prefix data/multi30k.train
    # summarization JSON Lines: one record per line; several reference fields for evaluation data
    python -m pretrain.preprocess_pairs --jsonl ../shared/data/dialogsum/dialogsum.test.jsonl \\
        --source_field dialogue --target_field summary1,summary2,summary3 --tokenizer sp.model \\
        --output_prefix data/dialogsum.test

Each pair is one document on each side: the sentence's tokens followed by the tokenizer's EOS.
--tokenizer (``bytes`` or a sentencepiece .model) serves both sides; --src_tokenizer and
--tgt_tokenizer give each side its own. Each index records the tokenizer it was made with.

JSON Lines: --source_field names the source text, --target_field one field or several
(comma-separated or a list); a field may hold a string or a list of strings. Training takes the
first reference of each record (PREFIX.tgt); all of them, in order, go to PREFIX.refs.jsonl (one
JSON list of strings per pair) for evaluation. A field holding a list as the source is one text
(its items joined by newlines), e.g. a dialogue's turns.

Pairs with a blank side are dropped from both sides (and from the references) and counted.
Input is streamed in chunks to --workers processes as pretrain.preprocess does; outputs are written
under temporary names and renamed when complete. Bad input is one line ``error: ...`` and exit
code 2, nothing written: parallel files whose line counts differ (naming both files and counts),
non-UTF-8 bytes or bad JSON (naming file and line), a missing field.
"""

import contextlib
import json
import multiprocessing
import os
import threading
import time

import numpy as np
from tqdm import tqdm

from pretrain.cli import fire_command
from pretrain.data.indexed import IndexedWriter, token_dtype
from pretrain.data.lm_dataset import field_text, json_field, json_record, read_lines
from pretrain.data.tokenizer import load_tokenizer
from pretrain.preprocess import bounded
from switchyard.errors import ConfigError

_tokenizers = None  # (source, target) in each worker process, loaded by its initializer


def _load_worker_tokenizers(src_name, tgt_name):
    global _tokenizers
    _tokenizers = load_tokenizer(src_name), load_tokenizer(tgt_name)


def _encode_side(tokenizer, texts):
    ids, lengths = [], []
    for text in texts:
        doc = tokenizer.encode(text)
        doc.append(tokenizer.eos_id)
        ids.extend(doc)
        lengths.append(len(doc))
    return np.asarray(ids, token_dtype(tokenizer.vocab_size)), np.asarray(lengths, np.int64)


def encode_pairs(chunk):
    """((source tokens, lengths), (target tokens, lengths), references, bytes read, pairs dropped) of a chunk."""
    sources, targets, references, nbytes, dropped = chunk
    return _encode_side(_tokenizers[0], sources), _encode_side(_tokenizers[1], targets), references, nbytes, dropped


def count_lines(path):
    """Lines of a file, counted in binary (a last line without a newline counts)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def parallel_pairs(source, target):
    """(source line, target line, [target line], bytes) of line-aligned files."""
    for (_, src, src_bytes), (_, tgt, tgt_bytes) in zip(read_lines(source), read_lines(target)):
        tgt = tgt.rstrip("\r\n")
        yield src.rstrip("\r\n"), tgt, [tgt], src_bytes + tgt_bytes


def json_pairs(path, source_field, target_fields):
    """(source text, first reference, all references, bytes) of each JSON Lines record."""
    for number, line, nbytes in read_lines(path):
        if not line.strip():
            continue
        record = json_record(path, number, line)
        where = f"data file {path} line {number} field"
        source = field_text(
            json_field(record, source_field, path, number, "--source_field"), f"{where} {source_field!r}", "pick a text field with --source_field"
        )
        references = []
        for field in target_fields:
            value = json_field(record, field, path, number, "--target_field")
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values):
                raise ConfigError(f"{where} {field!r} is {type(value).__name__}, not text or a list of texts; pick a text field with --target_field")
            references.extend(values)
        yield source, references[0] if references else "", references, nbytes


def chunks(pairs, chunk_chars):
    """Chunks of pairs for the workers, with the bytes read for them and the count of pairs with a blank side
    left out of them."""
    sources, targets, references, size, nbytes, dropped = [], [], [], 0, 0, 0
    for source, target, refs, n in pairs:
        nbytes += n
        if not (source.strip() and target.strip()):
            dropped += 1
            continue
        sources.append(source)
        targets.append(target)
        references.append(refs)
        size += len(source) + len(target)
        if size >= chunk_chars:
            yield sources, targets, references, nbytes, dropped
            sources, targets, references, size, nbytes, dropped = [], [], [], 0, 0, 0
    if sources or nbytes:
        yield sources, targets, references, nbytes, dropped


@contextlib.contextmanager
def atomic_lines(path):
    """A text file written under PATH.tmp and renamed to PATH on a clean exit (removed otherwise)."""
    f = open(path + ".tmp", "w", encoding="utf-8")
    try:
        yield f
    except BaseException:
        f.close()
        os.remove(path + ".tmp")
        raise
    f.close()
    os.replace(path + ".tmp", path)


def pair_inputs(source, target, jsonl, source_field, target_field):
    """The stream of pairs, the input files and a description of them; the choice of inputs is checked here."""
    if (jsonl is None) == (source is None and target is None):
        raise ConfigError("pass --source FILE --target FILE (parallel text) or --jsonl FILE (JSON Lines), one of the two")
    if jsonl is None:
        if source is None or target is None:
            raise ConfigError("parallel text needs both --source FILE and --target FILE")
        inputs = [str(source), str(target)]
    else:
        inputs = [str(jsonl)]
        if source_field is None or target_field is None:
            raise ConfigError("--jsonl needs --source_field NAME and --target_field NAME (several: NAME1,NAME2)")
    for path in inputs:
        if not os.path.isfile(path):
            raise ConfigError(f"data file {path} does not exist; pass an existing UTF-8 file")
    if jsonl is None:
        n_src, n_tgt = count_lines(inputs[0]), count_lines(inputs[1])
        if n_src != n_tgt:
            raise ConfigError(f"--source {inputs[0]} has {n_src:,} lines but --target {inputs[1]} has {n_tgt:,}; parallel files must be line-aligned")
        return parallel_pairs(*inputs), inputs, {"source": inputs[0], "target": inputs[1]}
    target_fields = target_field.split(",") if isinstance(target_field, str) else [str(f) for f in target_field]
    return (
        json_pairs(inputs[0], str(source_field), target_fields),
        inputs,
        {"jsonl": inputs[0], "source_field": source_field, "target_fields": target_fields},
    )


def preprocess_pairs(
    source=None,
    target=None,
    jsonl=None,
    source_field=None,
    target_field=None,
    output_prefix=None,
    tokenizer="bytes",
    src_tokenizer=None,
    tgt_tokenizer=None,
    workers=os.cpu_count(),
    chunk_chars=1 << 18,
):
    """Tokenize line-aligned --source/--target files or --jsonl records into PREFIX.src.* and PREFIX.tgt.*.

    Args:
        source: source-language text, one sentence per line.
        target: target-language text, line-aligned with --source.
        jsonl: JSON Lines file of pairs instead (summarization), with --source_field and --target_field.
        source_field: the JSON field of the source text.
        target_field: the JSON field of the reference, or several (NAME1,NAME2): the first trains, all go to PREFIX.refs.jsonl.
        output_prefix: where to write PREFIX.src.bin/.idx, PREFIX.tgt.bin/.idx (and PREFIX.refs.jsonl);
            default: the --source or --jsonl file without its extension.
        tokenizer: ``bytes`` or a sentencepiece .model for both sides.
        src_tokenizer: the source side's own tokenizer (with --tgt_tokenizer, instead of --tokenizer).
        tgt_tokenizer: the target side's own tokenizer.
        workers: encoding processes.
        chunk_chars: characters of pairs per chunk handed to a worker (bounds memory).
    """
    pairs, inputs, description = pair_inputs(source, target, jsonl, source_field, target_field)
    if (src_tokenizer is None) != (tgt_tokenizer is None):
        raise ConfigError("pass both --src_tokenizer and --tgt_tokenizer, or --tokenizer for both sides")
    src_name, tgt_name = (src_tokenizer, tgt_tokenizer) if src_tokenizer is not None else (tokenizer, tokenizer)
    output_prefix = str(output_prefix) if output_prefix is not None else os.path.splitext(inputs[0])[0]
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_prefix))):
        raise ConfigError(f"--output_prefix {output_prefix}: its directory does not exist; create it first")
    if workers < 1 or chunk_chars < 1:
        raise ConfigError(f"--workers and --chunk_chars must be >= 1, got {workers} and {chunk_chars}")
    src_tok, tgt_tok = load_tokenizer(src_name), load_tokenizer(tgt_name)
    slots = threading.Semaphore(2 * workers)
    start = time.perf_counter()
    src_source, tgt_source = {**description, "side": "source"}, {**description, "side": "target"}
    with (
        IndexedWriter(f"{output_prefix}.src", src_tok.vocab_size, src_tok.spec, src_source) as src_out,
        IndexedWriter(f"{output_prefix}.tgt", tgt_tok.vocab_size, tgt_tok.spec, tgt_source) as tgt_out,
        atomic_lines(f"{output_prefix}.refs.jsonl") if jsonl is not None else contextlib.nullcontext() as refs_out,
        multiprocessing.Pool(workers, _load_worker_tokenizers, (src_name, tgt_name)) as pool,
        tqdm(total=sum(map(os.path.getsize, inputs)), unit="B", unit_scale=True, desc=os.path.basename(output_prefix)) as progress,
    ):
        read = dropped = 0
        encoded = pool.imap(encode_pairs, bounded(chunks(pairs, chunk_chars), slots))
        for (src, src_lengths), (tgt, tgt_lengths), references, nbytes, blank in encoded:
            slots.release()
            dropped += blank
            src_out.add(src, src_lengths)
            tgt_out.add(tgt, tgt_lengths)
            if refs_out is not None:
                refs_out.writelines(json.dumps(refs, ensure_ascii=False) + "\n" for refs in references)
            read += nbytes
            progress.update(nbytes)
        if src_out.num_docs == 0:
            raise ConfigError(f"{', '.join(inputs)} holds no pair with text on both sides; pass files with text in them")
    seconds = time.perf_counter() - start
    tokens = src_out.num_tokens + tgt_out.num_tokens
    written = f"{output_prefix}.src.bin/.idx, {output_prefix}.tgt.bin/.idx" + (f", {output_prefix}.refs.jsonl" if jsonl else "")
    print(
        f"wrote {written}: {src_out.num_docs:,} pairs ({dropped:,} with a blank side dropped), "
        f"{src_out.num_tokens:,} source and {tgt_out.num_tokens:,} target tokens from {read / 1e6:.1f} MB in {seconds:.1f}s, "
        f"workers={workers}: {read / 1e6 / seconds:.2f} MB/s, {tokens / seconds:,.0f} tokens/s"
    )


def main(argv=None):
    fire_command(preprocess_pairs, "pretrain.preprocess_pairs", argv)


if __name__ == "__main__":
    main()
