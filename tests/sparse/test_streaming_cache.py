"""StreamingCache: prefill + decode steps equal one Lambda-masked pass; size stays bounded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, ShapeError
from longattn.reference import attention_ref
from longattn.sparse import Streaming, StreamingCache
from longattn.sparse.streaming import lambda_mask, reference_chunk_mask
from tests.sparse.cache_bytes import float_storage_bytes
from tests.tolerance import assert_close_to_oracle


@given(st.integers(0, 12), st.integers(1, 20), st.integers(0, 60), st.lists(st.integers(1, 7), min_size=1, max_size=6),
       st.sampled_from([1, 2]), st.sampled_from([1, 4]), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**16))
def test_prefill_then_steps_equal_one_masked_pass(sink, window, prompt, steps, nheads_k, group, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total = prompt + sum(steps)
    batch, nheads, d = 2, nheads_k * group, 16
    q = torch.randn(batch, total, nheads, d, generator=gen).to(dtype)
    k = torch.randn(batch, total, nheads_k, d, generator=gen).to(dtype)
    v = torch.randn(batch, total, nheads_k, d, generator=gen).to(dtype)
    cfg = Streaming(sink, window)
    ref_out, ref_lse = attention_ref(q, k, v, mask=lambda_mask(total, total, sink, window))
    cache = StreamingCache(cfg, batch, nheads_k, d, dtype=dtype)
    if prompt:
        out, lse = longattn.attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], causal=True, sparse=cfg,
                                      return_lse=True)
        assert_close_to_oracle(out, ref_out[:, :prompt], ref_out[:, :prompt])
        cache.append(k[:, :prompt], v[:, :prompt])
    at = prompt
    for n in steps:
        out, lse = cache.step(q[:, at : at + n], k[:, at : at + n], v[:, at : at + n], return_lse=True)
        assert_close_to_oracle(out, ref_out[:, at : at + n], ref_out[:, at : at + n])
        assert_close_to_oracle(lse, ref_lse[:, :, at : at + n], ref_lse[:, :, at : at + n], name="lse")
        at += n
        # Never more than sink + window tokens, whatever the length.
        assert cache.k.shape[1] == sink + window and cache.length == at
        assert int((cache.positions() >= 0).sum()) == min(at, sink + window)
    # Counted from the tensors the cache allocated; the same after any number of steps.
    assert cache.memory_bytes == float_storage_bytes(cache)
    assert cache.memory_bytes == float_storage_bytes(StreamingCache(cfg, batch, nheads_k, d, dtype=dtype))


@given(st.integers(0, 6), st.integers(1, 12), st.integers(0, 30), st.integers(1, 40), st.sampled_from([0.0, 2.5]),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_token_by_token_decode_through_the_fast_path(sink, window, prompt, steps, softcap, dtype, seed):
    """One token per step (the decode kernel over the filled slots) well past
    the ring's wrap, with softcap and GQA, equals one masked pass."""
    gen = torch.Generator().manual_seed(seed)
    total, nheads_k, group, d = prompt + steps, 2, 3, 16
    q = torch.randn(1, total, nheads_k * group, d, generator=gen).to(dtype)
    k = torch.randn(1, total, nheads_k, d, generator=gen).to(dtype)
    v = torch.randn(1, total, nheads_k, d, generator=gen).to(dtype)
    ref_out, ref_lse = attention_ref(q, k, v, softcap=softcap, mask=lambda_mask(total, total, sink, window))
    cache = StreamingCache(Streaming(sink, window), 1, nheads_k, d, dtype=dtype)
    cache.append(k[:, :prompt], v[:, :prompt])
    for at in range(prompt, total):
        out, lse = cache.step(q[:, at : at + 1], k[:, at : at + 1], v[:, at : at + 1], softcap=softcap,
                              return_lse=True)
        assert_close_to_oracle(out, ref_out[:, at : at + 1], ref_out[:, at : at + 1])
        assert_close_to_oracle(lse, ref_lse[:, :, at : at + 1], ref_lse[:, :, at : at + 1], name="lse")


@given(st.integers(0, 6), st.integers(1, 12), st.integers(0, 30), st.lists(st.integers(1, 9), min_size=1, max_size=5),
       st.sampled_from([1, 3]), st.integers(0, 2**16))
def test_reference_chunk_semantics(sink, window, prompt, steps, group, seed):
    gen = torch.Generator().manual_seed(seed)
    total, nheads_k, d = prompt + sum(steps), 2, 16
    q = torch.randn(1, total, nheads_k * group, d, generator=gen)
    k = torch.randn(1, total, nheads_k, d, generator=gen)
    v = torch.randn(1, total, nheads_k, d, generator=gen)
    cache = StreamingCache(Streaming(sink, window), 1, nheads_k, d)
    cache.append(k[:, :prompt], v[:, :prompt])
    at = prompt
    for n in steps:
        ref, _ = attention_ref(q[:, at : at + n], k[:, : at + n], v[:, : at + n],
                               mask=reference_chunk_mask(at, n, sink, window))
        out = cache.step(q[:, at : at + n], k[:, at : at + n], v[:, at : at + n], exact_lambda=False)
        assert_close_to_oracle(out, ref, ref)
        at += n
    with pytest.raises(ArgumentError, match="exact_lambda"):
        cache.step(q[:, :1], k[:, :1], v[:, :1], exact_lambda="no")


def test_positions_track_the_sinks_and_the_window():
    cache = StreamingCache(Streaming(2, 3), 1, 1, 4)
    cache.append(torch.zeros(1, 9, 1, 4), torch.zeros(1, 9, 1, 4))
    assert sorted(cache.positions().tolist()) == [0, 1, 6, 7, 8]


def test_errors_name_the_argument():
    cache = StreamingCache(Streaming(2, 3), 2, 2, 8)
    with pytest.raises(ShapeError, match="k_new"):
        cache.append(torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 3, 8))
    with pytest.raises(ShapeError, match="v_new"):
        cache.step(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 2, 8), torch.zeros(2, 1, 2, 8))
    with pytest.raises(ArgumentError, match="config"):
        StreamingCache("streaming", 1, 1, 8)
    with pytest.raises(ArgumentError, match="batch"):
        StreamingCache(Streaming(), 0, 1, 8)
