"""Dense attention: the call description, autograd, and the twins' registry.

Twins (priority order for ``backend="auto"``):

- ``cpp``: the C++ CPU flash kernel (``csrc/cpu/flash_cpu.cpp``): every CPU
  call (windows, softcap, GQA, any head dim), float32 math, AVX-512 or AVX2.
  The fastest CPU path where it builds (causal fp32 1.75x-2.3x faster than
  SDPA at 1k-32k tokens here), skipped without a compiler or AVX2, and by
  ``auto`` for fewer than 16 queries where SDPA can serve (faster there).
- ``sdpa``: PyTorch's fused kernel, where its semantics can be matched
  exactly (no softcap, no left window; bottom-right causal via a mask when
  ``seqlen_q != seqlen_k``).
- ``triton``: flash-attention forward kernel (GPU; on CPU only under
  ``TRITON_INTERPRET=1``, for verification, never picked by auto there).
- ``eager``: chunked PyTorch; serves every call.

Every twin except plain SDPA returns lse, and gradients of those twins come
from one recomputing backward (:func:`dense_backward_eager`), so a new
forward twin gets autograd for free. Forward and backward are registered as
``torch.library`` custom ops (``longattn::dense_forward``,
``longattn::dense_backward``) so that ``torch.compile`` can trace through
:func:`longattn.attention` without graph breaks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.dispatch import Backend, Registry
from longattn.kernels.support import triton_support
from longattn.errors import ArgumentError
from longattn.kernels.dense.eager import dense_backward_eager, dense_forward_eager
from longattn.kernels.dense.sdpa import lse_op_available, sdpa_attention, sdpa_forward_with_lse

ForwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# SDPA realises bottom-right causality for seqlen_q != seqlen_k with an
# explicit mask; above this many elements the mask costs more than it saves.
SDPA_MAX_MASK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class DenseCall:
    """One validated dense-attention request (shapes in :mod:`longattn.kernels.dense.eager`).

    ``window`` is the effective ``(left, right)`` window, causal folded in.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    window: tuple[int, int]
    softcap: float
    need_lse: bool

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        return self.k.shape[1]


def _forward_twin(name: str) -> ForwardFn:
    """The ``(out, lse)`` forward twin called ``name`` (Triton imported lazily)."""
    if name == "eager":
        return dense_forward_eager
    if name == "sdpa":
        return sdpa_forward_with_lse
    if name == "cpp":
        from longattn.kernels.dense.cpp import flash_forward_cpu

        return flash_forward_cpu
    if name == "triton":
        from longattn.kernels.dense.triton import dense_forward_triton

        return dense_forward_triton
    raise ArgumentError(f"twin must be one of cpp, eager, sdpa, triton, got {name!r}")


# The forward and backward are torch.library custom ops, so torch.compile
# (fullgraph=True included) sees two opaque nodes with known output shapes
# instead of breaking the graph on Python it cannot trace.
@torch.library.custom_op("longattn::dense_forward", mutates_args=())
def dense_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    twin: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the named forward twin."""
    return _forward_twin(twin)(q, k, v, scale=scale, window=(window_left, window_right), softcap=softcap)


@dense_forward_op.register_fake
def _dense_forward_fake(q, k, v, scale, window_left, window_right, softcap, twin):
    batch, seqlen_q, nheads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (batch, nheads, seqlen_q), dtype=torch.float32
    )


@torch.library.custom_op("longattn::dense_backward", mutates_args=())
def dense_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, recomputing probabilities from lse (any forward twin)."""
    return dense_backward_eager(
        dout, dlse, q, k, v, out, lse, scale=scale, window=(window_left, window_right), softcap=softcap
    )


@dense_backward_op.register_fake
def _dense_backward_fake(dout, dlse, q, k, v, out, lse, scale, window_left, window_right, softcap):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, window_left, window_right, softcap, _twin = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.params = (scale, window_left, window_right, softcap)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = dense_backward_op(dout, dlse, q, k, v, out, lse, *ctx.params)
    return dq, dk, dv, None, None, None, None, None


dense_forward_op.register_autograd(_backward, setup_context=_setup_context)


