"""Gather decode, CUDA twin (``csrc/cuda/gather_decode.cu``).

Same arguments and results as :func:`longattn.kernels.gather.eager.gather_decode_eager`
(shapes there; q any strides, headdim <= 256). Two launches, no atomics
(bitwise deterministic): the partial kernel, grid ``(batch * nlists,
num_splits * ceil(rows / 16))``, and, when lists are split, a merge per list and
``MERGE_COLS`` headdim columns. The split depends only on the shapes
(:func:`split_count`). Compiled at first use with NVRTC through
``cupy.RawModule`` (CUDA stays optional); tensors cross to cupy through DLPack
(16-bit floats as int16 views), kernels launch on torch's current stream.

Verified here by compiling the source with nvcc for sm_80 and sm_90 and by
running the kernels in the CPU emulation of tests/decode/test_decode_cuda.py
(tests/kernels/test_gather_decode.py); not yet run on a GPU, so
``backend="auto"`` does not pick it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from longattn.errors import DeviceError, DTypeError, UnsupportedFeatureError
from longattn.kernels.support.cuda_support import Launch, cuda_source, kernel_pair, to_cupy
from longattn.kernels.support.cuda_support import cuda_unavailable_reason as unavailable_reason

SOURCE = cuda_source("gather_decode.cu")
MAX_HEADDIM = 256  # = kMaxDim in the source
# Constants of the source: threads per CTA, list rows per CTA, entries per step, merge columns.
THREADS, ROWS, BLOCK_N, MERGE_COLS = 128, 16, 32, 32
MIN_SPLIT = 256  # shortest split worth a partial (entries, a multiple of BLOCK_N)
TARGET_CTAS = 256  # CTAs to aim for: a few per SM
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA twin can run here, else a one-line reason. Imports nothing heavy."""
    return unavailable_reason(SOURCE)


def gather_smem_bytes(headdim: int) -> int:
    """Dynamic shared memory of the partial kernel: int64 row offsets for K and V,
    then float32 q (ROWS x D), K (BLOCK_N x (D + 1)) and V (BLOCK_N x D)."""
    return 2 * BLOCK_N * 8 + 4 * (ROWS * headdim + BLOCK_N * (headdim + 1) + BLOCK_N * headdim)


def split_count(batch: int, nlists: int, n: int, rows: int) -> tuple[int, int]:
    """``(split_len, num_splits)``: one split when the lists already give
    TARGET_CTAS CTAs or are short, else about TARGET_CTAS CTAs of at least
    MIN_SPLIT entries (multiples of BLOCK_N)."""
    ctas = max(batch * nlists * -(-rows // ROWS), 1)
    if n <= MIN_SPLIT or ctas >= TARGET_CTAS:
        return max(n, 1), 1
    want = -(-TARGET_CTAS // ctas)
    length = max(MIN_SPLIT, -(-(-(-n // want)) // BLOCK_N) * BLOCK_N)
    return length, -(-n // length)


@functools.cache
def _kernels(device_index: int, suffix: str, headdim: int):
    return kernel_pair(SOURCE, device_index, f"gather_partial_{suffix}", f"gather_merge_{suffix}",
                       gather_smem_bytes(headdim))


def prepare_launches(q, k_cache, v_cache, indices, block_table, *, scale, softcap, split_len=None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[Launch]]:
    """Outputs, workspace and the launches, on q's device, in the kernels'
    parameter order. Needs no cupy and no GPU, so the argument lists can be
    checked against the source (and run in a CPU emulation) anywhere."""
    batch, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    nlists, n = indices.shape[1], indices.shape[2]
    rows, group = nheads // nlists, nheads // nheads_k
    out = torch.zeros((batch, nheads, headdim), dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads), float("-inf"), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse, []
    if split_len is None:
        split, num_splits = split_count(batch, nlists, n, rows)
    else:
        split = max(1, int(split_len))
        num_splits = max(1, -(-n // split))
    ws_rows = batch * nlists * num_splits * rows if num_splits > 1 else 1  # >= 1 keeps the pointer valid
    ws_o = torch.empty((ws_rows * headdim,), dtype=torch.float32, device=q.device)
    ws_l = torch.empty((ws_rows,), dtype=torch.float32, device=q.device)
    idx = indices.to(torch.int32)  # the kernel reads int32 lists (any strides)
    paged = block_table is not None
    table = block_table.to(torch.int32) if paged else idx  # never read when not paged
    i64, i32, f32 = np.int64, np.int32, np.float32
    suffix = _SUFFIX[q.dtype]
    launches = [Launch(
        f"gather_partial_{suffix}", (batch * nlists, num_splits * -(-rows // ROWS)),
        (q, k_cache, v_cache, idx, table, out, lse, ws_o, ws_l,
         *(i64(x) for x in (*q.stride(), *k_cache.stride(), *v_cache.stride(), *idx.stride())),
         i64(table.stride(0)), i64(table.stride(1) if paged else 0),
         i32(nlists), i32(n), i32(rows), i32(group), i32(nheads), i32(headdim),
         i32(k_cache.shape[1] if paged else 0), i32(split), i32(num_splits),  # page_size 0: contiguous
         f32(scale), f32(softcap)),
        gather_smem_bytes(headdim),
    )]
    if num_splits > 1:
        launches.append(Launch(
            f"gather_merge_{suffix}", (batch * nlists, -(-headdim // MERGE_COLS)),
            (out, lse, ws_o, ws_l, i32(nlists), i32(rows), i32(nheads), i32(headdim), i32(num_splits)),
            0,
        ))
    return out, lse, launches


def gather_decode_cuda(q, k_cache, v_cache, indices, block_table, *, scale: float, softcap: float = 0.0,
                       split_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather decode on a CUDA device; shapes in :mod:`longattn.kernels.gather.eager`.
    Inputs are assumed validated (:func:`longattn.kernels.gather.gather_decode`)."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"gather_decode_cuda cannot run: {reason}")
    if not q.is_cuda:
        raise DeviceError(f"gather_decode_cuda needs CUDA tensors, got {q.device}")
    if q.dtype not in _SUFFIX:
        raise DTypeError(f"gather_decode_cuda supports float32, float16, bfloat16, got {q.dtype}")
    if q.shape[-1] > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"gather_decode_cuda supports headdim <= {MAX_HEADDIM}, got {q.shape[-1]}")
    out, lse, launches = prepare_launches(q, k_cache, v_cache, indices, block_table, scale=scale, softcap=softcap,
                                          split_len=split_len)
    if not launches:
        return out, lse
    import cupy

    partial, merge = _kernels(q.device.index, _SUFFIX[q.dtype], q.shape[-1])
    with cupy.cuda.Device(q.device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(q.device).cuda_stream):
        for launch in launches:
            kernel = partial if launch.name.startswith("gather_partial") else merge
            args = tuple(to_cupy(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
            kernel(launch.grid, (THREADS,), args, shared_mem=launch.shared_mem)
    return out, lse
