"""HiP branch scoring, Triton twin: one round's block scores on the GPU.

Same result as the PyTorch scoring in :mod:`longattn.sparse.hip_mask` and
the C++ kernel (``csrc/cpu/hip_score.cpp``): for each (batch, head, query
block) row and each candidate key block, the max of ``q . k`` over the row's
strided queries and the block's searchable keys (``sink <= pos <= end`` and,
causal, ``pos <=`` the query's position). One program scores ``BLOCK_C``
blocks of one row with one ``tl.dot`` of its strided queries against their
``BLOCK_C * BK`` keys; the selection between rounds stays in PyTorch
(``torch.topk``). Under ``TRITON_INTERPRET=1`` it runs on CPU for tests.
"""

from __future__ import annotations

import torch

from longattn.errors import DeviceError
from longattn.kernels.support.triton_support import import_triton

triton, tl, _IMPORT_ERROR = import_triton()

_INTERPRETED = False


def triton_import_error() -> str | None:
    return _IMPORT_ERROR


if triton is not None:

    @triton.jit
    def _hip_score_kernel(
        Queries, QueryPos, RangeEnd, Keys, Blocks, Out,
        n_blocks, nheads, nheads_k, nqb, positions, headdim, block_k, sink_size,
        CAUSAL: tl.constexpr, S: tl.constexpr, BLOCK_C: tl.constexpr, BK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0)
        c0 = tl.program_id(1) * BLOCK_C
        b = r // (nheads * nqb)
        h = (r // nqb) % nheads
        qb = r % nqb
        hk = h // (nheads // nheads_k)
        offs_s = tl.arange(0, S)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < headdim
        qs = tl.load(Queries + (r.to(tl.int64) * S + offs_s[:, None]) * headdim + offs_d[None, :],
                     mask=d_ok[None, :], other=0.0)
        qpos = tl.load(QueryPos + qb * S + offs_s)
        end = tl.load(RangeEnd + qb)

        offs_n = tl.arange(0, BLOCK_C * BK)
        entry = c0 + offs_n // BK
        t = offs_n % BK
        blk = tl.load(Blocks + r.to(tl.int64) * n_blocks + entry, mask=entry < n_blocks, other=0)
        cols = blk * block_k + t
        ok = (entry < n_blocks) & (t < block_k) & (cols >= sink_size) & (cols <= end)
        base = (b.to(tl.int64) * nheads_k + hk) * positions
        kt = tl.load(Keys + (base + tl.where(ok, cols, 0)[None, :]) * headdim + offs_d[:, None],
                     mask=ok[None, :] & d_ok[:, None], other=0.0)
        dots = tl.dot(qs, kt, input_precision="ieee")  # (S, BLOCK_C * BK)
        visible = ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= qpos[:, None])
        # A NaN dot product (NaN in q or k) is passed over, as every twin
        # does: set to -inf here rather than left to how the backend's max
        # treats NaN (a block whose every dot product is NaN scores -inf).
        dots = tl.where(visible & (dots == dots), dots, float("-inf"))
        best = tl.max(tl.reshape(tl.max(dots, 0), (BLOCK_C, BK)), 1)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tl.store(Out + r.to(tl.int64) * n_blocks + offs_c, best, mask=offs_c < n_blocks)

    _INTERPRETED = not isinstance(_hip_score_kernel, triton.runtime.JITFunction)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def score_blocks_triton(
    queries: torch.Tensor,
    query_pos: torch.Tensor,
    range_end: torch.Tensor,
    keys: torch.Tensor,
    blocks: torch.Tensor,
    *,
    block_k: int,
    sink_size: int,
    causal: bool,
    nheads: int,
) -> torch.Tensor:
    """``(rows, c)`` block scores. queries ``(rows, S, headdim)`` float32 with S a
    power of two >= 16 (pad by repeating a query); query_pos ``(nqb, S)``;
    range_end ``(nqb,)``; keys ``(batch, nheads_k, positions, headdim)`` float32;
    blocks ``(rows, c)`` int."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"score_blocks_triton needs triton, but {_IMPORT_ERROR}")
    if not queries.is_cuda and not _INTERPRETED:
        raise DeviceError("score_blocks_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
                          "is imported to run on CPU")
    rows, lanes, headdim = queries.shape
    c = blocks.shape[1]
    out = torch.empty(rows, c, dtype=torch.float32, device=queries.device)
    if rows == 0 or c == 0:
        return out
    bk = _pow2(block_k)
    block_c = max(1, 16 // bk) if _INTERPRETED else max(1, 64 // bk)  # tl.dot needs >= 16 columns
    grid = (rows, -(-c // block_c))
    _hip_score_kernel[grid](
        queries.contiguous(), query_pos.to(torch.int32).contiguous(), range_end.contiguous(), keys.contiguous(),
        blocks.to(torch.int32).contiguous(), out,
        c, nheads, keys.shape[1], range_end.shape[0], keys.shape[2], headdim, block_k, sink_size,
        CAUSAL=causal, S=lanes, BLOCK_C=block_c, BK=bk, BLOCK_D=max(16, _pow2(headdim)),
        num_warps=4, num_stages=1,
    )
    return out
