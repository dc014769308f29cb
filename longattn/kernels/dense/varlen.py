"""Dense attention over packed sequences (varlen, flash-attn's
``flash_attn_varlen_func`` layout): the call type, autograd and the twins' registry.

``q (total_q, nheads, headdim)``, ``k, v (total_k, nheads_k, headdim)``,
``cu_seqlens_q/k (batch + 1,)`` int32 prefix sums: sequence ``b`` is rows
``cu[b]:cu[b + 1]`` of each, aligned bottom-right on its own (query ``i`` of
``b`` sits at key position ``i + Sk_b - Sq_b``); windows and softcap as in
dense attention. Returns ``out`` like q and ``lse (nheads, total_q)`` float32.

Twins (priority order for ``backend="auto"``):

- ``cpp``: the C++ flash kernel, sequences scheduled as work items inside
  one call (no loop over sequences, no padding to the longest);
- ``triton``: the flash forward kernel with a grid over (query block, head,
  sequence) (GPU; CPU only under ``TRITON_INTERPRET=1``);
- ``eager``: the dense eager twin on each sequence (the specification).

Gradients of every twin come from one recomputing backward
(:func:`~longattn.kernels.dense.eager.dense_varlen_backward_eager`);
forward and backward are ``torch.library`` custom ops, like dense attention's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from longattn.dispatch import Backend, Registry
from longattn.kernels.dense.eager import dense_varlen_backward_eager, dense_varlen_forward_eager
from longattn.kernels.support import triton_support


class DenseVarlenCall(NamedTuple):
    """One validated varlen request (``window`` effective, causal folded in)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32, contiguous, on q's device
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    window: tuple[int, int]
    softcap: float


def _forward_twin(name: str):
    if name == "eager":
        return dense_varlen_forward_eager
    if name == "cpp":
        from longattn.kernels.dense.cpp import flash_varlen_forward_cpu

        return flash_varlen_forward_cpu
    if name == "triton":
        from longattn.kernels.dense.triton import dense_varlen_forward_triton

        return dense_varlen_forward_triton
    raise ValueError(f"no varlen twin {name!r}")


@torch.library.custom_op("longattn::dense_varlen_forward", mutates_args=())
def dense_varlen_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int, softcap: float,
    twin: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the named varlen forward twin."""
    return _forward_twin(twin)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
                               window=(window_left, window_right), softcap=softcap)


@dense_varlen_forward_op.register_fake
def _forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
                  softcap, twin):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("longattn::dense_varlen_backward", mutates_args=())
def dense_varlen_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float,
    window_left: int, window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, recomputing probabilities from lse per sequence."""
    return dense_varlen_backward_eager(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale=scale,
                                       window=(window_left, window_right), softcap=softcap)


@dense_varlen_backward_op.register_fake
def _backward_fake(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right,
                   softcap):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _mq, _mk, scale, left, right, softcap, _twin = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output)
    ctx.params = (scale, left, right, softcap)


def _backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    dq, dk, dv = dense_varlen_backward_op(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


dense_varlen_forward_op.register_autograd(_backward, setup_context=_setup_context)


def run_varlen_twin(twin: str, call: DenseVarlenCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a varlen forward twin; differentiable in q, k, v (and through lse).
    Inference outside torch.compile calls the twin directly (as dense does)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v))
    if not needs_grad and not torch.compiler.is_compiling():
        return _forward_twin(twin)(call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q,
                                   call.max_seqlen_k, scale=call.scale, window=call.window, softcap=call.softcap)
    return dense_varlen_forward_op(call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q,
                                   call.max_seqlen_k, call.scale, *call.window, call.softcap, twin)


def _cpp_machine_reasons() -> list[str]:
    from longattn.kernels.dense import cpp

    if not hasattr(cpp, "flash_varlen_forward_cpu"):
        return ["this build of longattn has no C++ varlen entry"]
    compiling = torch.compiler.is_compiling()
    reason = cpp.probed_unavailable_reason() if compiling else cpp.flash_unavailable_reason()
    return [] if reason is None else [reason]


CPP = Backend[DenseVarlenCall](
    name="cpp",
    description="C++ CPU flash kernel, packed sequences as work items (no padding, no loop over sequences)",
    run=lambda call: run_varlen_twin("cpp", call),
    machine_reasons=_cpp_machine_reasons,
    call_reasons=lambda call: [] if call.q.device.type == "cpu" else [f"CPU only, q is on {call.q.device.type}"],
)


def _triton_machine_reasons() -> list[str]:
    reasons = triton_support.machine_reasons()
    if not reasons:
        from longattn.kernels.dense import triton as dense_triton

        if not hasattr(dense_triton, "dense_varlen_forward_triton"):
            reasons = ["this build of longattn has no Triton varlen kernel"]
    return reasons


TRITON = Backend[DenseVarlenCall](
    name="triton",
    description="flash-attention forward in Triton, grid over (query block, head, sequence)",
    run=lambda call: run_varlen_twin("triton", call),
    machine_reasons=_triton_machine_reasons,
    call_reasons=lambda call: triton_support.call_reasons(call.q),
    auto_reasons=lambda call: triton_support.auto_reasons(call.q),
)

EAGER = Backend[DenseVarlenCall](
    name="eager",
    description="the dense eager twin on each packed sequence (the specification)",
    run=lambda call: run_varlen_twin("eager", call),
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
)

DENSE_VARLEN_BACKENDS = Registry[DenseVarlenCall]("dense attention over packed sequences (varlen)",
                                                  [CPP, TRITON, EAGER])
