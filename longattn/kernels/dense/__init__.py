"""Dense attention: the call description, autograd, and the twins' registry.

Twins (priority order for ``backend="auto"``):

- ``cpp``: the C++ CPU flash kernel (``csrc/cpu/flash_cpu.cpp``): every CPU
  call (windows, softcap, GQA, any head dim), float32 math, AVX-512 or AVX2.
  The fastest CPU path for long query runs where it builds, skipped without
  a compiler or AVX2, and by ``auto`` where SDPA can serve and is measured
  faster: short query runs, and bfloat16/float16 on CPUs whose oneDNN GEMMs
  are native in that dtype (the rule is data: :data:`AUTO_PREFER_SDPA`).
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
from typing import NamedTuple

import torch

from longattn.dispatch import Backend, Registry
from longattn.kernels.support import cpp_build, triton_support
from longattn.errors import ArgumentError
from longattn.kernels.dense.eager import dense_backward_eager, dense_forward_eager
from longattn.kernels.dense.sdpa import bind_sdpa, lse_op_available, sdpa_attention, sdpa_forward_with_lse

ForwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# SDPA realises bottom-right causality for seqlen_q != seqlen_k with an
# explicit mask; above this many elements the mask costs more than it saves.
SDPA_MAX_MASK_ELEMENTS = 1 << 24


class DenseCall(NamedTuple):
    """One validated dense-attention request (shapes in :mod:`longattn.kernels.dense.eager`).

    ``window`` is the effective ``(left, right)`` window, causal folded in.
    (A NamedTuple, not a frozen dataclass: it is built on every call, and a
    frozen dataclass's ``__init__`` costs ~2 us, as much as SDPA's own call
    overhead at one token.)
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


def call_signature(call: DenseCall):
    """What every pure twin's reasons read from ``call`` (the registry's memo
    key), or None while torch.compile traces (the probe state may still
    change then, and guards on a memo would be pointless).

    Keep in step with ``_cpp_*_reasons``, ``_sdpa_call_reasons`` and
    :data:`AUTO_PREFER_SDPA`: tests/test_attention.py checks memoised and
    fresh selections agree over a grid of calls.
    """
    q = call.q
    return signature_of(q.shape, call.k.shape, q.dtype, q.device, call.window, call.softcap, call.need_lse)


def signature_of(qs, ks, dtype, device, window, softcap, need_lse, compiling=None):
    """:func:`call_signature` from values a caller already holds (``qs``/``ks``:
    q's and k's shapes; ``compiling``: ``torch.compiler.is_compiling()`` if
    the caller asked already)."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return None
    seqlen_q, seqlen_k = qs[1], ks[1]
    return (
        device, dtype, qs, seqlen_k == seqlen_q, seqlen_k if seqlen_k <= _AUTO_MAX_SEQLEN_K else -1,
        seqlen_q * seqlen_k > SDPA_MAX_MASK_ELEMENTS, window, softcap > 0, need_lse,
    )


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


# --- auto: which of cpp and sdpa is faster, by dtype and CPU -------------------

@dataclass(frozen=True)
class PreferSdpa:
    """One row of :data:`AUTO_PREFER_SDPA`: calls on which ``backend="auto"``
    skips the C++ kernel for SDPA (only when SDPA can serve the call).

    A row matches a call when its dtype is in ``dtypes``, ``min_seqlen_q <=
    seqlen_q <= max_seqlen_q`` and ``seqlen_k <= max_seqlen_k`` (None: no
    bound), and the machine has one of ``cpu_flags`` (``/proc/cpuinfo``
    names; empty: any CPU) and none of ``unless_cpu_flags`` (which name the
    features that give the kernel a faster engine than the row measured),
    and, if ``needs_onednn``, a torch built with oneDNN
    (whose bf16/fp16 GEMMs are what makes SDPA fast in half precision).
    ``why`` is the measurement behind the row: the auto reason that errors
    and ``longattn doctor`` show.
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    why: str
    cpu_flags: tuple[str, ...] = ()
    unless_cpu_flags: tuple[str, ...] = ()
    min_seqlen_q: int = 0
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    needs_onednn: bool = False

    def applies_here(self) -> bool:
        """Whether this machine has what the row asks of the CPU and torch
        (machine facts read at import: this runs inside compiled code too)."""
        if self.needs_onednn and not _HAS_ONEDNN:
            return False
        if not self.cpu_flags and not self.unless_cpu_flags:
            return True
        have = cpu_flags()
        if any(flag in have for flag in self.unless_cpu_flags):
            return False
        return not self.cpu_flags or any(flag in have for flag in self.cpu_flags)

    def matches(self, dtype: torch.dtype, seqlen_q: int, seqlen_k: int) -> bool:
        return (
            dtype in self.dtypes
            and self.min_seqlen_q <= seqlen_q
            and (self.max_seqlen_q is None or seqlen_q <= self.max_seqlen_q)
            and (self.max_seqlen_k is None or seqlen_k <= self.max_seqlen_k)
            and self.applies_here()
        )


