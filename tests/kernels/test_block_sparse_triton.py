"""The Triton block-sparse twin against the float64 oracle (under the interpreter without CUDA)."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_attention
from longattn.kernels.block_sparse_eager import block_sparse_forward_eager
from longattn.kernels.block_sparse_triton import triton_import_error
from longattn.reference import attention_ref
from longattn.sparse import HiP
from tests.tolerance import assert_close_to_oracle
from tests.triton_skip import HAS_CUDA, triton_skip_reason

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _skip_reason() -> str | None:
    return triton_skip_reason(triton_import_error())


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@st.composite
def cases(draw):
    layout = BlockSparseLayout(
        draw(st.integers(1, 40)), draw(st.integers(1, 60)), draw(st.integers(1, 20)),
        draw(st.sampled_from([1, 2, 3, 5])), draw(st.integers(0, 9)), draw(st.integers(0, 20)), draw(st.booleans()),
    )
    return (layout, draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 4])), draw(st.integers(0, 5)),
            draw(st.sampled_from([torch.float32, torch.float16])), draw(st.sampled_from([0.0, 4.0])),
            draw(st.integers(0, 2**16)))


# The interpreter runs every program in Python: few, tiny cases.
@settings(max_examples=12)
@given(cases())
def test_matches_oracle(case):
    layout, nheads_k, group, listed, dtype, softcap, seed = case
    gen = torch.Generator().manual_seed(seed)
    nheads, d = nheads_k * group, 16
    q = torch.randn(1, layout.seqlen_q, nheads, d, generator=gen).to(dtype)
    k = torch.randn(1, layout.seqlen_k, nheads_k, d, generator=gen).to(dtype)
    v = torch.randn(1, layout.seqlen_k, nheads_k, d, generator=gen).to(dtype)
    rows = [torch.cat([torch.randperm(layout.num_k_blocks, generator=gen)[:listed],
                       torch.full((max(0, listed - layout.num_k_blocks),), -1)])
            for _ in range(nheads * layout.num_q_blocks)]
    key_blocks = torch.stack(rows).reshape(1, nheads, layout.num_q_blocks, listed)
    kwargs = dict(block_q=layout.block_q, block_k=layout.block_k, sink_size=layout.sink_size,
                  window_size=layout.window_size, causal=layout.causal, softcap=softcap, return_lse=True)
    out, lse = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), key_blocks.to(DEVICE),
                                      backend="triton", **kwargs)
    eager_out, eager_lse = block_sparse_forward_eager(q, k, v, key_blocks, layout, scale=d ** -0.5, softcap=softcap)
    ref_out, ref_lse = attention_ref(q, k, v, softcap=softcap, mask=layout.dense_mask(key_blocks))
    assert_close_to_oracle(out.cpu(), ref_out, eager_out)
    assert_close_to_oracle(lse.cpu(), ref_lse, eager_lse, name="lse")


def test_hip_prefill_on_the_triton_twin_matches_eager():
    import longattn

    torch.manual_seed(5)
    q, k, v = torch.randn(1, 70, 2, 16), torch.randn(1, 70, 1, 16), torch.randn(1, 70, 1, 16)
    cfg = HiP(topk=8, block_q=16, block_k=2, sink_size=3, window_size=9)
    tri = longattn.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=True, sparse=cfg, backend="triton")
    eager = longattn.attention(q, k, v, causal=True, sparse=cfg, backend="eager")
    assert torch.allclose(tri.cpu(), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_search_selects_what_the_eager_search_selects(causal):
    from longattn.sparse import hip_select_blocks

    torch.manual_seed(6)
    q, k = torch.randn(1, 150, 4, 16), torch.randn(1, 150, 2, 16)
    cfg = HiP(topk=12, block_q=16, block_k=3, query_stride=3, sink_size=4, window_size=10)
    eager = hip_select_blocks(q, k, cfg, causal=causal, backend="eager")
    tri = hip_select_blocks(q.to(DEVICE), k.to(DEVICE), cfg, causal=causal, backend="triton")
    assert torch.equal(tri.cpu(), eager)
