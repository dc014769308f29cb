"""Streaming (sinks + sliding window, the Lambda mask) prefill against the oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
import longattn.kernels.dense.cpp
from longattn.errors import ArgumentError, BackendUnavailableError
from longattn.reference import attention_ref
from longattn.sparse import Streaming
from longattn.kernels.block_sparse.sdpa import streaming_prefill_chunked
from longattn.sparse.streaming import lambda_mask
from tests.tolerance import assert_close_to_oracle


@st.composite
def cases(draw):
    return dict(
        seqlen_q=draw(st.integers(1, 300)), seqlen_k=draw(st.integers(1, 300)), sink=draw(st.integers(0, 40)),
        window=draw(st.integers(1, 120)), nheads_k=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 4, 8])), dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        backend=draw(st.sampled_from(["auto", "sdpa", "eager"])), chunk=draw(st.sampled_from([7, 64, 256])),
        softcap=draw(st.sampled_from([0.0, 0.0, 3.0])), seed=draw(st.integers(0, 2**16)),
    )


def _inputs(c, headdim=16):
    gen = torch.Generator().manual_seed(c["seed"])
    nheads = c["nheads_k"] * c["group"]
    q = torch.randn(1, c["seqlen_q"], nheads, headdim, generator=gen).to(c["dtype"])
    k = torch.randn(1, c["seqlen_k"], c["nheads_k"], headdim, generator=gen).to(c["dtype"])
    v = torch.randn(1, c["seqlen_k"], c["nheads_k"], headdim, generator=gen).to(c["dtype"])
    return q, k, v


@given(cases())
def test_equals_the_oracle_with_the_lambda_mask(c):
    q, k, v = _inputs(c)
    if c["backend"] == "sdpa" and c["softcap"]:  # the fused kernel has no softcap: refused, naming why
        with pytest.raises(BackendUnavailableError, match="softcap"):
            longattn.attention(q, k, v, causal=True, sparse=Streaming(c["sink"], c["window"]),
                               softcap=c["softcap"], backend="sdpa")
        return
    out, lse = longattn.attention(q, k, v, causal=True, sparse=Streaming(c["sink"], c["window"]),
                                  softcap=c["softcap"], backend=c["backend"], return_lse=True)
    ref_out, ref_lse = attention_ref(q, k, v, softcap=c["softcap"],
                                     mask=lambda_mask(c["seqlen_q"], c["seqlen_k"], c["sink"], c["window"]))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")
    if c["softcap"]:
        return  # the chunked pass below serves softcap 0 only
    # Every chunk size gives the same answer (the chunked CPU pass).
    again, again_lse = streaming_prefill_chunked(q, k, v, c["sink"], c["window"], scale=16 ** -0.5,
                                                 chunk=c["chunk"])
    assert_close_to_oracle(again, ref_out, ref_out)
    assert_close_to_oracle(again_lse, ref_lse, ref_lse, name="lse")


@given(st.integers(1, 200), st.integers(0, 30), st.integers(1, 60))
def test_short_sequences_are_dense(seqlen, sink, extra):
    # seqlen <= sink + window: every query sees every earlier key.
    q, k, v = (torch.randn(1, seqlen, 2, 16) for _ in range(3))
    out = longattn.attention(q, k, v, causal=True, sparse=Streaming(sink, max(1, seqlen - sink) + extra))
    ref, _ = attention_ref(q, k, v, causal=True)
    assert_close_to_oracle(out, ref, ref)


def test_lambda_mask_counts_the_token_itself_in_the_window():
    mask = lambda_mask(6, 6, 1, 2)
    assert mask[5].tolist() == [True, False, False, False, True, True]  # sink 0, then 4 and 5 (itself)


@pytest.mark.parametrize("kwargs,match", [({"sink_size": -1}, "sink_size"), ({"recent_size": 0}, "recent_size"),
                                          ({"recent_size": 2.5}, "recent_size")])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        Streaming(**kwargs)


def test_non_causal_is_rejected():
    q = torch.randn(1, 8, 1, 8)
    with pytest.raises(ArgumentError, match="causal"):
        longattn.attention(q, q, q, causal=False, sparse=Streaming(2, 4))


@pytest.mark.parametrize("backend", ["cpp", "eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_key_reaches_exactly_the_rows_that_see_it(backend, dtype):
    """A NaN in k (an fp16 overflow upstream) makes NaN exactly the rows whose
    sinks or window hold it, as in the oracle: not rows that do not see it
    (an additive -inf mask would, NaN + -inf being NaN), and not none (the C++
    kernels' exp used to clamp NaN to a weight of 0)."""
    if backend == "cpp" and longattn.kernels.dense.cpp.flash_unavailable_reason() is not None:
        pytest.skip(f"the C++ kernel does not build here: {longattn.kernels.dense.cpp.flash_unavailable_reason()}")
    q, k, v = _inputs(dict(seqlen_q=300, seqlen_k=300, nheads_k=2, group=2, dtype=torch.float32, seed=4))
    k[0, 100, 1, 5] = float("nan")  # a window key for rows 100-163
    k[0, 2, 0, 1] = float("nan")  # a sink of kv head 0: every row of its heads
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, lse = longattn.attention(q, k, v, causal=True, sparse=Streaming(4, 64), backend=backend, return_lse=True)
    ref_out, ref_lse = attention_ref(q, k, v, mask=lambda_mask(300, 300, 4, 64))
    assert torch.equal(out.float().isnan().any(-1), ref_out.isnan().any(-1))
    assert torch.equal(lse.isnan(), ref_lse.isnan())
    assert ref_out.isnan().any() and not ref_out.isnan().all()
