"""longattn.integrations.transformers: attn_implementation="longattn" on tiny random models.

The oracle is the same model run in float64 with attention computed by
``longattn.reference.attention_ref`` on transformers' own sdpa mask (its eager
path in float64 turns fully padded rows into NaN, which then leaks through the
values into valid rows); longattn's fp32 logits must be within 2x transformers'
own fp32 implementation's error (sdpa, or eager for Gemma-2, whose softcap sdpa
does not apply) plus the floor. Models are built from configs (no download).
"""

from __future__ import annotations

import copy

import pytest
import torch

from longattn.errors import ArgumentError, UnsupportedFeatureError
from tests.tolerance import assert_close_to_oracle

transformers = pytest.importorskip("transformers", minversion="4.51", reason="the transformers integration needs transformers>=4.51")

import longattn.integrations.transformers as lt  # noqa: E402
import longattn.integrations.transformers_cache as ltc  # noqa: E402

VOCAB, SEQ = 100, 12


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """float64 oracle: attention_ref on the mask transformers' sdpa path builds (bool 4D, or None = causal)."""
    from longattn.reference import attention_ref

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    softcap = float(kwargs.get("softcap") or 0.0)
    if attention_mask is None:  # sdpa_mask returns None when plain causal (+ window) stands in
        sw = kwargs.get("sliding_window")
        window = (-1, -1) if sw is None else (sw - 1, 0)
        out, _ = attention_ref(q, k, v, causal=True, softmax_scale=scaling, window_size=window, softcap=softcap)
    else:  # the mask already holds causality, window and padding at their absolute positions
        out, _ = attention_ref(q, k, v, softmax_scale=scaling, softcap=softcap, mask=attention_mask)
    return out.to(query.dtype), None


@pytest.fixture(scope="module", autouse=True)
def _registered():
    from transformers.masking_utils import sdpa_mask

    lt.register()
    transformers.AttentionInterface.register("ref64", _oracle_attention)
    transformers.AttentionMaskInterface.register("ref64", sdpa_mask)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     sliding_window=5)
    return transformers.MistralForCausalLM(cfg)


def _gemma2():
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=128, sliding_window=5, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=None, query_pre_attn_scalar=16)
    return transformers.Gemma2ForCausalLM(cfg)


MODELS = {"llama": (_llama, "sdpa"), "mistral": (_mistral, "sdpa"), "gemma2": (_gemma2, "eager")}


