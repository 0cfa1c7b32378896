"""Tokenize a corpus once into PREFIX.bin + PREFIX.idx (pretrain/data/indexed.py), for --train_data PREFIX.

    python -m pretrain.preprocess data/tinyshakespeare.txt --tokenizer data/tinyshakespeare.bpe320.model \\
        --output_prefix data/tinyshakespeare.bpe320 --workers 2
    python -m pretrain.preprocess ../shared/data/ptb/ptb.train.txt --per_line --tokenizer ptb.unigram8000.model
    python -m pretrain.preprocess a.jsonl b.jsonl --field dialogue --tokenizer sp.model --output_prefix dialogs
    python -m pretrain.preprocess --dataset path/to/saved_dataset --field text --tokenizer sp.model --output_prefix ds

Documents are what training reads from text (pretrain/data/lm_dataset.py): blank-line-separated
paragraphs, one per line with --per_line, the --field of each JSON Lines object (.jsonl), or of each
row of a dataset; each ends with the tokenizer's EOS. --tokenizer is ``bytes`` or a sentencepiece
.model; the index records it (path and sha256) and training uses it unless told otherwise.
OUTPUT_PREFIX defaults to the first input without its extension.

Input is streamed: the main process reads documents into chunks of about --chunk_chars characters,
--workers processes encode them (at most two chunks per worker in flight) and the results are
written in input order, so memory is bounded by the chunk size and the output does not depend on
the number of workers. Output goes to temporary names, renamed when complete. Bad input (an empty
file, non-UTF-8 bytes, bad JSON, a missing field): one line ``error: ...`` naming file and line on
stderr, exit code 2, and nothing written.
"""

import multiprocessing
import os
import threading
import time

import numpy as np
from tqdm import tqdm

from pretrain.cli import fire_command
from pretrain.data.indexed import IndexedWriter, token_dtype
from pretrain.data.lm_dataset import read_corpus
from pretrain.data.tokenizer import load_tokenizer
from switchyard.errors import ConfigError

_tokenizer = None  # one per worker process, loaded by its initializer


def _load_worker_tokenizer(name_or_path):
    global _tokenizer
    _tokenizer = load_tokenizer(name_or_path)


def encode_chunk(chunk):
    """(tokens of the chunk's documents back to back, each ending with EOS; their lengths; bytes read)."""
    texts, nbytes = chunk
    ids, lengths = [], []
    for text in texts:
        doc = _tokenizer.encode(text)
        doc.append(_tokenizer.eos_id)
        ids.extend(doc)
        lengths.append(len(doc))
    return np.asarray(ids, token_dtype(_tokenizer.vocab_size)), np.asarray(lengths, np.int64), nbytes


def chunks(documents, chunk_chars):
    texts, size, nbytes = [], 0, 0
    for text, n in documents:
        texts.append(text)
        size += len(text)
        nbytes += n
        if size >= chunk_chars:
            yield texts, nbytes
            texts, size, nbytes = [], 0, 0
    if texts:
        yield texts, nbytes


def bounded(items, slots):
    """Pool.imap reads its input as fast as it can; taking a slot per item (freed when its result is
    written) keeps the chunks in memory to the number of slots."""
    for item in items:
        slots.acquire()
        yield item


def preprocess(
    *inputs,
    output_prefix=None,
    tokenizer="bytes",
    field="text",
    per_line=False,
    dataset=None,
    dataset_config=None,
    split="train",
    workers=os.cpu_count(),
    chunk_chars=1 << 18,
):
    """Tokenize INPUTS (text or .jsonl files) or --dataset into OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx.

    Args:
        output_prefix: where to write PREFIX.bin and PREFIX.idx (default: the first input without its extension).
        tokenizer: ``bytes`` or a sentencepiece .model file (python -m pretrain.tokenizer).
        field: the text field of JSON Lines records or dataset rows.
        per_line: each line of a text file is a document (default: blank-line-separated paragraphs).
        dataset: a Hugging Face dataset name, save_to_disk directory or local data folder, instead of INPUTS.
        dataset_config: the dataset's configuration name, if it has several.
        split: the dataset split.
        workers: encoding processes.
        chunk_chars: characters of documents per chunk handed to a worker (bounds memory).
    """
    inputs = [str(path) for path in inputs]  # fire turns a file named 2024 into an int
    documents = read_corpus(inputs, dataset, dataset_config, split, field, per_line)
    if output_prefix is None:
        if not inputs:
            raise ConfigError("pass --output_prefix PREFIX for a --dataset input")
        output_prefix = os.path.splitext(inputs[0])[0]
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_prefix))):
        raise ConfigError(f"--output_prefix {output_prefix}: its directory does not exist; create it first")
    if workers < 1 or chunk_chars < 1:
        raise ConfigError(f"--workers and --chunk_chars must be >= 1, got {workers} and {chunk_chars}")
    tok = load_tokenizer(tokenizer)
    source = {
        "inputs": [os.path.abspath(p) for p in inputs],
        "dataset": dataset,
        "dataset_config": dataset_config,
        "split": split,
        "field": field,
        "per_line": per_line,
    }
    slots = threading.Semaphore(2 * workers)
    total_bytes = sum(os.path.getsize(p) for p in inputs) or None
    start = time.perf_counter()
    with (
        IndexedWriter(output_prefix, tok.vocab_size, tok.spec, source) as writer,
        multiprocessing.Pool(workers, _load_worker_tokenizer, (tokenizer,)) as pool,
        tqdm(total=total_bytes, unit="B", unit_scale=True, desc=os.path.basename(output_prefix)) as progress,
    ):
        read = 0
        for tokens, lengths, nbytes in pool.imap(encode_chunk, bounded(chunks(documents, chunk_chars), slots)):
            slots.release()
            writer.add(tokens, lengths)
            read += nbytes
            progress.update(nbytes)
    seconds = time.perf_counter() - start
    print(
        f"wrote {writer.bin_path} and {writer.idx_path}: {writer.num_docs:,} documents, {writer.num_tokens:,} tokens "
        f"({writer.dtype.name}) from {read / 1e6:.1f} MB in {seconds:.1f}s, workers={workers}: "
        f"{read / 1e6 / seconds:.2f} MB/s, {writer.num_tokens / seconds:,.0f} tokens/s"
    )


def main(argv=None):
    fire_command(preprocess, "pretrain.preprocess", argv)


if __name__ == "__main__":
    main()