# The C++ kernel runs blocks of 48 query rows, so it wins on long query runs
# and loses on short ones (mostly padding). Its arithmetic depends on the
# CPU: bfloat16 runs natively with AVX512-BF16 dot products (the "bf16-dot"
# engine, csrc/cpu/flash_cpu.cpp), everything else in float32 (half-precision
# inputs widened, a copy). SDPA's bf16/fp16 speed depends on the CPU too:
# oneDNN's GEMMs are native with AMX (and fp16 with AVX512-FP16/AMX-FP16),
# emulated or scalar otherwise. Measured (causal, D=128, batch 1, H=32/8
# (GQA) and H=8/8, best of 7 with one thread, so other load on the machine
# does not skew it; the ratio is cpp time / SDPA time, > 1 means SDPA is faster):
#
# AMD EPYC Zen 4 (flags avx512f, avx512_bf16; no AMX, no avx512_fp16), torch 2.13:
#   seqlen_q = seqlen_k     1     4     8    16    32    64    96   128  1024  4096
#   float32              6.75  3.71  2.28  1.93  1.34  1.09  0.71  0.72  0.73  0.90
#   bfloat16 (bf16-dot)  5.4   1.9   1.5   1.3   0.92  0.74  0.52  0.49  0.42     -
#   bfloat16 (fp32 math) 4.94  2.19  1.68  1.75  1.45  1.17  1.27  0.79  0.87  0.92
#   float16              2.22  1.19  0.80  0.67  0.63  0.47     -  0.33  0.61  0.62
#   (H=8/8 alike: bf16-dot 5.1 2.1 1.75 1.57 1.09 0.81 0.54 0.52 0.43.)
#   Queries over 4096 keys (1/16/64/128): float32 3.9/1.48/1.00/0.77;
#   bfloat16 bf16-dot 0.34/0.99/0.63/0.50 (fp32 math 0.53-0.86/1.63/1.06/0.72);
#   float16 0.58-0.83 at one query.
#   So here: SDPA up to 64 queries in float32; in bfloat16 up to 16 queries
#   (32 with fp32 math: 96), the C++ kernel above; float16 almost always the
#   kernel (SDPA's fp16 GEMM is not native). (Wall-clock runs with 2 threads
#   on a busy 2-core machine can show SDPA ahead: each parallel region waits
#   for the second core; minima agree with the table.)
# Intel Xeon with AMX (flags amx_bf16, amx_tile, avx512_fp16; 2 cores),
#   torch 2.13, Dec 1 2026, H=8, medians of interleaved rounds with 2
#   threads (`longattn bench auto`, `longattn bench dense-bf16`; cpp time /
#   SDPA time):
#   bfloat16 (AMX engine)  1k 1.22-1.29, 4k 1.27-1.56, 8k 1.35, 32k 2.00:
#     SDPA (oneDNN's AMX GEMMs) faster at every length.
#   float32                1k 0.91-0.93, 2k 1.01, 3k 0.88, 4k 1.12-1.17, 8k 1.03:
#     SDPA ahead from 4k (its GEMMs hold up as K/V leave the L2; the
#     kernel's fp32 engine runs at ~47% of this CPU's FMA peak here, ~78%
#     on the Zen 4).
#   float16 (fp32 engine)  1k 0.74-0.94, 4k 1.04-1.15: SDPA's fp16 (native
#     with AVX512-FP16) ahead from 4k only.
#   (Before the bf16 engines: cpp with float32 math 491-504 ms vs SDPA
#   128-157 ms at bf16 4k.) These rows key on amx_tile / avx512_fp16 as the
#   mark of this CPU generation: no other flag tells it apart.
AUTO_PREFER_SDPA: tuple[PreferSdpa, ...] = (
    PreferSdpa(
        "fp32-short", (torch.float32,), max_seqlen_q=64,
        why="float32 with at most 64 queries: the kernel's 48-row blocks are mostly padding; "
        "SDPA measured 1.1-6.8x faster (EPYC, 1-64 queries)",
    ),
    PreferSdpa(
        "bf16-short", (torch.bfloat16,), min_seqlen_q=2, max_seqlen_q=96, unless_cpu_flags=("avx512_bf16",),
        why="bfloat16 with 2-96 queries and the kernel in float32 math (no AVX512-BF16): "
        "SDPA measured 1.2-3x faster (EPYC)",
    ),
    PreferSdpa(
        "bf16-tiny", (torch.bfloat16,), max_seqlen_q=96, max_seqlen_k=96, unless_cpu_flags=("avx512_bf16",),
        why="bfloat16 with at most 96 queries and keys and the kernel in float32 math (no AVX512-BF16): "
        "SDPA measured 1.2-4.9x faster (EPYC)",
    ),
    PreferSdpa(
        "bf16-dot-short", (torch.bfloat16,), min_seqlen_q=2, max_seqlen_q=16, cpu_flags=("avx512_bf16",),
        why="bfloat16 with 2-16 queries (the kernel's bf16 dot-product engine): SDPA measured 1.3-2.1x faster "
        "on short squares, even at 16 queries over 4k keys (Zen 4 EPYC)",
    ),
    PreferSdpa(
        "bf16-dot-tiny", (torch.bfloat16,), max_seqlen_q=16, max_seqlen_k=16, cpu_flags=("avx512_bf16",),
        why="bfloat16 with at most 16 queries and keys (the kernel's bf16 dot-product engine): "
        "SDPA measured 1.3-5.4x faster (Zen 4 EPYC)",
    ),
    PreferSdpa(
        "fp16-tiny", (torch.float16,), max_seqlen_q=4, max_seqlen_k=4,
        why="float16 with at most 4 queries and keys: SDPA measured 1.2-2.2x faster (EPYC; "
        "from 8 tokens its non-native fp16 GEMM makes it slower)",
    ),
    PreferSdpa(
        "bf16-amx", (torch.bfloat16,), cpu_flags=("amx_bf16", "amx_tile"), needs_onednn=True,
        why="bfloat16 on a CPU with AMX: SDPA's oneDNN AMX GEMMs measured 1.2-2.0x faster than the "
        "kernel's AMX engine (Xeon, causal 1k-32k)",
    ),
    PreferSdpa(
        "fp32-amx-xeon-long", (torch.float32,), min_seqlen_q=4096, cpu_flags=("amx_tile",),
        why="float32 with 4096+ queries on an AMX-generation Xeon: SDPA measured 1.03-1.17x faster "
        "(causal 4k-8k; the kernel is ahead up to 3k)",
    ),
    PreferSdpa(
        "fp16-native", (torch.float16,), min_seqlen_q=4096, cpu_flags=("amx_fp16", "avx512_fp16"),
        needs_onednn=True,
        why="float16 with 4096+ queries on a CPU with AVX512-FP16/AMX-FP16 (SDPA's fp16 GEMMs native): "
        "SDPA measured 1.04-1.15x faster at 4k causal; the kernel 1.06-1.36x faster at 1k (Xeon with AMX)",
    ),
)