def _build(name):
    torch.manual_seed(0)
    build, baseline = MODELS[name]
    model = build().eval()
    # Scale the random weights up so attention is far from uniform (a uniform
    # softmax would hide masking mistakes).
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "q_proj"):
                mod.q_proj.weight.mul_(8.0)
    return model, baseline


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def _inputs(left_padding):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if left_padding:
        mask[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("left_padding", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_float64_oracle(name, left_padding):
    model, baseline = _build(name)
    ids, mask = _inputs(left_padding)
    oracle = _logits(copy.deepcopy(model).double(), "ref64", ids, mask)
    ours = _logits(model, "longattn", ids, mask)
    theirs = _logits(model, baseline, ids, mask)
    valid = mask.bool()  # padded positions' logits are meaningless (and differ between implementations)
    assert_close_to_oracle(ours[valid], oracle[valid], theirs[valid], name="logits")
    assert ours.dtype == torch.float32


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_greedy_generate_matches_sdpa(name):
    model, _ = _build(name)
    ids, mask = _inputs(left_padding=True)
    tokens = {}
    for impl in ("sdpa", "longattn"):
        model.set_attn_implementation(impl)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        tokens[impl] = out[:, SEQ:]
    assert torch.equal(tokens["longattn"], tokens["sdpa"])


def test_generate_with_static_cache_matches_sdpa():
    # A static cache hands attention its whole zero-filled buffer; the mask
    # function must mark only the filled prefix valid.
    model, _ = _build("llama")
    ids, _ = _inputs(left_padding=False)
    tokens = {}
    for impl in ("sdpa", "longattn"):
        model.set_attn_implementation(impl)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
        tokens[impl] = out[:, SEQ:]
    assert torch.equal(tokens["longattn"], tokens["sdpa"])


def test_right_padding_matches_sdpa_on_valid_positions():
    model, _ = _build("llama")
    ids, _ = _inputs(left_padding=False)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, -3:] = 0
    oracle = _logits(copy.deepcopy(model).double(), "ref64", ids, mask)
    ours = _logits(model, "longattn", ids, mask)
    theirs = _logits(model, "sdpa", ids, mask)
    valid = mask.bool()
    assert_close_to_oracle(ours[valid], oracle[valid], theirs[valid], name="logits")


def _fn():
    return transformers.AttentionInterface._global_mapping["longattn"]


class _Module(torch.nn.Module):
    is_causal = True


def test_cache_alignment_is_bottom_right():
    # q_len < kv_len (a cache): query i is key position kv_len - q_len + i.
    from longattn.reference import attention_ref

    torch.manual_seed(2)
    q = torch.randn(2, 4, 3, 16)
    k = torch.randn(2, 2, 7, 16)
    v = torch.randn(2, 2, 7, 16)
    out, weights = _fn()(_Module(), q, k, v, None, scaling=0.25)
    assert weights is None and out.shape == (2, 3, 4, 16)
    ref = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=0.25)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert_close_to_oracle(out, ref, ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropout": 0.1}, "dropout"),
        ({"s_aux": torch.zeros(4)}, "s_aux"),
        ({"attention_mask": torch.ones(1, 1, 3, 3, dtype=torch.bool)}, "4D|shape"),
        ({"attention_mask": torch.tensor([[True, False, True]])}, "contiguous"),
        ({"position_ids": torch.tensor([[0, 1, 0]])}, "position_ids"),
    ],
    ids=["dropout", "sinks", "mask4d", "mask_hole", "packed"],
)
def test_unsupported_inputs_raise(kwargs, match):
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    mask = kwargs.pop("attention_mask", None)
    with pytest.raises(UnsupportedFeatureError, match=match):
        _fn()(_Module(), q, k, v, mask, **kwargs)


def test_training_with_attention_dropout_raises():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                                   attn_implementation="longattn")
    model = transformers.LlamaForCausalLM(cfg).train()
    with pytest.raises(UnsupportedFeatureError, match="dropout"):
        model(torch.randint(0, VOCAB, (1, 5)))


def test_mask_function_registered_under_same_name():
    assert transformers.AttentionMaskInterface._global_mapping["longattn"] is lt._mask_fn


def _streaming_oracle(sink, recent):
    """float64 oracle for Streaming(sink, recent) on an unpadded batch: causal, and key j visible from
    query i iff j < sink or i - j < recent."""
    from longattn.reference import attention_ref

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert attention_mask is None, "this oracle serves unpadded batches only"
        q_len, kv_len = query.shape[2], key.shape[2]
        i = torch.arange(q_len)[:, None] + kv_len - q_len
        j = torch.arange(kv_len)[None, :]
        mask = (j <= i) & ((j < sink) | (i - j < recent))
        out, _ = attention_ref(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                               softmax_scale=scaling, mask=mask)
        return out.to(query.dtype), None

    return fn


def test_streaming_variant_matches_its_oracle():
    from longattn.sparse import Streaming

    names = lt.register(streaming=Streaming(sink_size=2, recent_size=4))
    assert "longattn_streaming" in names
    transformers.AttentionInterface.register("ref64_streaming", _streaming_oracle(2, 4))
    transformers.AttentionMaskInterface.register("ref64_streaming", lt._mask_fn)
    model, _ = _build("llama")
    ids, mask = _inputs(left_padding=False)
    oracle = _logits(copy.deepcopy(model).double(), "ref64_streaming", ids, None)
    ours = _logits(model, "longattn_streaming", ids, None)
    dense = _logits(model, "longattn", ids, None)
    # baseline: the fp32 model with the oracle's own float64 attention (only the rest of the model rounds)
    assert_close_to_oracle(ours, oracle, _logits(model, "ref64_streaming", ids, None), name="logits")
    assert (dense - oracle).abs().max() > 1e-3  # the pattern really differs from dense attention here


