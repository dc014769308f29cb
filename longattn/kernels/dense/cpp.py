"""Flash-attention forward, C++ CPU twin (``csrc/cpu/flash_cpu.cpp``).

Float32 math with AVX-512 (or AVX2) micro-kernels; windows ``(left, right)``
in flash-attn's convention (causal is ``right = 0``), attention sinks (keys
``j < sink`` visible whatever the left window: StreamingLLM's Lambda mask),
softcap and GQA. It visits only the key tiles a block of 48 queries can see,
so a window costs ``seqlen * (sink + window)``. Built on first use like the
other C++ kernels; :func:`flash_unavailable_reason` says why it cannot run
(no compiler, no AVX2), and the callers then use PyTorch.

Inputs of any float dtype are computed in float32 (half-precision inputs are
widened once, a copy); head dims that are not a multiple of 16 are
zero-padded (exact: zeros add nothing to q.k, and padded value columns are
dropped). Shapes as :func:`longattn.attention`: ``q (batch, seqlen_q, nheads,
headdim)``, ``k, v (batch, seqlen_k, nheads_k, headdim)``; query ``i`` sits at
key position ``i + seqlen_k - seqlen_q``. Returns ``out`` like q and lse
``(batch, nheads, seqlen_q)`` float32, natural log; rows that see no key get
0 and -inf.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from longattn.kernels.support.cpp_build import BuildError, kernel_threads, load_library

SOURCE = "flash_cpu.cpp"
# Head dims are padded to a multiple of this (AVX-512's 16 floats; AVX2's 8 divides it).
HEADDIM_MULTIPLE = 16
# Key spans from this many keys up are read from head-major copies of K/V
# when each kv head serves at least this many query rows (below either, the
# copy costs more than the ~12% it saves).
HEAD_MAJOR_MIN_KEYS = 8192
HEAD_MAJOR_MIN_ROWS = 4096

_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_ARGTYPES = [
    _PTR, _I64, _I64, _I64,  # q, strides (batch, seq, head)
    _PTR, _I64, _I64, _I64,  # k
    _PTR, _I64, _I64, _I64,  # v
    _PTR, _I64, _I64, _I64, _PTR,  # out, its strides, lse
    _INT, _INT, _INT, _INT, _INT, _INT,  # batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim
    _INT, _INT, _INT, _INT, _FLOAT, _FLOAT,  # window left/right, sink, causal, scale, softcap
    _PTR, _INT, _INT, _INT,  # listed key positions, their count per query block, block_q, threads
]


@functools.lru_cache(maxsize=None)
def _kernel(build_flags: tuple[str, ...] = ()):
    lib = load_library(SOURCE, build_flags)
    if lib.longattn_flash_cpu_lanes() == 0:
        raise BuildError("the C++ flash kernel needs AVX2 and FMA, which this CPU (or build) lacks")
    fn = lib.longattn_flash_cpu
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


# build flags -> None (usable) or why not; filled by the first probe, so a
# failed build is not retried on every call.
_PROBED: dict[tuple[str, ...], str | None] = {}
NOT_PROBED = "not probed yet (the first longattn call outside torch.compile builds and probes it)"


def flash_unavailable_reason(build_flags: tuple[str, ...] = ()) -> str | None:
    """None when the kernel builds and runs here, else why not (builds on first use)."""
    if build_flags not in _PROBED:
        try:
            _kernel(build_flags)
            _PROBED[build_flags] = None
        except BuildError as exc:
            _PROBED[build_flags] = str(exc)
    return _PROBED[build_flags]


def probed_unavailable_reason() -> str | None:
    """:func:`flash_unavailable_reason` without building or touching files
    (what torch.compile can trace): the last probe's answer, else :data:`NOT_PROBED`."""
    return _PROBED.get((), NOT_PROBED)


def _c_int_window(window: tuple[int, int], reach: int) -> tuple[int, int]:
    """The window as C ints: an edge at least ``reach`` (seqlen_q + seqlen_k)
    keys wide already admits every key, so larger values (2**32, say, which a
    C int would wrap) are clamped to it; -1 stays unbounded."""
    return tuple(w if w < 0 else min(w, reach) for w in window)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def flash_forward_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0, sink: int = 0, causal: bool = False, listed: torch.Tensor | None = None,
    block_q: int = 1, build_flags: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; inputs already validated (:func:`longattn.attention`).

    Query ``i`` (at key position ``p = i + seqlen_k - seqlen_q``) sees key
    ``j`` iff (not ``causal`` or ``j <= p``) and (``j`` is in the window
    ``(left, right)`` -- flash-attn's, -1 unbounded; dense attention passes
    causality as ``right = 0`` -- or ``j < sink``, or ``j`` is listed).
    ``listed``: ``(batch, nheads, ceil(seqlen_q / block_q), n)`` int32 key
    positions seen by the rows of each query block of ``block_q`` rows, -1
    for none (block-sparse attention), or None."""
    fn = _kernel(build_flags)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty(batch, seqlen_q, nheads, headdim, dtype=torch.float32)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32)
    if q.numel() == 0 or seqlen_k == 0:
        return out.zero_().to(q.dtype), lse
    pad = -headdim % HEADDIM_MULTIPLE
    qf, kf, vf = (t.float() for t in (q, k, v))
    if pad:
        qf, kf, vf = (F.pad(t, (0, pad)) for t in (qf, kf, vf))
        out = torch.empty(batch, seqlen_q, nheads, headdim + pad, dtype=torch.float32)
    # headdim innermost and contiguous (the kernel's one requirement on strides)
    qf, kf, vf = (t if t.stride(3) == 1 else t.contiguous() for t in (qf, kf, vf))
    long_span = listed is None and (window[0] < 0 or window[0] >= HEAD_MAJOR_MIN_KEYS)
    many_rows = seqlen_q * (nheads // nheads_k) >= HEAD_MAJOR_MIN_ROWS
    if long_span and many_rows and seqlen_k >= HEAD_MAJOR_MIN_KEYS and nheads_k > 1 and kf.stride(1) != kf.shape[-1]:
        # Token-major K/V put consecutive keys of one head nheads_k rows apart,
        # each on its own 4 KiB page for 8+ heads of 128: a pass over tens of
        # thousands of keys then misses the TLB on almost every row. Head-major
        # copies (same values, same result bits) are 10-13% faster at 8k-32k.
        kf, vf = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kf, vf))
    if listed is not None:
        listed = listed.to(torch.int32).contiguous()
    status = fn(
        qf.data_ptr(), *_strides(qf), kf.data_ptr(), *_strides(kf), vf.data_ptr(), *_strides(vf),
        out.data_ptr(), *_strides(out), lse.data_ptr(),
        batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim + pad,
        *_c_int_window(window, seqlen_q + seqlen_k), min(sink, seqlen_k), int(causal), scale, softcap,
        None if listed is None else listed.data_ptr(), 0 if listed is None else listed.shape[-1], block_q,
        kernel_threads(),
    )
    if status != 0:
        raise RuntimeError(f"longattn_flash_cpu rejected its arguments (status {status}); this is a bug")
    if pad:
        out = out[..., :headdim].contiguous()  # the contract's output is contiguous like q
    return out.to(q.dtype), lse
