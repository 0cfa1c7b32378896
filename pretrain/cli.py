"""What every fire command line shares (pretrain.tokenizer, pretrain.preprocess*, the eval commands): one-line
errors with the bad-input exit code, unknown flags refused before anything runs, flags that may be repeated."""

import difflib
import functools
import inspect
import re
import sys

import fire

from switchyard.errors import ConfigError

EXIT_BAD_INPUT = 2
HELP_FLAGS = ("-h", "--help")


def fail(message):
    """One line on stderr naming the problem and the fix, and the bad-input exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def repeated_flag(argv, name):
    """(argv without ``--name X`` / ``--name=X``, [X, ...]): fire keeps only the last of a repeated flag."""
    rest, values, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}" and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(f"--{name}="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest, values


def _is_flag(arg):
    # fire's rule: a leading hyphen makes a flag (--name, -name, -n), unless the argument is a negative number
    return arg.startswith("--") or re.match(r"-[a-zA-Z]", arg) is not None


def check_flags(fn, argv, name):
    """Refuse, in one line with the closest valid flag, a flag ``fn`` does not take: fire would otherwise raise a
    TypeError from the call or, for a function of ``*args``, silently leave the flag unused."""
    flags, separator = list(argv), "--"
    if separator in flags:  # what follows fire's separator is fire's own flags (--help, --trace, ...)
        flags = flags[: len(flags) - 1 - flags[::-1].index(separator)]
    if any(arg in HELP_FLAGS for arg in flags):
        return
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind is not p.VAR_POSITIONAL]
    for arg in filter(_is_flag, flags):
        key = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        if (
            key in names
            or (key.startswith("no") and key[2:] in names)  # --noflag sets a boolean flag False
            or (len(key) == 1 and any(n.startswith(key) for n in names))
        ):  # -x is the flag starting with x
            continue
        match = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean --{match[0]}?)" if match else ""
        fail(f"unknown flag {arg.split('=', 1)[0]}{hint}; {name} takes {', '.join('--' + n for n in names)} (python -m {name} --help)")


def fire_command(fn, name, argv=None, repeated=()):
    """Run ``fn`` as the command line ``name`` with fire: an unknown flag or a ConfigError is one line and exit
    code 2; each flag in ``repeated`` may be given several times and reaches ``fn`` as the list of its values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    check_flags(fn, argv, name)
    values = {}
    for flag in repeated:
        argv, values[flag] = repeated_flag(argv, flag)
    signature = inspect.signature(fn)

    # functools.wraps, not functools.partial: fire's --help shows the wrapped function's own docstring and flags
    @functools.wraps(fn)
    def command(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)  # fire passes defaults positionally, a repeated flag among them
        bound.arguments.update(values)
        return fn(*bound.args, **bound.kwargs)

    try:
        fire.Fire(command, command=argv, name=name)
    except ConfigError as e:
        fail(str(e))
