"""Block backward, Triton twin: flash-attention-2's backward for one (query
block, key block) pair given the FINAL ``(out, lse)`` of the rows.

Same signature and results as
:func:`longattn.kernels.block_backward.eager.block_backward_eager` (the spec;
the math is in its module docstring). Shapes (longattn layout, any strides):
dout/q/out ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k,
nheads_k, headdim)``, lse/dlse ``(batch, nheads, seqlen_q)`` float32 natural
log. Returns float32 ``dq`` ``(batch, seqlen_q, nheads, headdim)`` and
``dk``/``dv`` ``(batch, seqlen_k, nheads_k, headdim)``, contiguous; query head
``h`` reads kv head ``h // (nheads // nheads_k)``. Causal is bottom-right
aligned within the pair: query ``i`` sees key ``j`` iff ``j <= i + seqlen_k -
seqlen_q``.

Three steps, no atomics (results are deterministic, run to run):

1. ``delta = rowsum(dout * out) - dlse`` in float32 (PyTorch, O(rows x
   headdim); the kernels read it per row), and ``lse = -inf`` (a row that saw
   no key anywhere) becomes ``+inf`` so ``exp(s - lse)`` is exactly 0 there.
2. ``_bwd_dkdv_kernel``: one program per (key block, batch x kv head) keeps
   its ``dk``/``dv`` tile in float32 registers and loops over every query head
   of the kv head's group and over the query blocks that can see its keys,
   recomputing ``P`` from ``lse``: ``dv += P^T dout``, ``dk += dS^T q``. The
   group is summed inside one program in a fixed order, which is what makes
   GQA deterministic without atomics.
3. ``_bwd_dq_kernel``: one program per (query block, batch x head) loops over
   the key blocks its rows can see: ``dq += dS k``. This recomputes ``P`` a
   second time (flash-attn instead adds dq with atomics, which is not
   deterministic).

Products are full float32 (``input_precision="ieee"``: no TF32), inputs are
upcast to float32 on load (fp16 inputs lose nothing more than their own
rounding). Offsets are int64; headdim is padded to a power of two (>= 16,
``tl.dot``'s minimum) with masks. Without a GPU the kernels run under
``TRITON_INTERPRET=1`` (no bfloat16, slow: tests use tiny shapes).
"""

from __future__ import annotations

import contextlib

import torch

from longattn.errors import DeviceError, UnsupportedFeatureError
from longattn.kernels.support.triton_support import MAX_HEADDIM, import_triton

triton, tl, _IMPORT_ERROR = import_triton()

_INTERPRETED = False  # set below once the kernels exist


