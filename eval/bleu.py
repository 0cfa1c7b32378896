"""BLEU with sacreBLEU: score a hypothesis file, or translate a source file with a checkpoint and score that.

    python -m eval.bleu --hyp hyps.txt --ref ref.txt [--ref ref2.txt ...]
    python -m eval.bleu RUN_DIR --src test.de --ref test.en [--beam 5 --lenpen 1.0 --max_len_a 1.2 --max_len_b 10
                        --batch_size 64 --hyp_output hyps.txt]

Scoring is sacreBLEU's corpus BLEU on detokenized text (its default 13a tokenization, --tokenize to
change it, --lowercase), against one or more line-aligned references (repeat --ref). Printed last,
as one JSON object: bleu, sacreBLEU's signature, the n-gram precisions, brevity penalty, lengths.

Translating: RUN_DIR is a pretrain/main.py --task translation --save_dir (dense or Switch, any ZeRO
stage; --tag picks a checkpoint other than ``latest``). Each source line is encoded with the run's
(source) tokenizer and EOS, translated by beam search with incremental decoding (models/generation.py;
max length = max_len_a x source length + max_len_b tokens), decoded with sentencepiece and written
one line per source line, in the input order, to --hyp_output (default RUN_DIR/hyps.TAG.txt), through a
temporary name. An empty source line translates to an empty line; a line longer than the model's
positions is cut to fit, with a warning naming it. A language-model checkpoint, empty or
line-misaligned files are refused with one line (exit code 2).
"""
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path as well as with -m

import fire  # noqa: E402
import torch  # noqa: E402
from sacrebleu.metrics import BLEU  # noqa: E402
from tqdm import tqdm  # noqa: E402

from eval.checkpoint import load_model, model_config, read_run_config, resolve_tag, run_source_tokenizer  # noqa: E402
from eval.cli import fail, print_result, read_lines, repeated_flag, write_atomically  # noqa: E402
from models import ConfigError  # noqa: E402
from models.generation import translate_ids  # noqa: E402
from models.transformer import TransformerConfig  # noqa: E402
from pretrain.checkpoint import UnsafeCheckpoint  # noqa: E402
from pretrain.tasks.translation import encode_sources  # noqa: E402


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
    return {"bleu": result.score, "signature": str(bleu.get_signature()), "precisions": result.precisions,
            "brevity_penalty": result.bp, "hyp_len": result.sys_len, "ref_len": result.ref_len,
            "sentences": len(hypotheses)}


@torch.no_grad()
def translate(model, src_tokenizer, tgt_tokenizer, encoded, beam, lenpen, max_len_a, max_len_b, batch_size, device):
    """Detokenized best hypothesis per entry of ``encoded`` ("" for None), in order; sentences of similar length
    share a batch."""
    sp = tgt_tokenizer.sp
    progress = functools.partial(tqdm, desc="translate", unit="batch", file=sys.stderr)
    best = translate_ids(model, encoded, src_tokenizer.sp.pad_id(), sp.bos_id(), tgt_tokenizer.eos_id, beam=beam,
                         lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b, batch_size=batch_size,
                         vocab_size=tgt_tokenizer.vocab_size, device=device, progress=progress)
    return [tgt_tokenizer.decode(tokens) for tokens in best]


def translation_model(run_dir, tag):
    """(model, config, source tokenizer, target tokenizer) of a translation run; a language-model run is refused
    before loading weights."""
    run_config = read_run_config(run_dir)
    config = model_config(run_config, run_dir)
    if not isinstance(config, TransformerConfig):
        raise ConfigError(f"{run_dir} holds a {type(config).family_name!r} language model, not a translation model; "
                          f"pass the --save_dir of a pretrain/main.py --task translation run")
    model, config, tgt_tokenizer = load_model(run_dir, tag)
    src_tokenizer = run_source_tokenizer(run_dir)
    for tokenizer in (src_tokenizer, tgt_tokenizer):
        if not hasattr(tokenizer, "sp") or tokenizer.sp.pad_id() < 0 or tokenizer.sp.bos_id() < 0:
            raise ConfigError(f"{run_dir} was trained with a tokenizer without pad and bos ids; it is not a translation run")
    return model, config, src_tokenizer, tgt_tokenizer


def check_search_settings(beam, batch_size, max_len_a, max_len_b):
    if beam < 1 or batch_size < 1 or max_len_a < 0 or max_len_b < 0:
        fail(f"--beam and --batch_size must be >= 1 and --max_len_a/--max_len_b >= 0, got {beam}, {batch_size}, "
             f"{max_len_a}, {max_len_b}")


def generate(run_dir, tag, sources, src_path, beam, lenpen, max_len_a, max_len_b, batch_size):
    """(outputs, tag, encoded sources): each line of ``sources`` through checkpoint ``tag`` of RUN_DIR by beam search.
    Shared with eval.rouge, whose summarizers are models of this task."""
    try:
        tag = resolve_tag(run_dir, tag)
        model, config, src_tokenizer, tgt_tokenizer = translation_model(run_dir, tag)
    except (ConfigError, UnsafeCheckpoint) as e:
        fail(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoded = encode_sources(sources, src_tokenizer, config.max_seq_len, src_path)
    outputs = translate(model.to(device), src_tokenizer, tgt_tokenizer, encoded, beam, lenpen, max_len_a, max_len_b,
                        batch_size, device)
    return outputs, tag, encoded


def main(run_dir=None, hyp=None, src=None, ref=(), tag=None, beam=5, lenpen=1.0, max_len_a=1.2, max_len_b=10,
         batch_size=64, hyp_output=None, tokenize="13a", lowercase=False, output=None):
    """Score --hyp against --ref, or translate --src with the checkpoint in RUN_DIR and score it; prints one JSON object.

    Args:
        run_dir: a pretrain/main.py --task translation --save_dir (translate mode).
        hyp: hypotheses, one per line (score mode).
        src: source text to translate, one sentence per line (translate mode).
        ref: reference file(s), line-aligned; repeat --ref for several references per sentence.
        tag: the checkpoint (global_stepN; default: the one ``latest`` names).
        beam: beam size.
        lenpen: length penalty: hypotheses are ranked by log-probability / length ** lenpen.
        max_len_a: maximum output length = max_len_a x source tokens + max_len_b.
        max_len_b: see max_len_a.
        batch_size: sentences per beam search.
        hyp_output: the translations (default RUN_DIR/hyps.TAG.txt).
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
    check_search_settings(beam, batch_size, max_len_a, max_len_b)
    run_dir, src = str(run_dir), str(src)
    sources = read_lines(src, "source")
    if not sources:
        fail(f"source file {src} is empty; it must hold one sentence per line")
    references = read_references(refs, len(sources), f"source file {src}")
    hypotheses, tag, encoded = generate(run_dir, tag, sources, src, beam, lenpen, max_len_a, max_len_b, batch_size)
    hyp_output = str(hyp_output) if hyp_output is not None else os.path.join(run_dir, f"hyps.{tag}.txt")
    write_atomically(hyp_output, "".join(h + "\n" for h in hypotheses))
    result = score(hypotheses, references, tokenize, lowercase)
    result.update(run_dir=run_dir, tag=tag, src=src, ref=refs, hyp_output=hyp_output, beam=beam, lenpen=lenpen,
                  max_len_a=max_len_a, max_len_b=max_len_b, empty_source_lines=sum(ids is None for ids in encoded))
    print_result(result, output)


if __name__ == "__main__":
    argv, refs = repeated_flag(sys.argv[1:], "ref")
    fire.Fire(functools.partial(main, ref=refs), command=argv, name="eval.bleu")
