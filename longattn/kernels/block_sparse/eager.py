"""Block-sparse attention, eager PyTorch twin (the CPU path).

Every (batch, head, query block) row gathers its candidate keys -- the sinks,
the window span of the block and the listed key blocks -- into one dense
``(candidates, headdim)`` slab, so the work is one batched matmul per chunk
of rows, as large as the memory budget allows. Cost per row is
``block_q x (sink + window + block_q + n * block_k)``, independent of
seqlen_k. Math in float32; masks follow
:mod:`longattn.kernels.block_sparse` exactly (the candidate sets overlap, the
masks make them a union without double counting).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.merge import merge_states

# Elements of one gathered K (or V) slab per chunk: 8M floats = 32 MiB.
CHUNK_ELEMENTS = 1 << 23

SINK, WINDOW = 0, 1  # kinds of fixed candidates


def fixed_candidates(layout: BlockSparseLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions every head of a query block considers besides its listed
    blocks: ``(positions (num_q_blocks, F), kinds (F,))`` -- the sinks, then the
    window span of the whole block (positions may fall outside ``[0, seqlen_k)``;
    the mask drops them)."""
    bq, w = layout.block_q, layout.recent_size
    first = torch.arange(layout.num_q_blocks, device=device) * bq + layout.offset  # position of each block's first query
    sinks = torch.arange(min(layout.sink_size, layout.seqlen_k), device=device)
    if w == 0:
        span = torch.empty(0, dtype=torch.long, device=device)
    elif layout.causal:
        span = torch.arange(-w + 1, bq, device=device)  # (p_first - w, p_last]
    else:
        span = torch.arange(-w + 1, bq + w - 1, device=device)  # |j - p| < w for some p in the block
    positions = torch.cat([sinks.expand(layout.num_q_blocks, -1), first[:, None] + span[None, :]], dim=1)
    kinds = torch.cat([torch.full_like(sinks, SINK), torch.full_like(span, WINDOW)])
    return positions, kinds


