"""Flash-attention forward, C++ CPU twin (``csrc/cpu/flash_cpu.cpp``).

Float32 math with AVX-512 (or AVX2) micro-kernels; windows ``(left, right)``
in flash-attn's convention (causal is ``right = 0``), attention sinks (keys
``j < sink`` visible whatever the left window: StreamingLLM's Lambda mask),
softcap and GQA. It visits only the key tiles a block of 48 queries can see,
so a window costs ``seqlen * (sink + window)``. Built on first use like the
other C++ kernels; :func:`flash_unavailable_reason` says why it cannot run
(no compiler, no AVX2), and the callers then use PyTorch.

Inputs of any float dtype are computed in float32 unless a native bfloat16
engine takes them (below; half-precision inputs are otherwise widened once, a
copy); head dims that are not a multiple of 16 are
zero-padded (exact: zeros add nothing to q.k, and padded value columns are
dropped). Shapes as :func:`longattn.attention`: ``q (batch, seqlen_q, nheads,
headdim)``, ``k, v (batch, seqlen_k, nheads_k, headdim)``; query ``i`` sits at
key position ``i + seqlen_k - seqlen_q``. Returns ``out`` like q and lse
``(batch, nheads, seqlen_q)`` float32, natural log; rows that see no key get
0 and -inf.

Native bfloat16 (``math``, :func:`choose_math`; ``"auto"`` takes the fastest
the build has for bfloat16). The ``"bf16-dot"`` engine (CPUs with
AVX512-BF16) reads bfloat16 q, k, v in place and multiplies pairs with
``vdpbf16ps``. The ``"amx"`` engine (``csrc/cpu/flash_amx.h``; Intel CPUs with
AMX-TILE + AMX-BF16, built by the ``amx`` ISA level) runs both products on
AMX tiles: per key tile, 16 keys x 16 query rows of scores per
``_tile_dpbf16ps`` (K rows against the q pair words, key-major as the online
softmax wants them) and 16 rows x 16 head dims of ``O += P V`` (P transposed
to row-major bf16, V rows interleaved into key pairs), float32 accumulation
and softmax; Linux must first grant the process AMX state, and "amx" is
offered only when it did (:func:`amx_unavailable_reason`). Built with
``build_flags=AMX_EMULATE`` the same engine runs on a scalar emulation of the
tile instructions that checks every shape the hardware would fault on (the
tests' way to run it on CPUs without AMX). Error of both bf16 engines: the
products of bf16 inputs are exact in float32, so Q K^T loses only the
float32 sums' rounding; for P V the probabilities are rounded to bfloat16
(relative error <= 2**-9 per weight, independent across keys: the
output's error is at most ~2**-9 of its scale when one key dominates and
shrinks like 1 / sqrt(keys) as the weight spreads, within the bfloat16
output's own rounding) while the row sums use the float32 P --
flash-attention's choice on GPUs too.

:func:`flash_varlen_forward_cpu` runs the same kernel on packed sequences
(flash-attn's varlen layout, ``q (total_q, nheads, headdim)`` with
``cu_seqlens`` prefix sums): one call, sequences as work items, each
sequence's rows bitwise those of :func:`flash_forward_cpu` on it alone.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from longattn.errors import ShapeError
from longattn.kernels.support.cpp_build import BuildError, cpu_features, kernel_threads, load_library
from longattn.kernels.support.huge_pages import empty_on_huge_pages

SOURCE = "flash_cpu.cpp"
# Head dims are padded to a multiple of this (AVX-512's 16 floats; AVX2's 8 divides it).
HEADDIM_MULTIPLE = 16
# Key spans from this many keys up are read from head-major copies of K/V
# when each kv head serves at least this many query rows (below either, the
# copy costs more than the ~12% it saves).
HEAD_MAJOR_MIN_KEYS = 8192
HEAD_MAJOR_MIN_ROWS = 4096


def _heads_outer(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """``t`` (same shape and values) from a copy with the heads dim (``seq_dim +
    1``) outside ``seq_dim`` in memory: each head's rows adjacent. On huge pages
    where the OS allows (fewer page faults while copying; 256 MiB copied in
    0.07-0.12 s instead of 0.13-0.16 s)."""
    heads_first = t.transpose(seq_dim, seq_dim + 1)
    copy = empty_on_huge_pages(*heads_first.shape, dtype=t.dtype, device=t.device)
    copy.copy_(heads_first)
    return copy.transpose(seq_dim, seq_dim + 1)


def reads_head_major(seqlen_q: int, seqlen_k: int, nheads: int, nheads_k: int, window: tuple[int, int],
                     listed: bool) -> bool:
    """Whether the kernel reads token-major K/V ``(batch, seqlen_k, nheads_k,
    headdim)`` from head-major copies (same values, same result bits): for
    key spans of :data:`HEAD_MAJOR_MIN_KEYS` and more -- dense, a long window,
    or listed keys (block-sparse: HiP's blocks are scattered over the whole
    context) -- when each kv head serves :data:`HEAD_MAJOR_MIN_ROWS` query
    rows or more. A short window without a listing is read as it is (its
    keys stay in cache: Streaming(64, 1024) at 32k gained nothing)."""
    long_span = listed or window[0] < 0 or window[0] >= HEAD_MAJOR_MIN_KEYS
    many_rows = seqlen_q * (nheads // nheads_k) >= HEAD_MAJOR_MIN_ROWS
    return long_span and many_rows and seqlen_k >= HEAD_MAJOR_MIN_KEYS and nheads_k > 1

_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_ARGTYPES = [
    _PTR, _I64, _I64, _I64,  # q, strides (batch, seq, head)
    _PTR, _I64, _I64, _I64,  # k
    _PTR, _I64, _I64, _I64,  # v
    _PTR, _I64, _I64, _I64, _PTR,  # out, its strides, lse
    _INT, _INT, _INT, _INT, _INT, _INT,  # batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim
    _INT, _INT, _INT, _INT, _FLOAT, _FLOAT,  # window left/right, sink, causal, scale, softcap
    _PTR, _INT, _INT, _INT, _INT,  # listed key positions, their count per query block, block_q, math, threads
]
_VARLEN_ARGTYPES = [
    _PTR, _I64, _I64,  # q, strides (token, head)
    _PTR, _I64, _I64,  # k
    _PTR, _I64, _I64,  # v
    _PTR, _I64, _I64, _PTR,  # out, its strides, lse
    _PTR, _PTR, _INT, _I64, _I64,  # cu_seqlens_q, cu_seqlens_k, batch, total_q, total_k
    _INT, _INT, _INT,  # nheads, nheads_k, headdim
    _INT, _INT, _INT, _INT, _FLOAT, _FLOAT, _INT, _INT,  # window left/right, sink, causal, scale, softcap, math, threads
]

# The kernel's arithmetic engines (the ``math`` argument of the C entry points):
# "fp32" float32 FMAs (every AVX2 build; fp16/bf16 inputs widened first),
# "bf16-dot" bfloat16 inputs read in place with AVX512-BF16 dot products,
# "amx" bfloat16 through AMX tiles. Float32 accumulation and softmax in all.
MATHS = {"fp32": 0, "bf16-dot": 1, "amx": 2}


@functools.lru_cache(maxsize=None)
def _library(build_flags: tuple[str, ...] = ()):
    lib = load_library(SOURCE, build_flags)
    if lib.longattn_flash_cpu_lanes() == 0:
        raise BuildError("the C++ flash kernel needs AVX2 and FMA, which this CPU (or build) lacks")
    return lib


@functools.lru_cache(maxsize=None)
def _maths_mask(build_flags: tuple[str, ...] = ()) -> int:
    """Bit m set: this build has C math code m (a build fact, asked once)."""
    return _library(build_flags).longattn_flash_cpu_maths()


AMX_EMULATE = ("-DLONGATTN_AMX_EMULATE",)  # build flags of the AMX engine on emulated tiles (any AVX512-BF16 CPU)


@functools.lru_cache(maxsize=None)
def amx_unavailable_reason(build_flags: tuple[str, ...] = ()) -> str | None:
    """None when this build's AMX engine can run here, else why not: the
    build has no AMX engine (the CPU or the flags lack AMX-TILE/AMX-BF16),
    or Linux refused the process AMX state. Builds on first use; raises
    :class:`BuildError` when the kernel cannot be built at all."""
    lib = _library(build_flags)
    if not _maths_mask(build_flags) >> MATHS["amx"] & 1:
        missing = sorted({"amx_tile", "amx_bf16", "avx512_bf16"} - cpu_features())
        why = (f"this CPU lacks {', '.join(missing)}" if missing
               else f"the build flags {' '.join(build_flags) or '(default)'} do not enable AMX-TILE and AMX-BF16")
        return (f"this build of the C++ flash kernel has no AMX engine: {why} "
                f"(build_flags={AMX_EMULATE!r} emulates the tiles in software on any AVX512-BF16 CPU)")
    if not lib.longattn_flash_cpu_amx_ready():
        return ("Linux refused this process the AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) "
                "failed: a kernel older than 5.16, or a sandbox that forbids it)")
    return None


@functools.lru_cache(maxsize=None)
def maths_built(build_flags: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The :data:`MATHS` this build of the kernel has and this process can run
    (builds on first use; raises :class:`BuildError` when it cannot be built
    here). "amx" only when :func:`amx_unavailable_reason` is None."""
    built = tuple(name for name, bit in MATHS.items() if _maths_mask(build_flags) >> bit & 1)
    if "amx" in built and amx_unavailable_reason(build_flags) is not None:
        built = tuple(m for m in built if m != "amx")
    return built


