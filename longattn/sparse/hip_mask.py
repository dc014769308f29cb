"""HiP's mask estimation: a tree search for the best key blocks of every
query block, vectorised over batch, heads and query blocks (eager PyTorch,
the CPU path).

For query block ``qb`` (queries ``[qb * block_q, ...)``, last one at position
``p_last``) the searchable keys are ``[sink_size, p_last - recent_size]``
(causal) or ``[sink_size, seqlen_k)`` (non-causal), i.e. key blocks ``lo ..
hi`` (block ``m`` = keys ``[m * block_k, (m + 1) * block_k)``), ``n`` of
them. With ``nb = topk // block_k``:

1. ``n <= nb``: every block of the range is selected (then HiP is exactly
   dense attention).
2. Otherwise the range is cut into ``nb`` groups of consecutive blocks
   (group ``g`` = ``[lo + g * n // nb, lo + (g + 1) * n // nb)``), and each
   round splits every group into halves ``[s, (s + e) // 2)`` and ``[(s + e)
   // 2, e)``, scores each half by its centre block ``(s + e - 1) // 2`` --
   the max of ``q . k`` over the block's keys in the range and the block's
   strided queries (every ``query_stride``-th, counting back from the last,
   each seeing only keys at or before its position when causal) -- and keeps
   the ``nb`` best halves (empty halves score -inf). Rounds continue until
   every group is one block: ``ceil(log2(ceil(n / nb)))`` of them.

Each head searches with its own queries against its kv head's keys (GQA).
The result lists block indices in ascending order, -1 padding last.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.block_sparse.eager import KeyRows
from longattn.kernels.hip_score import scoring_backend
from longattn.kernels.support.huge_pages import empty_on_huge_pages

if TYPE_CHECKING:  # hip.py imports this module to run its search
    from longattn.sparse.hip import HiP

# Elements of the gathered representative keys per chunk of rows: 32 MiB of float32.
CHUNK_ELEMENTS = 1 << 23


def searchable_blocks(layout: BlockSparseLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query block: ``(first block, number of blocks, last searchable key)``, each ``(num_q_blocks,)``."""
    qb = torch.arange(layout.num_q_blocks, device=device)
    p_last = torch.clamp((qb + 1) * layout.block_q, max=layout.seqlen_q) - 1 + layout.offset
    if layout.causal:
        end = torch.clamp(p_last - layout.recent_size, max=layout.seqlen_k - 1)
    else:
        end = torch.full_like(qb, layout.seqlen_k - 1)
    lo = torch.full_like(qb, layout.sink_size // layout.block_k)
    count = torch.where(end >= layout.sink_size, end // layout.block_k - lo + 1, torch.zeros_like(qb))
    return lo, count, end


def hip_select_blocks(
    q: torch.Tensor, k: torch.Tensor, config: HiP, *, causal: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """HiP's selection for every (batch, head, query block).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k ``(batch, seqlen_k, nheads_k, headdim)``.
        config: the :class:`~longattn.sparse.HiP` settings.
        causal: bottom-right causal alignment, as in :func:`longattn.attention`.
        backend: who scores branches: ``"cpp"`` (the C++ kernel, every round
            in one call), ``"triton"`` (a Triton kernel per round: CUDA, or CPU
            under ``TRITON_INTERPRET=1``), ``"eager"`` (PyTorch), or ``"auto"``
            (Triton on CUDA; the C++ kernel on CPU when it builds here, else
            PyTorch). All score in float32; scores differ only in summation order.
            A NaN in q or k makes some dot products NaN: every backend passes
            those over (a block whose every dot product is NaN scores -inf),
            so the backends select alike; the attention that follows still
            sees the NaN wherever a selected block, a sink or the window holds it.

    Returns:
        ``(batch, nheads, ceil(seqlen_q / block_q), topk // block_k)`` int64
        key block indices, ascending, -1 padding at the end: the
        ``key_blocks`` argument of
        :func:`~longattn.kernels.block_sparse.block_sparse_attention`.
    """
    return select_blocks(q, KeyRows.dense(k, k), k.shape[1], config, causal=causal, backend=backend)


def select_blocks(
    q: torch.Tensor, keys: KeyRows, seqlen_k: int, config: HiP, *, causal: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """:func:`hip_select_blocks` over keys in any layout :class:`KeyRows` addresses
    (``seqlen_k`` per sequence): decode searches a KV cache in place."""
    return select_blocks_and_key_copy(q, keys, seqlen_k, config, causal=causal, backend=backend)[0]


def select_blocks_and_key_copy(
    q: torch.Tensor, keys: KeyRows, seqlen_k: int, config: HiP, *, causal: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`select_blocks`, and the search's own copy of the keys when it
    made one in the keys' dtype and head dim: a ``(batch, seqlen_k, nheads_k,
    headdim)`` view of head-major storage (each head's keys adjacent), the
    layout the C++ attention reads K from anyway (:func:`longattn.kernels.dense.cpp.reads_head_major`),
    so HiP's prefill passes it on instead of copying K a second time. None
    when the search read the keys in place or copied them in another dtype."""
    batch, seqlen_q, nheads, headdim = q.shape
    layout = BlockSparseLayout(seqlen_q, seqlen_k, config.block_q, config.block_k, config.sink_size,
                               config.recent_size, causal)
    nqb, nb, device = layout.num_q_blocks, config.num_blocks, q.device
    lo, count, end = searchable_blocks(layout, device)
    # The same geometry on the host, for the decisions Python makes (rounds,
    # masking): reading them back from a GPU would be a host sync.
    _, count_host, end_host = searchable_blocks(layout, torch.device("cpu"))

    g = torch.arange(nb + 1, device=device)
    bounds = lo[:, None] + g[None, :] * count[:, None] // nb  # (nqb, nb + 1)
    starts = bounds[:, :-1].expand(batch, nheads, nqb, nb).reshape(-1, nb).contiguous()
    ends = bounds[:, 1:].expand(batch, nheads, nqb, nb).reshape(-1, nb).contiguous()
    largest = int(-(-count_host.max() // nb)) if nqb and seqlen_k else 0
    rounds = math.ceil(math.log2(largest)) if largest > 1 else 0

    ordered, scorer = False, None
    if rounds:
        scorer = _BranchScorer(q, keys, layout, config, end, scoring_backend(q, backend), end_host=end_host)
        if scorer.backend == "cpp":  # every round in one C++ call; it returns the groups ordered
            starts, ends = scorer.search(starts, ends, rounds)
            ordered = True
        else:
            for _ in range(rounds):
                mids = (starts + ends) // 2
                child_s, child_e = torch.cat([starts, mids], 1), torch.cat([mids, ends], 1)
                centres = ((child_s + child_e - 1) // 2).clamp(0, layout.num_k_blocks - 1)  # empty halves: any block
                scores = scorer.score(centres).masked_fill(child_e <= child_s, float("-inf"))
                keep = torch.topk(scores, nb, dim=1, sorted=False).indices
                starts, ends = child_s.gather(1, keep), child_e.gather(1, keep)

    picked = torch.where(ends > starts, starts, torch.full_like(starts, -1))
    if not ordered:  # ascending, -1 last: sort with -1 read as +inf
        huge = torch.iinfo(picked.dtype).max
        picked = torch.where(picked < 0, huge, picked).sort(dim=1).values
        picked = torch.where(picked == huge, -1, picked)
    key_copy = None if scorer is None else scorer.key_copy(keys.k_rows.dtype, headdim)
    return picked.reshape(batch, nheads, nqb, nb), key_copy


def _strided_queries(layout: BlockSparseLayout, config: HiP, device: torch.device) -> torch.Tensor:
    """``(num_q_blocks, ceil(block_q / query_stride))`` query indices each query
    block scores with: every ``query_stride``-th, counting back from its last
    query; a short last block repeats its last query (the max is unchanged)."""
    strided = -(-config.block_q // config.query_stride)
    qb = torch.arange(layout.num_q_blocks, device=device)
    last = torch.clamp((qb + 1) * config.block_q, max=layout.seqlen_q) - 1
    qidx = last[:, None] - torch.arange(strided, device=device)[None, :] * config.query_stride
    return torch.where(qidx >= qb[:, None] * config.block_q, qidx, last[:, None])


class _BranchScorer:
    """Scores representative key blocks for every (batch, head, query block) row.

    Rows are processed in chunks into buffers allocated once per search:
    fresh tensors of tens of MiB cost more in page faults than the gather
    and matmul that fill them.
    """

    def __init__(self, q: torch.Tensor, keys: KeyRows, layout: BlockSparseLayout, config: HiP,
                 end: torch.Tensor, backend: str = "eager", *, end_host: torch.Tensor | None = None) -> None:
        batch, seqlen_q, nheads, headdim = q.shape
        self.layout, self.block_k = layout, config.block_k
        self.nheads, self.nqb = nheads, layout.num_q_blocks
        self.nheads_k, self.seqlen_k = keys.nheads_k, layout.seqlen_k
        self.group = nheads // self.nheads_k
        device, bk, nkb = q.device, config.block_k, layout.num_k_blocks
        strided = -(-config.block_q // config.query_stride)
        qidx = _strided_queries(layout, config, device)  # (nqb, strided)
        self.qpos = qidx + layout.offset
        self.end = end
        self.backend = backend
        if backend in ("cpp", "triton"):  # lanes padded by repeating the last query (the max is unchanged)
            from longattn.kernels.hip_score.cpp import LANES

            # C++: a multiple of the vector width; Triton: a power of two >= 16 (tl.dot).
            lanes = -(-strided // LANES) * LANES if backend == "cpp" else max(16, 1 << (strided - 1).bit_length())
            pad = torch.cat([torch.arange(strided, device=device),
                             torch.zeros(lanes - strided, dtype=torch.long, device=device)])
            qidx = qidx[:, pad]
            self.padded_query_pos = (qidx + layout.offset).to(torch.int32).contiguous()
            strided = lanes
        # bfloat16 on a CPU with AVX512-BF16: the C++ search scores bf16 pairs
        # natively (half the float32 work; scores equal up to summation order).
        self.bf16 = False
        if backend == "cpp" and q.dtype == torch.bfloat16 and keys.k_rows.dtype == torch.bfloat16:
            from longattn.kernels.hip_score.cpp import has_bf16_search

            self.bf16 = has_bf16_search()
        if backend == "cpp":  # reads each row's strided queries from q itself (transposed per row)
            self.q = q if self.bf16 else q.float()
        else:  # (rows, headdim, strided)
            self.queries_t = (q.transpose(1, 2).float()[:, :, qidx].reshape(-1, strided, headdim)
                              .transpose(1, 2).contiguous())
        # Keys by (batch, kv head, block), zero-padded: the blocks a row scores are
        # scattered, so each one's keys should at least be adjacent. Copying the
        # keys once costs less than reading them strided round after round --
        # unless the rows are few (a decode step): then the C++ search reads a
        # float32 cache in place instead of copying all of it.
        rows = batch * nheads * self.nqb
        self.in_place = (backend == "cpp" and keys.k_rows.dtype == torch.float32
                         and rows * 2 * config.num_blocks < self.seqlen_k * self.nheads_k)
        if not self.in_place:
            width = headdim + (headdim % 2 if self.bf16 else 0)  # the bf16 search pairs head dims (zero-padded)
            dtype = torch.bfloat16 if self.bf16 else torch.float32
            # on huge pages where the OS allows: the search reads it at scattered blocks (huge_pages.py)
            blocks = empty_on_huge_pages(batch, self.nheads_k, nkb * bk, width, dtype=dtype, device=device)
            blocks[:, :, self.seqlen_k :] = 0
            blocks[..., headdim:] = 0
            blocks[:, :, : self.seqlen_k, :headdim] = keys.logical(batch, self.seqlen_k).transpose(1, 2)
            self.key_positions = blocks  # (batch, nheads_k, nkb * bk, width)
            self.key_blocks = blocks.reshape(batch * self.nheads_k * nkb, bk * width)
        self.keys = keys
        # Keys outside a block's searchable part (before the sinks end, after the
        # range ends, after a strided query when causal) need a mask; with
        # aligned sinks and ranges and a window at least as long as a query
        # block (HiP's defaults) none do, and the mask is skipped.
        # Decided on host copies of the geometry: no read-back from the device.
        end_h = end.cpu() if end_host is None else end_host
        qpos_h = _strided_queries(layout, config, torch.device("cpu")) + layout.offset
        active = (end_h >= layout.sink_size)
        ragged_end = bool((((end_h + 1) % bk != 0) & active).any())
        early_query = layout.causal and bool(((qpos_h < end_h[:, None]) & active[:, None]).any())
        self.needs_mask = layout.sink_size % bk != 0 or ragged_end or early_query
        self.buffers: dict[str, torch.Tensor] = {}

    def key_copy(self, dtype: torch.dtype, headdim: int) -> torch.Tensor | None:
        """The key copy as ``(batch, seqlen_k, nheads_k, headdim)`` (a view) when it
        holds the keys in ``dtype`` at full width and no padding in between; else None."""
        if self.in_place or self.key_positions.dtype != dtype or self.key_positions.shape[-1] != headdim:
            return None
        return self.key_positions[:, :, : self.seqlen_k].transpose(1, 2)

    def _buffer(self, name: str, numel: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, dtype=torch.float32, device=self.end.device)
        return buf[:numel]

    def search(self, starts: torch.Tensor, ends: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every round in the C++ kernel (``backend == "cpp"``)."""
        from longattn.kernels.hip_score.cpp import search_blocks_cpu

        return search_blocks_cpu(
            self.q, self.padded_query_pos, self.end, self.keys if self.in_place else self.key_positions,
            starts, ends, q_offset=self.layout.offset, rounds=rounds,
            block_k=self.block_k, sink_size=self.layout.sink_size, causal=self.layout.causal)

    def score(self, blocks: torch.Tensor) -> torch.Tensor:
        """``blocks (rows, c)`` key block indices -> ``(rows, c)`` max of q . k over
        each block's searchable keys and the row's strided queries. The blocks
        must lie in their row's searchable block range (the search's centres
        do); rows without a range get arbitrary scores (the search ignores them)."""
        if self.backend == "triton":
            from longattn.kernels.hip_score.triton import score_blocks_triton

            return score_blocks_triton(
                self.queries_t.transpose(1, 2), self.padded_query_pos, self.end, self.key_positions, blocks,
                block_k=self.block_k, sink_size=self.layout.sink_size, causal=self.layout.causal,
                nheads=self.nheads)
        rows, c = blocks.shape
        bk, device = self.block_k, blocks.device
        headdim, strided = self.queries_t.shape[1], self.queries_t.shape[2]
        nkb = self.layout.num_k_blocks
        out = torch.empty(rows, c, dtype=torch.float32, device=device)
        step = max(1, CHUNK_ELEMENTS // (c * bk * max(headdim, strided)))
        row_ids = torch.arange(rows, device=device)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            n, r = stop - start, row_ids[start:stop]
            b, h = r // (self.nheads * self.nqb), (r // self.nqb) % self.nheads
            base = (b * self.nheads_k + h // self.group) * nkb
            index = (base[:, None] + blocks[start:stop]).reshape(-1)
            keys = torch.index_select(self.key_blocks, 0, index, out=self._buffer("keys", n * c * bk * headdim).view(
                n * c, bk * headdim)).view(n, c * bk, headdim)
            # (n, keys, strided): the max over strided queries is then a contiguous reduction.
            dots = torch.bmm(keys, self.queries_t[start:stop],
                             out=self._buffer("dots", n * strided * c * bk).view(n, c * bk, strided))
            if self.needs_mask:
                qb = r % self.nqb
                kpos = (blocks[start:stop][:, :, None] * bk + torch.arange(bk, device=device)).reshape(n, c * bk, 1)
                ok = (kpos >= self.layout.sink_size) & (kpos <= self.end[qb][:, None, None])
                if self.layout.causal:
                    ok = ok & (kpos <= self.qpos[qb][:, None, :])
                dots.masked_fill_(~ok, float("-inf"))
            # A NaN dot product (NaN in q or k) is passed over, as the C++ and
            # Triton twins do (amax would spread it to the block's score).
            dots.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
            out[start:stop] = dots.amax(dim=2).view(n, c, bk).amax(dim=2)
        return out
