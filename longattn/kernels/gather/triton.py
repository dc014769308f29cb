"""Gather decode, Triton twin.

Same arguments and results as :func:`longattn.kernels.gather.eager.gather_decode_eager`
(shapes there; any strides). Two launches, no atomics:

1. ``_gather_partial_kernel``, grid ``(batch * nlists, num_splits)``: program
   ``(item, s)`` takes list ``item % nlists`` of sequence ``item // nlists``,
   entries ``[s * split_len, (s + 1) * split_len)``, in blocks of ``BLOCK_N``
   entries: loads the positions, maps them to cache rows (contiguous, or
   paged through ``block_table``), and folds the rows into the online softmax
   of the list's ``rows`` query heads (the whole group of a kv head for per-kv-head
   lists, one head for per-query-head lists; padded to ``BLOCK_M`` >= 16 rows
   for ``tl.dot``). ``-1`` entries are masked (never loaded). A list in one
   split writes out/lse; otherwise a float32 partial goes to workspace slot
   ``item * num_splits + s``.
2. ``_gather_merge_kernel``, grid ``(batch * nlists,)``, only when split:
   merges a list's partials in split order (max, then weighted sum; all -inf
   gives 0 / -inf).

The split depends only on the shapes (:func:`split_count`), so the result is
bitwise deterministic. On a GPU the splits give batch-1 steps enough programs.
Without a GPU this runs under ``TRITON_INTERPRET=1`` (tests, tiny shapes;
no bfloat16 there).
"""

from __future__ import annotations

import torch

from longattn.errors import DeviceError, UnsupportedFeatureError
from longattn.kernels.support.triton_support import MAX_HEADDIM, import_triton

triton, tl, _IMPORT_ERROR = import_triton()

# Entries per block, and the smallest split worth a partial (a multiple of BLOCK_N).
BLOCK_N = 32
MIN_SPLIT = 256
# Programs to aim for on a GPU: a few per SM of a large one.
TARGET_PROGRAMS = 256


def triton_import_error() -> str | None:
    """None when triton imports, else a one-line reason."""
    return _IMPORT_ERROR