def choose_math(dtype: torch.dtype, math: str = "auto", build_flags: tuple[str, ...] = ()) -> str:
    """The engine a call on ``dtype`` inputs runs: ``math`` itself, checked
    against the build, or for ``"auto"`` the fastest the build has for the
    dtype (bfloat16: AMX tiles, else bf16 dot products, else float32;
    float32 and float16: float32)."""
    built = maths_built(build_flags)
    if math == "auto":
        if dtype == torch.bfloat16:
            return next((m for m in ("amx", "bf16-dot") if m in built), "fp32")
        return "fp32"
    if math not in MATHS:
        raise ValueError(f"math must be 'auto' or one of {sorted(MATHS)}, got {math!r}")
    if math == "amx" and math not in built:
        why = amx_unavailable_reason(build_flags)
        raise BuildError(f"math='amx' cannot run here (this build has {list(built)}): {why}")
    if math not in built:
        raise BuildError(f"math={math!r} is not in this build of the C++ flash kernel (it has {list(built)}: "
                         "the CPU or the build flags lack the instructions)")
    if math != "fp32" and dtype != torch.bfloat16:
        raise ValueError(f"math={math!r} takes bfloat16 inputs, got {dtype}")
    return math


# The C entry points' codes for the "fp32" engine on half inputs: float32
# arithmetic on bfloat16 / float16 rows widened per tile inside the kernel
# (no float32 copy of K and V; bitwise the results of widening first).
_FP32_ON_HALF = {torch.bfloat16: 3, torch.float16: 4}


