"""Gather decode, C++ CPU twin (``csrc/cpu/gather_decode.cpp``).

Same arguments and results as :func:`longattn.kernels.gather.eager.gather_decode_eager`
(shapes there). The kernel reads the listed K/V rows where they are, in a
contiguous or paged cache, with the decode kernel's micro-kernels
(``csrc/cpu/attn_rows.h``: fp16/bf16 widened to fp32 in registers, float32
online softmax), one (batch, list, split) piece per OpenMP work item. Built on
first use for this CPU's ISA level by :mod:`longattn.kernels.support.cpp_build`
and run on ``torch.get_num_threads()`` threads (one in a forked child).

Splits: a list longer than :data:`MIN_SPLIT` entries is cut into equal splits
when there are fewer than :data:`TARGET_PIECES` lists, so that a batch-1 step
(8 kv heads, 2048 tokens each) still keeps every core busy; partial results are
merged in split order. The split depends on the shapes only, so the result is
bitwise the same for any thread count.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from longattn.errors import ArgumentError
from longattn.kernels.support.cpp_build import kernel_threads, load_library, unavailable_reason

SOURCE = "gather_decode.cpp"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Work items to aim for: enough for a few dozen cores with room for dynamic
# balancing. Fixed (not the thread count): the split decides the rounding.
TARGET_PIECES = 64
# Shortest split worth its partial write and merge (entries, a multiple of the
# kernel's 8-row chunk).
MIN_SPLIT = 256

_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_ARGTYPES = [
    _PTR, _I64, _I64,  # q, strides (batch, head)
    _PTR, _PTR, _I64, _I64, _I64,  # k_cache, v_cache, strides (dim0, dim1, head)
    _INT, _PTR, _INT, _INT, _INT,  # dtype, indices, batch, nlists, n
    _PTR, _I64, _INT, _INT, _I64,  # block_table, its row stride, page_size, num_pages, capacity
    _INT, _INT, _INT, _FLOAT, _FLOAT,  # nheads, nheads_k, headdim, scale, softcap
    _INT, _INT, _PTR, _PTR,  # split_len, num_splits, partial_out, partial_lse
    _PTR, _PTR, _INT,  # out, lse, num_threads
]


def cpu_unavailable_reason() -> str | None:
    """None when the C++ kernel builds and loads here, else why not."""
    return unavailable_reason(SOURCE)


@functools.lru_cache(maxsize=None)
def _kernel(build_flags: tuple[str, ...] = ()):
    fn = load_library(SOURCE, build_flags).longattn_gather_decode_cpu
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


def split_length(batch: int, nlists: int, n: int) -> int:
    """Entries per piece for lists of ``n`` entries: all of them when there are
    already TARGET_PIECES lists or the list is short; else enough splits for
    about TARGET_PIECES pieces, each at least MIN_SPLIT entries (rounded up to 8)."""
    lists = batch * nlists
    if n <= MIN_SPLIT or lists >= TARGET_PIECES:
        return max(n, 1)
    want = -(-TARGET_PIECES // max(lists, 1))
    length = -(-n // want)
    return max(MIN_SPLIT, -(-length // 8) * 8)


def gather_decode_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    block_table: torch.Tensor | None,
    *,
    scale: float,
    softcap: float = 0.0,
    split_len: int | None = None,
    build_flags: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather decode on the CPU; shapes in :mod:`longattn.kernels.gather.eager`.

    ``split_len``: entries per piece (default :func:`split_length`); tests
    force short splits to exercise the merge. ``build_flags``: extra compiler
    flags (a separate cached build), e.g. ``("-mno-avx512f",)`` for the AVX2 path.

    Raises :class:`~longattn.errors.ArgumentError` if a listed position lies
    past the cache or maps to a page outside it (the kernel checks every entry
    and never reads such a row; :func:`longattn.kernels.gather.gather_decode`
    normally catches this before)."""
    batch, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    nlists, n = indices.shape[1], indices.shape[2]
    out = torch.empty((batch, nheads, headdim), dtype=q.dtype)
    lse = torch.empty((batch, nheads), dtype=torch.float32)
    if batch == 0:
        return out, lse
    # Unit stride along headdim: rows are streamed as vectors.
    if q.stride(2) != 1:
        q = q.contiguous()
    k_strides = k_cache.stride()
    if k_strides[3] != 1 or v_cache.stride() != k_strides:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
        k_strides = k_cache.stride()
    if indices.dtype != torch.int32 or not indices.is_contiguous():
        indices = indices.to(torch.int32).contiguous()  # int64 lists fit: positions < capacity < 2**31
    if block_table is None:
        table_ptr, table_stride, page_size, num_pages = None, 0, 0, 0
    else:
        if block_table.dtype != torch.int32 or not block_table.is_contiguous():
            block_table = block_table.to(torch.int32).contiguous()
        table_ptr, table_stride = block_table.data_ptr(), block_table.stride(0)
        page_size, num_pages = k_cache.shape[1], k_cache.shape[0]
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    split = split_length(batch, nlists, n) if split_len is None else max(1, int(split_len))
    num_splits = max(1, -(-n // split))
    if num_splits > 1:
        rows = nheads // nlists
        partial_out = torch.empty((batch * nlists * num_splits * rows, headdim), dtype=torch.float32)
        partial_lse = torch.empty((batch * nlists * num_splits * rows,), dtype=torch.float32)
        partial_ptrs = partial_out.data_ptr(), partial_lse.data_ptr()
    else:  # every piece is a whole list: no workspace
        partial_ptrs = None, None
    kernel = _kernel(build_flags if type(build_flags) is tuple else tuple(build_flags))
    status = kernel(
        q.data_ptr(), q.stride(0), q.stride(1),
        k_cache.data_ptr(), v_cache.data_ptr(), k_strides[0], k_strides[1], k_strides[2],
        DTYPE_CODES[q.dtype], indices.data_ptr(), batch, nlists, n,
        table_ptr, table_stride, page_size, num_pages, capacity,
        nheads, nheads_k, headdim, float(scale), float(softcap),
        split, num_splits, *partial_ptrs, out.data_ptr(), lse.data_ptr(),
        # No more threads than pieces (a single list runs on the caller's thread).
        max(1, min(batch * nlists * num_splits, kernel_threads())),
    )
    if status == 2:
        from longattn.kernels.gather import check_gather_data  # the checks' own message, with the values found

        check_gather_data(k_cache, indices, block_table)
        pages = f", or one whose block_table page is outside 0 .. {num_pages - 1}" if block_table is not None else ""
        raise ArgumentError(f"indices list a position outside -1 .. {capacity - 1}{pages} (the C++ kernel "
                            "never read it; nothing was returned)")
    if status != 0:
        raise RuntimeError(f"the C++ gather-decode kernel rejected its arguments (status {status})")
    return out, lse
