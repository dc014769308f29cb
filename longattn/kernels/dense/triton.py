"""Dense attention forward, Triton twin: flash attention with online softmax.

Same signature and results as :func:`longattn.kernels.dense.eager.dense_forward_eager`
(the readable spec). Shapes (flash-attn layout, any strides):
    q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``,
    out like q (contiguous, q's dtype), lse ``(batch, nheads, seqlen_q)`` float32, natural log.
Query head ``h`` reads kv head ``h // (nheads // nheads_k)`` (MHA, GQA, MQA).
:func:`dense_varlen_forward_triton` is the same over packed sequences
(flash-attn's varlen layout): q ``(total_q, nheads, headdim)``, k/v ``(total_k,
nheads_k, headdim)``, ``cu_seqlens_q/k`` ``(batch + 1,)`` int32; out like q, lse
``(nheads, total_q)``; each sequence is aligned as below on its own lengths.

``window`` is the effective ``(left, right)`` window, -1 = unbounded, causal
folded in as ``right = 0``. Queries are bottom-right aligned: with
``offset = seqlen_k - seqlen_q`` query ``i`` sees key ``j`` iff
``(left < 0 or j >= i + offset - left) and (right < 0 or j <= i + offset + right)``
(:mod:`longattn.masking`). A row that sees no key gets out 0, lse -inf.

One program owns ``BLOCK_M`` query rows of one (sequence, head). It keeps the
running row max ``m``, running denominator ``l`` and unnormalised output
``acc`` in float32 and streams ``BLOCK_N`` keys at a time, rescaling by
``exp(m_old - m_new)`` whenever the max grows, so the ``seqlen_q x seqlen_k``
score matrix never exists. It visits only the key blocks its rows can see
(the in-kernel twin of :func:`longattn.masking.visible_key_range`), so causal
and windowed attention cost only the visible area. Exponentials use ``exp2``
(one hardware instruction on GPUs) with ``log2(e)`` folded into the scores;
lse is converted back to natural log on the way out.

Both entry points launch the one kernel ``_dense_fwd_kernel``; the constexpr
``IS_VARLEN`` picks how a program finds its sequence: the batch strides
(fixed length) or ``cu_seqlens`` rows (varlen, whose grid covers
``max_seqlen_q`` and whose blocks past a sequence's end exit at once). A
sequence's query blocks start at its first row in both, so packing changes no
bit of a sequence's result.

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
        Q, K, V, Out, Lse, Cu_q, Cu_k,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_lb, stride_lh,
        seqlen_q, seqlen_k, headdim, group,
        scale, softcap, window_left, window_right,
        IS_VARLEN: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_h = tl.program_id(1)
        off_b = tl.program_id(2)
        # int64 offsets throughout: batch * stride, and also row * stride and key * stride
        # (q of 32 heads x 128 passes 2**31 elements at 512k tokens, K/V of 8 x 128 at 2M).
        off_b64 = off_b.to(tl.int64)
        off_h64 = off_h.to(tl.int64)
        off_hk64 = (off_h // group).to(tl.int64)
        if IS_VARLEN:
            # Sequence b is rows cu_q[b]..cu_q[b+1] of the packed q and keys
            # cu_k[b]..cu_k[b+1]; seqlen_q/seqlen_k arrive as the maxima (unused
            # beyond the grid) and become this sequence's own lengths here.
            q_start = tl.load(Cu_q + off_b)
            seqlen_q = tl.load(Cu_q + off_b + 1) - q_start
            k_start = tl.load(Cu_k + off_b)
            seqlen_k = tl.load(Cu_k + off_b + 1) - k_start
            q_base = q_start.to(tl.int64)
            k_base = k_start.to(tl.int64)
            Q += q_base * stride_qm
            K += k_base * stride_kn
            V += k_base * stride_vn
            Out += q_base * stride_om
            Lse += q_base  # lse (nheads, total_q): the sequence's rows are consecutive
        else:
            Q += off_b64 * stride_qb
            K += off_b64 * stride_kb
            V += off_b64 * stride_vb
            Out += off_b64 * stride_ob
            Lse += off_b64 * stride_lb
        Q += off_h64 * stride_qh
        K += off_hk64 * stride_kh
        V += off_hk64 * stride_vh
        Out += off_h64 * stride_oh
        Lse += off_h64 * stride_lh

        # The grid covers the longest sequence: blocks past this one's end have no rows.
        if start_m * BLOCK_M >= seqlen_q:
            return

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


def _check_runnable(name: str, q: torch.Tensor) -> None:
    """Raise what this twin cannot compute: no triton, headdim > 256, CPU tensors without the interpreter."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"{name} needs triton, but {_IMPORT_ERROR}")
    headdim = q.shape[-1]
    if headdim > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"{name} supports headdim <= {MAX_HEADDIM}, got {headdim}")
    if not q.is_cuda and not _INTERPRETED:
        raise DeviceError(
            f"{name} got tensors on {q.device}; it needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before triton is imported to run on CPU"
        )


