"""HiP branch scoring, C++ CPU twin (``csrc/cpu/hip_score.cpp``).

Same result as the PyTorch scoring in :mod:`longattn.sparse.hip_mask` (up to
float32 summation order): for each row and candidate key block, the max of
``q . k`` over the row's strided queries and the block's searchable keys. It
reads keys in place instead of gathering them and needs no temporaries, which
is what HiP's mask estimation spends its time on. Built on first use like the
decode kernel; without a compiler the PyTorch scoring serves.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from longattn.kernels.cpp_build import load_library, unavailable_reason

SOURCE = "hip_score.cpp"
# Query lanes are padded to a multiple of this (the widest vector, AVX-512's 16 floats).
LANES = 16

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [
    _PTR, _PTR, _PTR, _PTR, _PTR,  # queries_t, query_pos, range_end, key_blocks, blocks
    _I64, _INT, _INT, _INT, _INT, _INT, _INT,  # rows, S, D, bk, c, sink, causal
    _INT, _INT, _INT, _INT,  # nheads, nheads_k, nqb, nkb
    _PTR, _INT,  # out, num_threads
]


def score_unavailable_reason() -> str | None:
    """None when the C++ scorer builds and loads here, else why not."""
    return unavailable_reason(SOURCE)


@functools.lru_cache(maxsize=None)
def _kernel(build_flags: tuple[str, ...] = ()):
    fn = load_library(SOURCE, build_flags).longattn_hip_score_blocks
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


def score_blocks_cpu(
    queries_t: torch.Tensor,
    query_pos: torch.Tensor,
    range_end: torch.Tensor,
    key_blocks: torch.Tensor,
    blocks: torch.Tensor,
    *,
    block_k: int,
    sink_size: int,
    causal: bool,
    nheads: int,
    nheads_k: int,
    num_k_blocks: int,
    build_flags: tuple[str, ...] = (),
) -> torch.Tensor:
    """``(rows, c)`` float32 block scores (layouts in ``csrc/cpu/hip_score.cpp``):

    queries_t ``(rows, headdim, S)`` float32, S a multiple of :data:`LANES`;
    query_pos ``(nqb, S)`` int32; range_end ``(nqb,)`` int64; key_blocks
    ``(batch * nheads_k * nkb, block_k * headdim)`` float32; blocks ``(rows, c)`` int64.
    """
    rows, headdim, lanes = queries_t.shape
    nqb, c = range_end.shape[0], blocks.shape[1]
    out = torch.empty(rows, c, dtype=torch.float32)
    tensors = [t.contiguous() for t in (queries_t, query_pos, range_end, key_blocks, blocks)]
    status = _kernel(tuple(build_flags))(
        *(t.data_ptr() for t in tensors), rows, lanes, headdim, block_k, c, sink_size, int(causal),
        nheads, nheads_k, nqb, num_k_blocks, out.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"the C++ HiP scorer rejected its arguments (status {status})")
    return out
