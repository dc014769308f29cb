"""Machine-limit probes (``csrc/cpu/probes.cpp``): the yardsticks for the benchmarks.

* :func:`fma_peak_gflops` -- the fp32 FMA peak: every thread runs a
  register-only loop of 12 independent FMA chains on the widest vectors the
  build has (AVX-512: 16 lanes, AVX2+FMA: 8, else scalar multiply-adds),
  counted as 2 flops per lane per FMA. Compute-bound kernels (dense prefill)
  are reported as a fraction of it. :func:`fma_run` runs the same loop for a
  given flop count, for benchmarks that time it beside the kernels.
* :func:`bf16_run` -- the bfloat16 counterpart of :func:`fma_run`, in the
  fastest bf16 arithmetic of this build and process
  (:func:`bf16_arithmetic`): AMX tiles (TDPBF16PS, a 2 x 2 block of C tiles
  as a GEMM keeps them) or AVX512-BF16 dot products (VDPBF16PS), register-
  only. The limit of bf16 prefill (the ``dense-bf16`` bench).
* :func:`stream_read_gbs` -- the read bandwidth: a multi-threaded streaming
  pass over a fresh float32 buffer of ``gib`` GiB, each thread reading one
  contiguous slice, best of ``repeats`` passes, in GB/s (1e9 bytes/s).
  Memory-bound kernels (decode) are reported as a fraction of it; unlike one
  ``torch.sum`` it uses every thread and does nothing but read.

Both build the library on first use like the other C++ kernels
(:mod:`longattn.kernels.support.cpp_build`) and run ``threads`` OpenMP
threads (default :func:`~longattn.kernels.support.cpp_build.kernel_threads`,
i.e. torch's thread count). They return a :class:`Probe`: when the library
cannot be built (no compiler, a failed build) its ``value`` is None and
``reason`` says why -- a benchmark then prints the reason instead of a ratio.
Bad arguments raise :class:`longattn.errors.ArgumentError` naming them.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.kernels.support import cpp_build

SOURCE = "probes.cpp"
# Upper bounds that catch a unit mistake (seconds given in ms, bytes as GiB)
# before it ties up the machine for an hour or allocates terabytes.
MAX_SECONDS = 60.0
MAX_GIB = 64.0
MAX_FLOPS = 1e15  # ~1 hour of a 2-core machine's fp32 peak
_ISA_BY_LANES = {16: "avx512", 8: "avx2", 1: "scalar"}


@dataclass(frozen=True)
class Probe:
    """One probe's result.

    ``value``: GFLOP/s (:func:`fma_peak_gflops`) or GB/s
    (:func:`stream_read_gbs`), None when the library is unavailable;
    ``isa``: the vector width the loop used (``"avx512"``, ``"avx2"`` or
    ``"scalar"``), None when unavailable; ``threads``: OpenMP threads asked
    for; ``reason``: None, else why there is no value."""

    value: float | None
    isa: str | None
    threads: int
    reason: str | None = None


@functools.lru_cache(maxsize=None)
def _library():
    lib = cpp_build.load_library(SOURCE)
    lib.longattn_probes_lanes.argtypes, lib.longattn_probes_lanes.restype = [], ctypes.c_int
    lib.longattn_fma_peak_gflops.argtypes, lib.longattn_fma_peak_gflops.restype = [ctypes.c_int, ctypes.c_double], ctypes.c_double
    lib.longattn_fma_run.argtypes, lib.longattn_fma_run.restype = [ctypes.c_int, ctypes.c_double], ctypes.c_double
    lib.longattn_bf16_arithmetic.argtypes, lib.longattn_bf16_arithmetic.restype = [], ctypes.c_int
    lib.longattn_bf16_run.argtypes, lib.longattn_bf16_run.restype = [ctypes.c_int, ctypes.c_double], ctypes.c_double
    lib.longattn_stream_read_sum.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_double)]
    lib.longattn_stream_read_sum.restype = ctypes.c_double
    lib.longattn_stream_read_gbs.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int]
    lib.longattn_stream_read_gbs.restype = ctypes.c_double
    return lib


def _isa(lib) -> str:
    lanes = lib.longattn_probes_lanes()
    return _ISA_BY_LANES.get(lanes, f"{lanes} lanes")


def _threads(threads) -> int:
    if threads is None:
        return cpp_build.kernel_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ArgumentError(f"threads must be None or an int >= 1, got {threads!r}")
    return threads


def _positive(name: str, value, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= maximum):
        raise ArgumentError(f"{name} must be a number in (0, {maximum:g}], got {value!r}")
    return float(value)


def _repeats(repeats) -> int:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ArgumentError(f"repeats must be an int >= 1, got {repeats!r}")
    return repeats


def fma_peak_gflops(threads: int | None = None, seconds: float = 0.2) -> Probe:
    """The fp32 FMA peak of ``threads`` threads (default: torch's count), in GFLOP/s.

    Each thread runs the register-only loop for about ``seconds`` (in (0,
    60]); the figure is all threads' flops over the team's wall time, so a
    core shared with another process lowers it."""
    threads = _threads(threads)
    seconds = _positive("seconds", seconds, MAX_SECONDS)
    try:
        lib = _library()
    except cpp_build.BuildError as exc:
        return Probe(None, None, threads, str(exc))
    value = lib.longattn_fma_peak_gflops(threads, seconds)
    if not (value > 0 and math.isfinite(value)):
        raise RuntimeError(f"longattn_fma_peak_gflops returned {value}; this is a bug")
    return Probe(value, _isa(lib), threads)


def fma_run(flops: float, threads: int | None = None) -> float:
    """Run the register-only FMA loop of :func:`fma_peak_gflops` for a fixed
    amount of work -- at least ``flops`` flops (in [1, 1e15]), shared evenly
    by ``threads`` threads (default: torch's count), rounded up to whole loop
    iterations -- and return the flops run. The caller times it: the
    benchmarks run it with a case's own flop count in the same interleaved
    rounds as the kernels, so that the peak a kernel is divided by was
    measured at the same moments (this shared VM's speed moves by 2x within
    minutes). Raises :class:`~longattn.kernels.support.cpp_build.BuildError`
    when the library is unavailable."""
    threads = _threads(threads)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not (1 <= flops <= MAX_FLOPS):
        raise ArgumentError(f"flops must be a number in [1, {MAX_FLOPS:g}], got {flops!r}")
    value = _library().longattn_fma_run(threads, float(flops))
    if not (value >= flops and math.isfinite(value)):
        raise RuntimeError(f"longattn_fma_run returned {value} for {flops:g} flops; this is a bug")
    return value


_BF16_ARITHMETIC = {2: "amx", 1: "avx512bf16"}


def bf16_arithmetic() -> str | None:
    """The bfloat16 arithmetic :func:`bf16_run` uses here: ``"amx"`` (the
    build targets AMX tiles and the OS granted this process AMX state),
    ``"avx512bf16"`` (VDPBF16PS dot products), or None (no bf16 arithmetic:
    bf16 is computed in float32, whose limit is :func:`fma_run`). Raises
    :class:`~longattn.kernels.support.cpp_build.BuildError` when the library
    is unavailable."""
    return _BF16_ARITHMETIC.get(_library().longattn_bf16_arithmetic())


def bf16_run(flops: float, threads: int | None = None) -> float:
    """:func:`fma_run` for bfloat16: at least ``flops`` flops (in [1, 1e15])
    of :func:`bf16_arithmetic`'s register-only loop -- a TDPBF16PS counts
    16 x 16 x 32 multiply-adds, a VDPBF16PS 16 x 2, 2 flops each -- shared
    evenly by ``threads`` threads, rounded up to whole iterations; returns
    the flops run, for the caller to time. Raises RuntimeError when this CPU
    or build has no bf16 arithmetic (``bf16_arithmetic()`` is None) and
    :class:`~longattn.kernels.support.cpp_build.BuildError` when the library
    is unavailable."""
    threads = _threads(threads)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not (1 <= flops <= MAX_FLOPS):
        raise ArgumentError(f"flops must be a number in [1, {MAX_FLOPS:g}], got {flops!r}")
    value = _library().longattn_bf16_run(threads, float(flops))
    if value == -2.0:
        raise RuntimeError("no bfloat16 arithmetic here (neither AMX tiles nor AVX512-BF16): "
                           "bf16 runs in float32, see fma_run")
    if not (value >= flops and math.isfinite(value)):
        raise RuntimeError(f"longattn_bf16_run returned {value} for {flops:g} flops; this is a bug")
    return value


def read_tensor(data: torch.Tensor, threads: int | None = None, repeats: int = 1) -> tuple[Probe, float]:
    """Stream ``data`` (a contiguous 1-D float32 CPU tensor, any length >= 1):
    the best read bandwidth of ``repeats`` passes (GB/s) and the data's sum
    (float64-accumulated per 64 KiB block; NaN if any element is NaN) -- the
    sum proves every element was read. Raises
    :class:`~longattn.kernels.support.cpp_build.BuildError` when the library
    is unavailable (:func:`stream_read_gbs` turns that into a reason)."""
    threads = _threads(threads)
    repeats = _repeats(repeats)
    if not isinstance(data, torch.Tensor):
        raise ArgumentError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if data.dtype != torch.float32:
        raise DTypeError(f"data must be float32, got {data.dtype}")
    if data.device.type != "cpu":
        raise ArgumentError(f"data must be on the CPU, got {data.device}")
    if data.dim() != 1 or data.numel() < 1 or not data.is_contiguous():
        raise ShapeError(f"data must be a non-empty contiguous 1-D tensor, got shape {tuple(data.shape)} "
                         f"with strides {data.stride()}")
    lib = _library()
    total = ctypes.c_double(0.0)
    value = lib.longattn_stream_read_sum(data.data_ptr(), data.numel(), threads, repeats, ctypes.byref(total))
    if not (value > 0 and math.isfinite(value)):
        raise RuntimeError(f"longattn_stream_read_sum returned {value}; this is a bug")
    return Probe(value, _isa(lib), threads), total.value


def stream_read_gbs(gib: float = 1.0, threads: int | None = None, repeats: int = 5) -> Probe:
    """The read bandwidth (GB/s, 1e9 bytes/s) of ``threads`` threads (default:
    torch's count) streaming a fresh float32 buffer of ``gib`` GiB (in (0, 64])
    once per pass, best of ``repeats`` passes.

    Size it like the data the kernel under test reads (e.g. the KV cache), and
    well above the last-level cache, or the figure measures the cache. The
    buffer is written before the passes (so its pages exist) and freed after."""
    threads = _threads(threads)
    gib = _positive("gib", gib, MAX_GIB)
    repeats = _repeats(repeats)
    try:
        _library()
    except cpp_build.BuildError as exc:
        return Probe(None, None, threads, str(exc))
    n = max(1, int(gib * 2**30) // 4)
    data = torch.ones(n, dtype=torch.float32)  # written: every page faulted in before the timed passes
    probe, _ = read_tensor(data, threads, repeats)
    return probe
