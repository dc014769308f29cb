"""The C++ flash kernel walks up to four 48-row blocks of one head together
(csrc/cpu/flash_tiles.h, work_item: the blocks take turns by chunks of keys so
that K and V come from memory once for all of them). Each block keeps its own
tiles in its own order, so walking it beside its neighbours must give bitwise
what it gives alone: exact property, every engine the build has.

A block alone: the block's query rows as a call of their own, with the keys up
to its last row's position (causal, so its rows see no key past that), which
keeps every row at its key position (bottom-right alignment).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.kernels.dense.cpp import flash_forward_cpu, flash_unavailable_reason, maths_built

BM = 48  # query rows per block (flash_tiles.h)

pytestmark = pytest.mark.skipif(flash_unavailable_reason() is not None,
                                reason=f"C++ flash kernel: {flash_unavailable_reason()}")


def _maths() -> list[str]:
    return list(maths_built()) if flash_unavailable_reason() is None else []


@pytest.mark.parametrize("math", _maths())
@settings(max_examples=12, deadline=None)
@given(st.integers(2 * BM + 1, 9 * BM), st.integers(0, 150), st.sampled_from([(8, 8), (8, 2)]),
       st.sampled_from([-1, 0, 37, 200]), st.integers(0, 9), st.sampled_from([0.0, 5.0]), st.integers(0, 2**16))
def test_a_block_walked_with_its_neighbours_is_bitwise_the_block_alone(math, seqlen_q, extra_keys, heads, left, sink,
                                                                        softcap, seed):
    nheads, nheads_k = heads
    dtype = torch.float32 if math == "fp32" else torch.bfloat16
    seqlen_k = seqlen_q + extra_keys
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seqlen_q, nheads, 64, generator=gen).to(dtype)
    k, v = (torch.randn(1, seqlen_k, nheads_k, 64, generator=gen).to(dtype) for _ in range(2))
    kwargs = dict(scale=0.125, window=(left, 0), softcap=softcap, sink=sink, causal=True, math=math)
    # 8 heads x 3..9 blocks on 1 thread: items of 4 blocks (group_size), the last one shorter
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, lse = flash_forward_cpu(q, k, v, **kwargs)
        for r0 in range(0, seqlen_q, BM):
            r1 = min(r0 + BM, seqlen_q)
            keys = r1 + extra_keys  # the last row's key position + 1
            alone_out, alone_lse = flash_forward_cpu(q[:, r0:r1], k[:, :keys], v[:, :keys], **kwargs)
            assert torch.equal(out[:, r0:r1], alone_out), f"rows {r0}..{r1}: out differs from the block alone"
            assert torch.equal(lse[:, :, r0:r1], alone_lse), f"rows {r0}..{r1}: lse differs from the block alone"
    finally:
        torch.set_num_threads(before)
