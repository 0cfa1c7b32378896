"""Export a checkpoint: dense LMs to a Hugging Face transformers directory, Switch LMs to one safetensors file.

    python -m eval.export_hf RUN_DIR --output DIR [--tag global_stepN]

A dense GPT (any ZeRO stage, or pipeline stages) or a Llama, dense or MoE, becomes the transformers
architecture it is exactly, so ``AutoModelForCausalLM.from_pretrained(DIR)`` computes the same logits:

    gpt, learned positions  GPT2LMHeadModel      exact GELU, Conv1D weights (the transpose of nn.Linear's)
    gpt, rotary positions   GPTNeoXForCausalLM   sequential residual, rotary on the whole head, tied
                                                 embeddings; its fused QKV is laid out head by head
    llama                   LlamaForCausalLM     the same layout, tied or untied
    llama_moe               Qwen2MoeForCausalLM  fused experts, norm_topk_prob for top-k > 1 only, its
                                                 always-present gated shared expert made exact (see
                                                 qwen2_moe_state_dict); no router bias (refused)

DIR gets config.json, model.safetensors and the run's tokenizer as a transformers fast tokenizer
(tokenizer.json, so ``AutoTokenizer.from_pretrained(DIR)`` encodes as the run did): a sentencepiece
BPE or unigram model rebuilt from its pieces and merges (whitespace as the "▁" metaspace, split
before each space, as sentencepiece does; not for models with user-defined symbols, which
transformers would split differently: those get a warning and tokenizer.model only), or the byte
tokenizer (id = byte value, EOS = 256) as a byte-level BPE without merges. The sentencepiece file goes along as tokenizer.model, and
switchyard_tokenizer.json records the spec and the EOS id.

A Switch LM has no transformers counterpart: its consolidated fp32 weights, every expert of every
expert-parallel rank gathered, go to DIR/model.safetensors with the Switchyard model config in
DIR/switchyard_config.json, so models.build_model + load_state_dict restores it.
"""

import functools
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from eval.cli import fail, fire_command, print_result
from models import config_to_dict
from models.registry import families_that, family_of
from pretrain.run_dir import UnsafeCheckpoint, load_model, recorded_model_config, require_run_config, resolve_tag
from switchyard.errors import ConfigError


def gpt2_state_dict(state, config):
    """Switchyard GPT (learned positions) -> GPT2LMHeadModel names. Conv1D stores (in, out)."""
    out = {
        "transformer.wte.weight": state["tok_emb.weight"],
        "transformer.wpe.weight": state["pos_emb.weight"],
        "transformer.ln_f.weight": state["ln_f.weight"],
        "transformer.ln_f.bias": state["ln_f.bias"],
    }
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("ln_attn", "ln_1"), ("ln_ffn", "ln_2")):
            out[f"{theirs}{b}.weight"], out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.weight"], state[f"{ours}{a}.bias"]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("ffn.fc", "mlp.c_fc"), ("ffn.proj", "mlp.c_proj")):
            out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"].t()
            out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.bias"]
    return out


def neox_state_dict(state, config):
    """Switchyard GPT (rotary positions) -> GPTNeoXForCausalLM names. Switchyard's QKV rows are
    [all q | all k | all v]; NeoX's are [q k v of head 0 | of head 1 | ...]."""
    heads, head_dim, d_model = config.n_heads, config.d_model // config.n_heads, config.d_model

    def per_head(t):
        return t.reshape(3, heads, head_dim, *t.shape[1:]).transpose(0, 1).reshape(3 * d_model, *t.shape[1:])

    out = {
        "gpt_neox.embed_in.weight": state["tok_emb.weight"],
        "gpt_neox.final_layer_norm.weight": state["ln_f.weight"],
        "gpt_neox.final_layer_norm.bias": state["ln_f.bias"],
    }
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in (
            ("ln_attn", "input_layernorm"),
            ("ln_ffn", "post_attention_layernorm"),
            ("attn.proj", "attention.dense"),
            ("ffn.fc", "mlp.dense_h_to_4h"),
            ("ffn.proj", "mlp.dense_4h_to_h"),
        ):
            out[f"{theirs}{b}.weight"], out[f"{theirs}{b}.bias"] = state[f"{ours}{a}.weight"], state[f"{ours}{a}.bias"]
        out[f"{theirs}attention.query_key_value.weight"] = per_head(state[f"{ours}attn.qkv.weight"])
        out[f"{theirs}attention.query_key_value.bias"] = per_head(state[f"{ours}attn.qkv.bias"])
    return out