def _launch(q, k, v, out, lse, cu_q, cu_k, *, batch, seqlen_q, seqlen_k, q_strides, k_strides, v_strides,
            out_strides, lse_strides, clamp_q, clamp_k, scale, window, softcap) -> None:
    """Launch :func:`_dense_fwd_kernel`. Strides are 4-tuples ``(batch, row, head, dim)``
    (batch stride 0 for varlen) and ``lse_strides`` ``(batch, head)``; ``seqlen_q``/``seqlen_k``
    are the lengths (fixed) or their maxima (varlen, with ``cu_q``/``cu_k`` not None)."""
    nheads, headdim, nheads_k = q.shape[-2], q.shape[-1], k.shape[-2]
    # Windows past every sequence are unbounded in effect; clamping (to the longest
    # a sequence can be) keeps the kernel's int32 position sums (row + offset +
    # right) from wrapping for huge windows.
    left, right = min(int(window[0]), clamp_k), min(int(window[1]), clamp_q)
    block_m, block_n, num_warps, num_stages = _launch_config(headdim, _INTERPRETED)
    grid = (triton.cdiv(seqlen_q, block_m), nheads, batch)  # m-blocks first: they share K/V in cache
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # launch on q's GPU
        _dense_fwd_kernel[grid](
            q, k, v, out, lse, cu_q, cu_k,
            *q_strides, *k_strides, *v_strides, *out_strides, *lse_strides,
            seqlen_q, seqlen_k, headdim, nheads // nheads_k,
            float(scale), float(softcap), max(left, 0), max(right, 0),
            IS_VARLEN=cu_q is not None,
            HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(headdim)),
            num_warps=num_warps, num_stages=num_stages,
        )


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
    _check_runnable("dense_forward_triton", q)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = k.shape[1]
    out_shape, lse_shape = (batch, seqlen_q, nheads, headdim), (batch, nheads, seqlen_q)
    if batch * seqlen_q * nheads == 0 or seqlen_k == 0:  # nothing to launch: every row is empty
        return (torch.zeros(out_shape, dtype=q.dtype, device=q.device),
                torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device))
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)  # the kernel writes every element
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    _launch(q, k, v, out, lse, None, None, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            q_strides=q.stride(), k_strides=k.stride(), v_strides=v.stride(), out_strides=out.stride(),
            lse_strides=lse.stride()[:2], clamp_q=seqlen_q, clamp_k=seqlen_k,
            scale=scale, window=window, softcap=softcap)
    return out, lse


def dense_varlen_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention over packed sequences (flash-attn's varlen layout); returns ``(out, lse)``.

    Shapes (any strides): q ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k,
    headdim)``; ``cu_seqlens_q``/``cu_seqlens_k`` ``(batch + 1,)`` int32 prefix sums on
    q's device: sequence ``b`` is query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key
    rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (empty sequences allowed).
    ``max_seqlen_q``/``max_seqlen_k`` bound every sequence's lengths (they size the grid;
    read without a device sync). Each sequence is bottom-right aligned on its own:
    its query ``i`` sits at key position ``i + seqlen_k_b - seqlen_q_b``; ``window``
    as in :func:`dense_forward_triton`. Returns out ``(total_q, nheads, headdim)``
    (contiguous, q's dtype) and lse ``(nheads, total_q)`` float32, natural log; a row
    that sees no key gets out 0, lse -inf.

    Inputs are assumed validated (cu_seqlens non-decreasing, starting at 0, ending
    at total_q/total_k, max_seqlen_* at least every length); this twin only rejects
    what it cannot compute.
    """
    _check_runnable("dense_varlen_forward_triton", q)
    total_q, nheads, headdim = q.shape
    total_k = k.shape[0]
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.zeros((total_q, nheads, headdim), dtype=q.dtype, device=q.device)
    lse = torch.full((nheads, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if batch <= 0 or total_q * nheads == 0 or total_k == 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        return out, lse  # nothing to launch: every row is empty
    # out and lse start as an empty row's values: the kernel skips blocks past a
    # sequence's end and rows no sequence owns, and those must not be garbage.
    (sqm, sqh, sqd), (skn, skh, skd), (svn, svh, svd) = q.stride(), k.stride(), v.stride()
    _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch=batch,
            seqlen_q=int(max_seqlen_q), seqlen_k=int(max_seqlen_k),
            q_strides=(0, sqm, sqh, sqd), k_strides=(0, skn, skh, skd), v_strides=(0, svn, svh, svd),
            out_strides=(0, *out.stride()), lse_strides=(0, lse.stride(0)),
            clamp_q=total_q, clamp_k=total_k, scale=scale, window=window, softcap=softcap)
    return out, lse
