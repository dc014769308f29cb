"""Stream-K (LeanAttention) decode attention, Triton twin.

Same signature and results as the eager twins in
:mod:`longattn.kernels.decode.eager`; it executes a
:class:`~longattn.kernels.decode.plan.DecodePlan` exactly as
:func:`~longattn.kernels.decode.eager.decode_forward_streamk_eager` does.

Shapes (flash-attn's ``flash_attn_with_kvcache`` layout, any strides):
    q ``(batch, seqlen_q, nheads, headdim)``; contiguous cache
    ``(batch, max_seqlen, nheads_k, headdim)``, or paged cache
    ``(num_pages, page_size, nheads_k, headdim)`` (any ``page_size >= 1``) with
    ``block_table (batch, max_pages)`` int32; ``seqlens (batch,)`` int32 keys
    attended. out like q (contiguous, q's dtype), lse ``(batch, nheads,
    seqlen_q)`` float32, natural log.

Alignment is bottom-right per sequence: query ``i`` of batch entry ``b`` sits
at key position ``seqlens[b] - seqlen_q + i``; ``window`` is the effective
``(left, right)`` (-1 unbounded, causal folded in as ``right = 0``) around
it. A row that sees no key gets out 0, lse -inf.

Two launches, no atomics, no spinning:

1. ``_streamk_partial_kernel``, grid ``(num_workers, row_blocks)``: program
   ``c`` walks worker ``c``'s segments (plan rows ``worker_first_segment[c]
   .. [c+1]``). A segment is keys ``[first * block_n, min(last * block_n,
   seqlen))`` of one output tile: a batch entry and ``heads_per_tile`` kv
   heads (1 in the plans made here; CPU plans fold all of them, and are
   executed one kv head after another). Each kv head's query group is folded
   into ``group * seqlen_q`` rows (row ``r`` = query ``r // group`` of head
   ``kv_head * group + r % group``), so K/V are read once for the group.
   Online softmax in float32; a whole-tile segment writes out/lse, any other
   writes its normalised partial ``(out, lse)`` to a float32 workspace slot
   (rows ``(slot, kv head in tile, row)``). ``row_blocks`` splits tall groups
   (large GQA ratio times seqlen_q) into blocks of at most 64 rows (32 for
   headdim > 128), bounding registers and shared memory.
2. ``_streamk_merge_kernel``, grid ``(tiles with partials, row_blocks,
   heads_per_tile x column_blocks)``: merges slots ``tile_first_partial[t] ..
   [t+1]`` in plan order (max, then weighted sum; all -inf gives 0 / -inf),
   writes out/lse. Each program takes ``MERGE_BLOCK_D`` (32) headdim columns:
   a GQA decode tile has a single row block (``group * seqlen_q`` rows, e.g.
   4), and a tile can have up to ``G`` partials (264 on an H100), so without
   the column split one program would read every partial of the tile alone
   while the rest of the GPU idles. Every column program reads all partial
   lse of its rows (a few bytes each) and recomputes the identical merged lse,
   and only its own column slice of the partial outputs; column block 0
   writes lse. The per-element arithmetic and order are unchanged, so the
   result does not depend on the split.

A one-launch GPU variant would let the last contributor of a tile merge
after an atomic counter increment; two launches give the same fixed merge
order without atomics or counters to reset, cost one small extra launch, and
run in the serial interpreter. The result is bitwise deterministic for a
fixed plan. Tiles with no keys are never visited: the outputs are
initialised to 0 / -inf.

The kernel's key block (``BLOCK_N``) is the plan's ``block_n`` rounded up to
a power of two >= 16 (``tl.dot`` needs >= 16) and capped at 64 (32 for
headdim > 128); segments are walked in such blocks with the last one masked,
so any plan works.

Without a GPU this runs under ``TRITON_INTERPRET=1`` (set before triton is
imported): no bfloat16, slow, tests use tiny shapes.
"""

from __future__ import annotations

import contextlib

import torch

from longattn.kernels.decode.plan import DecodePlan, plan_decode
from longattn.errors import ArgumentError, DeviceError, UnsupportedFeatureError
from longattn.kernels.support.triton_support import MAX_HEADDIM, import_triton

triton, tl, _IMPORT_ERROR = import_triton()

_INTERPRETED = False  # set below once the kernels exist


def triton_import_error() -> str | None:
    """None when triton imports, else a one-line reason (for the dispatcher and doctor)."""
    return _IMPORT_ERROR