def run_twin(twin: str, call: DenseCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a forward twin; differentiable in q, k, v and through lse.

    Inference outside torch.compile calls the twin directly: the custom op's
    first call imports torch._dynamo (~1.5 s), a cost only worth paying when
    its autograd or tracing support is used.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v))
    if not needs_grad and not torch.compiler.is_compiling():
        return _forward_twin(twin)(call.q, call.k, call.v, scale=call.scale, window=call.window, softcap=call.softcap)
    return dense_forward_op(call.q, call.k, call.v, call.scale, *call.window, call.softcap, twin)


# --- cpp --------------------------------------------------------------------

def _cpp_machine_reasons() -> list[str]:
    from longattn.kernels.dense import cpp as flash_cpu

    # While torch.compile traces, no build or file access: the last probe decides.
    compiling = torch.compiler.is_compiling()
    reason = flash_cpu.probed_unavailable_reason() if compiling else flash_cpu.flash_unavailable_reason()
    return [] if reason is None else [reason]


# Below this many queries the kernel's 48-row blocks are mostly padding and
# SDPA is up to 1.5x faster (at 16 they are even here); decode_attention is
# faster than both for a few queries over a long cache.
CPP_MIN_SEQLEN_Q = 16


def _cpp_auto_reasons(call: DenseCall) -> list[str]:
    if call.seqlen_q < CPP_MIN_SEQLEN_Q and not SDPA.reasons(call):
        return [f"seqlen_q {call.seqlen_q} < {CPP_MIN_SEQLEN_Q}: SDPA serves short query runs faster"]
    return []


CPP = Backend[DenseCall](
    name="cpp",
    description="C++ CPU flash kernel (AVX-512/AVX2; windows, softcap, GQA, any head dim)",
    run=lambda call: run_twin("cpp", call),
    machine_reasons=_cpp_machine_reasons,
    call_reasons=lambda call: [] if call.q.device.type == "cpu" else [f"CPU only, q is on {call.q.device.type}"],
    auto_reasons=lambda call: _cpp_auto_reasons(call),
)


# --- sdpa -------------------------------------------------------------------

def _sdpa_call_reasons(call: DenseCall) -> list[str]:
    reasons = []
    left, right = call.window
    if call.softcap > 0:
        reasons.append("softcap is not supported by SDPA")
    if left >= 0 or right > 0:
        reasons.append(f"window {call.window} is not expressible (SDPA has causal or full only)")
    if call.q.numel() == 0 or call.seqlen_k == 0:
        reasons.append("empty input (a sequence or batch of length 0)")
    if right == 0 and call.seqlen_q != call.seqlen_k and call.seqlen_q * call.seqlen_k > SDPA_MAX_MASK_ELEMENTS:
        reasons.append(
            f"causal with seqlen_q {call.seqlen_q} != seqlen_k {call.seqlen_k} needs an explicit mask "
            f"larger than {SDPA_MAX_MASK_ELEMENTS} elements"
        )
    if call.need_lse:
        if call.q.device.type != "cpu":
            reasons.append(f"SDPA returns no lse on {call.q.device.type}")
        elif not lse_op_available():
            reasons.append("this torch has no lse-returning fused CPU op")
        elif call.q.dtype != torch.float32:
            reasons.append(f"the fused CPU op's lse for {call.q.dtype} is only accurate to ~1e-4")
    return reasons


def _sdpa_run(call: DenseCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    if call.need_lse:
        return run_twin("sdpa", call)
    return sdpa_attention(call.q, call.k, call.v, scale=call.scale, window=call.window), None


SDPA = Backend[DenseCall](
    name="sdpa",
    description="torch.nn.functional.scaled_dot_product_attention (fused CPU/GPU kernels)",
    run=_sdpa_run,
    machine_reasons=lambda: [],
    call_reasons=_sdpa_call_reasons,
)


# --- triton -----------------------------------------------------------------

TRITON = Backend[DenseCall](
    name="triton",
    description="flash-attention forward kernel in Triton (GPU; CPU under TRITON_INTERPRET=1)",
    run=lambda call: run_twin("triton", call),
    machine_reasons=triton_support.machine_reasons,
    call_reasons=lambda call: triton_support.call_reasons(call.q),
    auto_reasons=lambda call: triton_support.auto_reasons(call.q),
)


# --- eager ------------------------------------------------------------------

EAGER = Backend[DenseCall](
    name="eager",
    description="chunked PyTorch, float32 math; serves every call",
    run=lambda call: run_twin("eager", call),
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
)

DENSE_BACKENDS = Registry[DenseCall]("dense attention", [CPP, SDPA, TRITON, EAGER])
