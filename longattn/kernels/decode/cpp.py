"""Decode attention, C++ CPU twin: stream-K over OpenMP threads.

Same signature and results as the eager twins of
:mod:`longattn.kernels.decode.eager`; the kernel is
``csrc/cpu/decode_streamk.cpp`` (built on first use, see
:mod:`longattn.kernels.support.cpp_build`). It streams every K/V row once,
in the cache's dtype, which is what makes decode run near memory bandwidth
instead of SDPA's ~13% (fp32) / ~2.4% (bf16) of it. With AVX-512 and a head
dim that is a multiple of 16 it scores 16 keys per vector; bf16 then uses
the CPU's bf16 dot product (AVX512-BF16) for QK and for PV, with P rounded
to bf16 for PV (each weight off by at most 2**-9 relative, unbiased, so the
output error averages down over the keys; the softmax denominator and lse
use the float32 P, so lse keeps float32 accuracy). Other builds widen
fp16/bf16 to fp32 in registers.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from longattn.kernels.decode.plan import DecodePlan, plan_decode
from longattn.kernels.support.cpp_build import kernel_threads, load_library, unavailable_reason

SOURCE = "decode_streamk.cpp"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Keys per LeanTile. Workers are few on a CPU (one per thread), so tiles can
# be long; 256 keys keeps per-segment overhead negligible. Short contexts get
# shorter tiles (down to MIN_BLOCK_N) so every thread still has work.
DEFAULT_BLOCK_N = 256
MIN_BLOCK_N = 16
TILES_PER_WORKER = 4

_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
# Windows travel as C ints; any edge this wide already admits every key (the
# kernel computes positions minus the window in 64 bits).
_INT_MAX = 2**31 - 1

_ARGTYPES = [
    _PTR, _I64, _I64, _I64,  # q, strides (batch, seqlen, head)
    _PTR, _PTR, _I64, _I64, _I64,  # k_cache, v_cache, strides (dim0, dim1, head)
    _INT, _PTR, _PTR, _I64, _INT,  # dtype, seqlens, block_table, its row stride, page_size
    _INT, _INT, _INT, _INT,  # seqlen_q, nheads, nheads_k, headdim
    _FLOAT, _INT, _INT, _FLOAT,  # scale, window left/right, softcap
    _PTR, _PTR, _PTR,  # segments, worker_first_segment, tile_first_partial
    _INT, _INT, _INT, _INT,  # num_workers, num_tiles, block_n, heads_per_tile
    _PTR, _PTR, _PTR, _PTR, _INT,  # partial_out, partial_lse, out, lse, num_threads
]


def cpu_unavailable_reason() -> str | None:
    """None when the C++ kernel builds and loads here, else why not."""
    return unavailable_reason(SOURCE)


@functools.lru_cache(maxsize=None)
def _kernel(build_flags: tuple[str, ...] = ()):
    fn = load_library(SOURCE, build_flags).longattn_decode_streamk_cpu
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


def default_plan(seqlens: torch.Tensor, nheads_k: int) -> DecodePlan:
    """One stream-K worker per thread (fewer for short caches: at least
    MIN_ROWS_PER_WORKER (key, kv head) rows each); every kv head of a
    sequence in one tile, so each key position's heads are read together,
    in address order.

    Cached by lengths: the layers of one decode step share their lengths, so
    all but the first reuse the plan (and its tensors) without asking."""
    return default_plan_for(tuple(seqlens.tolist()), nheads_k)


def default_plan_for(lengths: tuple[int, ...], nheads_k: int) -> DecodePlan:
    """:func:`default_plan` from lengths already read on the host (no tensor read)."""
    return _cached_plan(lengths, nheads_k, torch.get_num_threads())


# A worker (thread) is worth waking for at least this many (key, kv head)
# rows: below it the fork/join and the merge of split tiles cost more than
# the second thread saves (measured: 2 threads lose up to ~48 keys x 8 kv
# heads, win from ~64, fp32 and bf16, headdim 128).
MIN_ROWS_PER_WORKER = 256


@functools.lru_cache(maxsize=16)
def _cached_plan(lengths: tuple[int, ...], nheads_k: int, num_workers: int) -> DecodePlan:
    num_workers = max(1, min(num_workers, sum(lengths) * nheads_k // MIN_ROWS_PER_WORKER))
    return plan_decode(
        lengths, nheads_k=nheads_k, num_workers=num_workers, block_n=block_n_for(lengths, num_workers),
        heads_per_tile=nheads_k,
    )


def block_n_for(lengths: tuple[int, ...], num_workers: int) -> int:
    """DEFAULT_BLOCK_N, halved (not below MIN_BLOCK_N) until the LeanTiles
    number at least TILES_PER_WORKER per worker: at batch 1 and 256 keys a
    single 256-key tile would leave every thread but one idle."""
    block_n = DEFAULT_BLOCK_N
    while block_n > MIN_BLOCK_N and sum(-(-n // block_n) for n in lengths) < TILES_PER_WORKER * num_workers:
        block_n //= 2
    return block_n


def decode_forward_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
    plan: DecodePlan | None = None,
    build_flags: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream-K decode on the CPU (shapes in :mod:`longattn.kernels.decode.eager`).

    ``build_flags``: extra compiler flags for the kernel (a separate cached
    build), e.g. ``("-mno-avx512f",)`` to run the AVX2 path; tests use it."""
    batch, seqlen_q, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    plan = default_plan(seqlens, nheads_k) if plan is None else plan
    # Per plan, once: the schedule's pointers and sizes (a plan reused across
    # layers, or the cached default plan, pays for this on its first call).
    plan_args = plan.__dict__.get("_cpp_args")
    if plan_args is None:
        tensors = plan.as_tensors("cpu")  # kept alive by the plan: the pointers stay valid
        plan_args = plan.__dict__["_cpp_args"] = (
            tensors["segments"].data_ptr(), tensors["worker_first_segment"].data_ptr(),
            tensors["tile_first_partial"].data_ptr(), plan.num_workers, plan.num_tiles, plan.block_n,
            plan.heads_per_tile,
        )
    # The kernel wants unit stride along headdim (rows are streamed as vectors).
    q_strides = q.stride()
    if q_strides[3] != 1:
        q = q.contiguous()
        q_strides = q.stride()
    k_strides = k_cache.stride()
    if k_strides[3] != 1 or v_cache.stride() != k_strides:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
        k_strides = k_cache.stride()
    if plan.min_seqlen > 0:  # every tile has keys: the kernel writes every row of out and lse
        out = torch.empty((batch, seqlen_q, nheads, headdim), dtype=q.dtype)
        lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32)
    else:  # tiles without keys are never visited: they keep out 0, lse -inf
        out = torch.zeros((batch, seqlen_q, nheads, headdim), dtype=q.dtype)
        lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32)
    num_partials = plan.num_partial_slots  # host int: no read of the plan's tensors
    if num_partials:
        rows = plan.heads_per_tile * (nheads // nheads_k) * seqlen_q
        partial_out = torch.empty((num_partials, rows, headdim), dtype=torch.float32)
        partial_lse = torch.empty((num_partials, rows), dtype=torch.float32)
        partial_ptrs = partial_out.data_ptr(), partial_lse.data_ptr()
    else:  # no merges: the kernel never touches the workspace
        partial_ptrs = None, None
    if seqlens.dtype != torch.int32 or not seqlens.is_contiguous():
        seqlens = seqlens.to(torch.int32).contiguous()
    if block_table is None:
        table_ptr, table_stride, page_size = None, 0, 0
    else:
        if block_table.dtype != torch.int32 or not block_table.is_contiguous():
            block_table = block_table.to(torch.int32).contiguous()
        table_ptr, table_stride, page_size = block_table.data_ptr(), block_table.stride(0), k_cache.shape[1]
    kernel = _kernel(build_flags if type(build_flags) is tuple else tuple(build_flags))
    status = kernel(
        q.data_ptr(), q_strides[0], q_strides[1], q_strides[2],
        k_cache.data_ptr(), v_cache.data_ptr(), k_strides[0], k_strides[1], k_strides[2],
        DTYPE_CODES[q.dtype], seqlens.data_ptr(), table_ptr, table_stride, page_size,
        seqlen_q, nheads, nheads_k, headdim,
        float(scale), min(window[0], _INT_MAX), min(window[1], _INT_MAX), float(softcap),
        *plan_args, *partial_ptrs, out.data_ptr(), lse.data_ptr(),
        # Workers past the work get nothing: no thread for them (a short cache runs on one thread,
        # without waking the pool; the result does not depend on the thread count).
        max(1, min(plan.num_workers, plan.total_work, kernel_threads())),
    )
    if status != 0:
        raise RuntimeError(f"the C++ decode kernel rejected its arguments (status {status})")
    return out, lse
