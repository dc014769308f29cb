"""Rotary embedding for decode steps, with flash-attn's ``flash_attn_with_kvcache`` rules.

Used by :func:`longattn.decode_attention` (``rotary_cos``, ``rotary_sin``,
``rotary_interleaved``) and by the flash-attn compatible integration. Plain
PyTorch: it runs before the new keys are appended, on the few new tokens only.

Shapes: ``x (batch, seqlen, nheads, headdim)``; ``cos, sin (seqlen_ro,
rotary_dim / 2)``; ``positions (batch, seqlen)`` int64 rows of cos/sin.
"""

from __future__ import annotations

import torch

from longattn.errors import ArgumentError, DeviceError, ShapeError
from longattn.validation import check_tensor

# cos/sin tables may be kept in any float precision (math is float32 anyway).
_TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotary embedding of the first ``rotary_dim = 2 * cos.shape[1]`` channels.

    ``x (batch, seqlen, nheads, headdim)``, ``cos, sin (seqlen_ro, rotary_dim / 2)``,
    ``positions (batch, seqlen)`` int64 rows of cos/sin. Interleaved (GPT-J)
    rotates channel pairs ``(0, 1), (2, 3), ...``; otherwise (GPT-NeoX)
    ``(i, i + rotary_dim / 2)``. Channels past rotary_dim pass through. Math in
    float32, result in x's dtype."""
    half = cos.shape[1]
    c = cos[positions].float()[:, :, None, :]  # (batch, seqlen, 1, half)
    s = sin[positions].float()[:, :, None, :]
    xr = x[..., : 2 * half].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def check_rotary_layout(q: torch.Tensor, k_new: object, cos: object, sin: object, interleaved: object) -> None:
    """The checks that read no data: both tables given, ``(seqlen_ro, rotary_dim / 2)``
    floating tensors on q's device, ``rotary_dim <= headdim``, new keys present."""
    if (cos is None) != (sin is None):
        raise ArgumentError("rotary_cos and rotary_sin must be given together (or neither)")
    if type(interleaved) is not bool:
        raise ArgumentError(f"rotary_interleaved must be a bool, got {interleaved!r}")
    if cos is None:
        return
    if k_new is None:
        raise ArgumentError("rotary_cos/rotary_sin rotate the new keys before they are written: they need k_new "
                            "and v_new (as in flash-attn)")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        t = check_tensor(name, t, 2, "(seqlen_ro, rotary_dim / 2)", _TABLE_DTYPES)
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}")
    if sin.shape != cos.shape:
        raise ShapeError(f"rotary_sin has shape {tuple(sin.shape)} but rotary_cos has {tuple(cos.shape)}")
    if 2 * cos.shape[1] > q.shape[3]:
        raise ShapeError(f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * cos.shape[1]} exceeds headdim {q.shape[3]}")


def rotary_positions(
    cache_seqlens: torch.Tensor, seqlen_q: int, seqlen_new: int, per_query: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's positions: new key ``i`` of sequence ``b`` at ``cache_seqlens[b] + i``
    (the slot it is written to, counted from the start of the cache row, whatever
    the leftpad); query ``i`` at the same ``cache_seqlens[b] + i`` when
    ``per_query`` (causal or local attention), else every query at
    ``cache_seqlens[b]``. Returns ``(pos_q (batch, seqlen_q), pos_k (batch,
    seqlen_new))`` int64."""
    device = cache_seqlens.device
    base = cache_seqlens.to(torch.int64)[:, None]
    pos_k = base + torch.arange(seqlen_new, device=device)
    steps = torch.arange(seqlen_q, device=device) if per_query else torch.zeros(seqlen_q, dtype=torch.int64,
                                                                                 device=device)
    return base + steps, pos_k


def check_rotary_data(cos: torch.Tensor, lengths: list[int], seqlen_q: int, seqlen_new: int, per_query: bool) -> None:
    """Every rotated position (from ``lengths``, cache_seqlens on the host) is a row of cos/sin."""
    if not lengths:
        return
    span = max(seqlen_new, seqlen_q if per_query else min(seqlen_q, 1))
    needed = max(lengths) + span
    if span and needed > cos.shape[0]:
        raise ShapeError(f"rotary_cos has {cos.shape[0]} positions (seqlen_ro) but this call rotates positions up to "
                         f"{needed - 1} (cache_seqlens + seqlen); give at least {needed} rows (flash-attn asks for "
                         "the cache's capacity)")


def rotate_step(
    q: torch.Tensor,
    k_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    per_query: bool,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, k_new)`` rotated at flash-attn's positions (:func:`rotary_positions`);
    new tensors, nothing written."""
    pos_q, pos_k = rotary_positions(cache_seqlens, q.shape[1], k_new.shape[1], per_query)
    return apply_rotary(q, cos, sin, pos_q, interleaved), apply_rotary(k_new, cos, sin, pos_k, interleaved)
