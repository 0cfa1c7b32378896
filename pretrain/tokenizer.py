"""Train a sentencepiece tokenizer (BPE, unigram or char) on local files or a Hugging Face dataset.

    python -m pretrain.tokenizer data/tinyshakespeare.txt --vocab_size 320
    python -m pretrain.tokenizer ../shared/data/ptb/ptb.train.txt --per_line --vocab_size 8000 --model_type unigram
    python -m pretrain.tokenizer train.de.jsonl train.fr.jsonl --field text --user_defined_symbols "<2de>,<2fr>" \\
        --character_coverage 0.9995 --output data/multi30k.bpe16k --vocab_size 16000
    python -m pretrain.tokenizer --dataset path/to/saved_dataset --split train --field text --vocab_size 32000
    python -m pretrain.tokenizer --dataset wikitext --dataset_config wikitext-103-raw-v1 --output data/wt103.bpe32k
                                 # (a hub name needs the network, local files and folders never do)

Documents are read as pretrain.preprocess and --train_data read them: plain text in blank-line-separated
documents (or one per line with --per_line), JSON Lines (.jsonl) by --field, or a dataset
(datasets.load_from_disk for a save_to_disk directory, else datasets.load_dataset; local folders
need no network). Each document is one training sentence, streamed to sentencepiece's trainer;
documents longer than --max_sentence_length bytes are skipped by the trainer.

Writes OUTPUT.model and OUTPUT.vocab; OUTPUT defaults to beside the first input file,
``DIR/STEM.{model_type}{vocab_size}``. Ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s> (end of document),
then --user_defined_symbols (e.g. language tags, always kept whole), then the learned pieces.
Text is not normalized and whitespace is kept (newlines included), so decode(encode(text)) == text
for text made of covered characters. Bad input: one line ``error: ...`` on stderr, exit code 2.
"""

import os
import re
import time

import sentencepiece as spm

from pretrain.cli import fire_command
from pretrain.data.lm_dataset import read_corpus
from switchyard.errors import ConfigError

SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


def default_output(inputs, dataset, model_type, vocab_size):
    """DIR/STEM.{model_type}{vocab_size}, beside the first input file or the dataset directory."""
    source = inputs[0] if inputs else dataset
    if not inputs and not os.path.isdir(dataset):
        raise ConfigError(f"dataset {dataset} is not a local directory, so there is no place beside it; pass --output PREFIX")
    return f"{os.path.splitext(os.path.normpath(source))[0]}.{model_type}{vocab_size}"


def trainer_refusal(message):
    """The reason in a sentencepiece trainer error ("INTERNAL: file.cc(94) [check] reason"); a range check has no
    reason, only the check, which is then put in terms of the flags it tests."""
    check, _, reason = message.partition("] ")
    if reason.strip():
        return reason.strip()
    condition = re.sub(r"\(*trainer_spec_?\.(\w+)\(\)\)*", r"\1", check.split("[", 1)[-1])
    flags = dict.fromkeys(re.findall(r"trainer_spec_?\.(\w+)\(\)", check))
    return f"it needs {condition}; change {', '.join('--' + f for f in flags)}"


def train(
    *inputs,
    dataset=None,
    dataset_config=None,
    split="train",
    field="text",
    per_line=False,
    output=None,
    vocab_size=8000,
    model_type="bpe",
    character_coverage=0.9995,
    user_defined_symbols=(),
    input_sentence_size=0,
    max_sentence_length=1 << 16,
    num_threads=os.cpu_count(),
):
    """Train a sentencepiece model on the documents of INPUTS (or --dataset) and write OUTPUT.model/.vocab.

    Args:
        dataset: a Hugging Face dataset name, save_to_disk directory or local data folder, instead of INPUTS.
        dataset_config: the dataset's configuration name, if it has several.
        split: the dataset split.
        field: the text field of JSON Lines records or dataset rows.
        per_line: each line of a text file is a document (default: blank-line-separated paragraphs).
        output: path prefix of the .model/.vocab files (default: beside the data, DIR/STEM.{model_type}{vocab_size}).
        vocab_size: pieces in all, the 4 specials and the user-defined symbols included.
        model_type: bpe, unigram or char.
        character_coverage: share of characters covered by pieces; the rarest others become <unk>.
        user_defined_symbols: pieces never split, e.g. "<2de>,<2fr>".
        input_sentence_size: train on a random sample of this many documents (0: all of them).
        max_sentence_length: longer documents (in bytes) are left out of training.
        num_threads: trainer threads.
    """
    if model_type not in ("bpe", "unigram", "char"):
        raise ConfigError(f"--model_type must be bpe, unigram or char, got {model_type!r}")
    if isinstance(user_defined_symbols, str):  # fire passes "<2de>,<2fr>" as one string
        user_defined_symbols = [s for s in user_defined_symbols.split(",") if s]
    # checked here: sentencepiece's refusal of a size below 1 gives no reason, and of one too small for the specials
    # and symbols blames the corpus's characters
    smallest = len(SPECIAL_IDS) + len(user_defined_symbols) + 1
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < smallest:
        raise ConfigError(
            f"--vocab_size must be an integer of at least {smallest} (the {len(SPECIAL_IDS)} special pieces, "
            f"{len(user_defined_symbols)} --user_defined_symbols and one learned piece), got {vocab_size!r}"
        )
    inputs = [str(path) for path in inputs]  # fire turns a file named 2024 into an int
    documents = read_corpus(inputs, dataset, dataset_config, split, field, per_line)
    output = output or default_output(inputs, dataset, model_type, vocab_size)
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise ConfigError(f"--output {output}: its directory does not exist; create it first")
    count = 0

    def sentences():
        nonlocal count
        for text, _ in documents:
            count += 1
            yield text

    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=output,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            user_defined_symbols=list(user_defined_symbols),
            **SPECIAL_IDS,
            # keep text as it is (no NFKC, no whitespace collapsing) so that decoding restores it exactly
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # sentencepiece's own checks, e.g. a vocabulary larger than the corpus allows
        raise ConfigError(f"sentencepiece refused to train: {trainer_refusal(str(e))}")
    pieces = spm.SentencePieceProcessor(model_file=f"{output}.model").get_piece_size()  # char models may have fewer
    print(f"wrote {output}.model and {output}.vocab: {model_type}, {pieces} pieces, from {count:,} documents in {time.perf_counter() - start:.1f}s")


def main(argv=None):
    fire_command(train, "pretrain.tokenizer", argv)


if __name__ == "__main__":
    main()