def fixed_visibility(layout: BlockSparseLayout, positions: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """``(num_q_blocks, block_q, F)`` bool: which fixed candidates (sinks, window
    span) each query of each block sees. The same for every batch entry and
    head, so it is built once per call."""
    qpos = (torch.arange(layout.num_q_blocks, device=positions.device)[:, None] * layout.block_q
            + torch.arange(layout.block_q, device=positions.device) + layout.offset)[:, :, None]
    kpos = positions[:, None, :]
    visible = torch.where(kinds == SINK, torch.ones_like(kpos, dtype=torch.bool),
                          layout.in_window(qpos, kpos) & (kpos >= layout.sink_size))
    visible = visible & (kpos >= 0) & (kpos < layout.seqlen_k)
    if layout.causal:
        visible = visible & (kpos <= qpos)
    return visible


def listed_visibility(layout: BlockSparseLayout, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Listed-block keys ``kpos (n, 1, L)`` seen by queries at ``qpos (n, bq, 1)``:
    past the sinks, inside the sequence, outside the window (the window part
    counts them), and, causal, at or before the query."""
    inside = (kpos >= max(layout.sink_size, 0)) & (kpos < layout.seqlen_k)
    if layout.causal:  # j <= p - window: neither in the window nor after the query
        return inside & (kpos <= qpos - layout.recent_size)
    return inside & ~layout.in_window(qpos, kpos)


@dataclass(frozen=True)
class KeyRows:
    """Where key ``pos`` of (batch ``b``, kv head ``hk``) lives, as a row of flat
    ``(rows, headdim)`` views of K and V -- so keys are gathered from the
    caller's own layout (a (batch, seqlen, nheads_k, headdim) tensor, a
    contiguous KV cache or a paged one) without copying it first."""

    k_rows: torch.Tensor
    v_rows: torch.Tensor
    nheads_k: int
    positions_per_sequence: int  # contiguous layouts: rows of one sequence / nheads_k
    block_table: torch.Tensor | None = None  # paged: (batch, max_pages), int64
    page_size: int = 0
    first_batch: int = 0  # batch index 0 of a call is this sequence of the layout

    @classmethod
    def dense(cls, k: torch.Tensor, v: torch.Tensor) -> KeyRows:
        """``k, v (batch, seqlen, nheads_k, headdim)``, or a contiguous cache (seqlen = capacity)."""
        same = v is k  # HiP's search passes k twice: copy it (when not contiguous) once
        k = k.contiguous()  # no copy when already contiguous
        v = k if same else v.contiguous()
        return cls(k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1]), k.shape[2], k.shape[1])

    @classmethod
    def paged(cls, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor) -> KeyRows:
        """``k_cache, v_cache (num_pages, page_size, nheads_k, headdim)`` + ``block_table (batch, max_pages)``."""
        k, v = k_cache.contiguous(), v_cache.contiguous()
        return cls(k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1]), k.shape[2], 0, block_table.long(), k.shape[1])

    def sequence(self, b: int) -> KeyRows:
        """The same layout, with batch index 0 meaning sequence ``b``."""
        return replace(self, first_batch=self.first_batch + b)

    def logical(self, batch: int, seqlen: int) -> torch.Tensor:
        """The first ``seqlen`` keys of ``batch`` sequences as a ``(batch, seqlen, nheads_k,
        headdim)`` tensor: a view of a contiguous layout, a gather of a paged one."""
        d = self.k_rows.shape[1]
        if self.block_table is None:
            per_sequence = self.k_rows.view(-1, self.positions_per_sequence, self.nheads_k, d)
            return per_sequence[self.first_batch : self.first_batch + batch, :seqlen]
        pos = torch.arange(seqlen, device=self.k_rows.device)
        table = self.block_table[self.first_batch : self.first_batch + batch]
        rows = table[:, pos // self.page_size] * self.page_size + pos % self.page_size  # (batch, seqlen)
        pages = self.k_rows.view(-1, self.nheads_k, d)
        return torch.index_select(pages, 0, rows.reshape(-1)).view(batch, seqlen, self.nheads_k, d)

    def index(self, b: int, hk: int, pos: torch.Tensor) -> torch.Tensor:
        """Rows of keys ``pos`` (valid positions) of batch ``b``, kv head ``hk``."""
        b += self.first_batch
        if self.block_table is None:
            return (b * self.positions_per_sequence + pos) * self.nheads_k + hk
        page = self.block_table[b][pos // self.page_size]
        return (page * self.page_size + pos % self.page_size) * self.nheads_k + hk


def block_sparse_forward_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_blocks: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float,
    softcap: float,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (batch, seqlen_q, nheads, headdim) in q's dtype, lse (batch, nheads, seqlen_q) float32)``
    for ``k, v (batch, seqlen_k, nheads_k, headdim)``; ``fused`` as in :func:`block_sparse_rows_eager`."""
    return block_sparse_rows_eager(q, KeyRows.dense(k, v), key_blocks, layout, scale=scale, softcap=softcap,
                                   fused=fused)


def block_sparse_rows_eager(
    q: torch.Tensor,
    keys: KeyRows,
    key_blocks: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float,
    softcap: float,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of ``q (batch, seqlen_q, nheads, headdim)`` over the
    keys ``keys`` addresses (``layout.seqlen_k`` of them per sequence).

    Each chunk of rows is gathered and attended with an additive mask (0 /
    -inf) through matmul, logsumexp and exp -- the specification -- or, with
    ``fused=True`` (the block-sparse ``sdpa`` twin; CPU, no softcap), through
    PyTorch's fused CPU attention kernel.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = layout.seqlen_k, keys.nheads_k
    group = nheads // nheads_k
    bq, bk, nqb = layout.block_q, layout.block_k, layout.num_q_blocks
    device = q.device
    rows = batch * nheads * nqb

    fixed_pos, fixed_kind = fixed_candidates(layout, device)
    listed_pos = (key_blocks.long()[..., :, None] * bk + torch.arange(bk, device=device)).reshape(rows, -1)
    num_candidates = fixed_pos.shape[1] + listed_pos.shape[1]
    if num_candidates == 0 or seqlen_k == 0 or rows == 0:
        out = torch.zeros(rows, bq, headdim, dtype=torch.float32, device=device)
        lse = torch.full((rows, bq), float("-inf"), dtype=torch.float32, device=device)
        return _unblock(out, lse, batch, nheads, seqlen_q, q.dtype)
    fixed_seen = fixed_visibility(layout, fixed_pos, fixed_kind)  # (nqb, bq, F)
    fixed_bias = torch.zeros(fixed_seen.shape, dtype=torch.float32, device=device).masked_fill_(
        ~fixed_seen, float("-inf"))
    fixed_any = fixed_seen.any(dim=-1)  # (nqb, bq)

    q_blocks = torch.zeros(batch, nheads, nqb * bq, headdim, dtype=torch.float32, device=device)
    q_blocks[:, :, :seqlen_q] = q.transpose(1, 2)
    q_blocks = q_blocks.reshape(rows, bq, headdim)

    attend = _Attend(keys.k_rows, keys.v_rows, scale, softcap, fused, min(nqb, max(1, CHUNK_ELEMENTS // (
        num_candidates * max(headdim, bq)))) * num_candidates)
    step = attend.rows_per_chunk // num_candidates
    # Rows run (batch, head) by (batch, head), query blocks in chunks: a chunk's
    # fixed candidates and their mask are then slices, shared by every head.
    # The fixed and the listed candidates are attended separately (disjoint
    # key sets) into reused part buffers and merged per chunk.
    out = torch.empty(rows, bq, headdim, dtype=torch.float32, device=device)
    lse = torch.empty(rows, bq, dtype=torch.float32, device=device)
    parts_out = torch.empty(2, step, bq, 1, headdim, dtype=torch.float32, device=device)
    parts_lse = torch.empty(2, step, 1, bq, dtype=torch.float32, device=device)
    listed = _ListedMask(layout, step, listed_pos.shape[1], device)
    for bh in range(batch * nheads):
        b, hk = bh // nheads, bh % nheads // group
        for q0 in range(0, nqb, step):
            q1 = min(q0 + step, nqb)
            n, r0, r1 = q1 - q0, bh * nqb + q0, bh * nqb + q1
            attend(q_blocks[r0:r1], keys.index(b, hk, fixed_pos[q0:q1].clamp(0, seqlen_k - 1)),
                   parts_out[0, :n, :, 0], parts_lse[0, :n, 0], bias=fixed_bias[q0:q1], seen_any=fixed_any[q0:q1])
            bias, seen_any = listed(q0, q1, listed_pos[r0:r1])
            attend(q_blocks[r0:r1], keys.index(b, hk, listed_pos[r0:r1].clamp(0, seqlen_k - 1)),
                   parts_out[1, :n, :, 0], parts_lse[1, :n, 0], bias=bias, seen_any=seen_any)
            # merge_states takes (batch, seqlen_q, nheads, headdim) parts: rows as batch, one head.
            merged_out, merged_lse = merge_states(parts_out[:, :n], parts_lse[:, :n], check=False)
            out[r0:r1] = merged_out[:, :, 0]
            lse[r0:r1] = merged_lse[:, 0]
    return _unblock(out, lse, batch, nheads, seqlen_q, q.dtype)


class _ListedMask:
    """The 0/-inf mask of a chunk's listed-block candidates, built in buffers
    reused across chunks (see :func:`listed_visibility` for the rule). Every
    buffer lives on ``device`` (the queries'): the mask meets gathered keys there."""

    def __init__(self, layout: BlockSparseLayout, max_rows: int, listed: int, device: torch.device) -> None:
        self.layout, self.device = layout, device
        self.seen = torch.empty(max_rows * layout.block_q * listed, dtype=torch.bool, device=device)
        self.bias = torch.empty(max_rows * layout.block_q * listed, dtype=torch.float32, device=device)
        self.zero = torch.zeros((), device=device)
        self.neg_inf = torch.full((), float("-inf"), device=device)
        self.local = torch.arange(layout.block_q, device=device)

    def __call__(self, q0: int, q1: int, kpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``kpos (n, L)`` listed positions of query blocks ``[q0, q1)`` ->
        ``(bias (n, bq, L), seen_any (n, bq))``."""
        lay, n, width = self.layout, q1 - q0, kpos.shape[1]
        qpos = (torch.arange(q0, q1, device=self.device)[:, None] * lay.block_q + self.local + lay.offset)[:, :, None]
        seen = self.seen[: n * lay.block_q * width].view(n, lay.block_q, width)
        if lay.causal:
            # Keys outside [sink, seqlen_k) (and -1 padding) moved out of reach,
            # so one comparison per (query, key) decides: j <= p - window.
            inside = (kpos >= lay.sink_size) & (kpos < lay.seqlen_k)
            reach = torch.where(inside, kpos, torch.iinfo(kpos.dtype).max)[:, None, :]
            torch.le(reach, qpos - lay.recent_size, out=seen)
        else:
            seen.copy_(listed_visibility(lay, qpos, kpos[:, None, :]))
        bias = torch.where(seen, self.zero, self.neg_inf, out=self.bias[: seen.numel()].view(seen.shape))
        return bias, seen.any(dim=-1)


class _Attend:
    """Attention of query blocks over gathered candidate keys with a 0/-inf
    mask, into buffers allocated once: fresh tensors of tens of MiB per chunk
    cost more in page faults than the work that fills them. With ``fused``
    (CPU, no softcap) PyTorch's fused CPU attention kernel does the work."""

    def __init__(self, k_rows: torch.Tensor, v_rows: torch.Tensor, scale: float, softcap: float, fused: bool,
                 rows_per_chunk: int) -> None:
        self.k_rows, self.v_rows, self.scale, self.softcap = k_rows, v_rows, scale, softcap
        self.rows_per_chunk = rows_per_chunk  # candidate rows (queries blocks x candidates) per call
        device, headdim = k_rows.device, k_rows.shape[1]
        self.kbuf = torch.empty(rows_per_chunk, headdim, dtype=k_rows.dtype, device=device)
        self.vbuf = torch.empty_like(self.kbuf)
        self.fused = fused and softcap == 0 and device.type == "cpu"

    def __call__(self, q: torch.Tensor, index: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                 bias: torch.Tensor, seen_any: torch.Tensor) -> None:
        """``q (n, bq, d)`` over key rows ``index (n, c)``, masked by ``bias (n, bq, c)``
        (0/-inf; ``seen_any (n, bq)``: rows that see some key). Writes ``out (n, bq, d)``
        and ``lse (n, bq)``; rows that see nothing get 0 and -inf."""
        n, c = index.shape
        d = q.shape[2]
        if c == 0:
            out.zero_()
            lse.fill_(float("-inf"))
            return
        flat = index.reshape(-1)
        kc = torch.index_select(self.k_rows, 0, flat, out=self.kbuf[: n * c]).view(n, c, d)
        vc = torch.index_select(self.v_rows, 0, flat, out=self.vbuf[: n * c]).view(n, c, d)
        if kc.dtype != torch.float32:
            kc, vc = kc.float(), vc.float()
        exact = not self.fused
        if self.fused:
            from longattn.kernels.dense.sdpa import fused_cpu_attention

            part_out, part_lse = fused_cpu_attention(q[:, None], kc[:, None], vc[:, None], attn_mask=bias[:, None],
                                                     scale=self.scale)
            out.copy_(part_out[:, 0])
            lse.copy_(part_lse[:, 0])
            # The fused kernel adds the bias: a NaN score (NaN in q or k) plus
            # -inf is NaN, so a hidden NaN key reaches rows that do not see it.
            # Rare; such chunks are done again the exact way.
            exact = bool(torch.isnan(out).any())
        if exact:
            scores = torch.bmm(q, kc.transpose(1, 2)).mul_(self.scale)
            if self.softcap > 0:
                scores.div_(self.softcap).tanh_().mul_(self.softcap)
            # The bias is 0 or -inf: hidden keys become -inf, a NaN score included
            # (adding -inf would leave it NaN), so NaN reaches only the rows that see it.
            scores.masked_fill_(torch.isneginf(bias), float("-inf"))
            torch.logsumexp(scores, dim=-1, out=lse)
            finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
            torch.bmm(scores.sub_(finite[..., None]).exp_(), vc, out=out)
        # The fused kernel reports lse 0 for rows that see nothing; the contract says -inf.
        out.masked_fill_(~seen_any[..., None], 0.0)
        lse.masked_fill_(~seen_any, float("-inf"))


def _unblock(out, lse, batch, nheads, seqlen_q, dtype):
    out = out.reshape(batch, nheads, -1, out.shape[-1])[:, :, :seqlen_q]
    lse = lse.reshape(batch, nheads, -1)[:, :, :seqlen_q]
    return out.transpose(1, 2).to(dtype), lse.contiguous()
