"""What every eval command shares: repeated flags, one-line errors, atomic output files, the JSON last line."""
import json
import os
import sys

EXIT_BAD_INPUT = 2


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


def fail(message):
    """One line on stderr naming the problem and the fix, and the bad-input exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


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
        line = raw[:e.start].count(b"\n") + 1
        fail(f"{what} file {path} is not UTF-8 (line {line}); convert it, e.g. iconv -t UTF-8")
    return text.splitlines()
