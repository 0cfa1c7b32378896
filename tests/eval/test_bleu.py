"""eval.bleu: sacreBLEU scoring of files, and translation with a trained checkpoint (dense, 1 rank)
on the toy language pair of tests/conftest.py; bad input is one line, exit 2."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import sacrebleu
import torch

from models import build_model
from pretrain.main import prepare
from pretrain.run_dir import load_model
from tests.distributed import REPO, read_metrics, run_ranks, translation_args


def bleu(*args):
    return subprocess.run([sys.executable, "-m", "eval.bleu", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


def last_json(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


HYPS = ["the cat sat on the mat .", "a dog runs in the park", "two men are talking ."]
REFS = ["the cat sat on a mat .", "a dog is running in the park", "two men talk ."]
REFS2 = ["a cat is sitting on the mat .", "the dog runs through the park", "two men are talking ."]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_score_mode_is_sacrebleus_corpus_bleu(tmp_path):
    hyp, ref, ref2 = write(tmp_path / "h", HYPS), write(tmp_path / "r", REFS), write(tmp_path / "r2", REFS2)
    one = last_json(bleu("--hyp", hyp, "--ref", ref))
    expected = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert one["bleu"] == expected.score and one["hyp_len"] == expected.sys_len and one["sentences"] == 3
    assert one["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    two = last_json(bleu("--hyp", hyp, "--ref", ref, "--ref", ref2, "--output", tmp_path / "result.json"))
    assert two["bleu"] == sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score and "nrefs:2" in two["signature"]
    assert json.loads((tmp_path / "result.json").read_text()) == two
    assert last_json(bleu("--hyp", ref, "--ref", ref))["bleu"] == pytest.approx(100.0)
    lower = last_json(bleu("--hyp", write(tmp_path / "upper", [h.upper() for h in HYPS]), "--ref", ref, "--lowercase", "true"))
    assert lower["bleu"] == one["bleu"] and "case:lc" in lower["signature"]


def test_score_mode_refuses_bad_files(tmp_path):
    hyp, ref = write(tmp_path / "h", HYPS), write(tmp_path / "r", REFS)
    one_line_error(bleu("--hyp", write(tmp_path / "short", REFS[:2]), "--ref", ref), "short has 2 lines", "r has 3")
    one_line_error(bleu("--hyp", hyp, "--ref", ref, "--ref", write(tmp_path / "r2", REFS2[:1])), "r2 has 1")
    one_line_error(bleu("--hyp", write(tmp_path / "empty", []), "--ref", ref), "empty is empty")
    one_line_error(bleu("--hyp", tmp_path / "missing", "--ref", ref), "missing does not exist")
    one_line_error(bleu("--hyp", hyp), "at least one --ref")


def toy_test_files(tmp_path, pair_data):
    """The toy validation pairs as text (sources, references), decoded from the preprocessed files."""
    from pretrain.data.pairs import PairDataset
    from pretrain.data.tokenizer import SentencePieceTokenizer

    _, val, model = pair_data
    tokenizer, pairs = SentencePieceTokenizer(str(model)), PairDataset(val)
    sources = [tokenizer.decode(pairs.src(i)[:-1].tolist()) for i in range(40)]
    targets = [tokenizer.decode(pairs.tgt(i)[:-1].tolist()) for i in range(40)]
    return sources, targets


def test_translate_mode_translates_and_scores(tmp_path, translation_run, pair_data):
    sources, targets = toy_test_files(tmp_path, pair_data)
    src, ref = write(tmp_path / "src", sources), write(tmp_path / "ref", targets)
    result = last_json(bleu(translation_run, "--src", src, "--ref", ref, "--beam", 4, "--hyp_output", tmp_path / "hyps.txt"))
    hyps = (tmp_path / "hyps.txt").read_text().splitlines()
    assert len(hyps) == 40 and result["sentences"] == 40 and result["tag"] == "global_step150"
    assert result["bleu"] > 15, result  # the toy pair (reverse, rename the words) is being learned: 26.0 measured here
    assert last_json(bleu("--hyp", tmp_path / "hyps.txt", "--ref", ref))["bleu"] == result["bleu"]
    assert not list(tmp_path.glob("*.tmp"))
    # Beam 1 is greedy decoding; the default output goes into the run directory.
    greedy = last_json(bleu(translation_run, "--src", src, "--ref", ref, "--beam", 1))
    assert greedy["hyp_output"] == str(translation_run / "hyps.global_step150.txt")


def test_validation_bleu_during_training_is_what_eval_bleu_scores(translation_run, pair_data):
    """The run's val/bleu at its last step (--bleu_src/--bleu_ref, beam 4) is eval.bleu's score of that checkpoint."""
    directory = pair_data[0].parent
    logged = read_metrics(translation_run, "val/bleu")
    assert list(logged) == [150]
    result = last_json(bleu(translation_run, "--src", directory / "pairs2.src", "--ref", directory / "pairs2.tgt", "--beam", 4))
    assert result["sentences"] == 100 and result["bleu"] > 15
    assert logged[150] == pytest.approx(result["bleu"], abs=1e-9)


def test_nbest_lists_greedy_and_sampling(tmp_path, translation_run, pair_data):
    sources, targets = toy_test_files(tmp_path, pair_data)
    src, ref = write(tmp_path / "src", sources[:10]), write(tmp_path / "ref", targets[:10])
    result = last_json(
        bleu(
            translation_run,
            "--src",
            src,
            "--ref",
            ref,
            "--beam",
            4,
            "--nbest",
            3,
            "--hyp_output",
            tmp_path / "hyps.txt",
            "--nbest_output",
            tmp_path / "nbest.tsv",
        )
    )
    rows = [line.split("\t") for line in (tmp_path / "nbest.tsv").read_text().splitlines()]
    assert result["nbest"] == 3 and len(rows) == 30
    assert [(int(r[0]), int(r[1])) for r in rows] == [(line, rank) for line in range(1, 11) for rank in (1, 2, 3)]
    for line in range(10):
        scores = [float(r[2]) for r in rows[3 * line : 3 * line + 3]]
        assert scores == sorted(scores, reverse=True)
    assert [r[3] for r in rows[::3]] == (tmp_path / "hyps.txt").read_text().splitlines()  # the best is what is scored
    assert last_json(bleu(translation_run, "--src", src, "--ref", ref, "--search", "greedy"))["search"] == "greedy"
    sampled = [
        last_json(
            bleu(
                translation_run,
                "--src",
                src,
                "--ref",
                ref,
                "--search",
                "sample",
                "--temperature",
                1.5,
                "--seed",
                seed,
                "--hyp_output",
                tmp_path / f"sampled{i}.txt",
            )
        )
        for i, seed in enumerate((1, 1, 2))
    ]
    texts = [(tmp_path / f"sampled{i}.txt").read_text() for i in range(3)]
    assert texts[0] == texts[1] and sampled[0]["bleu"] == sampled[1]["bleu"]  # the seed makes it reproducible
    assert texts[2] != texts[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--beam", 2, "--nbest", 3], "--nbest 3 is more than the --beam 2"),
        (["--search", "greedy", "--nbest", 2], "needs --search beam"),
        (["--search", "topp"], "--search must be one of beam, greedy, sample"),
        (["--search", "sample", "--temperature", 0], "--temperature must be > 0"),
    ],
)
def test_bad_search_settings_are_one_line(tmp_path, translation_run, pair_data, flags, message):
    sources, targets = toy_test_files(tmp_path, pair_data)
    one_line_error(
        bleu(translation_run, "--src", write(tmp_path / "src", sources[:2]), "--ref", write(tmp_path / "ref", targets[:2]), *flags), message
    )


def test_empty_and_overlong_source_lines(tmp_path, translation_run, pair_data):
    sources, targets = toy_test_files(tmp_path, pair_data)
    overlong = " ".join(sources[:20])  # far over the tiny model's 64 positions
    src = write(tmp_path / "src", [sources[0], "", overlong, "   ", sources[1]])
    ref = write(tmp_path / "ref", [targets[0], "", targets[0], "", targets[1]])
    proc = bleu(translation_run, "--src", src, "--ref", ref, "--hyp_output", tmp_path / "hyps.txt")
    result = last_json(proc)
    hyps = (tmp_path / "hyps.txt").read_text().split("\n")[:-1]
    assert len(hyps) == 5 and hyps[1] == "" and hyps[3] == "" and hyps[0] and hyps[2] and hyps[4]
    assert result["empty_source_lines"] == 2
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "src line 3 has" in warnings[0] and "64 positions" in warnings[0]


def test_translate_mode_refuses_bad_input(tmp_path, translation_run, pair_data):
    sources, targets = toy_test_files(tmp_path, pair_data)
    src, ref = write(tmp_path / "src", sources), write(tmp_path / "ref", targets)
    one_line_error(bleu(translation_run, "--src", src, "--ref", write(tmp_path / "short", targets[:5])), "source file", "40 lines", "short has 5")
    one_line_error(bleu(translation_run, "--src", write(tmp_path / "empty", []), "--ref", ref), "empty is empty")
    one_line_error(bleu(tmp_path / "nowhere", "--src", src, "--ref", ref), "does not exist")
    lm_run = tmp_path / "lm_run"
    lm_run.mkdir()
    (lm_run / "run_config.json").write_text(
        json.dumps(
            {
                "model": {"family": "gpt", "vocab_size": 320, "max_seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
                "tokenizer": {"type": "bytes"},
            }
        )
    )
    (lm_run / "latest").write_text("global_step1")
    (lm_run / "global_step1").mkdir()
    one_line_error(bleu(lm_run, "--src", src, "--ref", ref), "'gpt' language model, not a translation model")


def test_switch_checkpoint_with_experts_on_two_ranks_translates(tmp_path, pair_data):
    """A Switch encoder-decoder trained at expert-parallel size 2 comes back whole (every expert of the
    encoder's and the decoder's MoE layers, each in its place) and translates. Three steps teach it nothing
    BLEU could see, so the model eval.bleu loads is checked against the run itself: it reproduces the val/loss
    the two ranks logged, which a missing, duplicated or misplaced expert changes."""
    steps = 3
    run_ranks(translation_args(tmp_path, pair_data, "moe_ep2_zero2.json", "tiny-switch-transformer.json", steps), 2, tmp_path / "logs")
    sources, targets = toy_test_files(tmp_path, pair_data)
    src, ref = write(tmp_path / "src", sources[:5]), write(tmp_path / "ref", targets[:5])
    result = last_json(bleu(tmp_path / "run", "--src", src, "--ref", ref, "--hyp_output", tmp_path / "hyps.txt"))
    assert result["sentences"] == 5 and len((tmp_path / "hyps.txt").read_text().splitlines()) == 5

    model, config, _ = load_model(tmp_path / "run")  # as eval.bleu loads it: all 4 experts on one process
    # The run's validation batches (a one-rank plan shapes them the same; a fresh --save_dir, as prepare() wants).
    task = prepare([str(a) for a in translation_args(tmp_path / "prepare_only", pair_data, "zero1.json", "tiny-switch-transformer.json", steps)])[-1]
    # Under expert parallelism each expert had a full token budget's capacity (TranslationTask.build_model); the
    # same here, so the same tokens reach the experts.
    full_budget = math.ceil(task.max_tokens * max(config.capacity_factor, config.eval_capacity_factor) / config.num_experts)
    same_capacity = build_model(dataclasses.replace(config, min_capacity=full_budget)).eval()
    same_capacity.load_state_dict(model.state_dict())
    with torch.no_grad():  # what the trainer logs: the mean over both ranks' 4 validation micro-batches
        losses = [
            task.loss(same_capacity(*task.inputs(batch)), batch)[1]["lm_loss"]
            for rank in range(2)
            for i in range(4)
            for batch in [task.val_batch(i, 2, rank, 2)]
        ]
    logged = read_metrics(tmp_path / "run", "val/loss")[steps]
    assert float(torch.stack(losses).mean()) == pytest.approx(logged, rel=1e-5)  # test_checkpoint.py's tolerance
