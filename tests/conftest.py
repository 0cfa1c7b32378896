"""Session set-up shared by every test that starts DeepSpeed."""

import os

# The suite is a CPU suite, also on a machine with GPUs: hidden before torch looks, here and in every rank it starts
# (their environment is this one's). The GPU paths are checked by scripts that run on a GPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import random
import sys

import pytest

from pretrain.preprocess_pairs import preprocess_pairs
from pretrain.tokenizer import train as train_tokenizer
from tests.distributed import REPO, bleu_args, run_ranks, translation_args
from tests.trained_runs import trained_runs


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built():
    """JIT-build DeepSpeed's CPU ops once, here, before any test starts ranks.

    Otherwise the first ranks of the session build them concurrently under a test's time-out,
    and a rank killed mid-build leaves torch's build lock behind, hanging every later run.
    The environment matches tests/distributed.rank_env (same cache, the venv's ninja first),
    since torch keys its cache by the build command.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        for name in ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder"):
            get_accelerator().create_op_builder(name).load(verbose=False)


# A toy language pair for the translation, BLEU, ROUGE and distillation tests, made once a session.
WORDS = [f"w{i}" for i in range(24)]


def write_synthetic_pairs(directory, n, seed):
    """A toy language pair: the target is the source's words reversed, each word renamed (wN -> vN)."""
    rng = random.Random(seed)
    sources = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) for _ in range(n)]
    targets = [" ".join(w.replace("w", "v") for w in reversed(s.split())) for s in sources]
    paths = []
    for ext, lines in (("src", sources), ("tgt", targets)):
        path = directory / f"pairs{seed}.{ext}"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory):
    """(train PREFIX, val PREFIX, tokenizer .model) of the toy language pair."""
    directory = tmp_path_factory.mktemp("pairs")
    train_src, train_tgt = write_synthetic_pairs(directory, 2000, seed=1)
    val_src, val_tgt = write_synthetic_pairs(directory, 100, seed=2)
    train_tokenizer(train_src, train_tgt, per_line=True, vocab_size=32, output=str(directory / "toy"), num_threads=1)
    model = directory / "toy.model"
    for prefix, (src, tgt) in (("train", (train_src, train_tgt)), ("val", (val_src, val_tgt))):
        preprocess_pairs(source=str(src), target=str(tgt), tokenizer=str(model), output_prefix=str(directory / prefix), workers=1)
    return directory / "train", directory / "val", model


@pytest.fixture(scope="session")
def translation_run(tmp_path_factory, pair_data):
    """A tiny dense translation model trained on the toy pair (1 rank, ZeRO-1), with val/bleu at its end."""
    directory = tmp_path_factory.mktemp("translation_run")
    run_ranks(translation_args(directory, pair_data, "zero1.json", "tiny-transformer.json", 150, *bleu_args(pair_data)), 1, directory / "logs")
    return directory / "run"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """name -> run directory of tests.trained_runs.RECIPES[name], trained on first use."""
    return trained_runs(tmp_path_factory)