# The largest seqlen_k any row bounds: the memo key keeps seqlen_k exactly up
# to here (every row's bound is then decided by the key) and lumps longer ones.
_AUTO_MAX_SEQLEN_K = max(r.max_seqlen_k for r in AUTO_PREFER_SDPA if r.max_seqlen_k is not None)


def _read_cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as ``/proc/cpuinfo`` names them (``avx512_bf16``,
    ``amx_bf16``...), less what ``$LONGATTN_MAX_CPU_ISA`` hides
    (:func:`longattn.kernels.support.cpp_build.cpu_features`); empty where
    there is no such file (then no row of :data:`AUTO_PREFER_SDPA` that asks
    for a flag applies: the C++ kernel stays first). A machine fact, read
    once, at import (see :func:`cpu_flags`)."""
    flags = set(cpp_build.cpu_features())
    amx = getattr(getattr(torch._C, "_cpu", None), "_is_amx_tile_supported", None)
    if amx is not None and amx():  # older torch builds say it directly
        flags |= cpp_build.cap_features(frozenset({"amx_tile"}), cpp_build.isa_cap())
    return frozenset(flags)


_CPU_FLAGS = _read_cpu_flags()
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (:func:`_read_cpu_flags`), read once at import:
    auto's rules consult them inside ``torch.compile``d code, which must not
    trace a file read."""
    return _CPU_FLAGS