def test_duo_variant_follows_layer_idx():
    # Layer 0: every kv head retrieval (dense); layer 1: every kv head streaming
    # (sinks 2 + window 4). The oracle picks per layer by module.layer_idx.
    from longattn.sparse import HeadPattern

    pattern = HeadPattern(retrieval=((True, True), (False, False)), sink_size=2, recent_size=4)
    assert "longattn_duo" in lt.register(duo=pattern)
    streaming = _streaming_oracle(2, 4)

    def oracle_fn(module, *args, **kwargs):
        return (_oracle_attention if module.layer_idx == 0 else streaming)(module, *args, **kwargs)

    transformers.AttentionInterface.register("ref64_duo", oracle_fn)
    transformers.AttentionMaskInterface.register("ref64_duo", lt._mask_fn)
    model, _ = _build("llama")
    ids, _ = _inputs(left_padding=False)
    oracle = _logits(copy.deepcopy(model).double(), "ref64_duo", ids, None)
    ours = _logits(model, "longattn_duo", ids, None)
    assert_close_to_oracle(ours, oracle, _logits(model, "ref64_duo", ids, None), name="logits")
    assert (_logits(model, "longattn", ids, None) - oracle).abs().max() > 1e-3  # differs from dense here


def test_hip_variant_with_topk_covering_every_key_is_dense():
    # topk 16 >= 12 keys: HiP's selection keeps every block, so the result is dense causal attention.
    from longattn.sparse import HiP

    assert "longattn_hip" in lt.register(hip=HiP(topk=16, block_q=4, block_k=2, sink_size=2, recent_size=4))
    model, baseline = _build("llama")
    ids, mask = _inputs(left_padding=True)
    oracle = _logits(copy.deepcopy(model).double(), "ref64", ids, mask)
    ours = _logits(model, "longattn_hip", ids, mask)
    valid = mask.bool()
    assert_close_to_oracle(ours[valid], oracle[valid], _logits(model, baseline, ids, mask)[valid], name="logits")


def _cache_kwarg(model):
    # transformers 5.x calls the forward/generate argument `cache` (`past_key_values` is deprecated there)
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("left_padding", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_longattn_cache_generate_matches_sdpa(name, left_padding, monkeypatch):
    model, _ = _build(name)
    ids, mask = _inputs(left_padding)
    model.set_attn_implementation("sdpa")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    calls = []
    real = ltc.decode_attention
    monkeypatch.setattr(ltc, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_attn_implementation("longattn")
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         **{_cache_kwarg(model): cache})
    assert torch.equal(out, expected)
    assert cache.get_seq_length() == SEQ + 7 and cache.layers[0].lengths.tolist() == [SEQ + 7] * 2
    # every decode step of every layer runs through decode_attention (left padding as cache_leftpad)
    assert len(calls) == 7 * 2


def test_longattn_cache_decode_step_matches_float64_oracle():
    model, _ = _build("mistral")  # sliding window 5 < 13 tokens: decode_attention gets the window too
    ids, _ = _inputs(left_padding=False)
    nxt = torch.randint(1, VOCAB, (2, 1), generator=torch.Generator().manual_seed(3))
    full = torch.cat([ids, nxt], dim=1)
    oracle = _logits(copy.deepcopy(model).double(), "ref64", full, None)[:, -1]
    baseline = _logits(model, "sdpa", full, None)[:, -1]
    model.set_attn_implementation("longattn")
    cache = lt.LongAttnCache(model.config, max_cache_len=16)
    kw = _cache_kwarg(model)
    with torch.no_grad():
        model(ids, use_cache=True, **{kw: cache})
        step = model(nxt, use_cache=True, **{kw: cache}).logits[:, -1]
    assert cache.get_seq_length() == SEQ + 1
    assert_close_to_oracle(step, oracle, baseline, name="decode logits")


def test_longattn_cache_refuses_other_attention_implementations():
    model, _ = _build("llama")
    model.set_attn_implementation("sdpa")
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    with pytest.raises(UnsupportedFeatureError, match="sdpa"):
        with torch.no_grad():
            model(_inputs(False)[0], use_cache=True, **{_cache_kwarg(model): cache})


def test_longattn_cache_overflow_raises():
    model, _ = _build("llama")
    model.set_attn_implementation("longattn")
    cache = lt.LongAttnCache(model.config, max_cache_len=8)
    with pytest.raises(ArgumentError, match="max_cache_len=8"):
        with torch.no_grad():
            model(_inputs(False)[0], use_cache=True, **{_cache_kwarg(model): cache})
