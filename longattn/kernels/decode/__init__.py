"""Decode attention: the call description and the twins' registry.

Twins (priority order for ``backend="auto"``):

- ``cpp``: C++/OpenMP stream-K kernel (``csrc/cpu``), built on first use.
- ``triton``: stream-K kernel (GPU; on CPU only under ``TRITON_INTERPRET=1``,
  for verification, never picked by auto there).
- ``cuda``: the same stream-K algorithm in CUDA C++, compiled at first use
  with NVRTC through cupy. Compile-checked with nvcc but not yet run on a GPU
  by this project's tests, so auto does not pick it (force ``backend="cuda"``).
- ``eager``: PyTorch, one piece per sequence; serves every call.

Every twin takes the same arguments (see :mod:`longattn.kernels.decode.eager`)
and returns ``(out, lse)``; the GPU twins import lazily (triton and cupy are
optional).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.kernels.decode.cache import CacheView
from longattn.kernels.decode.plan import DecodePlan, plan_from_spec, plan_spec
from longattn.dispatch import Backend, Registry
from longattn.kernels.support import triton_support
from longattn.kernels.decode.cpp import cpu_unavailable_reason, decode_forward_cpu
from longattn.kernels.decode.cuda import MAX_HEADDIM as CUDA_MAX_HEADDIM  # imports no cupy
from longattn.kernels.decode.cuda import cuda_unavailable_reason, decode_forward_cuda
from longattn.kernels.decode.eager import decode_forward_eager


@dataclass  # not frozen: built on every decode call, and a frozen __init__ costs ~1 us more
class DecodeCall:
    """One validated decode request; ``window`` has causal folded in.
    ``plan`` is the caller's stream-K plan (None: the twin plans for itself)."""

    q: torch.Tensor
    cache: CacheView
    scale: float
    window: tuple[int, int]
    softcap: float
    plan: DecodePlan | None

    def args(self) -> tuple:
        return (self.q, self.cache.k_cache, self.cache.v_cache, self.cache.seqlens, self.cache.block_table)

    def kwargs(self) -> dict:
        return {"scale": self.scale, "window": self.window, "softcap": self.softcap}


def _cpu_call_reasons(call: DecodeCall) -> list[str]:
    return [] if call.q.device.type == "cpu" else [f"tensors are on {call.q.device.type}; this twin runs on cpu"]


CPP = Backend[DecodeCall](
    name="cpp",
    description="C++/OpenMP stream-K kernel (csrc/cpu), fp16/bf16 widened to fp32 in registers",
    run=lambda call: decode_forward_cpu(*call.args(), **call.kwargs(), plan=call.plan),
    machine_reasons=lambda: [r] if (r := cpu_unavailable_reason()) else [],
    call_reasons=_cpu_call_reasons,
    pure=True,  # the build probe is made once per process
)



def _triton_run(call: DecodeCall) -> tuple[torch.Tensor, torch.Tensor]:
    from longattn.kernels.decode.triton import decode_forward_triton

    return decode_forward_triton(*call.args(), **call.kwargs(), plan=call.plan)


TRITON = Backend[DecodeCall](
    name="triton",
    description="stream-K (LeanAttention) decode kernel in Triton (GPU; CPU under TRITON_INTERPRET=1)",
    run=_triton_run,
    machine_reasons=triton_support.machine_reasons,
    call_reasons=lambda call: triton_support.call_reasons(call.q),
    auto_reasons=lambda call: triton_support.auto_reasons(call.q),
)


# --- cuda -------------------------------------------------------------------

def _cuda_machine_reasons() -> list[str]:
    reason = cuda_unavailable_reason()
    return [reason] if reason else []


def _cuda_call_reasons(call: DecodeCall) -> list[str]:
    reasons = []
    if call.q.device.type != "cuda":
        reasons.append(f"tensors are on {call.q.device.type}; the CUDA twin needs cuda tensors")
    if call.q.shape[-1] > CUDA_MAX_HEADDIM:
        reasons.append(f"headdim {call.q.shape[-1]} > {CUDA_MAX_HEADDIM}")
    return reasons


