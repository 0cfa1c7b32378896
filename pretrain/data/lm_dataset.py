"""Language-model data: documents streamed from text or JSON Lines files (or a Hugging Face dataset),
and samples: a token stream cut into fixed-length windows, read in a seeded order.

The order is a pure function of (seed, sample number), so the position in the data is one
integer, ``consumed_samples``: a resumed run recomputes exactly the batches an uninterrupted
run would have drawn. Within a global batch, rank r of W reads micro-batch slice r, so ranks
read disjoint samples and the union over ranks is the same global batch for any W.

Several corpora are blended with weights (as Megatron's BlendableDataset): BlendedOrder maps
sample number k to (corpus, sample), each corpus read in its own seeded order, again a pure
function of (seed, k).
"""

import itertools
import json
import os

import numpy as np
import torch

from switchyard.errors import ConfigError


def read_lines(path):
    """(line number, text, raw byte count) of each line of a file, streamed; non-UTF-8 bytes are refused with their line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist; pass an existing UTF-8 text file")
    with f:
        offset = 0
        for number, raw in enumerate(f, 1):  # split on b"\n", which is never part of a multi-byte UTF-8 character
            try:
                yield number, raw.decode("utf-8"), len(raw)
            except UnicodeDecodeError as e:
                raise ConfigError(f"data file {path} line {number} is not UTF-8 (byte {offset + e.start}); convert it, e.g. iconv -t UTF-8")
            offset += len(raw)


def _paragraphs(path):
    r"""Blank-line-separated documents, each with "\n\n" appended: the pieces of str.split("\n\n") on the whole file."""
    lines, nbytes = [], 0
    for _, line, size in read_lines(path):
        nbytes += size
        if line == "\n" and lines:  # with the previous line's "\n" this is a "\n\n" separator
            yield "".join(lines) + "\n", nbytes
            lines, nbytes = [], 0
        else:
            lines.append(line)
    if lines:
        yield "".join(lines) + "\n\n", nbytes


def _line_documents(path):
    for _, line, size in read_lines(path):
        yield line.rstrip("\r\n"), size


def _json_documents(path, field):
    for number, line, size in read_lines(path):
        if not line.strip():
            yield "", size
            continue
        record = json_record(path, number, line)
        text = json_field(record, field, path, number, "--field")
        yield field_text(text, f"data file {path} line {number} field {field!r}"), size


def json_record(path, number, line):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"data file {path} line {number} is not valid JSON ({e.msg}); each line must be one JSON object")


def json_field(record, field, path, number, flag):
    """record[field], or one line naming file, line, the fields there are and the flag that picks one."""
    if not isinstance(record, dict) or field not in record:
        has = f"it has {', '.join(map(repr, record))}" if isinstance(record, dict) else "it is not an object"
        raise ConfigError(f"data file {path} line {number} has no field {field!r} ({has}); pass {flag} NAME")
    return record[field]


def field_text(value, where, fix="pick a text field with --field"):
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)  # e.g. a list of sentences
    if not isinstance(value, str):
        raise ConfigError(f"{where} is {type(value).__name__}, not text; {fix}")
    return value


def is_json_lines(path):
    return str(path).endswith((".jsonl", ".json"))


def read_documents(path, per_line=False, field="text"):
    r"""Stream the documents of a local file as (text to encode, raw bytes read for it).

    Plain text: blank-line-separated paragraphs (with "\n\n" appended), or with ``per_line`` each
    non-blank line. JSON Lines (.jsonl, .json): the text in ``field`` of each object. A file without
    any text, non-UTF-8 bytes, bad JSON or a missing field raise ConfigError naming file and line.
    """
    if is_json_lines(path):
        documents = _json_documents(path, field)
    else:
        documents = _line_documents(path) if per_line else _paragraphs(path)
    # Blank documents are dropped; holding one document back lets the bytes of blank ones count with it.
    held, held_bytes = None, 0
    for text, nbytes in documents:
        if text.strip():
            if held is not None:
                yield held, held_bytes
                held_bytes = 0
            held = text
        held_bytes += nbytes
    if held is None:
        raise ConfigError(f"data file {path} is empty; pass a file with text in it")
    yield held, held_bytes


def read_dataset_documents(name_or_dir, config=None, split="train", field="text"):
    """Documents from a Hugging Face dataset: a directory written by save_to_disk, a local data folder
    or a hub name (only the last needs the network)."""
    import datasets  # slow to import; only this input needs it

    saved = any(os.path.isfile(os.path.join(name_or_dir, f)) for f in ("state.json", "dataset_dict.json"))
    try:
        dataset = datasets.load_from_disk(name_or_dir) if saved else datasets.load_dataset(name_or_dir, config, split=split)
    except (OSError, ValueError) as e:  # not found, offline, unknown split
        raise ConfigError(f"dataset {name_or_dir} could not be loaded ({' '.join(str(e).split())})")
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ConfigError(f"dataset {name_or_dir} has no split {split!r} (it has {', '.join(dataset)}); pass --split NAME")
        dataset = dataset[split]
    if field not in dataset.column_names:
        raise ConfigError(f"dataset {name_or_dir} has no field {field!r} (it has {', '.join(dataset.column_names)}); pass --field NAME")
    for batch in dataset.select_columns(field).iter(batch_size=1000):
        for value in batch[field]:
            text = field_text(value, f"dataset {name_or_dir} field {field!r}")
            if text.strip():
                yield text, len(text.encode("utf-8"))


def read_corpus(inputs=(), dataset=None, dataset_config=None, split="train", field="text", per_line=False):
    """The documents of local files (in order) or of a Hugging Face dataset; the choice is checked now,
    the data as they are read."""
    if (dataset is None) == (not inputs):
        raise ConfigError("pass input files (text or JSON Lines) or --dataset NAME_OR_DIR, one of the two")
    if dataset is not None:
        return read_dataset_documents(dataset, dataset_config, split, field)
    for path in inputs:
        if not os.path.isfile(path):
            raise ConfigError(f"data file {path} does not exist; pass an existing UTF-8 text or JSON Lines file")
    return itertools.chain.from_iterable(read_documents(path, per_line, field) for path in inputs)


def read_text_tokens(path, tokenizer):
    """Tokenize a UTF-8 text file; documents are separated by blank lines and end with EOS."""
    ids = []
    for text, _ in read_documents(path):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int32)


def split_tokens(tokens, val_fraction):
    """Train on the head, validate on the tail (a contiguous split keeps validation text unseen)."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class LMSamples:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets)."""

    def __init__(self, tokens, seq_len, name):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_samples = (len(tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise ConfigError(f"{name} has {len(tokens)} tokens, fewer than one sample of seq_len {seq_len}; use more data or a shorter --seq_len")

    def __getitem__(self, i):
        window = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return torch.from_numpy(window.astype(np.int64))


class SeededOrder:
    """Sample number k -> sample index: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_samples, seed):
        """``seed``: an int, or a tuple of ints (a blend seeds each corpus with (seed, corpus number))."""
        self.num_samples = num_samples
        self.seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
        self._epoch, self._perm = None, None

    def __call__(self, k):
        epoch, pos = divmod(k, self.num_samples)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([*self.seed, epoch]).permutation(self.num_samples)
        return int(self._perm[pos])


BLEND_BLOCK = 1 << 16  # samples per repeating blend pattern: shares are exact per block, within a sample inside one


def apportion(weights, total):
    """Integer counts summing to ``total`` in proportion to ``weights`` (largest remainders)."""
    quotas = np.asarray(weights, np.float64) / np.sum(weights) * total
    counts = np.floor(quotas).astype(np.int64)
    counts[np.argsort(counts - quotas, kind="stable")[: total - counts.sum()]] += 1
    return counts


class BlendedOrder:
    """Sample number k -> (corpus, sample index in that corpus) for corpora blended with weights.

    Samples come in blocks of BLEND_BLOCK: corpus d gets counts[d] slots of each block (its weight's
    share, rounded by largest remainders), spread evenly (its j-th slot at time (j + 0.5) / counts[d];
    ties go to the lower corpus number), so the share of every corpus among the first k samples tracks
    its weight to about one sample. Corpus d reads its own samples in SeededOrder(size, (seed, d)),
    a new permutation each time it is exhausted. The corpus sequence depends only on the weights, the
    samples within a corpus on the seed.
    """

    def __init__(self, sizes, weights, seed):
        self.counts = apportion(weights, BLEND_BLOCK)
        if not self.counts.all():
            raise ConfigError(
                f"--train_data_weights {list(weights)}: corpus {int(np.argmin(self.counts)) + 1} would get "
                f"no samples (weight below 1/{BLEND_BLOCK} of the total); raise its weight or drop it"
            )
        slot_times = np.concatenate([(np.arange(n) + 0.5) / n for n in self.counts])
        slot_corpus = np.repeat(np.arange(len(self.counts)), self.counts)
        slots = np.argsort(slot_times, kind="stable")  # stable: equal times keep corpus order
        self.corpus_of = slot_corpus[slots]
        self.rank_in_block = np.empty(BLEND_BLOCK, np.int64)  # how many earlier slots of the block went to the same corpus
        for d in range(len(self.counts)):
            where = self.corpus_of == d
            self.rank_in_block[where] = np.arange(where.sum())
        self.orders = [SeededOrder(size, (seed, d)) for d, size in enumerate(sizes)]

    @property
    def shares(self):
        return self.counts / BLEND_BLOCK

    def __call__(self, k):
        block, slot = divmod(k, BLEND_BLOCK)
        d = int(self.corpus_of[slot])
        return d, self.orders[d](block * int(self.counts[d]) + int(self.rank_in_block[slot]))


class BlendedSamples:
    """Samples of several corpora (LMSamples), indexed by (corpus, sample) as BlendedOrder gives them."""

    def __init__(self, corpora):
        self.corpora = corpora

    def __getitem__(self, corpus_and_sample):
        d, i = corpus_and_sample
        return self.corpora[d][i]


def micro_batch(samples, order, consumed_samples, micro_step, micro_batch_size, dp_rank, dp_size, seq_len=None):
    """The (B, seq_len + 1) tensor of one micro-batch of the global batch starting at consumed_samples.

    ``seq_len`` shorter than the samples': each keeps its first seq_len + 1 tokens (sequence-length warmup's
    truncation, pretrain/seqlen_warmup.py); the same samples are drawn, so the data position does not depend on it."""
    first = consumed_samples + (micro_step * dp_size + dp_rank) * micro_batch_size
    windows = [samples[order(k)] for k in range(first, first + micro_batch_size)]
    return torch.stack(windows if seq_len is None else [window[: seq_len + 1] for window in windows])
