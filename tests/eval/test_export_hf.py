"""python -m eval.export_hf: transformers computes Switchyard's logits; Switch weights come back whole."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from models import build_model, config_from_dict
from pretrain.run_dir import load_model
from switchyard.errors import ConfigError
from tests.distributed import REPO


def export(run, output):
    proc = subprocess.run(
        [sys.executable, "-m", "eval.export_hf", str(run), "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    return proc, (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None)


@pytest.mark.parametrize(
    "name, architecture",
    [
        ("dense", "GPTNeoXForCausalLM"),
        ("zero3", "GPT2LMHeadModel"),
        ("pipeline", "GPT2LMHeadModel"),
        ("llama", "LlamaForCausalLM"),
        ("llama_moe", "Qwen2MoeForCausalLM"),
    ],
)
def test_transformers_loads_the_export_and_computes_the_same_logits(trained, tmp_path, name, architecture):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained(name)
    proc, result = export(run, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == architecture
    model, config, tokenizer = load_model(run)
    tokens = torch.randint(0, config.vocab_size, (3, config.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens)[0], hf(tokens).logits
    print(f"{name} -> {architecture}: max |logit difference| {(ours - theirs).abs().max().item():.2e}")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # Qwen2-MoE's shared-expert gate (zero: see eval/export_hf.py) is one d_model row per MoE layer more.
    gates = config.d_model * len(config.layers_with_experts()) if architecture == "Qwen2MoeForCausalLM" else 0
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters()) + gates
    spec = json.loads((tmp_path / "hf" / "switchyard_tokenizer.json").read_text())
    assert spec["type"] == tokenizer.spec["type"] and spec["eos_id"] == tokenizer.eos_id
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_switch_exports_every_expert_as_fp32_safetensors(trained, tmp_path):
    run = trained("switch")  # trained with 2 expert-parallel ranks, 2 experts each
    proc, result = export(run, tmp_path / "switch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["format"] == "switchyard-switch"
    state = load_file(tmp_path / "switch" / "model.safetensors")
    config = config_from_dict(json.loads((tmp_path / "switch" / "switchyard_config.json").read_text()))
    restored = build_model(config)
    restored.load_state_dict(state, strict=True)
    model, _, _ = load_model(run)
    # All experts, each its own (initialized apart, trained on different tokens): none is a copy of another.
    fc = [state[name] for name in sorted(state) if re.search(r"deepspeed_experts\.\d+\.fc\.weight$", name)]
    assert len(fc) == config.num_experts * len(config.layers_with_experts())
    assert all(not torch.equal(a, b) for i, a in enumerate(fc) for b in fc[i + 1 :])
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(restored.eval()(tokens)[0], model(tokens)[0])


LLAMA = {
    "vocab_size": 320,
    "max_seq_len": 32,
    "d_model": 64,
    "n_layers": 3,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 176,
    "rope_theta": 5e5,
    "norm_eps": 1e-6,
}


@pytest.mark.parametrize(
    "changes, architecture",
    [
        ({"family": "llama", "tie_embeddings": True, "n_kv_heads": 1}, "LlamaForCausalLM"),
        ({"family": "llama_moe", "num_experts": 4}, "Qwen2MoeForCausalLM"),  # top-1: the raw softmax weight
        ({"family": "llama_moe", "num_experts": 4, "top_k": 2, "shared_expert": True, "moe_layers": [0, 2]}, "Qwen2MoeForCausalLM"),
        ({"family": "llama_moe", "num_experts": 4, "top_k": 3, "dropless": True, "tie_embeddings": True}, "Qwen2MoeForCausalLM"),
    ],
)
def test_llama_shapes_convert_to_the_same_logits(tmp_path, changes, architecture):
    """The conversions alone, on built models of the shapes no trained run covers: tied or not, multi-query
    attention, top-1 or top-k routing, a shared expert, MoE layers at chosen places."""
    from transformers import AutoModelForCausalLM

    from eval.export_hf import EXPORTERS
    from models.registry import family_of
    from pretrain.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    config = config_from_dict({**LLAMA, **changes})
    model = build_model(config).eval()
    state = {name: t.detach().float().contiguous() for name, t in model.state_dict().items()}
    EXPORTERS[family_of(config).export(config)](state, config, ByteTokenizer(), tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == architecture
    tokens = torch.randint(0, config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, outputs = model(tokens), hf(tokens)
    # Dropless as Qwen2-MoE is: no token over an expert's capacity here.
    assert all(float(s["dropped_fraction"]) == 0.0 for s in ours[2])
    torch.testing.assert_close(outputs.logits, ours[0], rtol=1e-5, atol=1e-5)


def test_a_router_bias_is_refused_before_any_weight_is_read(trained, tmp_path):
    from eval.export_hf import export

    run = trained("llama_moe")
    biased = tmp_path / "biased"
    biased.mkdir()  # the run's record alone, with the bias on: no checkpoint to read
    record = json.loads((run / "run_config.json").read_text())
    record["model"]["router_bias_rate"] = 0.001
    (biased / "run_config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="router bias .* which Qwen2-MoE's router has no place for; only a model trained with router_bias_rate 0"):
        export(biased, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_and_nothing_is_left_half_written(trained, tmp_path):
    run = trained("zero3")
    (tmp_path / "taken").mkdir()
    proc, _ = export(run, tmp_path / "taken")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'taken'} already exists; pass a new --output directory"]
    proc, _ = export(tmp_path / "no_run", tmp_path / "out")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_tokenizers_become_fast_tokenizers_that_encode_the_same(tmp_path, model_type):
    from transformers import AutoTokenizer

    from eval.export_hf import hf_tokenizer
    from pretrain.data.tokenizer import SentencePieceTokenizer
    from pretrain.tokenizer import train as train_tokenizer
    from tests.distributed import CORPUS

    train_tokenizer(str(CORPUS), vocab_size=400, model_type=model_type, output=str(tmp_path / "sp"), num_threads=1)
    ours = SentencePieceTokenizer(str(tmp_path / "sp.model"))
    hf_tokenizer(ours).save_pretrained(tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    documents = [d for d in CORPUS.read_text().split("\n\n") if d.strip()][:2000] + [
        "Wörds  with  spaces\nand ünïcödé",
        "  leading spaces",
        "trailing  ",
        "\n\tnewline first",
    ]
    assert [theirs.encode(d, add_special_tokens=False) for d in documents] == [ours.encode(d) for d in documents]
    assert all(theirs.decode(ours.encode(d)) == ours.decode(ours.encode(d)) for d in documents[:200])
    assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.sp.pad_id()


def test_the_byte_tokenizer_becomes_a_byte_level_fast_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from eval.export_hf import hf_tokenizer
    from pretrain.data.tokenizer import ByteTokenizer

    hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    text = "Héllo wörld\n\n  日本語 tabs\tand ✓"
    assert theirs.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text) == list(text.encode("utf-8"))
    assert theirs.decode(list(text.encode("utf-8"))) == text and theirs.eos_token_id == ByteTokenizer.eos_id


def test_user_defined_symbols_get_no_inexact_fast_tokenizer(tmp_path):
    from eval.export_hf import hf_tokenizer
    from pretrain.data.tokenizer import SentencePieceTokenizer
    from pretrain.tokenizer import train as train_tokenizer
    from tests.distributed import CORPUS

    train_tokenizer(str(CORPUS), vocab_size=400, user_defined_symbols="<2en>", output=str(tmp_path / "sp"), num_threads=1)
    with pytest.raises(ConfigError, match="user-defined symbols has no exact transformers fast tokenizer"):
        hf_tokenizer(SentencePieceTokenizer(str(tmp_path / "sp.model")))


def test_a_translation_run_is_refused(translation_run, tmp_path):
    from eval.export_hf import export

    # The family has no export format (models/transformer.py registers none), which is said before any weight is read.
    with pytest.raises(
        ConfigError,
        match=f"eval.export_hf of {translation_run}: the 'transformer' family has no export "
        r"format \(families that export: 'gpt', 'llama', 'llama_moe', 'switch'\)",
    ):
        export(translation_run, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
