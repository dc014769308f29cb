"""decode_attention against the float64 oracle: contiguous and paged caches,
ragged lengths (0 and 1 included), appended tokens, GQA, seqlen_q up to 8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import longattn
from longattn.decode import plan_decode
from longattn.errors import ArgumentError, DTypeError, ShapeError, UnsupportedFeatureError
from tests.decode.decode_cases import DecodeCase, decode_cases
from tests.tolerance import assert_close_to_oracle


@given(decode_cases())
def test_eager_matches_oracle(case):
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    out, lse = longattn.decode_attention(q, k_cache, v_cache, **kwargs, **case.kwargs(), backend="eager", return_lse=True)
    ref_out, ref_lse = case.oracle(q, logical_k, logical_v)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_new_tokens_are_written_in_place_and_cache_seqlens_untouched():
    case = DecodeCase((5, 0, 9), 2, 2, 2, 4, 32, torch.float32, 4, True, (-1, -1), 0.0, seed=1)
    q, k_cache, v_cache, kwargs, logical_k, _ = case.build()
    before = kwargs["cache_seqlens"].clone()
    longattn.decode_attention(q, k_cache, v_cache, **kwargs)
    assert torch.equal(kwargs["cache_seqlens"], before)
    table = kwargs["block_table"]
    for b, n in enumerate(case.cache_seqlens):
        for p in range(n, n + case.seqlen_new):
            assert torch.equal(k_cache[int(table[b, p // 4]), p % 4], logical_k[b, p])


def test_step_by_step_decode_equals_one_pass():
    """Prefill a cache, then decode token by token advancing cache_seqlens."""
    gen = torch.Generator().manual_seed(2)
    batch, steps, prefix, heads_k, dim = 2, 6, 7, 2, 32
    k_all = torch.randn(batch, prefix + steps, heads_k, dim, generator=gen)
    v_all = torch.randn(batch, prefix + steps, heads_k, dim, generator=gen)
    qs = torch.randn(batch, steps, 8, dim, generator=gen)
    k_cache = torch.zeros(batch, 32, heads_k, dim)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:, :prefix], v_cache[:, :prefix] = k_all[:, :prefix], v_all[:, :prefix]
    lens = torch.full((batch,), prefix, dtype=torch.int32)
    outs = []
    for t in range(steps):
        pos = prefix + t
        outs.append(longattn.decode_attention(
            qs[:, t : t + 1], k_cache, v_cache, cache_seqlens=lens,
            k_new=k_all[:, pos : pos + 1], v_new=v_all[:, pos : pos + 1],
        ))
        lens += 1
    full = longattn.reference.attention_ref(qs, k_all, v_all, causal=True)[0]
    assert_close_to_oracle(torch.cat(outs, dim=1), full, full)


def test_plan_mismatch_and_bad_input_are_clear_errors():
    case = DecodeCase((5, 3), 0, 1, 1, 2, 16, torch.float32, 2, True, (-1, -1), 0.0, seed=3)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    with pytest.raises(ArgumentError, match="plan was made for seqlens"):
        longattn.decode_attention(q, k_cache, v_cache, **kwargs, plan=plan_decode([5, 4], nheads_k=1, num_workers=2))
    bad_table = kwargs["block_table"].clone()
    bad_table[1, 0] = 999
    with pytest.raises(ArgumentError, match=r"block_table\[1, 0\] = 999 is out of range"):
        longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=kwargs["cache_seqlens"], block_table=bad_table)
    with pytest.raises(ArgumentError, match="cache overflow: sequence 0 needs"):
        longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=torch.tensor([99, 1], dtype=torch.int32),
                                  block_table=kwargs["block_table"])
    with pytest.raises(ArgumentError, match="cache_seqlens must be >= 0"):
        longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=torch.tensor([-1, 1], dtype=torch.int32),
                                  block_table=kwargs["block_table"])
    with pytest.raises(DTypeError, match="cache_seqlens must be an integer tensor"):
        longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=torch.tensor([1.0, 1.0]),
                                  block_table=kwargs["block_table"])
    with pytest.raises(ShapeError, match=r"cache_seqlens must have shape \(batch,\) = \(2,\)"):
        longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=torch.tensor([1], dtype=torch.int32),
                                  block_table=kwargs["block_table"])
    with pytest.raises(ArgumentError, match="k_new and v_new must be given together"):
        longattn.decode_attention(q, k_cache, v_cache, **kwargs, k_new=torch.randn(2, 1, 1, 16))
    with pytest.raises(ShapeError, match="k_new must have shape"):
        longattn.decode_attention(q, k_cache, v_cache, **kwargs, k_new=torch.randn(2, 1, 2, 16), v_new=torch.randn(2, 1, 2, 16))
    with pytest.raises(ShapeError, match="k_cache has batch 2 but q has 3"):
        longattn.decode_attention(torch.randn(3, 1, 2, 16), torch.randn(2, 8, 1, 16), torch.randn(2, 8, 1, 16),
                                  cache_seqlens=torch.ones(3, dtype=torch.int32))
    with pytest.raises(ShapeError, match="k_cache has headdim 8 but q has 16"):
        longattn.decode_attention(q, torch.randn(2, 8, 1, 8), torch.randn(2, 8, 1, 8), cache_seqlens=kwargs["cache_seqlens"])
    with pytest.raises(UnsupportedFeatureError, match="state="):
        longattn.decode_attention(q, k_cache, v_cache, **kwargs, state=object())
