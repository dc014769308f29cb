"""Dense attention forward, Triton twin: flash attention with online softmax.

Same signature and results as :func:`longattn.kernels.dense.eager.dense_forward_eager`
(the readable spec). Shapes (flash-attn layout, any strides):
    q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``,
    out like q (contiguous, q's dtype), lse ``(batch, nheads, seqlen_q)`` float32, natural log.
Query head ``h`` reads kv head ``h // (nheads // nheads_k)`` (MHA, GQA, MQA).

``window`` is the effective ``(left, right)`` window, -1 = unbounded, causal
folded in as ``right = 0``. Queries are bottom-right aligned: with
``offset = seqlen_k - seqlen_q`` query ``i`` sees key ``j`` iff
``(left < 0 or j >= i + offset - left) and (right < 0 or j <= i + offset + right)``
(:mod:`longattn.masking`). A row that sees no key gets out 0, lse -inf.

One program owns ``BLOCK_M`` query rows of one (batch, head). It keeps the
running row max ``m``, running denominator ``l`` and unnormalised output
``acc`` in float32 and streams ``BLOCK_N`` keys at a time, rescaling by
``exp(m_old - m_new)`` whenever the max grows, so the ``seqlen_q x seqlen_k``
score matrix never exists. It visits only the key blocks its rows can see
(the in-kernel twin of :func:`longattn.masking.visible_key_range`), so causal
and windowed attention cost only the visible area. Exponentials use ``exp2``
(one hardware instruction on GPUs) with ``log2(e)`` folded into the scores;
lse is converted back to natural log on the way out.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` (set before triton
is imported), which has no bfloat16 and is slow: tests use tiny shapes.
"""

from __future__ import annotations

import contextlib

import torch

from longattn.errors import DeviceError, UnsupportedFeatureError
from longattn.kernels.support.triton_support import MAX_HEADDIM, import_triton

triton, tl, _IMPORT_ERROR = import_triton()

_INTERPRETED = False  # set below once the kernel exists


def triton_import_error() -> str | None:
    """None when triton imports, else a one-line reason (for the dispatcher and doctor)."""
    return _IMPORT_ERROR


if triton is not None:
    from longattn.kernels.support.triton_tile import online_softmax_finish, online_softmax_step

    @triton.jit
    def _dense_fwd_kernel(
        Q, K, V, Out, Lse,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        nheads, seqlen_q, seqlen_k, headdim, group,
        scale, softcap, window_left, window_right,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_h = tl.program_id(1)
        off_b = tl.program_id(2)
        # int64 offsets throughout: batch * stride, and also row * stride and key * stride
        # (q of 32 heads x 128 passes 2**31 elements at 512k tokens, K/V of 8 x 128 at 2M).
        off_b64 = off_b.to(tl.int64)
        off_hk64 = (off_h // group).to(tl.int64)
        Q += off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
        K += off_b64 * stride_kb + off_hk64 * stride_kh
        V += off_b64 * stride_vb + off_hk64 * stride_vh
        Out += off_b64 * stride_ob + off_h.to(tl.int64) * stride_oh
        Lse += (off_b64 * nheads + off_h) * seqlen_q

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < seqlen_q
        d_ok = offs_d < headdim  # BLOCK_D is headdim rounded up to a power of two
        offs_m64 = offs_m.to(tl.int64)
        q = tl.load(Q + offs_m64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        # Key range [lo, hi) this block of rows can see (masking.visible_key_range).
        offset = seqlen_k - seqlen_q
        diag = offs_m + offset  # key position each query is aligned to
        lo = 0
        hi = seqlen_k
        if HAS_LEFT:
            # Round down to a block boundary so loads stay aligned; the mask trims the rest.
            lo = tl.maximum(start_m * BLOCK_M + offset - window_left, 0) // BLOCK_N * BLOCK_N
        if HAS_RIGHT:
            last_row = tl.minimum(start_m * BLOCK_M + BLOCK_M, seqlen_q) - 1
            hi = tl.minimum(last_row + offset + window_right + 1, seqlen_k)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen_k
            visible = col_ok[None, :]
            if HAS_LEFT:
                visible = visible & (cols[None, :] >= diag[:, None] - window_left)
            if HAS_RIGHT:
                visible = visible & (cols[None, :] <= diag[:, None] + window_right)
            cols64 = cols.to(tl.int64)
            m_i, l_i, acc = online_softmax_step(
                q, K + cols64[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                V + cols64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                col_ok, d_ok, visible, m_i, l_i, acc, scale, softcap, HAS_SOFTCAP)

        out, lse = online_softmax_finish(m_i, l_i, acc)  # rows that saw no key: 0 and -inf
        tl.store(Out + offs_m64[:, None] * stride_om + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + offs_m, lse, mask=row_ok)

    # The interpreter replaces triton.jit's JITFunction with its own wrapper.
    _INTERPRETED = not isinstance(_dense_fwd_kernel, triton.runtime.JITFunction)


def _launch_config(headdim: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). A fixed heuristic, no autotune
    (autotune can fail at import on hosts without a driver). tl.dot needs blocks >= 16."""
    if interpreted:
        return 16, 16, 4, 1  # the interpreter pays per program and per op, not per FLOP
    if headdim <= 64:
        return 64, 64, 4, 3
    if headdim <= 128:
        return 64, 64, 8, 3
    # headdim 256: smaller key tiles and fewer pipeline stages keep the K/V
    # buffers (BLOCK_N * 256 * 4 bytes each in fp32) within shared memory.
    return 64, 32, 8, 2


def dense_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention forward; returns ``(out, lse)`` (see module docstring).

    Inputs are assumed validated (:mod:`longattn.validation`); this twin only
    rejects what it cannot compute.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"dense_forward_triton needs triton, but {_IMPORT_ERROR}")
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if headdim > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"dense_forward_triton supports headdim <= {MAX_HEADDIM}, got {headdim}")
    if not q.is_cuda and not _INTERPRETED:
        raise DeviceError(
            f"dense_forward_triton got tensors on {q.device}; it needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before triton is imported to run on CPU"
        )
    out_shape, lse_shape = (batch, seqlen_q, nheads, headdim), (batch, nheads, seqlen_q)
    if batch * seqlen_q * nheads == 0 or seqlen_k == 0:  # nothing to launch: every row is empty
        return (torch.zeros(out_shape, dtype=q.dtype, device=q.device),
                torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)  # the kernel writes every element
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    # Windows past the sequence are unbounded in effect; clamping keeps the kernel's
    # int32 position sums (row + offset + right) from wrapping for huge windows.
    left, right = min(int(window[0]), seqlen_k), min(int(window[1]), seqlen_q)
    block_m, block_n, num_warps, num_stages = _launch_config(headdim, _INTERPRETED)
    grid = (triton.cdiv(seqlen_q, block_m), nheads, batch)  # m-blocks first: they share K/V in cache
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # launch on q's GPU
        _dense_fwd_kernel[grid](
            q, k, v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            nheads, seqlen_q, seqlen_k, headdim, nheads // nheads_k,
            float(scale), float(softcap), max(left, 0), max(right, 0),
            HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(headdim)),
            num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse
