"""HiP's tree search, C++ CPU twin (``csrc/cpu/hip_score.cpp``): every round in one call.

Selects what the PyTorch search in :mod:`longattn.sparse.hip_mask` selects
(scores equal up to float32 summation order): per row, halve the groups,
score each half by the max of ``q . k`` over the row's strided queries and
its centre block's searchable keys, keep the best. It reads keys in place
(no gather, no temporaries), which is what HiP's mask estimation spends its
time on. bfloat16 inputs are scored with AVX512-BF16 dot products where the
CPU has them (:func:`has_bf16_search`; about half the float32 search's time
on a Zen 4), on AMX tiles where it has those too and the OS grants the
process AMX state (:func:`bf16_search_uses_amx`; the Intel Xeon's bf16
search ran 1.8-2x faster on tiles than with dot products), else in float32.
Built on first use like the decode kernel; without a compiler the PyTorch
search serves.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from longattn.kernels.block_sparse.eager import KeyRows
from longattn.kernels.support.cpp_build import BuildError, kernel_threads, load_library, unavailable_reason

SOURCE = "hip_score.cpp"
# Query lanes are padded to a multiple of this (the widest vector, AVX-512's 16 floats).
LANES = 16

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def score_unavailable_reason() -> str | None:
    """None when the C++ search builds and loads here, else why not."""
    return unavailable_reason(SOURCE)


_SEARCH_ARGTYPES = [
    _PTR, _I64, _I64, _I64, _I64, _INT,  # q, its batch/row/head strides, row offset, head dim
    _PTR, _PTR,  # query_pos, range_end
    _PTR, _I64, _I64, _I64,  # keys, batch/head/pos strides
    _PTR, _I64, _INT,  # block_table, its row stride, page_size
    _PTR, _PTR, _I64, _INT, _INT, _INT, _INT, _INT, _INT, _INT,  # starts, ends, rows, S, D, bk, nb, rounds, sink, causal
    _INT, _INT, _INT, _INT,  # nheads, nheads_k, nqb, num_threads
]


@functools.lru_cache(maxsize=None)
def _search_kernel(build_flags: tuple[str, ...] = (), bf16: bool = False):
    lib = load_library(SOURCE, build_flags)
    fn = lib.longattn_hip_search_bf16 if bf16 else lib.longattn_hip_search
    fn.argtypes, fn.restype = _SEARCH_ARGTYPES, ctypes.c_int
    return fn


@functools.lru_cache(maxsize=None)
def has_bf16_search(build_flags: tuple[str, ...] = ()) -> bool:
    """Whether this build scores bfloat16 natively (AVX512-BF16 dot products);
    False where the search cannot be built at all."""
    try:
        return bool(load_library(SOURCE, build_flags).longattn_hip_search_has_bf16())
    except BuildError:  # no compiler, or a build this CPU cannot run: the float32 search decides
        return False


@functools.lru_cache(maxsize=None)
def bf16_search_uses_amx(build_flags: tuple[str, ...] = ()) -> bool:
    """Whether this build's bfloat16 search scores on AMX tiles: the compiler
    targets AMX-TILE + AMX-BF16 (or ``-DLONGATTN_AMX_EMULATE`` emulates them
    on an AVX512-BF16 build) and the OS granted this process AMX state.
    False where the search cannot be built at all."""
    try:
        return bool(load_library(SOURCE, build_flags).longattn_hip_search_uses_amx())
    except BuildError:
        return False


def bf16_search_arithmetic(build_flags: tuple[str, ...] = ()) -> str:
    """How this build's search scores bfloat16: ``"amx"`` (AMX tiles,
    :func:`bf16_search_uses_amx`), ``"bf16-dot"`` (``vdpbf16ps``,
    :func:`has_bf16_search`) or ``"fp32"`` (widened to float32)."""
    if bf16_search_uses_amx(build_flags):
        return "amx"
    return "bf16-dot" if has_bf16_search(build_flags) else "fp32"


def search_blocks_cpu(
    q: torch.Tensor,
    query_pos: torch.Tensor,
    range_end: torch.Tensor,
    keys: torch.Tensor | KeyRows,
    starts: torch.Tensor,
    ends: torch.Tensor,
    *,
    q_offset: int,
    rounds: int,
    block_k: int,
    sink_size: int,
    causal: bool,
    build_flags: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``rounds`` of the tree search in one call: ``starts, ends (rows, nb)``
    int64 initial groups -> the groups kept at the end, ordered by start,
    empty groups (``start == end``) last. Rows are (batch, head, query block)
    in that order; ``q (batch, seqlen_q, nheads, headdim)`` is read in place
    (any strides, head dim contiguous): query block ``qb`` scores with the
    queries at rows ``query_pos[qb] - q_offset`` (``q_offset = seqlen_k -
    seqlen_q``, bottom-right alignment), ``query_pos
    (num_q_blocks, lanes)`` int32 their key positions (lanes a multiple of
    :data:`LANES`). ``keys``: a ``(batch, nheads_k, positions, width)``
    copy (adjacent block keys; ``width >= headdim``, the extra head dims
    zero), or float32 keys read in place where a
    :class:`~longattn.kernels.block_sparse.eager.KeyRows` says (a decode cache).
    Ties keep the earlier branch.

    bfloat16 ``q`` and key copy with an even ``width`` (where
    :func:`has_bf16_search`): scored with bf16 dot products, or on AMX
    tiles (:func:`bf16_search_uses_amx`; products exact in float32, float32
    sums: scores equal the float32 search's up to summation order).
    Elsewhere both are scored in float32."""
    bf16 = q.dtype == torch.bfloat16
    if bf16 and (isinstance(keys, KeyRows) or keys.dtype != torch.bfloat16 or keys.shape[-1] % 2):
        raise ValueError("the bf16 search takes a bfloat16 key copy of even width")
    if bf16 and not has_bf16_search(build_flags):  # this build has no bf16 dot products: score in float32
        q, keys, bf16 = q.float(), keys.float(), False
    if q.dtype != torch.float32 and not bf16:
        raise ValueError(f"search_blocks_cpu takes float32 or bfloat16 q, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"search_blocks_cpu takes q (batch, seqlen_q, nheads, headdim), got shape {tuple(q.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    batch, _, nheads, q_dim = q.shape
    lanes = query_pos.shape[1]
    rows = batch * nheads * range_end.shape[0]
    table, table_stride, page_size = None, 0, 0
    if isinstance(keys, KeyRows):
        if keys.k_rows.dtype != torch.float32:
            raise ValueError("search_blocks_cpu reads keys in place only in float32")
        nheads_k, head_stride, pos_stride = keys.nheads_k, 1, keys.nheads_k
        if keys.block_table is None:
            batch_stride = keys.positions_per_sequence * nheads_k
            key_rows = keys.k_rows[keys.first_batch * batch_stride:]
        else:
            batch_stride, key_rows = 0, keys.k_rows
            table = keys.block_table[keys.first_batch:].contiguous()
            table_stride, page_size = table.shape[1], keys.page_size
    else:
        nheads_k, positions = keys.shape[1], keys.shape[2]
        batch_stride, head_stride, pos_stride, key_rows = nheads_k * positions, positions, 1, keys.contiguous()
    headdim = key_rows.shape[-1]
    starts, ends = starts.contiguous().clone(), ends.contiguous().clone()
    query_pos, range_end = query_pos.contiguous(), range_end.contiguous()
    if query_pos.dtype != torch.int32 or range_end.dtype != torch.int64:
        raise ValueError("search_blocks_cpu takes int32 query_pos and int64 range_end")
    status = _search_kernel(tuple(build_flags), bf16)(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), q_offset, q_dim,
        query_pos.data_ptr(), range_end.data_ptr(),
        key_rows.data_ptr(), batch_stride, head_stride, pos_stride,
        None if table is None else table.data_ptr(), table_stride, page_size,
        starts.data_ptr(), ends.data_ptr(), rows, lanes, headdim, block_k, starts.shape[1], rounds,
        sink_size, int(causal), nheads, nheads_k, range_end.shape[0], kernel_threads(),
    )
    if status != 0:
        raise RuntimeError(f"the C++ HiP search rejected its arguments (status {status})")
    return starts, ends

