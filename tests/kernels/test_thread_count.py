"""Every C++ kernel gives bitwise the same result with 1 and with 2 threads
(ARCHITECTURE.md, determinism: the same inputs and schedule give the same bits
whatever the number of threads that runs the schedule).

The stream-K decode kernel's *default* plan depends on the thread count (the
documented exception), so it runs here with a fixed plan. Shapes are big
enough that each kernel splits its work into more pieces than threads.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import longattn
from longattn.decode import plan_decode
from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_attention
from longattn.kernels.decode.cpp import cpu_unavailable_reason
from longattn.kernels.dense.cpp import flash_unavailable_reason
from longattn.kernels.hip_score.cpp import score_unavailable_reason
from longattn.sparse import HiP, hip_select_blocks


@contextmanager
def _threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _with_1_and_2_threads(fn):
    with _threads(1):
        one = fn()
    with _threads(2):
        two = fn()
    return one, two


def _assert_bitwise(one, two):
    one, two = (x if isinstance(x, tuple) else (x,) for x in (one, two))
    for a, b in zip(one, two, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), "result depends on the thread count"


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.skipif(flash_unavailable_reason() is not None, reason=f"C++ flash kernel: {flash_unavailable_reason()}")
@pytest.mark.parametrize("dtype,window,softcap", [(torch.float32, (-1, 0), 0.0), (torch.bfloat16, (37, 5), 4.0),
                                                  (torch.float16, (-1, -1), 0.0)])
def test_dense_flash(dtype, window, softcap):
    gen = torch.Generator().manual_seed(1)
    q = _randn(gen, 2, 150, 8, 40, dtype=dtype)  # 48-row blocks x 8 heads x 2 sequences: many work items
    k, v = (_randn(gen, 2, 170, 2, 40, dtype=dtype) for _ in range(2))
    kwargs = dict(window_size=window, softcap=softcap, softmax_scale=0.21, backend="cpp", return_lse=True)
    _assert_bitwise(*_with_1_and_2_threads(lambda: longattn.attention(q, k, v, **kwargs)))


@pytest.mark.skipif(flash_unavailable_reason() is not None, reason=f"C++ flash kernel: {flash_unavailable_reason()}")
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_through_the_flash_kernel(causal):
    gen = torch.Generator().manual_seed(2)
    layout = BlockSparseLayout(130, 160, 16, 4, 3, 9, causal)
    q = _randn(gen, 1, 130, 4, 32)
    k, v = (_randn(gen, 1, 160, 2, 32) for _ in range(2))
    blocks = torch.stack([torch.randperm(layout.num_k_blocks, generator=gen)[:6] for _ in range(4 * layout.num_q_blocks)])
    key_blocks = blocks.reshape(1, 4, layout.num_q_blocks, 6)
    kwargs = dict(block_q=16, block_k=4, sink_size=3, recent_size=9, causal=causal, return_lse=True, backend="cpp")
    _assert_bitwise(*_with_1_and_2_threads(lambda: block_sparse_attention(q, k, v, key_blocks, **kwargs)))


@pytest.mark.skipif(cpu_unavailable_reason() is not None, reason=f"C++ decode kernel: {cpu_unavailable_reason()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_with_a_fixed_plan(dtype, paged):
    gen = torch.Generator().manual_seed(3)
    lengths = [300, 7, 0, 129]
    batch, nheads_k, headdim = len(lengths), 2, 64
    q = _randn(gen, batch, 2, 8, headdim, dtype=dtype)
    if paged:
        k_cache, v_cache = (_randn(gen, 90, 16, nheads_k, headdim, dtype=dtype) for _ in range(2))
        block_table = torch.randperm(90, generator=gen)[: batch * 20].reshape(batch, 20).to(torch.int32)
    else:
        k_cache, v_cache = (_randn(gen, batch, 310, nheads_k, headdim, dtype=dtype) for _ in range(2))
        block_table = None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    plan = plan_decode(seqlens, nheads_k=nheads_k, num_workers=5, block_n=32)

    def run():
        return longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
                                         causal=True, softcap=3.0, plan=plan, backend="cpp", return_lse=True)

    _assert_bitwise(*_with_1_and_2_threads(run))


@pytest.mark.skipif(score_unavailable_reason() is not None, reason=f"C++ HiP scorer: {score_unavailable_reason()}")
@pytest.mark.parametrize("causal", [True, False])
def test_hip_scorer(causal):
    gen = torch.Generator().manual_seed(4)
    q = _randn(gen, 2, 300, 8, 40)
    k = _randn(gen, 2, 330, 2, 40)
    cfg = HiP(topk=24, block_q=16, block_k=3, query_stride=2, sink_size=5, recent_size=20)
    one, two = _with_1_and_2_threads(lambda: hip_select_blocks(q, k, cfg, causal=causal, backend="cpp"))
    assert torch.equal(one, two), "the selection depends on the thread count"
