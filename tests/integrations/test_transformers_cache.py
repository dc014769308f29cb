"""LongAttnCache: every method's decode steps through longattn's decode paths, on tiny random models.

Oracles: the float64 model with attention by ``longattn.reference`` over the
whole sequence (a DynamicCache run, i.e. no decode kernel); the baseline for
the tolerance rule is the same float64 attention in the fp32 model (only the
rest of the model rounds) or transformers' own fp32 implementation.
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
from longattn.sparse import HeadPattern, HiP, Streaming, StreamingCache  # noqa: E402
from tests.integrations.test_transformers import (  # noqa: E402
    MODELS,
    SEQ,
    VOCAB,
    _build,
    _cache_kwarg,
    _inputs,
    _oracle_attention,
    _streaming_oracle,
)

SINK, RECENT = 2, 4
PATTERN = HeadPattern(retrieval=((True, False), (False, True)), sink_size=SINK, recent_size=RECENT)


def _duo_oracle():
    streaming = _streaming_oracle(SINK, RECENT)

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # per kv head: retrieval heads dense causal, streaming heads the Lambda mask
        group = query.shape[1] // key.shape[1]
        full = PATTERN.layer(module.layer_idx).repeat_interleave(group)
        dense, _ = _oracle_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        lam, _ = streaming(module, query, key, value, attention_mask, scaling, **kwargs)
        return torch.where(full[None, None, :, None], dense, lam), None

    return fn


def register_methods_and_oracles():
    """longattn's four names (HiP, Streaming(2, 4), Duo over PATTERN) and their float64 oracles."""
    from transformers.masking_utils import sdpa_mask

    lt.register(hip=HiP(topk=32, block_q=4, block_k=2, sink_size=2, recent_size=4),
                streaming=Streaming(sink_size=SINK, recent_size=RECENT), duo=PATTERN)
    for name, fn in (("ref64", _oracle_attention), ("ref64_streaming", _streaming_oracle(SINK, RECENT)),
                     ("ref64_duo", _duo_oracle())):
        transformers.AttentionInterface.register(name, fn)
        transformers.AttentionMaskInterface.register(name, sdpa_mask if name == "ref64" else lt._mask_fn)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_methods_and_oracles()


def _steps(model, impl, ids, extra, mask=None, cache=None):
    """Last-position logits of prefill(ids) then one step per column of ``extra``."""
    model.set_attn_implementation(impl)
    kw = {} if cache is None else {_cache_kwarg(model): cache}
    outs = []
    with torch.no_grad():
        if cache is None:  # the oracle's way: the whole sequence each time
            for t in range(extra.shape[1] + 1):
                seq = torch.cat([ids, extra[:, :t]], dim=1)
                m = None if mask is None else torch.cat([mask, torch.ones_like(extra[:, :t])], dim=1)
                outs.append(model(seq, attention_mask=m).logits[:, -1])
        else:
            outs.append(model(ids, attention_mask=mask, use_cache=True, **kw).logits[:, -1])
            for t in range(extra.shape[1]):
                m = None if mask is None else torch.cat([mask, torch.ones_like(extra[:, :t + 1])], dim=1)
                outs.append(model(extra[:, t:t + 1], attention_mask=m, use_cache=True, **kw).logits[:, -1])
    return torch.stack(outs, dim=1)


def _extra(n=4):
    return torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("impl, oracle", [("longattn_streaming", "ref64_streaming"), ("longattn_duo", "ref64_duo"),
                                          ("longattn_hip", "ref64")])
def test_sparse_cache_steps_match_float64_oracle(impl, oracle, monkeypatch):
    # 12 prompt tokens + 4 steps: Streaming(2, 4) evicts from the first step on;
    # HiP's topk 32 covers every key, so its decode equals dense attention.
    model, _ = _build("llama")
    ids, _ = _inputs(left_padding=False)
    extra = _extra()
    expected = _steps(copy.deepcopy(model).double(), oracle, ids, extra)
    baseline = _steps(model, oracle, ids, extra)
    sparse_decodes = []
    real = ltc.decode_attention
    monkeypatch.setattr(ltc, "decode_attention",
                        lambda *a, **k: sparse_decodes.append(k.get("sparse")) or real(*a, **k))
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    ours = _steps(model, impl, ids, extra, cache=cache)
    assert_close_to_oracle(ours, expected, baseline, name=f"{impl} step logits")
    layer = cache.layers[0]
    assert cache.get_seq_length() == SEQ + 4
    if impl == "longattn_hip":
        assert len(sparse_decodes) == 4 * 2 and all(isinstance(s, HiP) for s in sparse_decodes)
        assert layer.hip_state is not None and layer.hip_state.refreshes >= 1
    else:
        assert layer.mode == "store" and layer.k_buf is None  # no full buffer: the method's own cache
        if impl == "longattn_streaming":
            assert isinstance(layer.store, StreamingCache)
            assert layer.store.k.shape[1] == SINK + RECENT  # constant memory


