"""BLEU with sacreBLEU: score a hypothesis file, or translate a source file with a checkpoint and score that.

    python -m eval.bleu --hyp hyps.txt --ref ref.txt [--ref ref2.txt ...]
    python -m eval.bleu RUN_DIR --src test.de --ref test.en [--beam 5 --lenpen 1.0 --max_len_a 1.2 --max_len_b 10
                        --min_len 1 --batch_size 64 --hyp_output hyps.txt] [--nbest 5 --nbest_output nbest.tsv]
                        [--search greedy | --search sample --temperature 0.8 --top_k 50 --seed 0]

Scoring is sacreBLEU's corpus BLEU on detokenized text (its default 13a tokenization, --tokenize to
change it, --lowercase), against one or more line-aligned references (repeat --ref). Printed last,
as one JSON object: bleu, sacreBLEU's signature, the n-gram precisions, brevity penalty, lengths.

Translating: RUN_DIR is a pretrain/main.py --task translation --save_dir (dense or Switch, any ZeRO
stage; --tag picks a checkpoint other than ``latest``). Each source line is encoded with the run's
(source) tokenizer and EOS, translated by beam search (or greedy decoding, or sampling) with
incremental decoding (models/generation.py; max length = max_len_a x source length + max_len_b
tokens), decoded with sentencepiece and written
one line per source line, in the input order, to --hyp_output (default RUN_DIR/hyps.TAG.txt), through a
temporary name; with --nbest N, beam search's N best per line also go to --nbest_output. An empty source line translates to an empty line; a line longer than the model's
positions is cut to fit, with a warning naming it. A language-model checkpoint, empty or
line-misaligned files are refused with one line (exit code 2).
"""

import functools
import os
import sys

import torch
from sacrebleu.metrics import BLEU
from tqdm import tqdm

from eval.cli import fail, fire_command, print_result, read_lines, write_atomically
from models.generation import SEARCHES, translate_ids
from models.registry import family_of
from models.transformer import TransformerConfig
from pretrain.distributed import local_device
from pretrain.run_dir import UnsafeCheckpoint, load_model, recorded_model_config, require_run_config, resolve_tag, run_source_tokenizer
from pretrain.tasks.translation import encode_sources
from switchyard.errors import ConfigError


def read_references(paths, num_lines, what):
    """Each --ref file's lines; every file must have ``num_lines`` lines (one per hypothesis or source line)."""
    references = []
    for path in paths:
        lines = read_lines(path, "reference")
        if len(lines) != num_lines:
            fail(f"{what} has {num_lines} lines but reference file {path} has {len(lines)}; they must be line-aligned")
        references.append(lines)
    return references


def score(hypotheses, references, tokenize="13a", lowercase=False):
    bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
    result = bleu.corpus_score(hypotheses, references)
    return {
        "bleu": result.score,
        "signature": str(bleu.get_signature()),
        "precisions": result.precisions,
        "brevity_penalty": result.bp,
        "hyp_len": result.sys_len,
        "ref_len": result.ref_len,
        "sentences": len(hypotheses),
    }


@torch.no_grad()
def translate(model, src_tokenizer, tgt_tokenizer, encoded, batch_size, device, options):
    """For each entry of ``encoded`` its hypotheses as (detokenized text, score), best first ([] for None), in order;
    sentences of similar length share a batch."""
    progress = functools.partial(tqdm, desc="translate", unit="batch", file=sys.stderr)
    hypotheses = translate_ids(
        model,
        encoded,
        src_tokenizer.sp.pad_id(),
        tgt_tokenizer.sp.bos_id(),
        tgt_tokenizer.eos_id,
        batch_size=batch_size,
        device=device,
        progress=progress,
        vocab_size=tgt_tokenizer.vocab_size,
        **options,
    )
    return [[(tgt_tokenizer.decode(h.tokens), h.score) for h in hyps] for hyps in hypotheses]


