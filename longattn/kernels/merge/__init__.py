"""Merge partial attention states computed over disjoint key sets.

If ``(out_i, lse_i)`` is attention of the same queries over key set ``K_i``
and the ``K_i`` are disjoint, then attention over their union is

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

Ring steps, stream-K tiles, offload tiers and head groups all combine through
this one function. Parts that saw no key (``lse_i = -inf``) get weight 0; a
query no part saw gets ``out = 0, lse = -inf``. The math is float32 and the
parts are summed in the order given, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from longattn.validation import FLOAT_DTYPES


def _as_stack(name: str, parts: torch.Tensor | Sequence[torch.Tensor], ndim: int, layout: str) -> torch.Tensor:
    """Stack a sequence of parts (or accept an already stacked tensor)."""
    if isinstance(parts, torch.Tensor):
        if parts.dim() != ndim + 1:
            raise ShapeError(
                f"{name} as one tensor must have {ndim + 1} dimensions (num_parts, *{layout}), "
                f"got shape {tuple(parts.shape)}"
            )
        stacked = parts
    else:
        if not isinstance(parts, Sequence) or len(parts) == 0:
            raise ArgumentError(f"{name} must be a non-empty sequence of tensors or one stacked tensor, got {parts!r}")
        for i, p in enumerate(parts):
            if not isinstance(p, torch.Tensor):
                raise DTypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if p.dim() != ndim:
                raise ShapeError(f"{name}[{i}] must have {ndim} dimensions {layout}, got shape {tuple(p.shape)}")
            if p.shape != parts[0].shape:
                raise ShapeError(f"{name}[{i}] has shape {tuple(p.shape)} but {name}[0] has {tuple(parts[0].shape)}")
            if p.dtype != parts[0].dtype:
                raise DTypeError(f"{name}[{i}] has dtype {p.dtype} but {name}[0] has {parts[0].dtype}")
            if p.device != parts[0].device:
                raise DeviceError(f"{name}[{i}] is on {p.device} but {name}[0] is on {parts[0].device}")
        stacked = torch.stack(list(parts))
    if stacked.shape[0] == 0:
        raise ArgumentError(f"{name} has no parts; pass at least one")
    if stacked.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise DTypeError(f"{name} must be floating point, got {stacked.dtype}")
    return stacked


def merge_states(
    outs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    *,
    check: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial results over disjoint key sets into one.

    Args:
        outs: parts ``(batch, seqlen_q, nheads, headdim)`` each, as a sequence
            or one tensor ``(num_parts, batch, seqlen_q, nheads, headdim)``.
        lses: matching ``(batch, nheads, seqlen_q)`` natural-log lse per part
            (or ``(num_parts, batch, nheads, seqlen_q)``); -inf = part saw nothing.
        check: also check the lse values (no NaN, no +inf). Reading a result
            back is a host sync on a GPU, so the default (None) checks only
            CPU tensors; True checks on any device, False never (the kernels'
            own merges of parts they computed).

    Returns:
        ``(out, lse)``: out in the parts' dtype, lse float32.

    Example::

        o1, l1 = attention(q, k[:, :100], v[:, :100], return_lse=True)
        o2, l2 = attention(q, k[:, 100:], v[:, 100:], return_lse=True)
        out, lse = merge_states([o1, o2], [l1, l2])  # == attention(q, k, v)
    """
    out_stack = _as_stack("outs", outs, 4, "(batch, seqlen_q, nheads, headdim)")
    lse_stack = _as_stack("lses", lses, 3, "(batch, nheads, seqlen_q)")
    n, batch, seqlen_q, nheads, _ = out_stack.shape
    if lse_stack.shape != (n, batch, nheads, seqlen_q):
        raise ShapeError(
            f"lses has shape {tuple(lse_stack.shape)} but outs of shape {tuple(out_stack.shape)} "
            f"need (num_parts, batch, nheads, seqlen_q) = {(n, batch, nheads, seqlen_q)}"
        )
    if lse_stack.device != out_stack.device:
        raise DeviceError(f"lses is on {lse_stack.device} but outs is on {out_stack.device}")

    if check is not None and not isinstance(check, bool):
        raise ArgumentError(f"check must be True, False or None, got {check!r}")
    lse32 = lse_stack.to(torch.float32)
    check_values = lse32.device.type == "cpu" if check is None else check
    if check_values and bool((torch.isnan(lse32) | (lse32 == float("inf"))).any()):
        raise ArgumentError("lses contains NaN or +inf; a part's lse must be finite or -inf")
    top = lse32.amax(dim=0)
    top = top.masked_fill(torch.isinf(top), 0.0)  # all parts empty: weights below are all 0
    weights = torch.exp(lse32 - top)  # (n, b, h, sq); exactly 0 for empty parts
    total = weights.sum(dim=0)
    lse = top + total.log()  # -inf where every part was empty
    weights = weights / total.clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.zeros(out_stack.shape[1:], dtype=torch.float32, device=out_stack.device)
    for i in range(n):  # fixed order: deterministic; addcmul_ makes no temporary of out's size
        out.addcmul_(weights[i].permute(0, 2, 1)[..., None], out_stack[i].to(torch.float32))
    return out.to(out_stack.dtype), lse


def merge_two_in_place(out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor,
                       other_lse: torch.Tensor) -> None:
    """:func:`merge_states` of two parts, written into the first: ``out (..., d)``
    float32 and ``lse (...)`` become the merge of themselves with
    ``other_out, other_lse`` (same shapes). No temporaries of ``out``'s size,
    for the hot paths that merge large partial outputs (no input checks)."""
    top = torch.maximum(lse, other_lse)
    top = top.masked_fill(torch.isinf(top), 0.0)  # both parts empty: weights are 0 below
    w_self, w_other = torch.exp(lse - top), torch.exp(other_lse - top)
    total = w_self + w_other
    safe = total.clamp_min(torch.finfo(torch.float32).tiny)
    out.mul_((w_self / safe)[..., None]).addcmul_(other_out, (w_other / safe)[..., None])
    lse.copy_(top + total.log())  # -inf where both parts were empty
