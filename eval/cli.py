"""What every eval command shares: one-line errors and the fire entry point (pretrain/cli.py, which the pretrain
commands share too), atomic output files, the JSON last line."""

import json
import os

from pretrain.cli import EXIT_BAD_INPUT, fail, fire_command  # noqa: F401 (the eval commands import them from here)


def write_atomically(path, text):
    """Write ``text`` to ``path`` through a temporary name, so a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def print_result(result, output=None):
    """The result as one JSON object on the last line of stdout (and in ``output``, when given)."""
    line = json.dumps(result)
    if output:
        write_atomically(output, line + "\n")
    print(line, flush=True)


def read_lines(path, what):
    """The lines of a UTF-8 text file (without newlines); a missing or undecodable file is a one-line error."""
    if not os.path.isfile(path):
        fail(f"{what} file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        fail(f"{what} file {path} is not UTF-8 (line {line}); convert it, e.g. iconv -t UTF-8")
    return text.splitlines()
