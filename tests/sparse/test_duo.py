"""DuoAttention prefill and HeadPattern: per-head oracle masks and pattern files."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, ShapeError
from longattn.reference import attention_ref
from longattn.sparse import Duo, HeadPattern
from longattn.sparse.streaming import lambda_mask, reference_chunk_mask
from tests.sparse.cache_bytes import float_storage_bytes
from tests.tolerance import assert_close_to_oracle


@given(st.integers(1, 150), st.integers(1, 150), st.sampled_from([1, 2, 4]), st.sampled_from([1, 4]),
       st.integers(0, 10), st.integers(1, 40), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_heads_follow_their_pattern(seqlen_q, seqlen_k, nheads_k, group, sink, window, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    retrieval = tuple(bool(x) for x in torch.randint(0, 2, (nheads_k,), generator=gen).tolist())
    pattern = HeadPattern((retrieval, tuple(not x for x in retrieval)), sink, window)
    nheads, d = nheads_k * group, 16
    q = torch.randn(1, seqlen_q, nheads, d, generator=gen).to(dtype)
    k = torch.randn(1, seqlen_k, nheads_k, d, generator=gen).to(dtype)
    v = torch.randn(1, seqlen_k, nheads_k, d, generator=gen).to(dtype)
    for layer in (0, 1):
        out, lse = longattn.attention(q, k, v, causal=True, sparse=Duo(pattern, layer), return_lse=True)
        full = pattern.layer(layer).repeat_interleave(group)  # per query head
        causal = lambda_mask(seqlen_q, seqlen_k, 0, seqlen_k + seqlen_q + 1)  # the plain causal mask
        stream = lambda_mask(seqlen_q, seqlen_k, sink, window)
        mask = torch.where(full[:, None, None], causal, stream)[None]  # (1, nheads, sq, sk)
        ref_out, ref_lse = attention_ref(q, k, v, mask=mask)
        assert_close_to_oracle(out, ref_out, ref_out)
        assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_all_retrieval_is_dense_and_all_streaming_is_the_lambda_mask():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 90, 4, 16), torch.randn(1, 90, 2, 16), torch.randn(1, 90, 2, 16)
    dense, lse = longattn.attention(q, k, v, causal=True, sparse=Duo(HeadPattern(((True, True),), 4, 8), 0),
                                    return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    assert_close_to_oracle(dense, ref, ref)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")
    stream, lse = longattn.attention(q, k, v, causal=True, sparse=Duo(HeadPattern(((False, False),), 4, 8), 0),
                                     return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, mask=lambda_mask(90, 90, 4, 8))
    assert_close_to_oracle(stream, ref, ref)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_from_gates_takes_the_lowest_fraction_over_all_layers():
    gates = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1]])
    pattern = HeadPattern.from_gates(gates, sparsity=0.5)
    assert pattern.retrieval == ((True, False, True), (False, True, False))  # 0.1, 0.1, 0.2 are streaming
    assert pattern.retrieval_fraction == 0.5
    assert HeadPattern.from_gates(gates, sparsity=0.0).retrieval_fraction == 1.0
    assert HeadPattern.from_gates(gates, sparsity=1.0).retrieval_fraction == 0.0
    with pytest.raises(ArgumentError, match="sparsity"):
        HeadPattern.from_gates(gates, sparsity=1.5)
    with pytest.raises(ShapeError, match="gates"):
        HeadPattern.from_gates(torch.ones(3))


def test_pattern_files_round_trip_and_bad_files_are_named(tmp_path):
    pattern = HeadPattern.from_gates(torch.tensor([[0.3, 0.7], [0.6, 0.1]]), 0.5, sink_size=8, recent_size=32)
    path = tmp_path / "pattern.json"
    pattern.save(path)
    assert HeadPattern.load(path, num_layers=2, nheads_k=2) == pattern
    with pytest.raises(ShapeError, match="layers"):
        HeadPattern.load(path, num_layers=3)
    with pytest.raises(ShapeError, match="kv heads"):
        HeadPattern.load(path, nheads_k=4)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArgumentError, match="invalid JSON"):
        HeadPattern.load(bad)
    data = json.loads(path.read_text())
    for change, match in (({"format": "other"}, "not a HeadPattern"), ({"version": 9}, "version"),
                          ({"retrieval": [[True, False], [True]]}, "layer 1"), ({"num_layers": 5}, "says 5 layers"),
                          ({"recent_size": 0}, "recent_size")):
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises((ArgumentError, ShapeError), match=match):
            HeadPattern.load(bad)


def test_duo_errors_name_the_problem():
    pattern = HeadPattern(((True, False),))
    with pytest.raises(ArgumentError, match="layer_idx"):
        Duo(pattern, 1)
    q = torch.randn(1, 8, 3, 8)
    with pytest.raises(ShapeError, match="kv heads"):
        longattn.attention(q, q, q, causal=True, sparse=Duo(pattern, 0))
    with pytest.raises(ArgumentError, match="causal"):
        k = torch.randn(1, 8, 2, 8)
        longattn.attention(torch.randn(1, 8, 2, 8), k, k, causal=False, sparse=Duo(pattern, 0))


# Patterns whose heads of a kind are one run (indexed as views) and split runs (gathered).
PATTERNS_3 = [(True, False, False), (False, True, False), (True, False, True)]


@given(st.integers(0, 40), st.lists(st.integers(1, 4), min_size=1, max_size=5), st.sampled_from([1, 4]),
       st.sampled_from(PATTERNS_3), st.integers(0, 2**16))
def test_prefill_then_decode_with_the_two_part_cache_equals_one_masked_pass(prompt, steps, group, layer, seed):
    from longattn.sparse import DuoCache

    gen = torch.Generator().manual_seed(seed)
    nheads_k, d, sink, window = 3, 16, 3, 9
    pattern = HeadPattern((layer,), sink, window)
    duo = Duo(pattern, 0)
    total = prompt + sum(steps)
    q = torch.randn(2, total, nheads_k * group, d, generator=gen)
    k = torch.randn(2, total, nheads_k, d, generator=gen)
    v = torch.randn(2, total, nheads_k, d, generator=gen)
    full = pattern.layer(0).repeat_interleave(group)
    mask = torch.where(full[:, None, None], lambda_mask(total, total, 0, 2 * total + 1),
                       lambda_mask(total, total, sink, window))[None]
    ref, _ = attention_ref(q, k, v, mask=mask)
    cache = DuoCache(duo, 2, total + 4, nheads_k, d)
    if prompt:
        out = longattn.attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], causal=True, sparse=duo)
        assert_close_to_oracle(out, ref[:, :prompt], ref[:, :prompt])
        cache.append(k[:, :prompt], v[:, :prompt])
    at = prompt
    for n in steps:
        out = cache.step(q[:, at : at + n], k[:, at : at + n], v[:, at : at + n])
        assert_close_to_oracle(out, ref[:, at : at + n], ref[:, at : at + n])
        at += n
    # Counted from the tensors the cache holds: everything it allocated, less
    # the full part's capacity beyond the tokens stored so far.
    allocated = float_storage_bytes(cache)
    assert cache.allocated_bytes == allocated
    assert cache.memory_bytes == allocated - cache.k_full[:, total:].nbytes - cache.v_full[:, total:].nbytes


@given(st.integers(0, 30), st.lists(st.integers(1, 9), min_size=1, max_size=4), st.sampled_from(PATTERNS_3),
       st.integers(0, 2**16))
def test_chunked_prefill_into_the_cache_with_the_reference_chunk_rule(prompt, steps, layer, seed):
    """``exact_lambda=False``: streaming heads see the whole streaming cache
    as the chunk began plus the chunk causally; retrieval heads stay dense."""
    from longattn.sparse import DuoCache

    gen = torch.Generator().manual_seed(seed)
    nheads_k, group, d, sink, window = 3, 2, 16, 3, 7
    total = prompt + sum(steps)
    q = torch.randn(1, total, nheads_k * group, d, generator=gen)
    k = torch.randn(1, total, nheads_k, d, generator=gen)
    v = torch.randn(1, total, nheads_k, d, generator=gen)
    full = torch.tensor(layer).repeat_interleave(group)
    cache = DuoCache(Duo(HeadPattern((layer,), sink, window), 0), 1, total, nheads_k, d)
    cache.append(k[:, :prompt], v[:, :prompt])
    at = prompt
    for n in steps:
        causal = lambda_mask(n, at + n, 0, 2 * total + 1)
        mask = torch.where(full[:, None, None], causal, reference_chunk_mask(at, n, sink, window))[None]
        ref, _ = attention_ref(q[:, at : at + n], k[:, : at + n], v[:, : at + n], mask=mask)
        out = cache.step(q[:, at : at + n], k[:, at : at + n], v[:, at : at + n], exact_lambda=False)
        assert_close_to_oracle(out, ref, ref)
        at += n

