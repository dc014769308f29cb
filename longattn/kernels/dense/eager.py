"""Dense attention, eager PyTorch twin: the readable specification.

Forward and backward are chunked over query rows, so memory stays
``O(batch * nheads * seqlen_k * rows_per_chunk)`` instead of
``O(seqlen_q * seqlen_k)``, and each chunk only touches the key range its rows
can see (:func:`longattn.masking.visible_key_range`), so causal and windowed
attention cost only the visible area. All math is float32; grouped-query
attention is handled by folding the query group into the row dimension, so K
and V are never repeated.

Shapes (flash-attn layout):
    q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``,
    out like q, lse ``(batch, nheads, seqlen_q)`` float32, natural log.
Query head ``h`` reads kv head ``h // (nheads // nheads_k)``.
``window`` is the *effective* ``(left, right)`` window with causal folded in
(:func:`longattn.masking.effective_window`).
"""

from __future__ import annotations

import torch

from longattn.masking import block_fully_visible, visibility_mask, visible_key_range

# Float32 elements of one chunk's score block (4 Mi = 16 MiB). Large enough
# for efficient matmuls; small enough to stay near the caches. On the 2-core
# reference machine (4k causal, H=8, D=128) 2-4 Mi ran ~1.25x faster than
# 1 Mi and ~1.05x faster than 8 Mi.
SCORE_CHUNK_ELEMENTS = 1 << 22
MIN_ROWS = 32
MAX_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of float32 scores, whatever the shape


