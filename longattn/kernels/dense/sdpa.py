"""Dense attention through ``torch.nn.functional.scaled_dot_product_attention``.

PyTorch's fused CPU (flash) kernel is the dense path on a CPU where the C++
twin (``cpp``) cannot build, and SDPA the fast path on GPUs; but its
semantics differ from longattn's contract in ways that must be bridged
here, never passed through:

- ``is_causal`` is *top-left* aligned. It equals longattn's bottom-right rule
  only when ``seqlen_q == seqlen_k``; otherwise an explicit bottom-right
  boolean mask is passed.
- It works in ``(batch, nheads, seqlen, headdim)``; longattn's layout is
  ``(batch, seqlen, nheads, headdim)``. Transposed views are passed (the CPU
  kernel accepts strided input and its output transposes back contiguous).
- The public function returns no lse. When lse is needed on CPU, the fused
  kernel's own op (``aten::_scaled_dot_product_flash_attention_for_cpu``,
  which returns it) is used; its presence is probed, not assumed.

Soft-capping and windows with a left edge are not expressible without a
dense mask that would cost more than the eager twin, so the dispatcher sends
those elsewhere (see :mod:`longattn.kernels.dense`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longattn.errors import UnsupportedFeatureError


def lse_op_available() -> bool:
    """Whether this torch build exposes the fused CPU kernel that returns lse
    (the one place longattn probes for it; every ``sdpa`` twin asks here)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def fused_cpu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU attention with lse (a private op: the one place longattn
    calls it). ``q (..., seqlen_q, headdim)`` heads-first like SDPA; ``attn_mask``
    additive, broadcastable to ``(..., seqlen_q, seqlen_k)``. Returns ``(out, lse)``;
    lse in the op's own layout and dtype, and 0 (not -inf) for rows that see no key:
    callers fix those rows."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


def bottom_right_causal_mask(seqlen_q: int, seqlen_k: int, device: torch.device) -> torch.Tensor:
    """``(seqlen_q, seqlen_k)`` bool, True where query ``i`` sees key ``j``:
    ``j <= i + seqlen_k - seqlen_q`` (the same mask as
    :func:`longattn.masking.dense_mask` for window ``(-1, 0)``, in one
    allocation and one in-place op instead of two aranges and a compare)."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril_(seqlen_k - seqlen_q)


def masked_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, *,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads-first ``(out, lse)`` in float32 math with hidden scores set to
    -inf (``visible`` bool, broadcastable to the scores; k/v heads repeated
    for GQA). SDPA adds its mask, and a NaN score (NaN in q or k) plus -inf
    is NaN, so a hidden NaN key reaches rows that do not see it; callers redo
    such (rare) calls here, where NaN reaches exactly the rows that see it."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.matmul((scores - finite[..., None]).exp(), v.float())
    return out.to(q.dtype), lse


def _causal_args(
    seqlen_q: int, seqlen_k: int, window: tuple[int, int], device: torch.device
) -> tuple[bool, torch.Tensor | None]:
    """``(is_causal, attn_mask)`` realising ``window`` (which must be
    unbounded on the left, right edge -1 or 0)."""
    if window[1] < 0:
        return False, None
    if seqlen_q == seqlen_k:
        return True, None  # top-left == bottom-right
    if seqlen_q == 1:
        return False, None  # bottom-right: the one query is the last position and sees every key
    return False, bottom_right_causal_mask(seqlen_q, seqlen_k, device)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: tuple[int, int]
) -> torch.Tensor:
    """Output only (differentiable through PyTorch's own backward).

    Shapes as in :func:`longattn.kernels.dense.eager.dense_forward_eager`.
    Called once per layer per token by models: kept to the SDPA call itself
    plus the layout views (no kwargs dicts, each shape read once).
    """
    qs, ks = q.shape, k.shape
    if window[1] < 0 or qs[1] == 1:  # (bottom-right, one query sees every key: no causal work)
        is_causal, mask = False, None
    elif qs[1] == ks[1]:
        is_causal, mask = True, None
    else:
        is_causal, mask = _causal_args(qs[1], ks[1], window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=qs[2] != ks[2],
    )
    if mask is not None and bool(torch.isnan(out).any()):  # a hidden NaN key leaked: see masked_attention_math
        out = masked_attention_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale=scale)[0]
    return out.transpose(1, 2)


def bind_sdpa(seqlen_q: int, seqlen_k: int, gqa: bool, *, scale: float, window: tuple[int, int]):
    """``fn(q, k, v) -> out``: :func:`sdpa_attention` for calls of these lengths
    and options with everything but the tensors settled (what a model's
    per-token calls repeat), or None when the call needs a mask (bottom-right
    causal with ``seqlen_q`` not 1 or ``seqlen_k``), which is built per call."""
    if window[1] < 0 or seqlen_q == 1:
        is_causal = False
    elif seqlen_q == seqlen_k:
        is_causal = True
    else:
        return None
    sdpa = F.scaled_dot_product_attention

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal, scale=scale,
                    enable_gqa=gqa).transpose(1, 2)

    return run


def sdpa_forward_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: tuple[int, int], softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` from the fused CPU kernel; same signature as the other
    forward twins (``softcap`` must be 0). Not differentiable by itself: the
    dispatcher wraps it with the shared recomputing backward."""
    if softcap:  # the dispatcher never sends it; direct callers get a clear error
        raise UnsupportedFeatureError(f"sdpa_forward_with_lse does not support softcap, got softcap={softcap}")
    group = q.shape[2] // k.shape[2]
    if group > 1:  # the lse-returning op has no GQA mode: repeat K/V (O(seqlen_k) memory)
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    is_causal, visible = _causal_args(q.shape[1], k.shape[1], window, q.device)
    mask = None
    if visible is not None:  # this op takes an additive mask in q's dtype
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    out, lse = fused_cpu_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        scale=scale, attn_mask=mask, is_causal=is_causal,
    )
    if visible is not None and bool(torch.isnan(out).any()):  # a hidden NaN key leaked: see masked_attention_math
        out, lse = masked_attention_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), visible,
                                         scale=scale)
    lse = lse.to(torch.float32).contiguous()  # the op returns it (batch, seqlen, nheads)-strided
    empty_rows = q.shape[1] - k.shape[1]
    if window[1] >= 0 and empty_rows > 0:
        # Causal with seqlen_q > seqlen_k: the first rows see no key. The op
        # returns out 0 but lse 0 for them; the contract says -inf.
        lse[:, :, :empty_rows] = float("-inf")
    return out.transpose(1, 2).contiguous(), lse