def test_streaming_cache_memory_is_constant():
    model, _ = _build("llama")
    model.set_attn_implementation("longattn_streaming")
    cache = lt.LongAttnCache(model.config, max_cache_len=64)
    ids, _ = _inputs(left_padding=False)
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **{_cache_kwarg(model): cache})
    before = cache.layers[1].store.memory_bytes
    model.generate(torch.cat([ids, ids], 1), max_new_tokens=20, do_sample=False, pad_token_id=0,
                   **{_cache_kwarg(model): lt.LongAttnCache(model.config, max_cache_len=64)})
    assert cache.layers[1].store.memory_bytes == before == 2 * 2 * 2 * 16 * (SINK + RECENT) * 4


@pytest.mark.parametrize("page_size", [None, 5])
@pytest.mark.parametrize("name", list(MODELS))
def test_dense_cache_generate_matches_transformers(name, page_size):
    # Left padding decodes through decode_attention(cache_leftpad=...); the
    # paged variant through the paged kernel; Gemma-2 mixes sliding and full layers.
    model, baseline = _build(name)
    ids, mask = _inputs(left_padding=True)
    model.set_attn_implementation(baseline)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("longattn")
    cache = lt.LongAttnCache(model.config, max_cache_len=24, page_size=page_size)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         **{_cache_kwarg(model): cache})
    assert torch.equal(out, expected)
    layer = cache.layers[0]
    assert layer.mode == "full" and layer.leftpad.tolist() == [0, 4]
    assert (layer.block_table is None) == (page_size is None)


def test_padded_sparse_batch_falls_back_to_exact_unpadded_steps():
    # HiP's decode search serves rows of equal length: a left-padded batch
    # keeps full buffers and unpads each step (HiP's topk covers every key: dense).
    model, _ = _build("llama")
    ids, mask = _inputs(left_padding=True)
    extra = _extra(2)
    expected = _steps(copy.deepcopy(model).double(), "ref64", ids, extra, mask=mask)
    baseline = _steps(model, "sdpa", ids, extra, mask=mask)
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    ours = _steps(model, "longattn_hip", ids, extra, mask=mask, cache=cache)
    assert cache.layers[0].mode == "fallback"
    assert_close_to_oracle(ours, expected, baseline, name="padded HiP step logits")


