"""Encoder-decoder Transformer: shapes, padding and causal masking, tied embeddings, the Vaswani presets'
sizes, the Switch variant and config refusals."""

import pytest
import torch

from models import build_model, config_from_dict, load_model_config
from models.switch import SwitchFFN
from models.transformer import SwitchTransformer, Transformer
from switchyard.deepspeed_compat import gate_weight
from switchyard.errors import ConfigError

PAD = 0


def tiny(family="transformer", **over):
    base = {"family": family, "vocab_size": 50, "max_seq_len": 32, "d_model": 32, "n_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "d_ff": 64}
    torch.manual_seed(0)
    return build_model(config_from_dict({**base, **over})).eval()


def batch(B=3, S=7, T=6, vocab=50, seed=1):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(1, vocab, (B, S), generator=gen)
    tgt = torch.randint(1, vocab, (B, T), generator=gen)
    return src, torch.zeros(B, S, dtype=torch.bool), tgt


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_forward_shapes_and_dense_aux_loss(positions):
    model = tiny(positions=positions)
    src, pad_mask, tgt = batch()
    logits, aux_loss, stats = model(src, pad_mask, tgt)
    assert logits.shape == (3, 6, 50)
    assert aux_loss.item() == 0.0 and stats == []


def test_separate_vocabularies_give_target_sized_logits():
    model = tiny(share_all_embeddings=False, tgt_vocab_size=40)
    src, pad_mask, _ = batch()
    tgt = torch.randint(1, 40, (3, 6))
    assert model(src, pad_mask, tgt)[0].shape == (3, 6, 40)
    assert model.src_emb.weight.shape == (50, 32) and model.tgt_emb is not model.src_emb


def test_embeddings_are_tied():
    shared = tiny()
    assert shared.src_emb.weight is shared.tgt_emb.weight
    separate = tiny(share_all_embeddings=False)
    assert separate.src_emb.weight is not separate.tgt_emb.weight
    # The decoder's output projection is its input embedding: a gradient reaches it from the logits alone.
    src, pad_mask, tgt = batch()
    separate(src, pad_mask, tgt)[0][..., 5].sum().backward()
    assert separate.tgt_emb.weight.grad[5].abs().sum() > 0


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_source_padding_does_not_change_real_tokens(positions):
    model = tiny(positions=positions)
    src, pad_mask, tgt = batch(B=2, S=5)
    padded = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
    padded_mask = torch.cat([pad_mask, torch.ones(2, 4, dtype=torch.bool)], dim=1)
    memory, _, _ = model.encode(src, pad_mask)
    padded_memory, _, _ = model.encode(padded, padded_mask)
    torch.testing.assert_close(padded_memory[:, :5], memory, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(padded, padded_mask, tgt)[0], model(src, pad_mask, tgt)[0], rtol=1e-5, atol=1e-6)
    # Changing what is under the padding changes nothing either.
    garbage = padded.clone()
    garbage[:, 5:] = 7
    torch.testing.assert_close(model(garbage, padded_mask, tgt)[0], model(padded, padded_mask, tgt)[0])


def test_padding_in_one_sentence_leaves_the_other_alone():
    model = tiny()
    src, _, tgt = batch(B=2, S=6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3:] = True  # sentence 1 is 3 tokens long
    logits = model(src, mask, tgt)[0]
    torch.testing.assert_close(logits[0], model(src[:1], mask[:1], tgt[:1])[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits[1], model(src[1:, :3], mask[1:, :3], tgt[1:])[0][0], rtol=1e-5, atol=1e-6)


def test_decoder_is_causal():
    model = tiny()
    src, pad_mask, tgt = batch(B=1, T=8)
    logits = model(src, pad_mask, tgt)[0]
    for t in range(8):
        changed = tgt.clone()
        changed[0, t] = (changed[0, t] % 49) + 1
        other = model(src, pad_mask, changed)[0]
        torch.testing.assert_close(other[0, :t], logits[0, :t])  # earlier positions cannot see position t
        assert not torch.allclose(other[0, t:], logits[0, t:])


def test_source_reaches_the_decoder():
    model = tiny()
    src, pad_mask, tgt = batch(B=1)
    other_src = src.clone()
    other_src[0, 0] = (src[0, 0] % 49) + 1
    assert not torch.allclose(model(src, pad_mask, tgt)[0], model(other_src, pad_mask, tgt)[0])


@pytest.mark.parametrize("preset,paper_millions", [("transformer-base", 65), ("transformer-big", 213)])
def test_vaswani_presets_have_the_papers_sizes(preset, paper_millions):
    config = load_model_config(f"models/configs/{preset}.json")
    with torch.device("meta"):  # sizes only: no memory for 200M weights
        total, active = build_model(config).param_counts()
    assert total == active
    # The paper's counts are rounded, with a 37000-token joint BPE vocabulary (Table 3): within 3%.
    assert abs(total / 1e6 - paper_millions) / paper_millions < 0.03, total


def test_tiny_presets_build_and_run():
    for name in ("tiny-transformer", "tiny-switch-transformer"):
        torch.manual_seed(0)
        model = build_model(load_model_config(f"models/configs/{name}.json")).eval()
        src, pad_mask, tgt = batch(vocab=model.config.vocab_size)
        assert model(src, pad_mask, tgt)[0].shape == (3, 6, model.config.vocab_size)


def test_switch_transformer_has_experts_in_encoder_and_decoder():
    model = tiny("switch-transformer", encoder_layers=4, decoder_layers=4, num_experts=4)
    assert isinstance(model, SwitchTransformer) and isinstance(model, Transformer)
    switched = [i for i, layer in enumerate([*model.encoder, *model.decoder]) if isinstance(layer.ffn, SwitchFFN)]
    assert switched == [1, 3, 5, 7] == model.config.layers_with_experts()  # every other layer of each stack
    model.train()
    layer_aux = []
    for ffn in model.switch_layers():
        ffn.register_forward_hook(lambda module, args, out: layer_aux.append(out[1]))
    src, pad_mask, tgt = batch()
    logits, aux_loss, stats = model(src, pad_mask, tgt)
    assert logits.shape == (3, 6, 50) and len(stats) == 4 and len(layer_aux) == 4
    assert aux_loss.dtype == torch.float32 and aux_loss.item() > 0
    torch.testing.assert_close(aux_loss, sum(layer_aux))  # summed over encoder and decoder layers
    aux_loss.backward()
    assert all(gate_weight(ffn.moe).grad is not None for ffn in model.switch_layers())


def test_switch_transformer_takes_the_routing_options():
    """The encoder-decoder's Switch layers read the same fields as the LM's: top-2 dropless SwiGLU experts with a
    shared expert and the router bias train, route no padding and drop nothing."""
    model = tiny("switch-transformer", num_experts=4, top_k=2, dropless=True, expert_activation="swiglu", shared_expert=True, router_bias_rate=0.01)
    model.train()
    src, pad_mask, tgt = batch()
    pad_mask[0, 5:] = True  # padding in the first source sentence
    logits, aux_loss, stats = model(src, pad_mask, tgt)
    assert all(float(s["dropped_fraction"]) == 0.0 for s in stats)
    (logits.square().mean() + aux_loss).backward()
    assert all(ffn.shared.w1.grad is not None and ffn.local_experts().w2.grad is not None for ffn in model.switch_layers())
    encoder_layer = model.switch_layers()[0]
    assert int(encoder_layer.routed_tokens.sum()) == 2 * (3 * 7 - 2)  # k x the real source tokens
    model.balance_routers()
    assert all(int(ffn.routed_tokens.sum()) == 0 and ffn.router_bias_steps.abs().sum() > 0 for ffn in model.switch_layers())
    total, active = model.param_counts()
    per_expert = sum(ffn.local_experts().params_per_expert() for ffn in model.switch_layers())
    assert total - active == 2 * per_expert  # 4 experts, 2 active


def test_switch_transformer_counts_one_expert_as_active():
    model = tiny("switch-transformer", num_experts=4)
    total, active = model.param_counts()
    per_expert = sum(ffn.local_experts().params_per_expert() for ffn in model.switch_layers())
    assert total - active == 3 * per_expert
    dense_ffn = sum(p.numel() for p in tiny().encoder[1].ffn.parameters())
    assert per_expert == 2 * dense_ffn  # one encoder and one decoder Switch layer of the dense shape


def test_experts_start_different():
    model = tiny("switch-transformer", num_experts=4)
    experts = model.switch_layers()[0].local_experts()
    weights = [experts.expert(e)["fc.weight"] for e in range(experts.num_experts)]
    assert not torch.equal(weights[0], weights[1])


@pytest.mark.parametrize(
    "over,message",
    [
        ({"share_all_embeddings": True, "tgt_vocab_size": 40}, "share_all_embeddings needs one vocabulary"),
        ({"positions": "rotary"}, "positions must be 'sinusoidal' or 'learned'"),
        ({"n_heads": 5}, "divisible by n_heads"),
        ({"decoder_layers": 0}, "decoder_layers must be positive"),
        ({"n_layers": 2}, "unknown key 'n_layers'"),
    ],
)
def test_bad_configs_are_refused_in_one_line(over, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**over)


def test_bad_switch_configs_are_refused():
    with pytest.raises(ConfigError, match="out of range"):
        tiny("switch-transformer", moe_layers=[2])
    with pytest.raises(ConfigError, match="no layer has experts"):
        tiny("switch-transformer", encoder_layers=1, decoder_layers=1)
    with pytest.raises(ConfigError, match="set at launch"):
        tiny("switch-transformer", expert_parallel_size=2)


def padded_pair(src, src_lengths, tgt, tgt_lengths, width):
    """The pair right-padded with PAD to ``width`` on both sides, and its (src_pad_mask, tgt_pad_mask)."""
    src = torch.cat([src, torch.full((src.shape[0], width - src.shape[1]), PAD)], dim=1)
    tgt = torch.cat([tgt, torch.full((tgt.shape[0], width - tgt.shape[1]), PAD)], dim=1)
    positions = torch.arange(width)[None, :]
    return src, positions >= src_lengths[:, None], tgt, positions >= tgt_lengths[:, None]


def test_switch_padding_takes_no_capacity_and_no_stats():
    # Every token chooses expert 0 (zero router weights tie, argmax takes the first), whose capacity
    # (min_capacity 13) holds the 13 real tokens on each side but not them and much padding.
    model = tiny("switch-transformer", num_experts=2, eval_capacity_factor=1.0, min_capacity=13)
    for ffn in model.switch_layers():
        torch.nn.init.zeros_(gate_weight(ffn.moe))
    src, _, tgt = batch(B=2, S=7, T=7)
    src_lengths, tgt_lengths = torch.tensor([7, 6]), torch.tensor([7, 6])
    logits, aux, stats = model(*padded_pair(src, src_lengths, tgt, tgt_lengths, 7))
    padded_logits, padded_aux, padded_stats = model(*padded_pair(src, src_lengths, tgt, tgt_lengths, 24))
    real = ~padded_pair(src, src_lengths, tgt, tgt_lengths, 7)[3]
    torch.testing.assert_close(padded_logits[:, :7][real], logits[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_aux, aux)
    for layer_stats in padded_stats:  # fractions of the 13 real tokens: all at expert 0, none dropped
        torch.testing.assert_close(layer_stats["expert_fraction"], torch.tensor([1.0, 0.0]))
        assert float(layer_stats["dropped_fraction"]) == 0.0
    # Without the target mask the decoder's padding takes expert 0's slots: real target tokens are dropped.
    unmasked_logits, _, unmasked_stats = model(*padded_pair(src, src_lengths, tgt, tgt_lengths, 24)[:3])
    assert float(unmasked_stats[-1]["dropped_fraction"]) > 0
    assert not torch.allclose(unmasked_logits[:, :7][real], logits[real], rtol=1e-5, atol=1e-6)


def test_dense_transformer_takes_and_ignores_the_target_pad_mask():
    model = tiny()
    src, src_pad_mask, tgt = batch()
    tgt_pad_mask = torch.zeros_like(tgt, dtype=torch.bool)
    tgt_pad_mask[0, 4:] = True
    torch.testing.assert_close(model(src, src_pad_mask, tgt, tgt_pad_mask)[0], model(src, src_pad_mask, tgt)[0])


@pytest.mark.parametrize("family", ["transformer", "switch-transformer"])
def test_a_batch_without_source_padding_attends_without_a_mask(family, monkeypatch):
    """src_pad_mask None (no source padding): every attention call gets no mask, which is what lets a GPU run
    FlashAttention (it takes none), and the output equals the masked call's with nothing masked."""
    import torch.nn.functional as F

    over = {"num_experts": 4} if family == "switch-transformer" else {}
    model = tiny(family, **over)
    src, nothing_padded, tgt = batch()
    masked = model(src, nothing_padded, tgt)
    masks = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: masks.append(kw.get("attn_mask")) or sdpa(*a, **kw))
    unmasked = model(src, None, tgt)
    assert len(masks) == 2 + 2 * 2 and all(mask is None for mask in masks)  # encoder self, decoder self and cross
    torch.testing.assert_close(unmasked[0], masked[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmasked[1], masked[1])
    masks.clear()
    model(src, nothing_padded.index_fill(1, torch.tensor([6]), True), tgt)  # padding: the encoder and cross masks stay
    assert sum(mask is not None for mask in masks) == 2 + 2