def _cuda_run(call: DecodeCall) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_forward_cuda(*call.args(), **call.kwargs(), plan=call.plan)


CUDA = Backend[DecodeCall](
    name="cuda",
    description="stream-K decode kernel in CUDA C++ (csrc/cuda/decode_streamk.cu, NVRTC via cupy)",
    run=_cuda_run,
    machine_reasons=_cuda_machine_reasons,
    call_reasons=_cuda_call_reasons,
    auto_reasons=lambda call: ["compile-checked with nvcc but not yet verified on a GPU; force backend='cuda' to use it"],
    pure=True,  # cupy/NVRTC availability is probed once per process
)


# --- eager ------------------------------------------------------------------

EAGER = Backend[DecodeCall](
    name="eager",
    description="PyTorch, one piece per sequence, float32 math; serves every call",
    run=lambda call: decode_forward_eager(*call.args(), **call.kwargs(), plan=call.plan),
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
    pure=True,
)


def call_signature(call: DecodeCall):
    """What every pure twin's reasons read from ``call`` (the registry's memo
    key): the device, dtype and headdim of q; None while torch.compile traces
    (selection then happens when the traced op runs). Keep in step with
    ``_cpu_call_reasons`` and ``_cuda_call_reasons``."""
    if torch.compiler.is_compiling():
        return None
    q = call.q
    return (q.device, q.dtype, q.shape[-1])


# The Triton twin's reasons read TRITON_INTERPRET at call time, so it is not
# pure: selections that consult it (forced "triton", or auto walking past it)
# are never memoised. On a CPU, auto stops at cpp (pure) before reaching it.
DECODE_BACKENDS = Registry[DecodeCall]("decode attention", [CPP, TRITON, CUDA, EAGER], signature=call_signature)


def decode_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    *,
    scale: float,
    window: tuple[int, int] = (-1, 0),
    softcap: float = 0.0,
    plan: DecodePlan | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode primitive for callers in the methods layer (caches, states)
    that validated their own inputs and wrote their own new keys:
    ``q (batch, seqlen_q, nheads, headdim)`` over the first ``seqlens[b]``
    (int32, on q's device) keys of each sequence of a contiguous
    ``(batch, capacity, nheads_k, headdim)`` or paged cache; ``window`` is
    effective (causal folded in, bottom-right: query ``i`` sits at key
    position ``seqlens[b] - seqlen_q + i``). Returns ``(out, lse)``.

    Traceable by ``torch.compile(fullgraph=True)``: while tracing it is the
    custom op ``longattn::decode_forward`` (the twins read host data and
    load kernels), which runs this same function."""
    if torch.compiler.is_compiling():
        return decode_forward_op(q, k_cache, v_cache, seqlens, block_table, scale, window[0], window[1], softcap,
                                 plan_spec(plan), backend)
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    call = DecodeCall(q, CacheView(k_cache, v_cache, block_table, seqlens, capacity), scale, window, softcap, plan)
    return DECODE_BACKENDS.select(call, backend).run(call)


@torch.library.custom_op("longattn::decode_forward", mutates_args=())
def decode_forward_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    plan_spec: list[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_forward` as an op (the plan as :func:`~longattn.kernels.decode.plan.plan_spec`
    ints): ``(out, lse)``, out like q, lse ``(batch, nheads, seqlen_q)`` float32."""
    out, lse = decode_forward(q, k_cache, v_cache, seqlens, block_table, scale=scale,
                              window=(window_left, window_right), softcap=softcap,
                              plan=plan_from_spec(tuple(plan_spec)), backend=backend)
    return out.contiguous(), lse.contiguous()


@decode_forward_op.register_fake
def _decode_forward_fake(q, k_cache, v_cache, seqlens, block_table, scale, window_left, window_right, softcap,
                         plan_spec, backend):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)