def _math_code(math: str, dtype: torch.dtype, build_flags: tuple[str, ...]) -> int:
    """The ``math`` argument of the C entry points for ``math`` on ``dtype`` inputs."""
    code = _FP32_ON_HALF.get(dtype) if math == "fp32" else None
    if code is not None and _maths_mask(build_flags) >> code & 1:
        return code
    return MATHS[math]


def _kernel_inputs(tensors, code: int, pad: int):
    """q, k, v as the engine reads them: float32 (widened once, a copy) for
    code 0, in place otherwise; head dims zero-padded by ``pad``."""
    if code == MATHS["fp32"]:
        tensors = tuple(t.float() for t in tensors)
    if pad:
        tensors = tuple(F.pad(t, (0, pad)) for t in tensors)
    return tensors


@functools.lru_cache(maxsize=None)
def _kernel(build_flags: tuple[str, ...] = ()):
    fn = _library(build_flags).longattn_flash_cpu
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


@functools.lru_cache(maxsize=None)
def _varlen_kernel(build_flags: tuple[str, ...] = ()):
    fn = _library(build_flags).longattn_flash_cpu_varlen
    fn.argtypes, fn.restype = _VARLEN_ARGTYPES, ctypes.c_int
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
    block_q: int = 1, build_flags: tuple[str, ...] = (), math: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; inputs already validated (:func:`longattn.attention`).

    ``math`` picks the arithmetic (:func:`choose_math`; ``"auto"``: bfloat16
    inputs run natively where the CPU can, everything else in float32).

    Query ``i`` (at key position ``p = i + seqlen_k - seqlen_q``) sees key
    ``j`` iff (not ``causal`` or ``j <= p``) and (``j`` is in the window
    ``(left, right)`` -- flash-attn's, -1 unbounded; dense attention passes
    causality as ``right = 0`` -- or ``j < sink``, or ``j`` is listed).
    ``listed``: ``(batch, nheads, ceil(seqlen_q / block_q), n)`` int32 key
    positions seen by the rows of each query block of ``block_q`` rows, -1
    for none (block-sparse attention), or None."""
    fn = _kernel(build_flags)
    math = choose_math(q.dtype, math, build_flags)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty(batch, seqlen_q, nheads, headdim, dtype=torch.float32)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32)
    if q.numel() == 0 or seqlen_k == 0:
        return out.zero_().to(q.dtype), lse
    pad = -headdim % HEADDIM_MULTIPLE
    code = _math_code(math, q.dtype, build_flags)
    qf, kf, vf = _kernel_inputs((q, k, v), code, pad)
    if pad:
        out = torch.empty(batch, seqlen_q, nheads, headdim + pad, dtype=torch.float32)
    # headdim innermost and contiguous (the kernel's one requirement on strides)
    qf, kf, vf = (t if t.stride(3) == 1 else t.contiguous() for t in (qf, kf, vf))
    staged = reads_head_major(seqlen_q, seqlen_k, nheads, nheads_k, window, listed is not None)
    if staged and kf.stride(1) != kf.shape[-1]:
        # Token-major K/V put consecutive keys of one head nheads_k rows apart,
        # each on its own 4 KiB page for 8+ heads of 128: a pass over tens of
        # thousands of keys then misses the TLB on almost every row, and
        # HiP's 2-key blocks are two pages each. Head-major copies (same
        # values, same result bits) are 10-13% faster for dense attention at
        # 8k-32k; HiP's block-sparse attention at 8k-32k ran 1.16-1.24x faster
        # in float32, copies included (bfloat16 1.00-1.06x; Intel Xeon, A/B in
        # one process).
        kf, vf = (t if t.stride(1) == t.shape[-1] else _heads_outer(t, 1) for t in (kf, vf))
    if listed is not None:
        listed = listed.to(torch.int32).contiguous()
    status = fn(
        qf.data_ptr(), *_strides(qf), kf.data_ptr(), *_strides(kf), vf.data_ptr(), *_strides(vf),
        out.data_ptr(), *_strides(out), lse.data_ptr(),
        batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim + pad,
        *_c_int_window(window, seqlen_q + seqlen_k), min(sink, seqlen_k), int(causal), scale, softcap,
        None if listed is None else listed.data_ptr(), 0 if listed is None else listed.shape[-1], block_q,
        code, kernel_threads(),
    )
    if status != 0:
        raise RuntimeError(f"longattn_flash_cpu rejected its arguments (status {status}); this is a bug")
    if pad:
        out = out[..., :headdim].contiguous()  # the contract's output is contiguous like q
    return out.to(q.dtype), lse


def _seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 lengths ``cu[b + 1] - cu[b]`` of the packed sequences."""
    return cu_seqlens[1:].long() - cu_seqlens[:-1].long()