if triton is not None:
    from longattn.kernels.support.triton_tile import softcap_tanh

    @triton.jit
    def _ds_tile(q, k, v, do, lse, delta, visible, scale, softcap, HAS_SOFTCAP: tl.constexpr):
        """``(P, dS)`` of one ``(BLOCK_M, BLOCK_N)`` tile, float32; dS is the
        gradient w.r.t. the UNSCALED ``q . k`` (softcap chain rule and ``scale``
        folded in). q/do ``(BLOCK_M, BLOCK_D)``, k/v ``(BLOCK_N, BLOCK_D)``, lse
        (+inf for empty and padded rows) and delta ``(BLOCK_M,)``."""
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if HAS_SOFTCAP:
            s = softcap_tanh(s, softcap)
        # Masked pairs give exactly 0 (where, not -inf arithmetic: lse may be +inf).
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            t = s / softcap  # = tanh(raw / softcap): d(c * tanh(x / c)) / dx = 1 - tanh^2
            ds = ds * (1.0 - t * t)
        return p, ds * scale

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_lb, stride_lh,
        stride_dkb, stride_dkn, stride_dkh,
        stride_dvb, stride_dvn, stride_dvh,
        seqlen_q, seqlen_k, headdim, nheads_k, group,
        scale, softcap,
        CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_n = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b64 = (off_bh // nheads_k).to(tl.int64)
        off_hk64 = (off_bh % nheads_k).to(tl.int64)
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < seqlen_k
        d_ok = offs_d < headdim
        offs_n64 = offs_n.to(tl.int64)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + off_b64 * stride_kb + off_hk64 * stride_kh + offs_n64[:, None] * stride_kn
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V + off_b64 * stride_vb + off_hk64 * stride_vh + offs_n64[:, None] * stride_vn
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        offset = seqlen_k - seqlen_q
        lo = 0
        if CAUSAL:
            # Query i sees key j iff i >= j - offset: rows before the block's
            # first key's diagonal see none of it (rounded down to a block).
            lo = tl.maximum(start_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        for g in range(0, group):
            off_h64 = off_hk64 * group + g
            q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
            do_base = DO + off_b64 * stride_ob + off_h64 * stride_oh
            row_base = off_b64 * stride_lb + off_h64 * stride_lh
            for start_m in range(lo, seqlen_q, BLOCK_M):
                rows = start_m + offs_m
                row_ok = rows < seqlen_q
                rows64 = rows.to(tl.int64)
                qd_mask = row_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=qd_mask, other=0.0).to(tl.float32)
                do = tl.load(do_base + rows64[:, None] * stride_om + offs_d[None, :] * stride_od,
                             mask=qd_mask, other=0.0).to(tl.float32)
                lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf"))
                delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
                visible = row_ok[:, None] & col_ok[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= rows[:, None] + offset)
                p, ds = _ds_tile(q, k, v, do, lse, delta, visible, scale, softcap, HAS_SOFTCAP)
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")

        tl.store(DK + off_b64 * stride_dkb + off_hk64 * stride_dkh + offs_n64[:, None] * stride_dkn
                 + offs_d[None, :], dk, mask=kv_mask)
        tl.store(DV + off_b64 * stride_dvb + off_hk64 * stride_dvh + offs_n64[:, None] * stride_dvn
                 + offs_d[None, :], dv, mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, Lse, Delta, DQ,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_lb, stride_lh,
        stride_dqb, stride_dqm, stride_dqh,
        seqlen_q, seqlen_k, headdim, nheads, group,
        scale, softcap,
        CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b64 = (off_bh // nheads).to(tl.int64)
        off_h = off_bh % nheads
        off_h64 = off_h.to(tl.int64)
        off_hk64 = (off_h // group).to(tl.int64)
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = rows < seqlen_q
        d_ok = offs_d < headdim
        rows64 = rows.to(tl.int64)
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + off_b64 * stride_qb + off_h64 * stride_qh + rows64[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + off_b64 * stride_ob + off_h64 * stride_oh + rows64[:, None] * stride_om
                     + offs_d[None, :] * stride_od, mask=qd_mask, other=0.0).to(tl.float32)
        row_base = off_b64 * stride_lb + off_h64 * stride_lh
        lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
        k_base = K + off_b64 * stride_kb + off_hk64 * stride_kh
        v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh

        offset = seqlen_k - seqlen_q
        hi = seqlen_k
        if CAUSAL:
            last_row = tl.minimum(start_m * BLOCK_M + BLOCK_M, seqlen_q) - 1
            hi = tl.minimum(tl.maximum(last_row + offset + 1, 0), seqlen_k)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen_k
            cols64 = cols.to(tl.int64)
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_base + cols64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0).to(tl.float32)
            visible = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + offset)
            _, ds = _ds_tile(q, k, v, do, lse, delta, visible, scale, softcap, HAS_SOFTCAP)
            dq += tl.dot(ds, k, input_precision="ieee")

        tl.store(DQ + off_b64 * stride_dqb + off_h64 * stride_dqh + rows64[:, None] * stride_dqm
                 + offs_d[None, :], dq, mask=qd_mask)

    # The interpreter replaces triton.jit's JITFunction with its own wrapper.
    _INTERPRETED = not isinstance(_bwd_dq_kernel, triton.runtime.JITFunction)


def triton_import_error() -> str | None:
    """None when triton imports, else a one-line reason."""
    return _IMPORT_ERROR


def _launch_config(headdim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). A fixed heuristic, no autotune; tl.dot needs blocks >= 16.
    Float32 operands everywhere, so tiles are smaller than the forward's: the
    dk/dv program holds k, v, dk, dv (4 x BLOCK_N x headdim float32) in registers."""
    if _INTERPRETED:
        return 16, 16, 4  # the interpreter pays per program and per op, not per FLOP
    if headdim <= 64:
        return 64, 64, 4
    if headdim <= 128:
        return 32, 64, 8
    return 16, 32, 8


def block_backward_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float = 0.0,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` float32 of one block pair (module docstring).

    Inputs are assumed validated (:func:`longattn.kernels.block_backward.block_backward`);
    this twin only rejects what it cannot compute.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"block_backward_triton needs triton, but {_IMPORT_ERROR}")
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if headdim > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"block_backward_triton supports headdim <= {MAX_HEADDIM}, got {headdim}")
    if not q.is_cuda and not _INTERPRETED:
        raise DeviceError(f"block_backward_triton got tensors on {q.device}; it needs CUDA tensors, "
                          "or TRITON_INTERPRET=1 set before triton is imported to run on CPU")
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if batch * seqlen_q * nheads * headdim == 0 or seqlen_k == 0:
        return dq, dk, dv  # no (row, key) pair: every gradient is 0
    # delta and lse in (batch, nheads, seqlen_q) float32, contiguous, so both share strides.
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.to(torch.float32)
    delta = delta.contiguous()
    # +inf: exp(s - lse) is exactly 0 for rows that saw no key anywhere.
    lse_use = lse.to(torch.float32).masked_fill(torch.isneginf(lse), float("inf")).contiguous()
    group = nheads // nheads_k
    block_m, block_n, num_warps = _launch_config(headdim)
    block_d = max(16, triton.next_power_of_2(headdim))
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse_use.stride()[:2])
    flags = dict(CAUSAL=bool(causal), HAS_SOFTCAP=softcap > 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                 num_warps=num_warps, num_stages=1)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # launch on q's GPU
        _bwd_dkdv_kernel[(triton.cdiv(seqlen_k, block_n), batch * nheads_k)](
            q, k, v, dout, lse_use, delta, dk, dv, *common,
            *dk.stride()[:3], *dv.stride()[:3],
            seqlen_q, seqlen_k, headdim, nheads_k, group, float(scale), float(softcap), **flags,
        )
        _bwd_dq_kernel[(triton.cdiv(seqlen_q, block_m), batch * nheads)](
            q, k, v, dout, lse_use, delta, dq, *common, *dq.stride()[:3],
            seqlen_q, seqlen_k, headdim, nheads, group, float(scale), float(softcap), **flags,
        )
    return dq, dk, dv