if triton is not None:
    from longattn.kernels.support.triton_tile import online_softmax_finish, online_softmax_step

    @triton.jit
    def _streamk_partial_kernel(
        Q, K, V, Out, Lse, WsO, WsL,
        Segs, WorkerFirst, Seqlens, BlockTable,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_k0, stride_k1, stride_kh, stride_kd,
        stride_v0, stride_v1, stride_vh, stride_vd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_btb, stride_btp,
        nheads, tiles_per_seq, heads_per_tile, seqlen_q, group, headdim, block_n, page_size,
        scale, softcap, window_left, window_right,
        PAGED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        worker = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        n_rows = group * seqlen_q  # rows of one kv head's query group
        row_ok = rows < n_rows
        qi = rows // group  # query index within the step
        qi64 = qi.to(tl.int64)  # int64 offsets: index * stride can pass 2**31 elements
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < headdim  # BLOCK_D is headdim rounded up to a power of two
        seg_lo = tl.load(WorkerFirst + worker)
        seg_hi = tl.load(WorkerFirst + worker + 1)
        for s in range(seg_lo, seg_hi):
            tile = tl.load(Segs + s * 6 + 1)
            first = tl.load(Segs + s * 6 + 2)
            last = tl.load(Segs + s * 6 + 3)
            whole = tl.load(Segs + s * 6 + 4)
            slot = tl.load(Segs + s * 6 + 5)
            b = tile // tiles_per_seq
            b64 = b.to(tl.int64)  # int64 offsets: batch/page * stride can exceed 2**31
            seqlen = tl.load(Seqlens + b)
            qpos = seqlen - seqlen_q + qi  # bottom-right: key position of each query
            start = first * block_n
            end = tl.minimum(last * block_n, seqlen)
            # Skip key blocks no row can see (rows sit at seqlen - seqlen_q .. seqlen - 1);
            # the plan assigned them anyway, so this only shortens this worker's walk.
            lo = start
            hi = end
            if HAS_LEFT:
                lo = tl.maximum(start, seqlen - seqlen_q - window_left)
                lo = start + (lo - start) // BLOCK_N * BLOCK_N  # keep blocks aligned to the segment
            if HAS_RIGHT:
                hi = tl.minimum(end, seqlen + window_right)
            # A tile holds heads_per_tile kv heads (1 in GPU plans; CPU plans fold them
            # all in): one pass over the segment's keys per kv head.
            for j in range(heads_per_tile):
                hk = (tile % tiles_per_seq) * heads_per_tile + j
                hk64 = hk.to(tl.int64)  # head-major caches have head strides of seqlen * headdim
                heads = hk * group + rows % group
                heads64 = heads.to(tl.int64)
                q = tl.load(Q + b64 * stride_qb + qi64[:, None] * stride_qm + heads64[:, None] * stride_qh
                            + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
                l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
                acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                for start_n in range(lo, hi, BLOCK_N):
                    cols = start_n + offs_n
                    col_ok = cols < hi
                    if PAGED:
                        # Any page_size: position p is in page p // page_size, slot p % page_size.
                        page = tl.load(BlockTable + b64 * stride_btb + (cols // page_size).to(tl.int64) * stride_btp,
                                       mask=col_ok, other=0).to(tl.int64)
                        slot_in_page = (cols % page_size).to(tl.int64)
                        k_rows = page * stride_k0 + slot_in_page * stride_k1
                        v_rows = page * stride_v0 + slot_in_page * stride_v1
                    else:
                        k_rows = b64 * stride_k0 + cols.to(tl.int64) * stride_k1
                        v_rows = b64 * stride_v0 + cols.to(tl.int64) * stride_v1
                    visible = col_ok[None, :]
                    if HAS_LEFT:
                        visible = visible & (cols[None, :] >= qpos[:, None] - window_left)
                    if HAS_RIGHT:
                        visible = visible & (cols[None, :] <= qpos[:, None] + window_right)
                    m_i, l_i, acc = online_softmax_step(
                        q, K + k_rows[None, :] + hk64 * stride_kh + offs_d[:, None] * stride_kd,
                        V + v_rows[:, None] + hk64 * stride_vh + offs_d[None, :] * stride_vd,
                        col_ok, d_ok, visible, m_i, l_i, acc, scale, softcap, HAS_SOFTCAP)

                o, lse = online_softmax_finish(m_i, l_i, acc)
                if whole != 0:  # the only contributor: final output
                    tl.store(Out + b64 * stride_ob + qi64[:, None] * stride_om + heads64[:, None] * stride_oh
                             + offs_d[None, :] * stride_od, o.to(Out.dtype.element_ty),
                             mask=row_ok[:, None] & d_ok[None, :])
                    tl.store(Lse + (b64 * nheads + heads) * seqlen_q + qi, lse, mask=row_ok)
                else:  # one of several: normalised float32 partial, merged by the second kernel
                    # Workspace row; int64 since row * headdim passes 2**31 for ~16M partial rows.
                    base = ((slot * heads_per_tile + j) * n_rows + rows).to(tl.int64)
                    tl.store(WsO + base[:, None] * headdim + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
                    tl.store(WsL + base, lse, mask=row_ok)

    @triton.jit
    def _streamk_merge_kernel(
        Out, Lse, WsO, WsL, MergeTiles, TileFirst,
        stride_ob, stride_om, stride_oh, stride_od,
        nheads, tiles_per_seq, heads_per_tile, seqlen_q, group, headdim, col_blocks,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # BLOCK_D here is the column slice of one program (MERGE_BLOCK_D, or less for
        # small headdim), not the partial kernel's whole padded headdim.
        tile = tl.load(MergeTiles + tl.program_id(0))
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        j = tl.program_id(2) // col_blocks  # which kv head of the tile
        cb = tl.program_id(2) % col_blocks  # which column slice of headdim
        n_rows = group * seqlen_q
        row_ok = rows < n_rows
        qi = rows // group
        offs_d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < headdim
        b64 = (tile // tiles_per_seq).to(tl.int64)
        qi64 = qi.to(tl.int64)  # int64 offsets: index * stride can pass 2**31 elements
        heads = ((tile % tiles_per_seq) * heads_per_tile + j) * group + rows % group
        heads64 = heads.to(tl.int64)
        lo = tl.load(TileFirst + tile)
        hi = tl.load(TileFirst + tile + 1)
        # Pass 1: M = max L_i (0 where every part is -inf, so the weights are exact zeros).
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in range(lo, hi):
            base = ((s * heads_per_tile + j) * n_rows + rows).to(tl.int64)
            m = tl.maximum(m, tl.load(WsL + base, mask=row_ok, other=float("-inf")))
        m = tl.where(m == float("-inf"), 0.0, m)
        # Pass 2: weights exp(L_i - M), summed in slot (= plan) order.
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s in range(lo, hi):
            base = ((s * heads_per_tile + j) * n_rows + rows).to(tl.int64)
            w = tl.exp(tl.load(WsL + base, mask=row_ok, other=float("-inf")) - m)
            o = tl.load(WsO + base[:, None] * headdim + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            den += w
            acc += w[:, None] * o
        empty = den == 0.0
        out = acc / tl.where(empty, 1.0, den)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, den)))
        tl.store(Out + b64 * stride_ob + qi64[:, None] * stride_om + heads64[:, None] * stride_oh
                 + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        # Every column program computed the same lse (same loads, same order); one writes it.
        if cb == 0:
            tl.store(Lse + (b64 * nheads + heads) * seqlen_q + qi, lse, mask=row_ok)

    # The interpreter replaces triton.jit's JITFunction with its own wrapper.
    _INTERPRETED = not isinstance(_streamk_partial_kernel, triton.runtime.JITFunction)


# Headdim columns per merge program. 32 fp32 columns x up to 64 rows keep a program's
# accumulator small, and headdim 128 gives 4 programs per row block of a tile.
# ``longattn.decode.simulate.GpuModel.merge_block_d`` models the same split.
MERGE_BLOCK_D = 32


def default_num_workers(device: torch.device) -> int:
    """``G``: two workers per SM on a GPU (LeanAttention's choice); 4 under the
    interpreter, enough to exercise cross-worker tiles while staying fast."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def plan_num_slots(plan: DecodePlan) -> int:
    """Partial workspace slots a plan needs: the segments of tiles with more than one contributor."""
    return sum(len(segs) for segs in plan.contributors if len(segs) > 1)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_config(n_rows: int, headdim: int, block_n: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, num_warps)`` of the partial kernel; a fixed heuristic, no
    autotune (it can fail at import on hosts without a driver). ``tl.dot`` needs blocks >= 16;
    for headdim > 128 the row and key blocks shrink to 32 so that float32 inputs stay within
    ~70 KB of shared memory (the test checks < 99 KB, the smallest opt-in limit from sm_80 on)."""
    block_d = max(16, _next_pow2(headdim))
    cap = 64 if block_d <= 128 else 32
    block_m = min(cap, max(16, _next_pow2(n_rows)))
    return block_m, min(cap, max(16, _next_pow2(block_n))), block_d, 4 if block_d <= 64 else 8


def decode_forward_triton(
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
    """Stream-K decode attention; returns ``(out, lse)`` (see module docstring).

    ``plan`` None: plan here over ``seqlens`` with ``num_workers`` (default
    :func:`default_num_workers`) and ``block_n`` (default 64 on GPU, 16 under
    the interpreter); a given plan is used as is (its own ``block_n``).
    Inputs are assumed validated (:func:`longattn.decode_attention`).
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"decode_forward_triton needs triton, but {_IMPORT_ERROR}")
    batch, seqlen_q, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    if headdim > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"decode_forward_triton supports headdim <= {MAX_HEADDIM}, got {headdim}")
    if not q.is_cuda and not _INTERPRETED:
        raise DeviceError(
            f"decode_forward_triton got tensors on {q.device}; it needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before triton is imported to run on CPU"
        )
    if plan is None:
        plan = plan_decode(seqlens, nheads_k=nheads_k, num_workers=num_workers or default_num_workers(q.device),
                           block_n=block_n or (16 if _INTERPRETED else 64))
    elif plan.nheads_k != nheads_k or len(plan.seqlens) != batch:
        raise ArgumentError(
            f"plan was made for batch {len(plan.seqlens)} and nheads_k {plan.nheads_k}, "
            f"but the call has batch {batch} and nheads_k {nheads_k}"
        )
    # Initialised: tiles with no keys are never visited by either kernel.
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or plan.total_work == 0:
        return out, lse
    t = plan.as_tensors(q.device)
    n_rows = group * seqlen_q
    # Workspace rows: (slot, kv head of the tile, row); sized from the host-side plan (no device read).
    # It is only read where written; max(1, ...) keeps pointers valid when nothing is partial.
    ws_rows = max(1, plan_num_slots(plan) * plan.heads_per_tile * n_rows)
    ws_o = torch.empty((ws_rows * headdim,), dtype=torch.float32, device=q.device)
    ws_l = torch.empty((ws_rows,), dtype=torch.float32, device=q.device)
    seqlens_i32 = seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    paged = block_table is not None
    table = block_table if paged else seqlens_i32  # any int32 tensor: PAGED=False never reads it
    # Windows past the cache are unbounded in effect; clamping keeps the kernel's int32
    # position sums (qpos + right) from wrapping for huge windows.
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    left, right = min(int(window[0]), capacity), min(int(window[1]), seqlen_q)
    block_m, kernel_block_n, block_d, num_warps = launch_config(n_rows, headdim, plan.block_n)
    row_blocks = triton.cdiv(n_rows, block_m)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # launch on q's GPU
        _streamk_partial_kernel[(plan.num_workers, row_blocks)](
            q, k_cache, v_cache, out, lse, ws_o, ws_l,
            t["segments"], t["worker_first_segment"], seqlens_i32, table,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            table.stride(0), table.stride(1) if paged else 0,
            nheads, plan.tiles_per_sequence, plan.heads_per_tile, seqlen_q, group, headdim, plan.block_n,
            k_cache.shape[1] if paged else 1,
            float(scale), float(softcap), max(left, 0), max(right, 0),
            PAGED=paged, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
            BLOCK_M=block_m, BLOCK_N=kernel_block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=1,
        )
        merge_tiles = [tile for tile, segs in enumerate(plan.contributors) if len(segs) > 1]
        if merge_tiles:
            # Column slices spread one tile's merge over several programs (SMs on a GPU).
            merge_block_d = min(block_d, MERGE_BLOCK_D)
            col_blocks = triton.cdiv(headdim, merge_block_d)
            _streamk_merge_kernel[(len(merge_tiles), row_blocks, plan.heads_per_tile * col_blocks)](
                out, lse, ws_o, ws_l, torch.tensor(merge_tiles, dtype=torch.int32, device=q.device),
                t["tile_first_partial"], *out.stride(),
                nheads, plan.tiles_per_sequence, plan.heads_per_tile, seqlen_q, group, headdim, col_blocks,
                BLOCK_M=block_m, BLOCK_D=merge_block_d, num_warps=4,
            )
    return out, lse
