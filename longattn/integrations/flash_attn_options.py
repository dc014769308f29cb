"""flash-attn's option conventions, converted to longattn's (shared by
:mod:`longattn.integrations.flash_attn` and its KV-cache function)."""

from __future__ import annotations

import numbers

import torch

from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError, UnsupportedFeatureError


class CacheOverflowError(ArgumentError, RuntimeError):
    """New tokens do not fit in the KV cache. A :class:`~longattn.errors.LongAttnError`
    (``ValueError``) and a ``RuntimeError`` (what flash-attn's checks raise)."""


# --- option conversions (flash-attn's conventions -> longattn's) --------------

def check_dropout(dropout_p: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ArgumentError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_p > 0:
        raise UnsupportedFeatureError(
            f"dropout_p={dropout_p} is not supported: longattn is an inference library and its attention kernels "
            "have no dropout; pass dropout_p=0.0 (flash-attn's value for evaluation)"
        )


def fa_softcap(softcap: object) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise ArgumentError(f"softcap must be a number (<= 0 disables it), got {softcap!r}")
    return float(softcap) if softcap > 0 else 0.0


def fa_window(window_size: object, causal: bool, seqlen_k: int | None) -> tuple[int, int]:
    """flash-attn's window rules: a tuple, list or 2-element integer tensor;
    negative = unbounded; an edge ``>= seqlen_k`` (when given) unbounded;
    causal sets the right edge to 0. Returns the effective ``(left, right)``."""
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int \
            and type(window_size[1]) is int:
        items = window_size  # the common call: no conversion
    elif isinstance(window_size, torch.Tensor):
        if window_size.numel() != 2 or window_size.dtype.is_floating_point or window_size.dtype.is_complex \
                or window_size.dtype == torch.bool:
            raise ArgumentError(
                f"window_size as a tensor must hold 2 integers (left, right), got dtype {window_size.dtype} "
                f"shape {tuple(window_size.shape)}"
            )
        items = window_size.flatten().tolist()
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size
    ):
        items = window_size
    else:
        raise ArgumentError(f"window_size must be (left, right) ints (-1 = unbounded), got {window_size!r}")
    left, right = (-1 if w < 0 else int(w) for w in items)
    if seqlen_k is not None:
        left = -1 if left >= seqlen_k else left
        right = -1 if right >= seqlen_k else right
    return (left, 0) if causal else (left, right)


def alibi_slopes_2d(alibi_slopes: object, batch: int, nheads: int, device: torch.device) -> torch.Tensor:
    """``(nheads,)`` or ``(batch, nheads)`` float32 -> ``(batch, nheads)``."""
    if not isinstance(alibi_slopes, torch.Tensor):
        raise DTypeError(f"alibi_slopes must be a float32 tensor (nheads,) or (batch, nheads), got "
                         f"{type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise DTypeError(f"alibi_slopes must be float32 (as in flash-attn), got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise DeviceError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    if tuple(alibi_slopes.shape) == (nheads,):
        return alibi_slopes[None].expand(batch, nheads)
    if tuple(alibi_slopes.shape) != (batch, nheads):
        raise ShapeError(f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                         f"({batch}, {nheads}), got {tuple(alibi_slopes.shape)}")
    return alibi_slopes


def fa_lse(lse: torch.Tensor) -> torch.Tensor:
    """longattn's empty-row lse (-inf) -> flash-attn's (+inf)."""
    return torch.where(lse == float("-inf"), float("inf"), lse)
