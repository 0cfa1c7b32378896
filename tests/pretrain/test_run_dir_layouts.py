"""pretrain.run_dir.load_model: every checkpoint layout loads into the plain model and reproduces the
validation loss the training logged; Switch experts land in their places; bad run directories are refused."""

import shutil

import pytest
import torch

from pretrain.data.tokenizer import SentencePieceTokenizer
from pretrain.run_dir import load_model, run_tokenizer, safe_load
from pretrain.tokenizer import train as train_tokenizer
from switchyard.errors import ConfigError
from tests.distributed import CORPUS, read_metrics
from tests.trained_runs import RECIPES, lm_task

RTOL = 1e-5  # the trainer's engine and the plain model differ only in the order of floating-point sums


def val_loss(model, task, dp_size, eval_iters=4, micro_batch_size=2):
    """What the trainer logs as val/loss: the mean over every data-parallel rank's validation micro-batches."""
    with torch.no_grad():
        losses = [
            task.loss(model(task.inputs(batch)), batch)[1]["lm_loss"]
            for rank in range(dp_size)
            for i in range(eval_iters)
            for batch in [task.val_batch(i, micro_batch_size, rank, dp_size)]
        ]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("name", RECIPES)
def test_loaded_model_reproduces_logged_val_loss(trained, name):
    run = trained(name)
    model, config, tokenizer = load_model(run)
    assert not model.training and tokenizer.spec == {"type": "bytes"}
    logged = read_metrics(run, "val/loss")[RECIPES[name].steps]
    measured = val_loss(model, lm_task(name, run), RECIPES[name].dp_size)
    print(f"{name}: val/loss logged {logged}, loaded model {measured}, relative gap {abs(measured - logged) / logged:.1e}")
    assert measured == pytest.approx(logged, rel=RTOL)


def test_switch_experts_all_local_distinct_and_in_place(trained):
    """Trained at expert-parallel size 2 (each rank held 2 of the 4 experts), loaded with all 4 on one process."""
    run = trained("switch")
    model, config, _ = load_model(run)
    assert config.expert_parallel_size == 1
    moe_blocks = [block for block in model.blocks if hasattr(block.ffn, "local_experts")]
    assert len(moe_blocks) == len(config.layers_with_experts()) == 1
    experts = moe_blocks[0].ffn.local_experts()
    assert experts.num_experts == config.num_experts == 4
    weights = [experts.expert(e)["fc.weight"] for e in range(4)]
    assert all(not torch.equal(weights[i], weights[j]) for i in range(4) for j in range(i + 1, 4))
    for e, weight in enumerate(weights):  # expert e holds the weights DeepSpeed saved as global expert e
        saved = safe_load(run / "global_step3" / f"layer_0_expert_{e}_mp_rank_00_model_states.pt")
        torch.testing.assert_close(weight, saved[f"blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{e}.fc.weight"], rtol=0, atol=0)


def test_explicit_tag_and_refusals(trained, tmp_path):
    run = trained("zero3")
    model, _, _ = load_model(run, tag="global_step3")
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ConfigError, match="run_config.json does not exist"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint global_step99 is not in .* \(it has: global_step3\)"):
        load_model(run, tag="global_step99")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "run_config.json", bare)
    with pytest.raises(ConfigError, match="'latest' is missing"):
        load_model(bare)


def test_a_damaged_checkpoint_is_refused_naming_an_intact_one(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained("zero3"), run)
    shutil.copytree(run / "global_step3", run / "global_step4")
    (run / "latest").write_text("global_step4")
    shard = next((run / "global_step4").glob("*model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(
        ConfigError,
        match=rf"global_step4 is damaged \({shard.name} has 100 bytes, expected \d+\); "
        rf"pass --tag global_step3 \(the newest intact one\)",
    ):
        load_model(run)
    assert load_model(run, tag="global_step3")[0] is not None


def test_sentencepiece_tokenizer_found_with_a_moved_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:50_000])
    train_tokenizer(str(corpus), vocab_size=200, output=str(tmp_path / "tok"), num_threads=1)
    spec = SentencePieceTokenizer(tmp_path / "tok.model").spec
    run = tmp_path / "run"
    run.mkdir()
    assert run_tokenizer(run, spec).spec == spec  # at the recorded path
    (tmp_path / "tok.model").rename(run / "tok.model")
    assert run_tokenizer(run, spec).sha256 == spec["sha256"]  # moved with the run, into its directory
    train_tokenizer(str(corpus), vocab_size=150, output=str(run / "tok"), num_threads=1)  # same name, another model
    with pytest.raises(ConfigError, match="is not the one"):
        run_tokenizer(run, spec)
    (run / "tok.model").unlink()
    with pytest.raises(ConfigError, match="no longer exists"):
        run_tokenizer(run, spec)
