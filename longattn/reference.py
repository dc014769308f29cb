"""The oracle: dense attention in float64 with an explicit boolean mask.

Every twin of every primitive and every method in longattn is tested against
:func:`attention_ref`. It is written for clarity, not speed: it materialises
the full ``(batch, nheads, seqlen_q, seqlen_k)`` score tensor.
"""

from __future__ import annotations

import torch

from longattn.errors import ShapeError, DTypeError
from longattn.masking import dense_mask, effective_window
from longattn.validation import (
    check_flag,
    check_qkv,
    check_softcap,
    check_softmax_scale,
    check_window,
    FLOAT_DTYPES,
)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in float64; differentiable.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; float64 accepted besides
            float32/float16/bfloat16 (for float64 gradient checks).
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0``.
        causal: bottom-right aligned (query ``i`` sees key ``j`` iff
            ``j <= i + seqlen_k - seqlen_q``), see :mod:`longattn.masking`.
        softmax_scale: defaults to ``headdim ** -0.5``.
        window_size: ``(left, right)``, -1 = unbounded (flash-attn semantics).
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``
            (applied after scaling).
        mask: optional boolean tensor broadcastable to
            ``(batch, nheads, seqlen_q, seqlen_k)``; True = may attend. It is
            combined (AND) with causal and window.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` float64 and ``lse``
        ``(batch, nheads, seqlen_q)`` float64 (natural log). A query that sees
        no key gets ``out = 0`` and ``lse = -inf``.
    """
    q, k, v = check_qkv(q, k, v, dtypes=FLOAT_DTYPES + (torch.float64,))
    causal = check_flag("causal", causal)
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    window = effective_window(causal, check_window(window_size, causal))
    softcap = check_softcap(softcap)
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]

    group = nheads // nheads_k
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=2)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    visible = dense_mask(seqlen_q, seqlen_k, window, device=q.device)
    visible = visible.expand(batch, nheads, seqlen_q, seqlen_k)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise DTypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        try:
            visible = visible & mask.to(q.device)
        except RuntimeError as exc:
            raise ShapeError(
                f"mask with shape {tuple(mask.shape)} does not broadcast to "
                f"(batch, nheads, seqlen_q, seqlen_k) = {(batch, nheads, seqlen_q, seqlen_k)}"
            ) from exc
        if visible.shape != (batch, nheads, seqlen_q, seqlen_k):
            raise ShapeError(
                f"mask with shape {tuple(mask.shape)} does not broadcast to "
                f"(batch, nheads, seqlen_q, seqlen_k) = {(batch, nheads, seqlen_q, seqlen_k)}"
            )

    scores = scores.masked_fill(~visible, float("-inf"))
    empty = ~visible.any(dim=-1)  # (batch, nheads, seqlen_q): rows that see no key
    # A row of -inf has lse -inf, and exp(-inf - -inf) is NaN (in the forward
    # pass and in logsumexp's backward). Compute on zeros there instead, then
    # write out = 0 and lse = -inf explicitly, so gradients stay finite.
    safe_scores = scores.masked_fill(empty[..., None], 0.0)
    lse_safe = torch.logsumexp(safe_scores, dim=-1)
    probs = torch.exp(safe_scores - lse_safe[..., None]).masked_fill(empty[..., None], 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v64)
    lse = lse_safe.masked_fill(empty, float("-inf"))
    return out, lse


def attention_ref_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    seqused_k: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_ref` over packed sequences, one sequence at a time.

    ``q (total_q, nheads, headdim)``, ``k, v (total_k, nheads_k, headdim)``,
    ``cu_seqlens_q/k (batch + 1,)`` prefix sums; each sequence is aligned
    bottom-right on its own; ``options`` are :func:`attention_ref`'s. Returns
    ``out (total_q, nheads, headdim)`` float64 and ``lse (nheads, total_q)``
    float64 (flash-attn's varlen layout). ``seqused_k (batch,)``: sequence
    ``b`` uses only its first ``seqused_k[b]`` keys."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = None if seqused_k is None else seqused_k.tolist()
    for b in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[b : b + 2], bounds_k[b : b + 2]
        if used is not None:
            k1 = k0 + used[b]
        out, lse = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **options)
        outs.append(out[0])
        lses.append(lse[0])
    if not outs:
        return q.new_zeros(q.shape, dtype=torch.float64), q.new_zeros((q.shape[1], 0), dtype=torch.float64)
    return torch.cat(outs, 0), torch.cat(lses, 1)