def rows_per_chunk(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, window: tuple[int, int]) -> int:
    """Query rows per chunk so one score block stays near SCORE_CHUNK_ELEMENTS.

    A chunk of ``rows`` queries spans at most ``left + right + rows`` keys
    under a two-sided window, so narrow windows get taller chunks (bigger,
    faster matmuls) for the same memory.
    """
    left, right = window
    width = seqlen_k if left < 0 or right < 0 else min(seqlen_k, left + right + 1)
    per_row = max(1, batch * nheads * width)
    rows = SCORE_CHUNK_ELEMENTS // per_row
    if width < seqlen_k:  # the span grows by one key per extra row: solve rows * (width + rows) <= budget
        rows = max(1, int(((width**2 + 4 * SCORE_CHUNK_ELEMENTS / (batch * nheads)) ** 0.5 - width) / 2))
    # Very long keys would leave a handful of rows per chunk, and tiny matmuls
    # are slow; allow taller chunks up to a hard memory cap.
    rows = max(rows, min(MIN_ROWS, MAX_CHUNK_ELEMENTS // per_row))
    return max(1, min(seqlen_q, rows))


def _heads_major(x: torch.Tensor) -> torch.Tensor:
    """``(batch, seqlen, heads, dim)`` -> contiguous float32 ``(batch, heads, seqlen, dim)``."""
    return x.permute(0, 2, 1, 3).to(torch.float32).contiguous()


def _query_rows(x: torch.Tensor, r0: int, r1: int, nheads_k: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a ``(batch, seqlen_q, nheads, dim)`` tensor as float32
    ``(batch, nheads_k, group * rows, dim)``: the query group folded into rows."""
    batch, _, nheads, dim = x.shape
    group = nheads // nheads_k
    rows = x[:, r0:r1].reshape(batch, r1 - r0, nheads_k, group, dim)
    return rows.permute(0, 2, 3, 1, 4).to(torch.float32).reshape(batch, nheads_k, group * (r1 - r0), dim)


def _to_query_layout(x: torch.Tensor, nheads: int) -> torch.Tensor:
    """Inverse of :func:`_query_rows`: ``(batch, nheads_k, group * rows, dim)`` ->
    ``(batch, rows, nheads, dim)``."""
    batch, nheads_k, folded, dim = x.shape
    group = nheads // nheads_k
    rows = folded // group
    return x.reshape(batch, nheads_k, group, rows, dim).permute(0, 3, 1, 2, 4).reshape(batch, rows, nheads, dim)


def _scores(
    q_rows: torch.Tensor,
    k_t: torch.Tensor,
    rows: tuple[int, int],
    keys: tuple[int, int],
    seqlen_q: int,
    seqlen_k: int,
    scale: float,
    window: tuple[int, int],
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked, scaled (and soft-capped) scores of one chunk.

    Returns ``scores (batch, nheads_k, group * rows, keys)`` with invisible
    entries at -inf, and ``tanh`` of the soft-cap (None without softcap), which
    the backward pass needs for the soft-cap's derivative.
    """
    (r0, r1), (lo, hi) = rows, keys
    scores = torch.matmul(q_rows, k_t[..., lo:hi]).mul_(scale)
    capped = None
    if softcap > 0:
        capped = scores.div_(softcap).tanh_()
        scores = capped * softcap
    # Decided from the geometry, not from the mask's values: no host sync on a GPU.
    if not block_fully_visible(r0, r1, lo, hi, seqlen_q, seqlen_k, window):
        mask = visibility_mask(
            torch.arange(r0, r1, device=scores.device),
            torch.arange(lo, hi, device=scores.device),
            seqlen_q,
            seqlen_k,
            window,
        )
        batch, nheads_k, folded, nkeys = scores.shape
        grouped = scores.view(batch, nheads_k, folded // (r1 - r0), r1 - r0, nkeys)
        grouped.masked_fill_(~mask, float("-inf"))
    return scores, capped


def dense_forward_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention forward; returns ``(out, lse)`` (see module docstring)."""
    batch, seqlen_q, nheads, dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or seqlen_k == 0:
        return out, lse
    k_t = _heads_major(k).transpose(-1, -2)  # (batch, nheads_k, dim, seqlen_k)
    v_h = _heads_major(v)  # (batch, nheads_k, seqlen_k, dim)
    step = rows_per_chunk(batch, nheads, seqlen_q, seqlen_k, window)
    for r0 in range(0, seqlen_q, step):
        r1 = min(seqlen_q, r0 + step)
        lo, hi = visible_key_range(r0, r1, seqlen_q, seqlen_k, window)
        if lo >= hi:
            continue  # every row of the chunk is empty: out 0, lse -inf already
        scores, _ = _scores(
            _query_rows(q, r0, r1, nheads_k), k_t, (r0, r1), (lo, hi),
            seqlen_q, seqlen_k, scale, window, softcap,
        )
        row_max = scores.amax(dim=-1, keepdim=True)
        # Rows that see nothing in this chunk have max -inf; subtract 0 there
        # so exp gives exact zeros instead of NaN.
        row_max.masked_fill_(torch.isinf(row_max), 0.0)
        probs = scores.sub_(row_max).exp_()
        denom = probs.sum(dim=-1, keepdim=True)
        acc = torch.matmul(probs, v_h[:, :, lo:hi])
        acc.div_(denom.clamp_min(torch.finfo(torch.float32).tiny))  # empty rows: 0 / tiny = 0
        out[:, r0:r1] = _to_query_layout(acc, nheads).to(q.dtype)
        chunk_lse = (row_max + denom.log()).squeeze(-1)  # (batch, nheads_k, group * rows)
        lse[:, :, r0:r1] = chunk_lse.reshape(batch, nheads, r1 - r0)
    return out, lse


def dense_backward_eager(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of dense attention, recomputing probabilities from ``lse``.

    Any forward twin's ``(out, lse)`` can be differentiated with this, which
    is why every twin returns lse. ``lse`` must be the forward's own lse over
    these keys (not a global one over more keys, as a ring step would have):
    the recomputed rows are renormalised to sum to 1, so they match the
    forward's probabilities whatever order the forward twin rounded its
    scores in. ``dlse`` (the gradient flowing into lse, or None) enters as
    ``dS += P * dlse`` because ``d lse / d S = P``.
    Returns contiguous ``(dq, dk, dv)`` in the dtypes of q, k, v.
    """
    lse_safe = lse.masked_fill(torch.isinf(lse), 0.0)  # empty rows: all scores -inf, P = 0
    dq, dk, dv = attention_grads(dout, q, k, v, out, lse_safe, dlse, scale=scale, window=window, softcap=softcap,
                                 renormalise=True)
    return _finish_grads(dq, dk, dv, q, k, v)


def attention_grads(dout, q, k, v, out, lse, dlse, *, scale: float, window: tuple[int, int], softcap: float,
                    renormalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``dq (like q)``, ``dk, dv (batch, nheads_k, seqlen_k, headdim)``
    recomputing ``P = exp(s - lse)`` chunk by chunk (``lse`` finite where used:
    0 for rows that see nothing here, +inf for rows that see nothing anywhere).

    ``renormalise``: divide each recomputed row by its sum -- right when
    ``lse`` is over exactly these keys (a dense backward: it reproduces the
    forward twin's probabilities whatever order that twin rounded in); wrong
    for a block of a longer row (a ring step), whose ``lse`` covers keys
    beyond this block and whose probabilities must not sum to 1 here.
    """
    batch, seqlen_q, nheads, dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros((batch, nheads_k, seqlen_k, dim), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if q.numel() == 0 or seqlen_k == 0:
        return dq, dk, dv
    k_h = _heads_major(k)
    k_t = k_h.transpose(-1, -2)
    v_h = _heads_major(v)
    # delta_i = sum_d dout_i * out_i = sum_j P_ij dP_ij: the softmax Jacobian's diagonal term.
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1).permute(0, 2, 1)  # (b, h, sq)
    if dlse is not None:
        delta = delta - dlse.to(torch.float32)  # d lse / d s = P, so dlse enters as dS += P * dlse
    lse = lse.to(torch.float32)
    step = rows_per_chunk(batch, nheads, seqlen_q, seqlen_k, window)
    for r0 in range(0, seqlen_q, step):
        r1 = min(seqlen_q, r0 + step)
        lo, hi = visible_key_range(r0, r1, seqlen_q, seqlen_k, window)
        if lo >= hi:
            continue  # no row of the chunk sees a key here
        q_rows = _query_rows(q, r0, r1, nheads_k)
        scores, capped = _scores(q_rows, k_t, (r0, r1), (lo, hi), seqlen_q, seqlen_k, scale, window, softcap)
        fold = (batch, nheads_k, -1, 1)
        probs = scores.sub_(lse[:, :, r0:r1].reshape(fold)).exp_()
        if renormalise:
            # The forward twin computed its scores in its own order (the C++ kernel
            # pre-scales q, Triton works in base 2), so exp(s - lse) here is off by a
            # few ulps of s -- a row with one visible key would get P = 1 - 2e-6, and
            # fp16 dV one unit off. The chunk holds every key its rows can see, so the
            # row sum is the softmax denominator; dividing by it reproduces the
            # forward's probabilities (exactly 1 for one key). Empty rows stay 0.
            probs.div_(probs.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny))
        do_rows = _query_rows(dout, r0, r1, nheads_k)
        dv[:, :, lo:hi] += torch.matmul(probs.transpose(-1, -2), do_rows)
        dprobs = torch.matmul(do_rows, v_h[:, :, lo:hi].transpose(-1, -2))
        dscores = probs.mul_(dprobs.sub_(delta[:, :, r0:r1].reshape(fold)))
        if capped is not None:
            dscores.mul_(1.0 - capped.square_())  # d(c * tanh(s / c)) / ds = 1 - tanh^2
        dscores.mul_(scale)
        dq[:, r0:r1] = _to_query_layout(torch.matmul(dscores, k_h[:, :, lo:hi]), nheads)
        dk[:, :, lo:hi] += torch.matmul(dscores.transpose(-1, -2), q_rows)
    return dq, dk, dv


def _finish_grads(dq, dk, dv, q, k, v):
    """float32 accumulators -> contiguous gradients in the inputs' dtypes and layout."""
    return (
        dq.to(q.dtype).contiguous(),
        dk.permute(0, 2, 1, 3).to(k.dtype).contiguous(),
        dv.permute(0, 2, 1, 3).to(v.dtype).contiguous(),
    )


def dense_varlen_forward_eager(
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
    """Varlen dense attention, the specification: :func:`dense_forward_eager`
    on each packed sequence. ``q (total_q, nheads, headdim)``, ``k, v
    (total_k, nheads_k, headdim)``, ``cu_seqlens_q/k (batch + 1,)`` int32;
    sequence ``b`` is rows ``cu[b]:cu[b + 1]``, aligned bottom-right on its
    own. Returns ``out (total_q, nheads, headdim)`` in q's dtype and ``lse
    (nheads, total_q)`` float32. (``max_seqlen_*`` are unused here; every
    twin takes them.)"""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in _sequence_bounds(cu_seqlens_q, cu_seqlens_k):
        if q1 > q0:
            o, l = dense_forward_eager(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale=scale, window=window,
                                       softcap=softcap)
            out[q0:q1] = o[0]
            lse[:, q0:q1] = l[0]
    return out, lse


def dense_varlen_backward_eager(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`dense_varlen_forward_eager` (any forward twin's
    ``out``/``lse``): :func:`dense_backward_eager` on each packed sequence."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (q0, q1), (k0, k1) in _sequence_bounds(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue  # no query or no key: every gradient of the sequence is 0
        grads = dense_backward_eager(
            dout[None, q0:q1], None if dlse is None else dlse[None, :, q0:q1], q[None, q0:q1], k[None, k0:k1],
            v[None, k0:k1], out[None, q0:q1], lse[None, :, q0:q1], scale=scale, window=window, softcap=softcap)
        for full, part, (lo, hi) in zip((dq, dk, dv), grads, ((q0, q1), (k0, k1), (k0, k1))):
            full[lo:hi] = part[0]
    return dq, dk, dv


def _sequence_bounds(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """``[((q0, q1), (k0, k1)), ...]`` per packed sequence (one host read of each prefix sum)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [((cq[b], cq[b + 1]), (ck[b], ck[b + 1])) for b in range(len(cq) - 1)]
