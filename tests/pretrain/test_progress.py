"""Rank 0's progress (pretrain/progress.py): plain log lines with the percentage and ETA in a log file, a tqdm bar
on a terminal."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from tests.distributed import MAIN, REPO, free_port, rank_env, run_ranks, train_args


def test_log_lines_in_a_file_carry_the_percentage_and_eta(tmp_path):
    output = run_ranks(train_args(tmp_path, "zero0.json", "tiny-gpt.json", 6, "--log_interval", 2), 2, tmp_path / "l")[0].output
    lines = [line for line in output.splitlines() if line.startswith("step ") and "train/loss=" in line]
    shown = [re.search(r"\[(\d+)% of 6 steps, eta (\d\d:\d\d)\]$", line) for line in lines]
    assert all(shown) and [m.group(1) for m in shown] == ["33", "67", "100"], output[-3000:]
    assert shown[-1].group(2) == "00:00"


def test_a_terminal_gets_a_progress_bar(tmp_path):
    leader, follower = pty.openpty()  # rank 0's stdout is a terminal, 120 columns wide
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    args = train_args(tmp_path, "zero0.json", "tiny-gpt.json", 4, "--log_interval", 2)
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *map(str, args)],
        cwd=REPO,
        env=rank_env(0, 1, free_port()),
        stdout=follower,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the rank has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
    text = shown.decode(errors="replace")
    assert re.search(r"train: +100%\|[^|]*\| 4/4 \[[\d:]+<[\d:]+, +[\d.]+(s/step|step/s), loss=\d", text), text[-3000:]
    assert "step 2 train/loss=" in text and "of 4 steps, eta" not in text  # the lines print above the bar, which has the ETA