def auto_rules_here() -> list[str]:
    """The :data:`AUTO_PREFER_SDPA` rows that apply on this machine, one line each."""
    return [f"{rule.name}: SDPA over cpp for {rule.why}" for rule in AUTO_PREFER_SDPA if rule.applies_here()]


def _cpp_auto_reasons(call: DenseCall) -> list[str]:
    dtype, seqlen_q, seqlen_k = call.q.dtype, call.q.shape[1], call.k.shape[1]
    for rule in AUTO_PREFER_SDPA:
        if rule.matches(dtype, seqlen_q, seqlen_k) and not SDPA.reasons(call):
            return [f"SDPA preferred (auto rule {rule.name!r}): {rule.why}"]
    return []


CPP = Backend[DenseCall](
    name="cpp",
    description="C++ CPU flash kernel (AVX-512/AVX2; native bf16 with AVX512-BF16 or AMX; windows, softcap, GQA, "
    "any head dim)",
    run=lambda call: run_twin("cpp", call),
    machine_reasons=_cpp_machine_reasons,
    call_reasons=lambda call: [] if call.q.device.type == "cpu" else [f"CPU only, q is on {call.q.device.type}"],
    auto_reasons=_cpp_auto_reasons,
    pure=True,  # the build probe is made once; while compiling nothing is memoised
)


# --- sdpa -------------------------------------------------------------------

def _sdpa_call_reasons(call: DenseCall) -> list[str]:
    reasons = []
    left, right = call.window
    seqlen_q, seqlen_k = call.q.shape[1], call.k.shape[1]
    if call.softcap > 0:
        reasons.append("softcap is not supported by SDPA")
    if left >= 0 or right > 0:
        reasons.append(f"window {call.window} is not expressible (SDPA has causal or full only)")
    if call.q.numel() == 0 or seqlen_k == 0:
        reasons.append("empty input (a sequence or batch of length 0)")
    if right == 0 and 1 != seqlen_q != seqlen_k and seqlen_q * seqlen_k > SDPA_MAX_MASK_ELEMENTS:
        reasons.append(
            f"causal with seqlen_q {seqlen_q} != seqlen_k {seqlen_k} needs an explicit mask "
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
    pure=True,
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
    pure=True,
)

# The Triton twin's reasons read TRITON_INTERPRET at call time, so it is not
# pure: selections that consult it (forced "triton", or auto walking past it
# to eager) are never memoised.
DENSE_BACKENDS = Registry[DenseCall](
    "dense attention", [CPP, SDPA, TRITON, EAGER], signature=call_signature, auto_rules=auto_rules_here
)


def bind_out_only(twin: Backend[DenseCall], call: DenseCall) -> Callable | None:
    """``fn(q, k, v) -> out`` running ``twin`` for calls like ``call`` (same
    shapes, dtype, device and options, no lse) with every decision already
    made, or None where the twin has no such shortcut. SDPA has one: the
    per-token calls of a model are where its few microseconds of wrapper
    matter (``longattn bench overhead``)."""
    if twin is SDPA and not call.need_lse:
        q, k = call.q, call.k
        return bind_sdpa(q.shape[1], k.shape[1], q.shape[2] != k.shape[2], scale=call.scale, window=call.window)
    return None
