"""Input checks shared by every public function.

Each check raises a :mod:`longattn.errors` subclass whose message names the
argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import torch

from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from longattn.masking import effective_window

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(
    name: str, t: object, ndim: int, layout: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> torch.Tensor:
    """``t`` is a floating tensor with ``ndim`` dimensions described by ``layout``."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ShapeError(
            f"{name} must have {ndim} dimensions {layout}, got {t.dim()} with shape {_shape(t)}"
        )
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise DTypeError(f"{name} must be one of {names}, got {t.dtype}")
    return t


def check_qkv(
    q: object, k: object, v: object, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a q/k/v triple in longattn's layout.

    q ``(batch, seqlen_q, nheads, headdim)``, k and v
    ``(batch, seqlen_k, nheads_k, headdim)``, ``nheads % nheads_k == 0``, one
    dtype (from ``dtypes``), one device.
    """
    qkv_facts(q, k, v, dtypes)
    return q, k, v  # type: ignore[return-value]  (qkv_facts raised unless they are tensors)


def qkv_facts(
    q: object, k: object, v: object, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> tuple[torch.Size, torch.Size, torch.dtype, torch.device]:
    """:func:`check_qkv`, returning ``(q.shape, k.shape, dtype, device)`` so a
    caller on a hot path (:func:`longattn.attention`) need not read them again.
    """
    # Fast path: a model calls this once per layer per token, so the common
    # valid case is one chain of cheap comparisons (each shape and device read
    # once). It accepts exactly what the checks below accept; anything else
    # (including every invalid input) takes the full path for its message.
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
        qs, ks = q.shape, k.shape
        if (
            len(qs) == 4 and len(ks) == 4 and v.shape == ks
            and qs[0] == ks[0] and qs[3] == ks[3] and qs[3] != 0
            and ks[2] != 0 and qs[2] % ks[2] == 0
        ):
            dtype = q.dtype
            if dtype in dtypes and k.dtype is dtype and v.dtype is dtype:
                device = q.device
                # (three CPU tensors share the one CPU device: cheaper than comparing devices)
                if (q.is_cpu and k.is_cpu and v.is_cpu) or (k.device == device and v.device == device):
                    return qs, ks, dtype, device
    q, k, v = _check_qkv_full(q, k, v, dtypes)
    return q.shape, k.shape, q.dtype, q.device


def _check_qkv_full(
    q: object, k: object, v: object, dtypes: tuple[torch.dtype, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)", dtypes)
    k = check_tensor("k", k, 4, "(batch, seqlen_k, nheads_k, headdim)", dtypes)
    v = check_tensor("v", v, 4, "(batch, seqlen_k, nheads_k, headdim)", dtypes)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share one dtype")
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}; q, k, v must share one device")
        if t.shape[0] != q.shape[0]:
            raise ShapeError(f"{name} has batch {t.shape[0]} but q has {q.shape[0]}")
        if t.shape[3] != q.shape[3]:
            raise ShapeError(f"{name} has headdim {t.shape[3]} but q has {q.shape[3]}")
    if v.shape[1] != k.shape[1]:
        raise ShapeError(f"v has seqlen_k {v.shape[1]} but k has {k.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ShapeError(f"v has nheads_k {v.shape[2]} but k has {k.shape[2]}")
    nheads, nheads_k = q.shape[2], k.shape[2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ShapeError(
            f"q has {nheads} heads, which is not a multiple of k's nheads_k {nheads_k} "
            "(MHA needs equal counts, GQA/MQA a divisor)"
        )
    if q.shape[3] == 0:
        raise ShapeError("q has headdim 0; headdim must be at least 1")
    return q, k, v


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be a bool, got {value!r}")
    return value


def check_softmax_scale(softmax_scale: object, headdim: int) -> float:
    """Return the scale to use: ``headdim ** -0.5`` when ``None``."""
    if softmax_scale is None:
        return headdim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not math.isfinite(softmax_scale):
        raise ArgumentError(f"softmax_scale must be None or a finite number, got {softmax_scale!r}")
    return float(softmax_scale)


def check_softcap(softcap: object) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap < 0:
        raise ArgumentError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap!r}")
    return float(softcap)


def check_window(window_size: object, causal: bool) -> tuple[int, int]:
    """``window_size`` is ``(left, right)``, each an int >= -1 (-1 = unbounded).

    With ``causal=True`` the right edge is the query itself, so ``right`` must
    be -1 or 0: a positive right window would contradict causality, and
    silently overriding it (as flash-attn does) hides a bug in the caller.
    """
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in window_size)
    ):
        raise ArgumentError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if left < -1 or right < -1:
        raise ArgumentError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    if causal and right > 0:
        raise ArgumentError(
            f"window_size right edge must be -1 or 0 when causal=True, got {right}; "
            "a causal query cannot see keys to its right"
        )
    return left, right


def check_attention_options(
    headdim: int,
    causal: object,
    return_lse: object,
    softmax_scale: object,
    window_size: object,
    softcap: object,
) -> tuple[bool, bool, float, tuple[int, int], float]:
    """The options :func:`longattn.attention` and :func:`longattn.decode_attention`
    share: ``(causal, return_lse, scale, window, softcap)`` with the window
    effective (causal folded in, see :func:`longattn.masking.effective_window`)."""
    # Fast path for the common valid options (bool flags, no or a float scale,
    # a tuple window of plain ints, a float/int softcap), checked with exact
    # type tests instead of the numbers-ABC checks below (~10x cheaper per
    # test); anything else takes the full path, which also makes the errors.
    if (
        (causal is True or causal is False)
        and (return_lse is True or return_lse is False)
        and type(window_size) is tuple and len(window_size) == 2
        and type(window_size[0]) is int and type(window_size[1]) is int
        and (type(softcap) is float or type(softcap) is int)
    ):
        left, right = window_size
        if (
            left >= -1 and right >= -1 and not (causal and right > 0)
            and 0 <= softcap < math.inf
        ):
            if softmax_scale is None:
                scale = headdim ** -0.5
            elif type(softmax_scale) is float and math.isfinite(softmax_scale):
                scale = softmax_scale
            else:
                scale = check_softmax_scale(softmax_scale, headdim)
            return causal, return_lse, scale, (left, 0 if causal else right), float(softcap)
    causal = check_flag("causal", causal)
    return_lse = check_flag("return_lse", return_lse)
    scale = check_softmax_scale(softmax_scale, headdim)
    window = effective_window(causal, check_window(window_size, causal))
    return causal, return_lse, scale, window, check_softcap(softcap)


def check_varlen(
    q: object, k: object, v: object, cu_seqlens_q: object, cu_seqlens_k: object,
    max_seqlen_q: object, max_seqlen_k: object,
) -> tuple[int, int]:
    """Validate a packed (varlen) call; returns ``(max_seqlen_q, max_seqlen_k)``.

    q ``(total_q, nheads, headdim)``, k and v ``(total_k, nheads_k, headdim)``
    (one dtype, one device, ``nheads % nheads_k == 0``); ``cu_seqlens_q`` and
    ``cu_seqlens_k`` integer ``(batch + 1,)`` prefix sums on q's device, each
    starting at 0, non-decreasing, ending at ``total_q`` / ``total_k``;
    ``max_seqlen_*`` ints at least the longest sequence (None: computed).
    The prefix sums are read on the host once (they are small; a GPU caller
    who wants no sync passes the ``max_seqlen_*`` it knows and data it trusts,
    as with flash-attn)."""
    for name, t, layout in (("q", q, "(total_q, nheads, headdim)"), ("k", k, "(total_k, nheads_k, headdim)"),
                            ("v", v, "(total_k, nheads_k, headdim)")):
        check_tensor(name, t, 3, layout)
    # the 4-D checks (dtype, device, heads, headdim) on batch-1 views
    check_qkv(q[None], k[None], v[None])
    bounds = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor):
            raise DTypeError(f"{name} must be an int32 tensor (batch + 1,), got {type(cu).__name__}")
        if cu.dtype not in (torch.int32, torch.int64):
            raise DTypeError(f"{name} must be an int32 tensor (batch + 1,), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ShapeError(f"{name} must have shape (batch + 1,), got {tuple(cu.shape)}")
        if cu.device != q.device:
            raise DeviceError(f"{name} is on {cu.device} but q is on {q.device}")
        values = cu.tolist()
        if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
            raise ArgumentError(
                f"{name} must start at 0, never decrease and end at {total} (the packed length), got "
                f"{values if len(values) <= 12 else values[:6] + ['...'] + values[-6:]}"
            )
        bounds.append(values)
    if len(bounds[0]) != len(bounds[1]):
        raise ShapeError(f"cu_seqlens_q has {len(bounds[0]) - 1} sequences but cu_seqlens_k has {len(bounds[1]) - 1}")
    result = []
    for name, given, values in (("max_seqlen_q", max_seqlen_q, bounds[0]), ("max_seqlen_k", max_seqlen_k, bounds[1])):
        longest = max((b - a for a, b in zip(values, values[1:])), default=0)
        if given is None:
            result.append(longest)
            continue
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < longest:
            raise ArgumentError(f"{name} must be an int >= the longest sequence ({longest}), got {given!r}")
        result.append(int(given))
    return result[0], result[1]


def check_seqused_k(seqused_k: object, cu_seqlens_k: torch.Tensor, device: torch.device) -> list[int]:
    """Validate varlen's ``seqused_k``: integer ``(batch,)`` on q's device, ``0 <=
    seqused_k[b] <= cu_seqlens_k[b + 1] - cu_seqlens_k[b]``; returns it as host ints."""
    bounds = cu_seqlens_k.tolist()
    batch = len(bounds) - 1
    if not isinstance(seqused_k, torch.Tensor):
        raise DTypeError(f"seqused_k must be an int32 tensor (batch,) = ({batch},), got {type(seqused_k).__name__}")
    if seqused_k.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"seqused_k must be an int32 tensor (batch,), got {seqused_k.dtype}")
    if tuple(seqused_k.shape) != (batch,):
        raise ShapeError(f"seqused_k must have shape (batch,) = ({batch},), got {tuple(seqused_k.shape)}")
    if seqused_k.device != device:
        raise DeviceError(f"seqused_k is on {seqused_k.device} but q is on {device}")
    used = seqused_k.tolist()
    for b, n in enumerate(used):
        if not 0 <= n <= bounds[b + 1] - bounds[b]:
            raise ArgumentError(f"seqused_k[{b}] = {n} must be in 0..{bounds[b + 1] - bounds[b]} (sequence {b}'s "
                                "keys in cu_seqlens_k)")
    return used