def test_decoding_after_right_padding_raises():
    # Appending after right padding leaves pads inside the row: refused, never attended.
    model, _ = _build("llama")
    model.set_attn_implementation("longattn")
    ids, _ = _inputs(left_padding=False)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    kw = _cache_kwarg(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=True, **{kw: cache})
        with pytest.raises(UnsupportedFeatureError, match="padding inside a sequence"):
            model(_extra(1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                  use_cache=True, **{kw: cache})
    assert cache.get_seq_length() == SEQ  # nothing was written by the refused step


@pytest.mark.parametrize("page_size", [None, 4])
def test_crop_then_step_equals_building_the_shorter_cache(page_size):
    model, _ = _build("mistral")
    model.set_attn_implementation("longattn")
    ids, _ = _inputs(left_padding=False)
    nxt = _extra(1)
    kw = _cache_kwarg(model)
    with torch.no_grad():
        long_cache = lt.LongAttnCache(model.config, max_cache_len=32, page_size=page_size)
        model(ids, use_cache=True, **{kw: long_cache})
        model(nxt, use_cache=True, **{kw: long_cache})  # 13 tokens
        long_cache.crop(-4)  # transformers 5: remove 4 -> 9 tokens
        assert long_cache.get_seq_length() == SEQ - 3
        a = model(nxt, use_cache=True, **{kw: long_cache}).logits
        short_cache = lt.LongAttnCache(model.config, max_cache_len=32, page_size=page_size)
        model(ids[:, :SEQ - 3], use_cache=True, **{kw: short_cache})
        b = model(nxt, use_cache=True, **{kw: short_cache}).logits
    # the same tokens in the same slots, the same decode call: bitwise equal
    assert torch.equal(a, b)
    long_cache.crop(SEQ - 5)  # transformers 4's form: the length to keep
    assert long_cache.get_seq_length() == SEQ - 5
    with pytest.raises(ArgumentError, match="removes more"):
        long_cache.crop(-100)


def test_streaming_cache_cannot_crop():
    model, _ = _build("llama")
    model.set_attn_implementation("longattn_streaming")
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    with torch.no_grad():
        model(_inputs(False)[0], use_cache=True, **{_cache_kwarg(model): cache})
    with pytest.raises(UnsupportedFeatureError, match="cannot be cropped"):
        cache.crop(-1)


def test_beam_search_reorders_rows():
    model, _ = _build("llama")
    ids, mask = _inputs(left_padding=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    expected = model.generate(ids, **kwargs)
    model.set_attn_implementation("longattn")
    out = model.generate(ids, **kwargs, **{_cache_kwarg(model): lt.LongAttnCache(model.config, max_cache_len=24)})
    assert torch.equal(out, expected)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_arguments_name_themselves(bad):
    model, _ = _build("llama")
    with pytest.raises(ArgumentError, match="max_cache_len"):
        lt.LongAttnCache(model.config, max_cache_len=bad)
    with pytest.raises(ArgumentError, match="page_size"):
        lt.LongAttnCache(model.config, max_cache_len=8, page_size=bad)


@pytest.mark.parametrize("impl", ["longattn", "longattn_hip", "longattn_streaming", "longattn_duo"])
def test_prompt_loaded_through_update_decodes_like_a_prefilled_cache(impl):
    # cache.update(k, v, layer_idx) outside attention (loading a prompt's K/V) picks each method's storage
    from transformers.cache_utils import DynamicCache

    model, _ = _build("llama")
    model.set_attn_implementation(impl)
    ids, _ = _inputs(left_padding=False)
    nxt = _extra(1)
    kw = _cache_kwarg(model)
    with torch.no_grad():
        dyn = DynamicCache(config=model.config)
        model(ids, use_cache=True, **{kw: dyn})
        loaded = lt.LongAttnCache(model.config, max_cache_len=32)
        for idx, layer in enumerate(dyn.layers):
            loaded.update(layer.keys, layer.values, idx)
        prefilled = lt.LongAttnCache(model.config, max_cache_len=32)
        model(ids, use_cache=True, **{kw: prefilled})
        a = model(nxt, use_cache=True, **{kw: loaded}).logits
        b = model(nxt, use_cache=True, **{kw: prefilled}).logits
    assert loaded.layers[1].mode == prefilled.layers[1].mode
    assert torch.equal(a, b)


def test_duo_pattern_from_a_file(tmp_path):
    path = tmp_path / "pattern.json"
    PATTERN.save(path)
    assert "longattn_duo" in lt.register(duo=str(path))
    assert lt.sparse_config("longattn_duo", 1).pattern == PATTERN
    with pytest.raises(ArgumentError, match="HeadPattern or the path"):
        lt.register(duo=3)
    register_methods_and_oracles()  # back to this module's registrations


# --- decode-time methods: Quest, Double Sparsity, TidalDecode ---------------------------------------------------

def _register_decode_time(budget):
    from longattn.sparse import ChannelConfig, Quest, TidalDecode

    ranking = tuple(tuple(tuple(range(16)) for _ in range(2)) for _ in range(2))  # 2 layers x 2 kv heads, headdim 16
    channels = ChannelConfig(ranking=ranking, r=4, rotary="none", method="qk")
    return lt.register(quest=Quest(token_budget=budget, page_size=4),
                       double_sparsity=lambda i: channels.for_layer(i, token_budget=budget),
                       tidal=TidalDecode(2, dense_layers=(), selection_layers=(0,), token_budget=budget))


@pytest.mark.parametrize("impl", ["longattn_quest", "longattn_double_sparsity", "longattn_tidal"])
def test_decode_time_methods_with_budget_covering_the_context_generate_sdpas_tokens(impl, monkeypatch):
    names = _register_decode_time(budget=64)
    assert impl in names
    model, _ = _build("llama")
    ids, _ = _inputs(left_padding=False)
    model.set_attn_implementation("sdpa")
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    calls = []
    real = ltc.decode_attention
    monkeypatch.setattr(ltc, "decode_attention", lambda *a, **k: calls.append(k.get("sparse")) or real(*a, **k))
    model.set_attn_implementation(impl)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         **{_cache_kwarg(model): lt.LongAttnCache(model.config, max_cache_len=32)})
    assert torch.equal(out, expected)
    assert len(calls) == 5 * 2 and all(c is not None for c in calls)  # every step of every layer selected


@pytest.mark.parametrize("impl", ["longattn_quest", "longattn_double_sparsity"])
def test_decode_time_methods_small_budget_cache_matches_the_stateless_path(impl):
    # LongAttnCache keeps each layer's state; without it every step rebuilds it from the whole
    # cache: the same selection, the same exact attention over it.
    _register_decode_time(budget=8)
    model, _ = _build("llama")
    model.set_attn_implementation(impl)
    ids, _ = _inputs(left_padding=False)
    extra = _extra(3)
    ours = _steps(model, impl, ids, extra, cache=lt.LongAttnCache(model.config, max_cache_len=32))
    stateless = _steps(model, impl, ids, extra, cache=transformers.DynamicCache(config=model.config))
    dense = _steps(model, "longattn", ids, extra, cache=lt.LongAttnCache(model.config, max_cache_len=32))
    assert_close_to_oracle(ours, stateless, stateless, name=f"{impl} cached vs stateless")
    assert (ours - dense).abs().max() > 1e-4  # the budget really drops tokens here


def test_decode_time_methods_refuse_padding_and_tidal_needs_the_cache():
    _register_decode_time(budget=8)
    model, _ = _build("llama")
    ids, mask = _inputs(left_padding=True)
    model.set_attn_implementation("longattn_quest")
    with torch.no_grad(), pytest.raises(UnsupportedFeatureError, match="unpadded batches only"):
        model(ids, attention_mask=mask, use_cache=True,
              **{_cache_kwarg(model): lt.LongAttnCache(model.config, max_cache_len=32)})
    model.set_attn_implementation("longattn_tidal")
    with pytest.raises(UnsupportedFeatureError, match="use LongAttnCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    register_methods_and_oracles()


# --- TidalDecode's cache correction ------------------------------------------------------------------------------

def _layer_keys(cache, n):
    return torch.stack([layer.k_buf[:, :n] for layer in cache.layers])


def test_cache_correction_makes_the_kv_dense_again():
    # Tidal with a 4-token budget: layer 1 reuses layer 0's selection, so layer 1's
    # keys of decoded tokens come from approximate attention; correcting after every
    # token recomputes them densely.
    from longattn.sparse import TidalDecode

    lt.register(tidal=TidalDecode(3, dense_layers=(), selection_layers=(0,), token_budget=4, correction_interval=2))
    torch.manual_seed(0)  # 3 layers: layer 2's KV comes from layer 1's sparse (reuse) attention
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "q_proj"):
                mod.q_proj.weight.mul_(8.0)
    ids, _ = _inputs(left_padding=False)
    model.set_attn_implementation("longattn_tidal")
    plain = lt.LongAttnCache(model.config, max_cache_len=32)
    tokens = lt.generate_with_correction(model, ids, plain, max_new_tokens=5, correction_interval=100)
    corrected_cache = lt.LongAttnCache(model.config, max_cache_len=32)
    corrected = lt.generate_with_correction(model, ids, corrected_cache, max_new_tokens=5, correction_interval=1)
    assert tokens.shape == corrected.shape == (2, SEQ + 5)
    assert model.config._attn_implementation == "longattn_tidal"  # restored after each correction
    # The oracle: a dense float64 run over the corrected sequence; the fed tokens are SEQ .. SEQ + 3.
    n = SEQ + 4
    model64 = copy.deepcopy(model).double()
    model64.set_attn_implementation("ref64")
    dense64 = transformers.DynamicCache(config=model64.config)
    model.set_attn_implementation("longattn")
    dense32 = lt.LongAttnCache(model.config, max_cache_len=32)
    with torch.no_grad():
        model64(corrected[:, :n], use_cache=True, **{_cache_kwarg(model64): dense64})
        model(corrected[:, :n], use_cache=True, **{_cache_kwarg(model): dense32})
    oracle = torch.stack([layer.keys.transpose(1, 2) for layer in dense64.layers])
    assert_close_to_oracle(_layer_keys(corrected_cache, n), oracle, _layer_keys(dense32, n), name="corrected keys")
    # without correction layer 2's decoded keys differ from the dense ones
    uncorrected = _layer_keys(plain, n)
    plain_oracle64 = transformers.DynamicCache(config=model64.config)
    with torch.no_grad():
        model64(tokens[:, :n], use_cache=True, **{_cache_kwarg(model64): plain_oracle64})
    plain_oracle = torch.stack([layer.keys.transpose(1, 2) for layer in plain_oracle64.layers])
    assert (uncorrected[2, :, SEQ:] - plain_oracle[2, :, SEQ:].float()).abs().max() > 1e-3
    register_methods_and_oracles()


def test_recompute_recent_bad_input():
    model, _ = _build("llama")
    model.set_attn_implementation("longattn")
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    ids, _ = _inputs(left_padding=False)
    with torch.no_grad():
        model(ids, use_cache=True, **{_cache_kwarg(model): cache})
    with pytest.raises(ArgumentError, match="the cache holds 12"):
        lt.recompute_recent(model, cache, torch.zeros(2, 13, dtype=torch.long))
    with pytest.raises(ArgumentError, match="cache must be a longattn LongAttnCache"):
        lt.recompute_recent(model, transformers.DynamicCache(), ids)
    with pytest.raises(ArgumentError, match="correction_interval"):
        lt.generate_with_correction(model, ids, cache, max_new_tokens=2, correction_interval=0)