if triton is not None:
    from longattn.kernels.support.triton_tile import online_softmax_finish, online_softmax_step

    @triton.jit
    def _gather_partial_kernel(
        Q, K, V, Idx, BlockTable, Out, Lse, WsO, WsL,
        stride_qb, stride_qh, stride_qd,
        stride_k0, stride_k1, stride_kh, stride_kd,
        stride_v0, stride_v1, stride_vh, stride_vd,
        stride_ib, stride_il, stride_in,
        stride_btb, stride_btp,
        stride_ob, stride_oh, stride_od,
        nlists, n, rows, group, nheads, headdim, page_size, split_len, num_splits,
        scale, softcap,
        PAGED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        item = tl.program_id(0)
        split = tl.program_id(1)
        b = item // nlists
        lst = item % nlists
        b64 = b.to(tl.int64)  # int64 offsets: batch/page * stride can exceed 2**31
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < rows
        d_ok = offs_d < headdim
        heads = lst * rows + offs_m
        heads64 = heads.to(tl.int64)
        hk64 = ((lst * rows) // group).to(tl.int64)  # the list's kv head
        q = tl.load(Q + b64 * stride_qb + heads64[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, n)
        idx_base = Idx + b64 * stride_ib + lst.to(tl.int64) * stride_il
        for e0 in range(start, end, BLOCK_N):
            ent = e0 + offs_n
            in_list = ent < end
            pos = tl.load(idx_base + ent.to(tl.int64) * stride_in, mask=in_list, other=-1).to(tl.int64)
            listed = pos >= 0
            safe = tl.where(listed, pos, 0)
            if PAGED:
                page = tl.load(BlockTable + b64 * stride_btb + (safe // page_size) * stride_btp,
                               mask=listed, other=0).to(tl.int64)
                k_rows = page * stride_k0 + (safe % page_size) * stride_k1
                v_rows = page * stride_v0 + (safe % page_size) * stride_v1
            else:
                k_rows = b64 * stride_k0 + safe * stride_k1
                v_rows = b64 * stride_v0 + safe * stride_v1
            visible = row_ok[:, None] & listed[None, :]
            m_i, l_i, acc = online_softmax_step(
                q, K + k_rows[None, :] + hk64 * stride_kh + offs_d[:, None] * stride_kd,
                V + v_rows[:, None] + hk64 * stride_vh + offs_d[None, :] * stride_vd,
                listed, d_ok, visible, m_i, l_i, acc, scale, softcap, HAS_SOFTCAP)
        o, lse = online_softmax_finish(m_i, l_i, acc)
        if num_splits == 1:
            tl.store(Out + b64 * stride_ob + heads64[:, None] * stride_oh + offs_d[None, :] * stride_od,
                     o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            tl.store(Lse + b64 * nheads + heads, lse, mask=row_ok)
        else:
            slot_rows = ((item * num_splits + split) * rows + offs_m).to(tl.int64)
            tl.store(WsO + slot_rows[:, None] * headdim + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(WsL + slot_rows, lse, mask=row_ok)

    @triton.jit
    def _gather_merge_kernel(
        Out, Lse, WsO, WsL,
        stride_ob, stride_oh, stride_od,
        nlists, rows, nheads, headdim, num_splits,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        item = tl.program_id(0)
        b64 = (item // nlists).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < rows
        d_ok = offs_d < headdim
        heads64 = ((item % nlists) * rows + offs_m).to(tl.int64)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in range(0, num_splits):
            base = ((item * num_splits + s) * rows + offs_m).to(tl.int64)
            m = tl.maximum(m, tl.load(WsL + base, mask=row_ok, other=float("-inf")))
        m = tl.where(m == float("-inf"), 0.0, m)  # every part empty: weights exact zeros
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s in range(0, num_splits):
            base = ((item * num_splits + s) * rows + offs_m).to(tl.int64)
            w = tl.exp(tl.load(WsL + base, mask=row_ok, other=float("-inf")) - m)
            o = tl.load(WsO + base[:, None] * headdim + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            den += w
            acc += w[:, None] * o
        empty = den == 0.0
        out = acc / tl.where(empty, 1.0, den)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, den)))
        tl.store(Out + b64 * stride_ob + heads64[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + b64 * nheads + heads64, lse, mask=row_ok)


def split_count(batch: int, nlists: int, n: int) -> tuple[int, int]:
    """``(split_len, num_splits)`` for lists of ``n`` entries: one split when
    there are TARGET_PROGRAMS lists already or the lists are short, else about
    TARGET_PROGRAMS programs of at least MIN_SPLIT entries (multiples of BLOCK_N)."""
    lists = max(batch * nlists, 1)
    if n <= MIN_SPLIT or lists >= TARGET_PROGRAMS:
        return max(n, 1), 1
    want = -(-TARGET_PROGRAMS // lists)
    length = max(MIN_SPLIT, -(-(-(-n // want)) // BLOCK_N) * BLOCK_N)
    return length, -(-n // length)


def gather_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    block_table: torch.Tensor | None,
    *,
    scale: float,
    softcap: float = 0.0,
    split_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather decode with Triton; shapes in :mod:`longattn.kernels.gather.eager`.
    Inputs are assumed validated (:func:`longattn.kernels.gather.gather_decode`).
    ``split_len``: entries per program (default :func:`split_count`)."""
    if triton is None:
        raise RuntimeError(f"the Triton gather-decode twin cannot run: {_IMPORT_ERROR}")
    if q.device.type != "cuda" and q.device.type != "cpu":
        raise DeviceError(f"the Triton gather-decode twin needs cuda (or cpu under TRITON_INTERPRET=1), got {q.device}")
    batch, nheads, headdim = q.shape
    if headdim > MAX_HEADDIM:
        raise UnsupportedFeatureError(f"the Triton gather-decode twin supports headdim <= {MAX_HEADDIM}, got {headdim}")
    nheads_k = k_cache.shape[2]
    nlists, n = indices.shape[1], indices.shape[2]
    rows, group = nheads // nlists, nheads // nheads_k
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, nheads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    if split_len is None:
        split, num_splits = split_count(batch, nlists, n)
    else:
        split = max(1, int(split_len))
        num_splits = max(1, -(-n // split))
    if num_splits > 1:
        ws_o = torch.empty((batch * nlists * num_splits * rows, headdim), dtype=torch.float32, device=q.device)
        ws_l = torch.empty((batch * nlists * num_splits * rows,), dtype=torch.float32, device=q.device)
    else:
        ws_o = ws_l = lse  # never written
    paged = block_table is not None
    table = block_table if paged else indices  # never read when not paged
    block_m = max(16, triton.next_power_of_2(rows))
    block_d = max(16, triton.next_power_of_2(headdim))
    _gather_partial_kernel[(batch * nlists, num_splits)](
        q, k_cache, v_cache, indices, table, out, lse, ws_o, ws_l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *indices.stride(),
        table.stride(0), table.stride(1) if paged else 0, *out.stride(),
        nlists, n, rows, group, nheads, headdim, k_cache.shape[1] if paged else 1, split, num_splits,
        float(scale), float(softcap) if softcap > 0 else 1.0,
        PAGED=paged, HAS_SOFTCAP=softcap > 0, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    if num_splits > 1:
        _gather_merge_kernel[(batch * nlists,)](
            out, lse, ws_o, ws_l, *out.stride(), nlists, rows, nheads, headdim, num_splits,
            BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return out, lse
