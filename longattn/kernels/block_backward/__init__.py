"""Block backward: the gradient of attention restricted to one (query block,
key block) pair, given the FINAL ``(out, lse)`` of the query rows over every
key. Sequence-parallel backward passes (ring attention) call it once per
block in hand and add the results up; shapes and math:
:mod:`longattn.kernels.block_backward.eager`.

Twins (priority order for ``backend="auto"``):

- ``triton``: flash-attention-2's backward kernels (dk/dv per key block over
  the query group, dq in a second atomics-free pass; deterministic). GPU, or
  CPU under ``TRITON_INTERPRET=1`` for verification (never picked by auto there).
- ``sdpa``: PyTorch's fused CPU flash-attention backward handed the final
  out and lse (float32 on a CPU, no soft-cap/window/dlse, causal only on a
  square pair: every piece of the rings without a window); ~1.7x the eager
  twin's speed.
- ``eager``: PyTorch, float32 math, chunked over query rows (the
  specification; serves every call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.dispatch import Backend, Registry
from longattn.errors import ArgumentError, DeviceError, ShapeError
from longattn.kernels.block_backward.eager import block_backward_eager
from longattn.kernels.block_backward.sdpa import block_backward_sdpa, op_available
from longattn.kernels.block_backward.sdpa import call_reasons as sdpa_call_reasons
from longattn.kernels.support import triton_support
from longattn.validation import (
    check_flag,
    check_qkv,
    check_softcap,
    check_softmax_scale,
    check_tensor,
    check_window,
)


@dataclass
class BlockBackwardCall:
    """One validated block-backward request."""

    dout: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    dlse: torch.Tensor | None
    scale: float
    causal: bool
    softcap: float
    window: tuple[int, int] = (-1, -1)  # as validated: causal folded in by the kernels


def _run_triton(c: BlockBackwardCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Imported on first use: importing triton costs seconds.
    from longattn.kernels.block_backward.triton import block_backward_triton

    return block_backward_triton(c.dout, c.q, c.k, c.v, c.out, c.lse, scale=c.scale, causal=c.causal,
                                 softcap=c.softcap, dlse=c.dlse)


def _window_reasons(call: BlockBackwardCall) -> list[str]:
    if call.window != (-1, -1):
        return [f"no sliding window in the Triton twin (window_size={call.window})"]
    return []


# Its reasons read TRITON_INTERPRET at call time: not pure (never memoised).
TRITON = Backend[BlockBackwardCall](
    name="triton",
    description="flash-attention-2 backward kernels in Triton, no atomics (GPU; CPU under TRITON_INTERPRET=1)",
    run=_run_triton,
    machine_reasons=triton_support.machine_reasons,
    call_reasons=lambda call: triton_support.call_reasons(call.q) + _window_reasons(call),
    auto_reasons=lambda call: triton_support.auto_reasons(call.q),
)

SDPA = Backend[BlockBackwardCall](
    name="sdpa",
    description="PyTorch's fused CPU flash-attention backward given the final out and lse (float32, no "
                "soft-cap/window/dlse)",
    run=lambda c: block_backward_sdpa(c.dout, c.q, c.k, c.v, c.out, c.lse, scale=c.scale, causal=c.causal),
    machine_reasons=lambda: [] if op_available() else ["this torch has no aten::_scaled_dot_product_flash_"
                                                       "attention_for_cpu_backward"],
    call_reasons=lambda c: sdpa_call_reasons(c.q, c.k, c.causal, c.softcap, c.window, c.dlse),
    pure=True,
)

EAGER = Backend[BlockBackwardCall](
    name="eager",
    description="PyTorch recompute of the block's probabilities from the final lse, float32 math; serves every call",
    run=lambda c: block_backward_eager(c.dout, c.q, c.k, c.v, c.out, c.lse, scale=c.scale, causal=c.causal,
                                       softcap=c.softcap, dlse=c.dlse, window_size=c.window),
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
    pure=True,
)

BLOCK_BACKWARD_BACKENDS = Registry[BlockBackwardCall](
    "block backward (attention gradient of one block pair given the final out and lse)", [TRITON, SDPA, EAGER],
    # everything a pure twin's reasons read: the sdpa twin's depend on more than device and dtype
    signature=lambda call: (call.q.device, call.q.dtype, call.causal and call.q.shape[1] != call.k.shape[1],
                            call.softcap > 0, call.window, call.dlse is None),
)


def block_backward(
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
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient contribution of the key block ``k, v`` to the rows ``q``.

    Args:
        dout: ``(batch, seqlen_q, nheads, headdim)``, gradient of the output rows.
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k,
            nheads_k, headdim)`` with ``nheads % nheads_k == 0``; one
            float dtype and device for q, k, v, dout, out.
        out: the rows' FINAL output over all keys (not just this block), like q.
        lse: ``(batch, nheads, seqlen_q)`` float32, the rows' final natural-log
            lse over all keys; ``-inf`` = the row saw no key (contributes 0).
        scale: softmax scale applied to ``q . k``.
        causal: mask the pair bottom-right aligned (query ``i`` sees key ``j``
            iff ``j <= i + seqlen_k - seqlen_q``), as :func:`longattn.attention`.
        softcap: > 0 soft-caps scores to ``softcap * tanh(s / softcap)``.
        dlse: optional ``(batch, nheads, seqlen_q)`` gradient flowing into lse.
        window_size: ``(left, right)`` sliding window within the pair, -1 =
            unbounded, bottom-right aligned like ``causal`` (which it combines
            with: causal sets right = 0); the Triton twin has none (eager serves it).
        backend: ``"auto"`` or a twin name (``BLOCK_BACKWARD_BACKENDS.names``).

    Returns:
        ``(dq, dk, dv)`` float32, shaped like q, k, v. Summed over a partition
        of the keys into blocks they equal the full attention gradient.

    Raises:
        ShapeError / DTypeError / DeviceError / ArgumentError naming the argument.
    """
    check_qkv(q, k, v)
    for name, t in (("dout", dout), ("out", out)):
        check_tensor(name, t, 4, "(batch, seqlen_q, nheads, headdim)")
        if t.shape != q.shape:
            raise ShapeError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}")
    want = (q.shape[0], q.shape[2], q.shape[1])
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is None and name == "dlse":
            continue
        check_tensor(name, t, 3, "(batch, nheads, seqlen_q)", (torch.float32,))
        if tuple(t.shape) != want:
            raise ShapeError(f"{name} must be (batch, nheads, seqlen_q) = {want}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}")
    if scale is None or isinstance(scale, torch.Tensor):  # None would silently mean headdim ** -0.5 below
        raise ArgumentError(f"scale must be a finite number, got {type(scale).__name__}")
    is_causal = check_flag("causal", causal)
    call = BlockBackwardCall(dout, q, k, v, out, lse, dlse, check_softmax_scale(scale, q.shape[3]), is_causal,
                             check_softcap(softcap), check_window(window_size, is_causal))
    return BLOCK_BACKWARD_BACKENDS.select(call, backend).run(call)


__all__ = ["BLOCK_BACKWARD_BACKENDS", "BlockBackwardCall", "block_backward"]
