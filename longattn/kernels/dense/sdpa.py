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
from longattn.masking import dense_mask


def lse_op_available() -> bool:
    """Whether this torch build exposes the fused CPU kernel that returns lse."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _causal_args(seqlen_q: int, seqlen_k: int, window: tuple[int, int], device: torch.device) -> dict:
    """``is_causal`` / ``attn_mask`` arguments realising ``window`` (which must be
    unbounded on the left, right edge -1 or 0)."""
    if window[1] < 0:
        return {"is_causal": False, "attn_mask": None}
    if seqlen_q == seqlen_k:
        return {"is_causal": True, "attn_mask": None}  # top-left == bottom-right
    return {"is_causal": False, "attn_mask": dense_mask(seqlen_q, seqlen_k, window, device=device)}


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: tuple[int, int]
) -> torch.Tensor:
    """Output only (differentiable through PyTorch's own backward).

    Shapes as in :func:`longattn.kernels.dense.eager.dense_forward_eager`.
    """
    args = _causal_args(q.shape[1], k.shape[1], window, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
        **args,
    )
    return out.transpose(1, 2)


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
    args = _causal_args(q.shape[1], k.shape[1], window, q.device)
    if args["attn_mask"] is not None:  # this op takes an additive mask in q's dtype
        args["attn_mask"] = torch.zeros(args["attn_mask"].shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~args["attn_mask"], float("-inf")
        )
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        0.0,
        args["is_causal"],
        attn_mask=args["attn_mask"],
        scale=scale,
    )
    lse = lse.to(torch.float32).contiguous()  # the op returns it (batch, seqlen, nheads)-strided
    empty_rows = q.shape[1] - k.shape[1]
    if window[1] >= 0 and empty_rows > 0:
        # Causal with seqlen_q > seqlen_k: the first rows see no key. The op
        # returns out 0 but lse 0 for them; the contract says -inf.
        lse[:, :, :empty_rows] = float("-inf")
    return out.transpose(1, 2).contiguous(), lse