def flash_varlen_forward_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, *, scale: float, window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0, build_flags: tuple[str, ...] = (), math: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences (flash-attn's ``flash_attn_varlen_func`` layout): ``(out, lse)``.

    ``q (total_q, nheads, headdim)``, ``k, v (total_k, nheads_k, headdim)``;
    ``cu_seqlens_q``, ``cu_seqlens_k`` ``(batch + 1,)`` integer prefix sums
    (``cu[0] = 0``, non-decreasing, ``cu[-1] = total``): sequence ``b``'s
    queries are rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`` of q, its keys
    rows ``cu_seqlens_k[b] .. cu_seqlens_k[b + 1]`` of k and v. Each sequence
    is aligned on its own: its query ``i`` sits at key position ``i +
    seqlen_k_b - seqlen_q_b``, and sees key ``j`` iff ``j`` is in ``window``
    (flash-attn's ``(left, right)``, -1 unbounded, causal folded in as
    ``right = 0``). Sequences of length 0 on either side are allowed. Inputs
    already validated (the front door checks the prefix sums against the
    totals and ``max_seqlen_*``; the kernel re-checks the prefix sums and
    raises on nonsense rather than reading out of bounds).

    Returns ``out (total_q, nheads, headdim)`` in q's dtype and ``lse
    (nheads, total_q)`` float32, natural log (flash-attn's varlen layout);
    rows that see no key get 0 and -inf. One kernel call over work items
    (sequence, head, block of 48 queries): no padding to the longest
    sequence, and each sequence's rows are bitwise those of
    :func:`flash_forward_cpu` on that sequence alone.

    ``max_seqlen_q`` / ``max_seqlen_k`` are accepted for flash-attn's
    signature; the window clamp and the head-major choice use the lengths
    read from the prefix sums (the same when the maxima are exact, and safe
    when they are not).
    """
    del max_seqlen_q, max_seqlen_k  # see the docstring: the prefix sums are the truth
    fn = _varlen_kernel(build_flags)
    math = choose_math(q.dtype, math, build_flags)
    total_q, nheads, headdim = q.shape
    total_k, nheads_k = k.shape[0], k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape != cu_seqlens_q.shape or cu_seqlens_q.dim() != 1:  # the kernel reads cu_k[batch]
        raise ShapeError(f"cu_seqlens_q and cu_seqlens_k must both be (batch + 1,), got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    if q.numel() == 0 or total_k == 0 or batch < 1:  # nothing to compute: every row is empty
        return (torch.zeros(total_q, nheads, headdim, dtype=q.dtype),
                torch.full((nheads, total_q), float("-inf"), dtype=torch.float32))
    cu_q = cu_seqlens_q.to(device="cpu", dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device="cpu", dtype=torch.int32).contiguous()
    lens_q, lens_k = _seqlens(cu_q), _seqlens(cu_k)
    longest_q, longest_k = int(lens_q.max()), int(lens_k.max())
    pad = -headdim % HEADDIM_MULTIPLE
    # Every row of q belongs to one sequence (cu_q[-1] = total_q), so the kernel writes all of out and lse.
    out = torch.empty(total_q, nheads, headdim + pad, dtype=torch.float32)
    lse = torch.empty(nheads, total_q, dtype=torch.float32)
    code = _math_code(math, q.dtype, build_flags)
    qf, kf, vf = _kernel_inputs((q, k, v), code, pad)
    # headdim innermost and contiguous (the kernel's one requirement on strides)
    qf, kf, vf = (t if t.stride(2) == 1 else t.contiguous() for t in (qf, kf, vf))
    # Head-major K/V copies as in flash_forward_cpu (same bits, fewer TLB misses
    # on long key spans), decided by the most query rows of a sequence with a
    # long key span: its items dominate.
    rows_of_long = int((lens_q * (lens_k >= HEAD_MAJOR_MIN_KEYS)).max())
    staged = reads_head_major(rows_of_long, int(lens_k.max()), nheads, nheads_k, window, listed=False)
    if staged and kf.stride(0) != kf.shape[-1]:
        kf, vf = (_heads_outer(t, 0) for t in (kf, vf))
    status = fn(
        qf.data_ptr(), qf.stride(0), qf.stride(1), kf.data_ptr(), kf.stride(0), kf.stride(1),
        vf.data_ptr(), vf.stride(0), vf.stride(1), out.data_ptr(), out.stride(0), out.stride(1), lse.data_ptr(),
        cu_q.data_ptr(), cu_k.data_ptr(), batch, total_q, total_k, nheads, nheads_k, headdim + pad,
        *_c_int_window(window, longest_q + longest_k), 0, 0, scale, softcap, code, kernel_threads(),
    )
    if status != 0:
        raise RuntimeError(f"longattn_flash_cpu_varlen rejected its arguments (status {status}); this is a bug")
    if pad:
        out = out[..., :headdim].contiguous()  # the contract's output is contiguous like q
    return out.to(q.dtype), lse