def common_config(config, eos_id, tied=True):
    return {"vocab_size": config.vocab_size, "tie_word_embeddings": tied, "eos_token_id": eos_id, "bos_token_id": eos_id, "torch_dtype": "float32"}


def gpt2_config(config, eos_id):
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "n_positions": config.max_seq_len,
        "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **common_config(config, eos_id),
    }


def neox_config(config, eos_id):
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_seq_len,
        "hidden_act": "gelu",
        "use_parallel_residual": False,
        "layer_norm_eps": 1e-5,
        "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        **common_config(config, eos_id),
    }


def llama_state_dict(state, config):
    """Switchyard Llama (or the attention, norms and dense FFNs of its MoE form) -> LlamaForCausalLM names, which
    Qwen2MoeForCausalLM shares. Both rotate the two halves of each head (transformers' rotate_half) as
    models/gpt.py apply_rotary does, so q and k need no permutation."""
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names = [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
        names += [(f"attn.w{a}", f"self_attn.{a}_proj") for a in "qkvo"]
        names += [(f"ffn.{a}", f"mlp.{b}_proj") for a, b in (("w1", "gate"), ("w3", "up"), ("w2", "down"))]
        for a, b in names:
            if f"{ours}{a}.weight" in state:  # an MoE layer has no ffn.w1 ... (qwen2_moe_state_dict names its experts)
                out[f"{theirs}{b}.weight"] = state[f"{ours}{a}.weight"]
    return out


def llama_config(config, eos_id):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads(),
        "head_dim": config.head_dim(),
        "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        **common_config(config, eos_id, tied=config.tie_embeddings),
    }


def qwen2_moe_state_dict(state, config):
    """Switchyard Llama MoE -> Qwen2MoeForCausalLM names. Its experts are stored fused, per layer
    gate_up_proj [experts, 2 x d_ff, d_model] (the gate rows, then the up rows) and down_proj [experts, d_model,
    d_ff]; its router is mlp.gate.weight [experts, d_model]. Its MoE block always adds a shared expert times
    sigmoid(shared_expert_gate x): exported with a zero gate (sigmoid 0 = 1/2, exactly) and the down projection
    doubled (exact: a power of two), or, without a shared expert, of size 0."""
    out = llama_state_dict(state, config)
    for moe_layer, i in enumerate(config.layers_with_experts()):
        ours, theirs = f"blocks.{i}.ffn.", f"model.layers.{i}.mlp."
        experts = [f"{ours}moe.deepspeed_moe.experts.deepspeed_experts.{e}." for e in range(config.num_experts)]
        out[f"{theirs}gate.weight"] = state[f"{ours}moe.deepspeed_moe.gate.wg.weight"]
        out[f"{theirs}experts.gate_up_proj"] = torch.stack([torch.cat([state[e + "w1.weight"], state[e + "w3.weight"]]) for e in experts])
        out[f"{theirs}experts.down_proj"] = torch.stack([state[e + "w2.weight"] for e in experts])
        out[f"{theirs}shared_expert_gate.weight"] = torch.zeros(1, config.d_model)
        if config.shared_expert:  # a GroupedExperts of one expert: stacked [1, in, out]
            out[f"{theirs}shared_expert.gate_proj.weight"] = state[f"{ours}shared.w1"][0].t()
            out[f"{theirs}shared_expert.up_proj.weight"] = state[f"{ours}shared.w3"][0].t()
            out[f"{theirs}shared_expert.down_proj.weight"] = 2 * state[f"{ours}shared.w2"][0].t()
        else:
            for name, shape in (("gate_proj", (0, config.d_model)), ("up_proj", (0, config.d_model)), ("down_proj", (config.d_model, 0))):
                out[f"{theirs}shared_expert.{name}.weight"] = torch.zeros(shape)
    return out


