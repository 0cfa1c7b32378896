"""Every eval command line (fire, through pretrain/cli.py): a misspelled flag is one line naming the closest flag,
exit code 2; --help shows the command's own docstring and flags."""

import subprocess
import sys

import pytest

from pretrain.cli import check_flags
from tests.distributed import REPO


def command(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "module,args,expected",
    [
        ("eval.perplexity", ["run", "--txt", "a.txt"], "unknown flag --txt (did you mean --text?); eval.perplexity takes --run_dir"),
        ("eval.bleu", ["--hyp", "h", "--ref", "r", "--lenpenalty", "1"], "unknown flag --lenpenalty (did you mean --lenpen?)"),
        ("eval.rouge", ["--hyp", "h", "--ref", "r", "--bootstrp=10"], "unknown flag --bootstrp (did you mean --bootstrap?)"),
        ("eval.distill", ["t", "s", "b", "--pair", "p"], "unknown flag --pair (did you mean --pairs?)"),
        ("eval.export_hf", ["run", "out", "--tga", "global_step1"], "unknown flag --tga (did you mean --tag?)"),
        (
            "eval.harness",
            ["run", "--task", "hellaswag"],
            "unknown flag --task (did you mean --tasks?); eval.harness takes --run_dir, --tasks, --tag, --batch_size, --limit, "
            "--num_fewshot, --output, --include_path, --device, --max_gen_toks (python -m eval.harness --help)",
        ),
        (
            "eval.plot",
            ["run", "--outptu", "x.png"],
            "unknown flag --outptu (did you mean --output?); eval.plot takes --output, --smooth, --x, --panels, --table (python -m eval.plot --help)",
        ),
    ],
)
def test_a_misspelled_flag_is_one_line_with_the_closest_flag(module, args, expected):
    proc = command(module, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), proc.stderr


@pytest.mark.parametrize(
    "module,summary",
    [
        ("eval.bleu", "eval.bleu - Score --hyp against --ref, or translate --src with the checkpoint in RUN_DIR"),
        ("eval.rouge", "eval.rouge - Score a hypothesis file against references, or summarize --src with RUN_DIR first"),
    ],
)
def test_help_shows_the_commands_own_docstring_and_flags(module, summary):
    proc = command(module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert summary in proc.stderr and "partial(func" not in proc.stderr, proc.stderr  # fire shows help on stderr
    assert "--ref=REF" in proc.stderr and "repeat --ref for several" in proc.stderr


def flags_of_a_command(run_dir, *inputs, vocab_size=8000, per_line=False, output=None):
    """A stand-in for a fire command's function."""


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--vocab_size", "5", "--output=x"],
        ["run", "--vocab-size", "-5"],  # fire reads hyphens as underscores; -5 is a value, not a flag
        ["run", "--per_line", "--noper_line"],  # --noNAME sets a boolean False
        ["run", "-v", "5"],  # fire's one-letter shortcut for the only flag starting with v
        ["run", "--", "--trace"],  # fire's own flags follow its separator
        ["run", "--bogus", "--help"],  # help is shown, whatever else is on the line
    ],
)
def test_what_fire_accepts_is_not_refused(argv):
    check_flags(flags_of_a_command, argv, "cmd")


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["run", "--vocab", "5"], "unknown flag --vocab (did you mean --vocab_size?)"),
        (["run", "-per_lin"], "unknown flag -per_lin (did you mean --per_line?)"),
        (["run", "--inputs", "a"], "unknown flag --inputs"),  # *inputs are positional only
        (["run", "--zzz=1"], "unknown flag --zzz; cmd takes --run_dir, --vocab_size, --per_line, --output (python -m cmd --help)"),
    ],
)
def test_what_fire_would_not_use_is_refused(capsys, argv, expected):
    with pytest.raises(SystemExit) as exited:
        check_flags(flags_of_a_command, argv, "cmd")
    errors = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {expected}"), errors
