"""The tokenizer loader: a file that is not a sentencepiece model is one ConfigError naming it, for every caller."""

import os
import random
import subprocess
import sys

import pytest

from pretrain.data.tokenizer import load_tokenizer
from switchyard.errors import ConfigError
from tests.distributed import CORPUS, MAIN, REPO

NOT_MODELS = {
    "text": b"hello, I am a text file\n",
    "random bytes": random.Random(0).randbytes(300),
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(NOT_MODELS))
def test_a_file_that_is_not_a_sentencepiece_model_is_refused_by_name(tmp_path, kind):
    path = tmp_path / "x.model"
    path.write_bytes(NOT_MODELS[kind])
    with pytest.raises(ConfigError) as refused:
        load_tokenizer(str(path))
    assert str(refused.value) == (
        f"tokenizer {path} is not a sentencepiece model; pass a .model file written by python -m pretrain.tokenizer, or --tokenizer bytes"
    )


def test_training_with_a_text_file_as_tokenizer_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(NOT_MODELS["text"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [
            sys.executable,
            str(MAIN),
            "--ds_config",
            str(REPO / "ds_configs" / "zero0.json"),
            "--model_config",
            str(REPO / "models" / "configs" / "tiny-gpt.json"),
            "--train_data",
            str(CORPUS),
            "--tokenizer",
            str(bad),
            "--max_steps",
            "1",
            "--save_dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and f"tokenizer {bad} is not a sentencepiece model" in errors[0], proc.stderr[-2000:]