def qwen2_moe_config(config, eos_id):
    return {
        **llama_config(config, eos_id),
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "qkv_bias": False,
        "use_sliding_window": False,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.top_k,
        # Switch (top-1) weights the expert by its raw softmax probability; top-k > 1 renormalizes over the k.
        "norm_topk_prob": config.top_k > 1,
        "moe_intermediate_size": config.d_ff,
        "shared_expert_intermediate_size": config.d_ff if config.shared_expert else 0,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(config.n_layers) if i not in config.layers_with_experts()],
        "router_aux_loss_coef": config.aux_loss_coef,
    }


def qwen2_moe_refusal(config):
    """Why Qwen2-MoE cannot compute this Llama MoE's logits, or None. Its router has no bias on the choice
    (DeepSeek-V3's balancing), and it is dropless: a model trained with a capacity exports as its dropless form,
    whose logits are Switchyard's wherever no token is over an expert's capacity."""
    if config.router_bias_rate > 0:
        return (
            f"this llama_moe model chooses experts with a router bias (router_bias_rate {config.router_bias_rate}), which "
            f"Qwen2-MoE's router has no place for; only a model trained with router_bias_rate 0 exports"
        )
    return None


def hf_tokenizer(tokenizer):
    """The run's tokenizer as a transformers PreTrainedTokenizerFast that encodes and decodes the same ids."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, bytes_to_unicode

    if tokenizer.spec["type"] == "bytes":
        byte_chars = bytes_to_unicode()  # GPT-2's printable stand-in for each byte
        vocab = {byte_chars[b]: b for b in range(256)} | {"<eos>": tokenizer.eos_id}
        fast = Tokenizer(BPE(vocab, []))
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        fast.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=fast, eos_token="<eos>")
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer.model_path, "rb") as f:
        proto.ParseFromString(f.read())
    model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}[proto.trainer_spec.model_type]
    if model_type not in ("bpe", "unigram"):
        raise ConfigError(
            f"a sentencepiece {model_type} model has no transformers fast tokenizer here; export a run trained with a bpe or unigram tokenizer"
        )
    extracted = SentencePieceExtractor(tokenizer.model_path).extract(BPE if model_type == "bpe" else Unigram)
    if model_type == "bpe":
        fast = Tokenizer(BPE(extracted["vocab"], extracted["merges"], unk_token="<unk>", fuse_unk=True))
    else:
        fast = Tokenizer(Unigram(extracted["vocab"], unk_id=extracted["unk_id"]))
    if any(piece.type == proto.SentencePiece.USER_DEFINED for piece in proto.pieces):
        # transformers matches added tokens before or after normalization, never as sentencepiece does
        # (around the dummy prefix and the spaces), so the ids would differ next to them.
        raise ConfigError("a sentencepiece model with user-defined symbols has no exact transformers fast tokenizer")
    # sentencepiece's dummy prefix and spaces as "▁", then a split before each "▁": the same pieces.
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    fast.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    sp = tokenizer.sp
    specials = {"pad_token": sp.pad_id(), "unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": tokenizer.eos_id}
    return PreTrainedTokenizerFast(tokenizer_object=fast, **{name: sp.id_to_piece(i) for name, i in specials.items() if i >= 0})


def write_tokenizer(tokenizer, directory):
    try:
        hf_tokenizer(tokenizer).save_pretrained(directory)
    except ConfigError as e:
        print(f"warning: {e}; exporting tokenizer.model only (load it with sentencepiece)", file=sys.stderr)
    spec = dict(tokenizer.spec)
    if spec["type"] == "sentencepiece":
        shutil.copyfile(spec["path"], os.path.join(directory, "tokenizer.model"))
        spec["path"] = "tokenizer.model"
    spec["eos_id"] = tokenizer.eos_id
    with open(os.path.join(directory, "switchyard_tokenizer.json"), "w") as f:
        json.dump(spec, f, indent=1)


def write_transformers(state, config, tokenizer, directory, convert, hf_config):
    """A transformers directory: config.json and the weights under the architecture's names."""
    # save_file refuses tensors sharing memory; the tied output embedding is implied by the config.
    tensors = {name: t.contiguous().clone() for name, t in convert(state, config).items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config, tokenizer.eos_id), f, indent=1)


