"""Stream-K (LeanAttention) decode attention, CUDA twin (``csrc/cuda/decode_streamk.cu``).

Same signature and results as the eager twins in
:mod:`longattn.kernels.decode.eager`; the kernels execute a
:class:`~longattn.kernels.decode.plan.DecodePlan` as
:func:`~longattn.kernels.decode.eager.decode_forward_streamk_eager` does.

Shapes: q ``(batch, seqlen_q, nheads, headdim)`` (any strides, headdim <=
256); contiguous cache ``(batch, max_seqlen, nheads_k, headdim)`` or paged
cache ``(num_pages, page_size, nheads_k, headdim)`` with ``block_table
(batch, max_pages)`` int32; ``seqlens (batch,)`` int32. out like q
(contiguous, q's dtype: float32, float16 or bfloat16), lse ``(batch, nheads,
seqlen_q)`` float32, natural log. Alignment is bottom-right per sequence
(query ``i`` at key position ``seqlens[b] - seqlen_q + i``); ``window`` is
the effective ``(left, right)``, causal folded in.

Two launches (partials per worker, then a merge per split tile and column
block of ``MERGE_COLS`` headdim columns), no atomics:
bitwise deterministic for a fixed plan. The source is compiled at first use
with NVRTC through ``cupy.RawModule`` (no build step; CUDA stays optional),
tensors cross to cupy through DLPack (float16/bfloat16 as int16 views: cupy
has no bfloat16), and kernels launch on torch's current stream.

Verified here only by compiling the source with nvcc for sm_80 and sm_90
(tests/decode/test_decode_cuda.py); the runtime test needs a GPU and cupy.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from longattn.kernels.decode.plan import DecodePlan, plan_decode
from longattn.errors import ArgumentError, DeviceError, DTypeError, UnsupportedFeatureError
from longattn.kernels.support.cuda_support import Launch, cuda_source, kernel_pair, to_cupy
from longattn.kernels.support.cuda_support import cuda_unavailable_reason as unavailable_reason

SOURCE = cuda_source("decode_streamk.cu")
MAX_HEADDIM = 256  # = kMaxDim in the source
# Constants of the source: threads per CTA, query rows per CTA, keys per step.
THREADS, ROWS, BLOCK_N = 128, 16, 32
# Headdim columns per merge CTA (= kMergeCols): the merge grid is (tiles with partials,
# ceil(headdim / MERGE_COLS)), so a split tile is merged by several CTAs in parallel.
MERGE_COLS = 32
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA twin can run here, else a one-line reason. Imports nothing heavy."""
    return unavailable_reason(SOURCE)


def streamk_smem_bytes(headdim: int) -> int:
    """Dynamic shared memory of the partial kernel: int64 key offsets for K and V,
    then float32 q (ROWS x D), K (BLOCK_N x (D + 1)) and V (BLOCK_N x D)."""
    return 2 * BLOCK_N * 8 + 4 * (ROWS * headdim + BLOCK_N * (headdim + 1) + BLOCK_N * headdim)


@functools.cache
def _kernels(device_index: int, suffix: str, headdim: int):
    return kernel_pair(SOURCE, device_index, f"streamk_partial_{suffix}", f"streamk_merge_{suffix}",
                       streamk_smem_bytes(headdim))


