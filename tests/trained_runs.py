"""Tiny training runs shared by the tests that read checkpoints back (evaluation, export, the run-directory loader):
each recipe is trained once a session, when a test first asks for it (the ``trained`` fixture, tests/conftest.py)."""

from dataclasses import dataclass

from pretrain.main import prepare
from tests.distributed import run_ranks, train_args


@dataclass(frozen=True)
class Recipe:
    ds_config: str
    model_config: str
    ranks: int
    steps: int
    stages: int = 1

    @property
    def dp_size(self):
        return self.ranks // self.stages


RECIPES = {
    # Rotary positions and 100 steps: a model that uses its context, for the sliding-window test
    # (learned positions at a few hundred steps still differ by position more than context helps).
    "dense": Recipe("zero1.json", "tiny-gpt-rotary.json", ranks=1, steps=100),
    "zero3": Recipe("zero3.json", "tiny-gpt.json", ranks=2, steps=3),
    "pipeline": Recipe("pipeline2_zero1.json", "tiny-gpt.json", ranks=2, steps=3, stages=2),
    "switch": Recipe("moe_ep2_zero2.json", "tiny-switch.json", ranks=2, steps=3),
    "llama": Recipe("zero3.json", "tiny-llama.json", ranks=2, steps=3),
    "llama_moe": Recipe("moe_ep2_zero2.json", "tiny-llama-moe.json", ranks=2, steps=3),  # top-2 dropless, EP 2
}


def trained_runs(tmp_path_factory):
    """name -> run directory of RECIPES[name], trained on first use."""
    root = tmp_path_factory.mktemp("eval_runs")
    done = {}

    def get(name):
        if name not in done:
            recipe = RECIPES[name]
            run = root / name
            run_ranks(train_args(root, recipe.ds_config, recipe.model_config, recipe.steps, save_dir=run), recipe.ranks, root / f"logs_{name}")
            done[name] = run
        return done[name]

    return get


def lm_task(name, run):
    """The LM task the run trained with (its data, tokenizer and validation batches). The launch plan
    does not shape them, so a one-rank ZeRO-1 plan stands in for pipeline and expert-parallel ones."""
    # A fresh --save_dir: prepare() refuses a start into the run's own, which holds the run.
    args = train_args(run, "zero1.json", RECIPES[name].model_config, RECIPES[name].steps, save_dir=run.parent / f"{run.name}_prepare_only")
    return prepare([str(a) for a in args])[-1]