def write_switchyard(state, config, tokenizer, directory):
    """Switchyard's own export, for families transformers has no architecture for: the consolidated weights and the
    model config, which models.build_model + load_state_dict restore."""
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "switchyard_config.json"), "w") as f:
        json.dump(config_to_dict(config, launch_fields=False), f, indent=1)


# What a family's ``export(config)`` may name (models/registry.py ModelFamily), and how it is written.
EXPORTERS = {
    "gpt2": functools.partial(write_transformers, convert=gpt2_state_dict, hf_config=gpt2_config),
    "gpt_neox": functools.partial(write_transformers, convert=neox_state_dict, hf_config=neox_config),
    "llama": functools.partial(write_transformers, convert=llama_state_dict, hf_config=llama_config),
    "qwen2_moe": functools.partial(write_transformers, convert=qwen2_moe_state_dict, hf_config=qwen2_moe_config),
    "switchyard-switch": write_switchyard,
}
# What a format cannot express, checked before any weight is read: config -> the reason, or None.
REFUSALS = {"qwen2_moe": qwen2_moe_refusal}


def export(run_dir, output, tag=None):
    """Write the export of checkpoint ``tag`` of RUN_DIR into ``output`` (through a temporary directory)."""
    if os.path.exists(output):
        raise ConfigError(f"{output} already exists; pass a new --output directory")
    config = recorded_model_config(require_run_config(run_dir), run_dir)
    family = family_of(config)
    if family.export is None:  # before any weight is read
        exporting = families_that(lambda f: f.export is not None)
        raise ConfigError(
            f"eval.export_hf of {run_dir}: the {family.name!r} family has no export format (families "
            f"that export: {', '.join(repr(f) for f in exporting)})"
        )
    kind = family.export(config)
    refusal = REFUSALS.get(kind, lambda config: None)(config)
    if refusal:
        raise ConfigError(f"eval.export_hf of {run_dir}: {refusal}")
    tag = resolve_tag(str(run_dir), tag)
    model, config, tokenizer = load_model(str(run_dir), tag)
    state = {name: t.detach().float().contiguous() for name, t in model.state_dict().items()}
    tmp = f"{output}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    EXPORTERS[kind](state, config, tokenizer, tmp)
    write_tokenizer(tokenizer, tmp)
    os.rename(tmp, output)
    return {"output": str(output), "format": kind, "run_dir": str(run_dir), "tag": tag, "parameters": sum(t.numel() for name, t in state.items())}


def main(run_dir, output, tag=None):
    """Export checkpoint TAG (default: latest) of RUN_DIR to the directory OUTPUT.

    Args:
        run_dir: a pretrain/main.py --save_dir.
        output: the directory to create.
        tag: global_stepN (default: the one ``latest`` names).
    """
    try:
        result = export(str(run_dir), str(output), tag)
    except (ConfigError, UnsafeCheckpoint) as e:
        fail(str(e))
    print_result(result)


if __name__ == "__main__":
    fire_command(main, "eval.export_hf")