def decode_forward_cuda(
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
    num_workers: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream-K decode attention on a CUDA device; returns ``(out, lse)``.

    ``plan`` None: plan here with ``num_workers`` (default 2 per SM) and
    ``block_n`` (default 64). Inputs are assumed validated
    (:func:`longattn.decode_attention`).
    """
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"decode_forward_cuda cannot run: {reason}")
    if not q.is_cuda:
        raise DeviceError(f"decode_forward_cuda needs CUDA tensors, got {q.device}")
    if q.dtype not in _SUFFIX:
        raise DTypeError(f"decode_forward_cuda supports float32, float16, bfloat16, got {q.dtype}")
    batch, seqlen_q, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    if headdim > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"decode_forward_cuda supports headdim <= {MAX_HEADDIM}, got {headdim}")
    if plan is None:
        workers = num_workers or 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
        plan = plan_decode(seqlens, nheads_k=nheads_k, num_workers=workers, block_n=block_n or 64)
    elif plan.nheads_k != nheads_k or len(plan.seqlens) != batch:
        raise ArgumentError(
            f"plan was made for batch {len(plan.seqlens)} and nheads_k {plan.nheads_k}, "
            f"but the call has batch {batch} and nheads_k {nheads_k}"
        )
    out, lse, launches = prepare_launches(q, k_cache, v_cache, seqlens, block_table, scale=scale, window=window,
                                          softcap=softcap, plan=plan)
    if not launches:
        return out, lse
    import cupy

    partial, merge = _kernels(q.device.index, _SUFFIX[q.dtype], headdim)
    with cupy.cuda.Device(q.device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(q.device).cuda_stream):
        for launch in launches:
            kernel = partial if launch.name.startswith("streamk_partial") else merge
            args = tuple(to_cupy(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
            kernel(launch.grid, (THREADS,), args, shared_mem=launch.shared_mem)
    return out, lse


def prepare_launches(
    q, k_cache, v_cache, seqlens, block_table, *, scale, window, softcap, plan: DecodePlan
) -> tuple[torch.Tensor, torch.Tensor, list[Launch]]:
    """Outputs (initialised to 0 / -inf: tiles with no keys are never visited),
    workspace and the launches, on q's device. Needs no cupy and no GPU, so the
    argument lists can be checked against the source's signatures anywhere."""
    batch, seqlen_q, nheads, headdim = q.shape
    group = nheads // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or plan.total_work == 0:
        return out, lse, []
    t = plan.as_tensors(q.device)
    n_rows = group * seqlen_q
    merge_tiles = [tile for tile, segs in enumerate(plan.contributors) if len(segs) > 1]
    # Workspace rows (slot, kv head of the tile, row), sized on the host: no device sync.
    num_slots = sum(len(plan.contributors[tile]) for tile in merge_tiles)
    ws_rows = max(1, num_slots * plan.heads_per_tile * n_rows)  # >= 1 keeps the pointer valid
    ws_o = torch.empty((ws_rows * headdim,), dtype=torch.float32, device=q.device)
    ws_l = torch.empty((ws_rows,), dtype=torch.float32, device=q.device)
    seqlens_i32 = seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    paged = block_table is not None
    table = block_table.to(torch.int32) if paged else seqlens_i32  # never read when not paged
    i64, i32, f32 = np.int64, np.int32, np.float32
    shape = (i32(nheads), i32(plan.tiles_per_sequence), i32(plan.heads_per_tile), i32(seqlen_q), i32(group),
             i32(headdim))
    suffix = _SUFFIX[q.dtype]
    launches = [Launch(
        f"streamk_partial_{suffix}", (plan.num_workers, -(-n_rows // ROWS)),
        (q, k_cache, v_cache, out, lse, ws_o, ws_l, t["segments"], t["worker_first_segment"], seqlens_i32, table,
         *(i64(x) for x in (*q.stride(), *k_cache.stride(), *v_cache.stride())),
         i64(table.stride(0)), i64(table.stride(1) if paged else 0),
         *shape, i32(plan.block_n), i32(k_cache.shape[1] if paged else 0),  # page_size 0: contiguous cache
         f32(scale), f32(softcap), i32(window[0]), i32(window[1])),
        streamk_smem_bytes(headdim),
    )]
    if merge_tiles:
        launches.append(Launch(
            f"streamk_merge_{suffix}", (len(merge_tiles), -(-headdim // MERGE_COLS)),
            (out, lse, ws_o, ws_l, torch.tensor(merge_tiles, dtype=torch.int32, device=q.device),
             t["tile_first_partial"], *shape),
            0,
        ))
    return out, lse, launches