def translation_model(run_dir, tag):
    """(model, config, source tokenizer, target tokenizer) of a translation run; a language-model run is refused
    before loading weights."""
    run_config = require_run_config(run_dir)
    config = recorded_model_config(run_config, run_dir)
    if not isinstance(config, TransformerConfig):
        raise ConfigError(
            f"{run_dir} holds a {family_of(config).name!r} language model, not a translation model; "
            f"pass the --save_dir of a pretrain/main.py --task translation run"
        )
    model, config, tgt_tokenizer = load_model(run_dir, tag)
    src_tokenizer = run_source_tokenizer(run_dir)
    for tokenizer in (src_tokenizer, tgt_tokenizer):
        if not hasattr(tokenizer, "sp") or tokenizer.sp.pad_id() < 0 or tokenizer.sp.bos_id() < 0:
            raise ConfigError(f"{run_dir} was trained with a tokenizer without pad and bos ids; it is not a translation run")
    return model, config, src_tokenizer, tgt_tokenizer


def search_options(search, beam, lenpen, nbest, min_len, max_len_a, max_len_b, temperature, top_k, seed, batch_size):
    """models.generation.translate_ids' options for --search and its settings; a bad setting is one line, exit 2."""
    if search not in SEARCHES:
        fail(f"--search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if beam < 1 or batch_size < 1 or nbest < 1 or min_len < 0 or max_len_a < 0 or max_len_b < 0:
        fail(
            f"--beam, --batch_size and --nbest must be >= 1 and --min_len, --max_len_a, --max_len_b >= 0, got {beam}, "
            f"{batch_size}, {nbest}, {min_len}, {max_len_a}, {max_len_b}"
        )
    options = dict(search=search, min_len=min_len, max_len_a=max_len_a, max_len_b=max_len_b)
    if search == "beam":
        if nbest > beam:
            fail(f"--nbest {nbest} is more than the --beam {beam} hypotheses beam search keeps; raise --beam")
        return {**options, "beam": beam, "lenpen": lenpen, "nbest": nbest}
    if nbest != 1:
        fail(f"--nbest {nbest} needs --search beam; {search} gives one hypothesis per sentence")
    if search == "sample":
        if temperature <= 0 or top_k < 0:
            fail(f"--temperature must be > 0 and --top_k >= 0, got {temperature} and {top_k}")
        return {**options, "temperature": temperature, "top_k": top_k, "generator": torch.Generator(local_device()).manual_seed(seed)}
    return options


def generate(run_dir, tag, sources, src_path, batch_size, options):
    """(hypotheses, tag, encoded sources): for each line of ``sources`` its (text, score) hypotheses, best first, from
    checkpoint ``tag`` of RUN_DIR with search ``options`` (search_options). Shared with eval.rouge, whose summarizers
    are models of this task."""
    try:
        tag = resolve_tag(run_dir, tag)
        model, config, src_tokenizer, tgt_tokenizer = translation_model(run_dir, tag)
    except (ConfigError, UnsafeCheckpoint) as e:
        fail(str(e))
    device = local_device()
    encoded = encode_sources(sources, src_tokenizer, config.max_seq_len, src_path)
    return translate(model.to(device), src_tokenizer, tgt_tokenizer, encoded, batch_size, device, options), tag, encoded


def main(
    run_dir=None,
    hyp=None,
    src=None,
    ref=(),
    tag=None,
    search="beam",
    beam=5,
    lenpen=1.0,
    nbest=1,
    min_len=1,
    max_len_a=1.2,
    max_len_b=10,
    temperature=1.0,
    top_k=0,
    seed=0,
    batch_size=64,
    hyp_output=None,
    nbest_output=None,
    tokenize="13a",
    lowercase=False,
    output=None,
):
    """Score --hyp against --ref, or translate --src with the checkpoint in RUN_DIR and score it; prints one JSON object.

    Args:
        run_dir: a pretrain/main.py --task translation --save_dir (translate mode).
        hyp: hypotheses, one per line (score mode).
        src: source text to translate, one sentence per line (translate mode).
        ref: reference file(s), line-aligned; repeat --ref for several references per sentence.
        tag: the checkpoint (global_stepN; default: the one ``latest`` names).
        search: beam (beam search), greedy, or sample (ancestral sampling).
        beam: beam size.
        lenpen: length penalty: hypotheses are ranked by log-probability / length ** lenpen.
        nbest: hypotheses kept per sentence (beam search; the best is scored), written to --nbest_output.
        min_len: no EOS before this many tokens.
        max_len_a: maximum output length = max_len_a x source tokens + max_len_b.
        max_len_b: see max_len_a.
        temperature: sampling temperature (--search sample).
        top_k: sample from the k most likely tokens only (0: all).
        seed: the sampling generator's seed.
        batch_size: sentences decoded together.
        hyp_output: the translations (default RUN_DIR/hyps.TAG.txt).
        nbest_output: with --nbest > 1, every hypothesis as "line<TAB>rank<TAB>score<TAB>text" (default
            RUN_DIR/nbest.TAG.tsv).
        tokenize: sacreBLEU's tokenizer (13a, intl, zh, char, none, ...).
        lowercase: case-insensitive BLEU.
        output: also write the JSON object to this file.
    """
    refs = [str(r) for r in ref]
    if not refs:
        fail("pass at least one --ref FILE")
    if run_dir is None:
        if hyp is None or src is not None:
            fail("pass --hyp FILE to score a hypothesis file, or RUN_DIR --src FILE to translate and score")
        hypotheses = read_lines(str(hyp), "hypothesis")
        if not hypotheses:
            fail(f"hypothesis file {hyp} is empty; it must hold one translation per line")
        result = score(hypotheses, read_references(refs, len(hypotheses), f"hypothesis file {hyp}"), tokenize, lowercase)
        print_result({**result, "hyp": str(hyp), "ref": refs}, output)
        return
    if src is None or hyp is not None:
        fail("translate mode takes RUN_DIR --src FILE --ref FILE (--hyp is for scoring a file without a model)")
    options = search_options(search, beam, lenpen, nbest, min_len, max_len_a, max_len_b, temperature, top_k, seed, batch_size)
    run_dir, src = str(run_dir), str(src)
    sources = read_lines(src, "source")
    if not sources:
        fail(f"source file {src} is empty; it must hold one sentence per line")
    references = read_references(refs, len(sources), f"source file {src}")
    nbest_lists, tag, encoded = generate(run_dir, tag, sources, src, batch_size, options)
    hypotheses = [hyps[0][0] if hyps else "" for hyps in nbest_lists]
    hyp_output = str(hyp_output) if hyp_output is not None else os.path.join(run_dir, f"hyps.{tag}.txt")
    write_atomically(hyp_output, "".join(h + "\n" for h in hypotheses))
    result = score(hypotheses, references, tokenize, lowercase)
    if nbest > 1:
        nbest_output = str(nbest_output) if nbest_output is not None else os.path.join(run_dir, f"nbest.{tag}.tsv")
        write_atomically(
            nbest_output,
            "".join(
                f"{line}\t{rank}\t{score:.6f}\t{text}\n" for line, hyps in enumerate(nbest_lists, 1) for rank, (text, score) in enumerate(hyps, 1)
            ),
        )
        result["nbest_output"] = nbest_output
    result.update(
        run_dir=run_dir,
        tag=tag,
        src=src,
        ref=refs,
        hyp_output=hyp_output,
        **{k: v for k, v in options.items() if k != "generator"},
        **({"seed": seed} if search == "sample" else {}),
        empty_source_lines=sum(ids is None for ids in encoded),
    )
    print_result(result, output)


if __name__ == "__main__":
    fire_command(main, "eval.bleu", repeated=("ref",))
