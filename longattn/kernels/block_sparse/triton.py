"""Block-sparse attention forward, Triton twin.

Same contract as :func:`longattn.kernels.block_sparse.eager.block_sparse_forward_eager`
(the visibility rule is in :mod:`longattn.kernels.block_sparse`). One program
owns one query block of one (batch, head) and runs one online softmax over
three kinds of key tiles, in a fixed order: the sinks ``[0, sink_size)``,
the block's window span, and its listed key blocks -- gathered
``BLOCK_N // BK`` blocks per tile by index, so a tile of 2-key blocks is
still a full ``BLOCK_N``-wide matmul. The masks make the three sets a union:
window keys below the sinks and listed keys inside the window are dropped.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` (no bfloat16,
slow): tests use tiny shapes.
"""

from __future__ import annotations

import torch

from longattn.errors import DeviceError, UnsupportedFeatureError
from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.support.triton_support import MAX_HEADDIM, import_triton

triton, tl, _IMPORT_ERROR = import_triton()

_INTERPRETED = False  # set below once the kernel exists


def triton_import_error() -> str | None:
    return _IMPORT_ERROR


if triton is not None:
    from longattn.kernels.support.triton_tile import online_softmax_finish, online_softmax_step

    @triton.jit
    def _attend_tile(q, K, V, cols, load_ok, visible, m_i, l_i, acc, offs_d, d_ok,
                     stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap, HAS_SOFTCAP: tl.constexpr):
        """The shared online-softmax step over key positions ``cols``; row offsets in
        int64 (``key * stride`` passes 2**31 elements for long contexts)."""
        cols64 = cols.to(tl.int64)
        return online_softmax_step(q, K + cols64[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                                   V + cols64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                                   load_ok, d_ok, visible, m_i, l_i, acc, scale, softcap, HAS_SOFTCAP)

    @triton.jit
    def _block_sparse_fwd_kernel(
        Q, K, V, Out, Lse, Blocks,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_bb, stride_bh, stride_bq,
        nheads, seqlen_q, seqlen_k, headdim, group, n_listed,
        block_q, block_k, sink_size, recent_size,
        scale, softcap,
        CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BK: tl.constexpr,
    ):
        qb = tl.program_id(0)
        off_h = tl.program_id(1)
        off_b = tl.program_id(2)
        off_b64 = off_b.to(tl.int64)
        off_hk64 = (off_h // group).to(tl.int64)
        Q += off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
        K += off_b64 * stride_kb + off_hk64 * stride_kh
        V += off_b64 * stride_vb + off_hk64 * stride_vh
        Out += off_b64 * stride_ob + off_h.to(tl.int64) * stride_oh
        Lse += (off_b64 * nheads + off_h) * seqlen_q
        Blocks += off_b64 * stride_bb + off_h.to(tl.int64) * stride_bh + qb.to(tl.int64) * stride_bq

        first = qb * block_q
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = (rows < first + block_q) & (rows < seqlen_q)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < headdim
        rows64 = rows.to(tl.int64)  # int64: row * stride passes 2**31 for long contexts
        q = tl.load(Q + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qpos = rows + (seqlen_k - seqlen_q)  # bottom-right aligned key position of each query
        offs_n = tl.arange(0, BLOCK_N)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # 1. the sinks
        sink_end = tl.minimum(sink_size, seqlen_k)
        for start in range(0, sink_end, BLOCK_N):
            cols = start + offs_n
            ok = cols < sink_end
            visible = ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= qpos[:, None])
            m_i, l_i, acc = _attend_tile(q, K, V, cols, ok, visible, m_i, l_i, acc, offs_d, d_ok,
                                         stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap, HAS_SOFTCAP)

        # 2. the window span of the block (past the sinks)
        p_first = first + (seqlen_k - seqlen_q)
        p_last = tl.minimum(first + block_q, seqlen_q) - 1 + (seqlen_k - seqlen_q)
        lo = tl.maximum(p_first - recent_size + 1, sink_size)
        if CAUSAL:
            hi = tl.minimum(p_last + 1, seqlen_k)
        else:
            hi = tl.minimum(p_last + recent_size, seqlen_k)
        if recent_size > 0:
            for start in range(lo, hi, BLOCK_N):
                cols = start + offs_n
                ok = (cols < hi) & (cols >= 0)
                dist = cols[None, :] - qpos[:, None]
                if CAUSAL:
                    inside = (dist > -recent_size) & (dist <= 0)
                else:
                    inside = (dist > -recent_size) & (dist < recent_size)
                visible = ok[None, :] & inside
                m_i, l_i, acc = _attend_tile(q, K, V, cols, ok, visible, m_i, l_i, acc, offs_d, d_ok,
                                             stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap,
                                             HAS_SOFTCAP)

        # 3. the listed key blocks, BLOCK_N // BK of them per tile
        for e0 in range(0, n_listed, BLOCK_N // BK):
            entry = e0 + offs_n // BK
            t = offs_n % BK
            blk = tl.load(Blocks + entry, mask=entry < n_listed, other=-1)
            cols = blk * block_k + t
            ok = (blk >= 0) & (t < block_k) & (cols < seqlen_k) & (cols >= sink_size)
            dist = cols[None, :] - qpos[:, None]
            if CAUSAL:
                visible = ok[None, :] & (dist <= -recent_size)  # before the window, hence before the query
            else:
                visible = ok[None, :] & ((dist <= -recent_size) | (dist >= recent_size))
            m_i, l_i, acc = _attend_tile(q, K, V, tl.where(ok, cols, 0), ok, visible, m_i, l_i, acc, offs_d,
                                         d_ok, stride_kn, stride_kd, stride_vn, stride_vd, scale, softcap,
                                         HAS_SOFTCAP)

        out, lse = online_softmax_finish(m_i, l_i, acc)
        tl.store(Out + rows64[:, None] * stride_om + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + rows, lse, mask=row_ok)

    _INTERPRETED = not isinstance(_block_sparse_fwd_kernel, triton.runtime.JITFunction)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(block_q: int, block_k: int, headdim: int, interpreted: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, BK, num_stages)``: a program holds a query
    block (rounded up to a power of two, >= 16 for tl.dot); a key tile holds
    ``BLOCK_N // BK`` listed blocks (BK = block_k rounded up). Headdim 256
    takes narrower, unpipelined key tiles so K/V fit in shared memory."""
    bk = _pow2(block_k)
    block_d = max(16, _pow2(headdim))
    if interpreted:
        return max(16, _pow2(block_q)), max(16, bk), block_d, bk, 1
    if block_d > 128:
        return max(16, _pow2(block_q)), max(16, bk), block_d, bk, 1
    return max(16, _pow2(block_q)), max(64, bk), block_d, bk, 2


def block_sparse_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_blocks: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as the eager twin; inputs assumed validated."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"block_sparse_forward_triton needs triton, but {_IMPORT_ERROR}")
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if headdim > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"block_sparse_forward_triton supports headdim <= {MAX_HEADDIM}, got {headdim}")
    if not q.is_cuda and not _INTERPRETED:
        raise DeviceError(
            f"block_sparse_forward_triton got tensors on {q.device}; it needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before triton is imported to run on CPU"
        )
    out = torch.empty_like(q)
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    if seqlen_q == 0 or batch == 0 or nheads == 0:
        return out, lse
    blocks = key_blocks.to(device=q.device, dtype=torch.int32).contiguous()
    block_m, block_n, block_d, bk_pow2, stages = launch_config(layout.block_q, layout.block_k, headdim, _INTERPRETED)
    grid = (layout.num_q_blocks, nheads, batch)
    _block_sparse_fwd_kernel[grid](
        q, k, v, out, lse, blocks,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *blocks.stride()[:3],
        nheads, seqlen_q, seqlen_k, headdim, nheads // nheads_k, blocks.shape[3],
        layout.block_q, layout.block_k, layout.sink_size, layout.recent_size,
        float(scale), float(softcap),
        CAUSAL=layout.causal, HAS_SOFTCAP=softcap > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BK=bk_pow2,
        num_warps=4, num_stages=stages,
    )
    return out, lse
