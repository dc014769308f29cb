"""Block-sparse attention (listed key blocks + sinks + window) against the oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_attention
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle


@st.composite
def block_sparse_cases(draw):
    seqlen_q = draw(st.integers(1, 70))
    seqlen_k = draw(st.integers(1, 90))
    nheads_k = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    layout = BlockSparseLayout(
        seqlen_q, seqlen_k, draw(st.integers(1, 17)), draw(st.integers(1, 9)), draw(st.integers(0, 12)),
        draw(st.integers(0, 20)), draw(st.booleans()),
    )
    listed = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    nheads = nheads_k * group
    # Distinct blocks per row, some rows padded with -1.
    rows = []
    for _ in range(nheads * layout.num_q_blocks):
        perm = torch.randperm(layout.num_k_blocks, generator=gen)[:listed]
        perm = torch.cat([perm, torch.full((listed - perm.numel(),), -1)])
        rows.append(perm)
    key_blocks = torch.stack(rows).reshape(1, nheads, layout.num_q_blocks, listed) if rows else torch.empty(
        1, nheads, 0, listed, dtype=torch.long)
    return layout, nheads, nheads_k, key_blocks, draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])), \
        draw(st.sampled_from([0.0, 3.0])), seed


@given(block_sparse_cases(), st.sampled_from(["auto", "cpp", "eager"]))
def test_matches_oracle_with_the_dense_mask(case, backend):
    from longattn.errors import BackendUnavailableError
    from longattn.kernels.dense.cpp import flash_unavailable_reason

    layout, nheads, nheads_k, key_blocks, dtype, softcap, seed = case
    gen = torch.Generator().manual_seed(seed)
    headdim = 16
    q = torch.randn(1, layout.seqlen_q, nheads, headdim, generator=gen).to(dtype)
    k = torch.randn(1, layout.seqlen_k, nheads_k, headdim, generator=gen).to(dtype)
    v = torch.randn(1, layout.seqlen_k, nheads_k, headdim, generator=gen).to(dtype)
    kwargs = dict(block_q=layout.block_q, block_k=layout.block_k, sink_size=layout.sink_size,
                  recent_size=layout.recent_size, causal=layout.causal, softcap=softcap, return_lse=True)
    if backend == "cpp" and (layout.recent_size == 0 or flash_unavailable_reason() is not None):
        with pytest.raises(BackendUnavailableError, match="backend='cpp'"):
            block_sparse_attention(q, k, v, key_blocks, **kwargs, backend=backend)
        return
    out, lse = block_sparse_attention(q, k, v, key_blocks, **kwargs, backend=backend)
    ref_out, ref_lse = attention_ref(q, k, v, softcap=softcap, mask=layout.dense_mask(key_blocks))
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_every_block_listed_is_dense():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 33, 4, 32), torch.randn(2, 47, 2, 32), torch.randn(2, 47, 2, 32)
    nkb = -(-47 // 5)
    key_blocks = torch.arange(nkb).expand(2, 4, -(-33 // 8), nkb)
    out = block_sparse_attention(q, k, v, key_blocks, block_q=8, block_k=5, causal=True)
    ref_out, _ = attention_ref(q, k, v, causal=True)
    assert_close_to_oracle(out, ref_out, ref_out)


def _args():
    q, k, v = torch.randn(1, 10, 2, 8), torch.randn(1, 12, 1, 8), torch.randn(1, 12, 1, 8)
    return q, k, v


@pytest.mark.parametrize("key_blocks,error,match", [
    (torch.zeros(1, 2, 3, 2, dtype=torch.float32), DTypeError, "integer"),
    (torch.zeros(1, 2, 2, 2, dtype=torch.long), ShapeError, "num_q_blocks"),
    (torch.full((1, 2, 3, 1), 3, dtype=torch.long), ArgumentError, r"\[0, 3\)"),
    (torch.full((1, 2, 3, 1), -2, dtype=torch.long), ArgumentError, "-1"),
    (torch.zeros(1, 2, 3, 2, dtype=torch.long), ArgumentError, "twice"),
])
def test_bad_key_blocks_are_named(key_blocks, error, match):
    q, k, v = _args()
    with pytest.raises(error, match=match):
        block_sparse_attention(q, k, v, key_blocks, block_q=4, block_k=4)


@pytest.mark.parametrize("name,value", [("block_q", 0), ("block_k", -1), ("sink_size", -1), ("recent_size", 1.5)])
def test_bad_sizes_are_named(name, value):
    q, k, v = _args()
    kwargs = {"block_q": 4, "block_k": 4, name: value}
    with pytest.raises(ArgumentError, match=name):
        block_sparse_attention(q, k, v, torch.full((1, 2, 3, 1), -1), **kwargs)


def test_a_forced_twin_that_cannot_serve_says_why():
    from longattn.errors import BackendUnavailableError
    from longattn.kernels.support import triton_support

    q = torch.randn(1, 8, 2, 16)
    no_blocks = torch.full((1, 2, 1, 1), -1)
    with pytest.raises(BackendUnavailableError, match="cpp: recent_size 0"):
        block_sparse_attention(q, q, q, no_blocks, block_q=8, block_k=4, backend="cpp")
    if triton_support.machine_reasons() + triton_support.call_reasons(q):  # no GPU, no interpreter
        with pytest.raises(BackendUnavailableError, match="triton:"):
            block_sparse_attention(q, q, q, no_blocks, block_q=8, block_k=4, backend="triton")
