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

import torch

from longattn.kernels.block_sparse import BlockSparseLayout

# Elements of one gathered K (or V) slab per chunk: 8M floats = 32 MiB.
CHUNK_ELEMENTS = 1 << 23

SINK, WINDOW, LISTED = 0, 1, 2  # candidate kinds


def fixed_candidates(layout: BlockSparseLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions every head of a query block considers besides its listed
    blocks: ``(positions (num_q_blocks, F), kinds (F,))`` -- the sinks, then the
    window span of the whole block (positions may fall outside ``[0, seqlen_k)``;
    the mask drops them)."""
    bq, w = layout.block_q, layout.window_size
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


def block_sparse_forward_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_blocks: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (batch, seqlen_q, nheads, headdim) in q's dtype, lse (batch, nheads, seqlen_q) float32)``."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    bq, bk, nqb = layout.block_q, layout.block_k, layout.num_q_blocks
    device = q.device

    # (batch, kv_head, position) order: key row (b, hk, j) is row (b * nheads_k + hk) * seqlen_k + j.
    k_rows = k.transpose(1, 2).reshape(batch * nheads_k * seqlen_k, headdim)
    v_rows = v.transpose(1, 2).reshape(batch * nheads_k * seqlen_k, headdim)
    q_blocks = torch.zeros(batch, nheads, nqb * bq, headdim, dtype=torch.float32, device=device)
    q_blocks[:, :, :seqlen_q] = q.transpose(1, 2)
    q_blocks = q_blocks.reshape(batch * nheads * nqb, bq, headdim)

    fixed_pos, fixed_kind = fixed_candidates(layout, device)
    listed_pos = (key_blocks.long()[..., :, None] * bk + torch.arange(bk, device=device)).reshape(
        batch * nheads * nqb, -1)  # -1 entries give negative positions: dropped by the mask
    kinds = torch.cat([fixed_kind, torch.full((listed_pos.shape[1],), LISTED, device=device)])
    num_candidates = kinds.numel()

    rows = batch * nheads * nqb
    out = torch.zeros(rows, bq, headdim, dtype=torch.float32, device=device)
    lse = torch.full((rows, bq), float("-inf"), dtype=torch.float32, device=device)
    if num_candidates == 0 or seqlen_k == 0:
        return _unblock(out, lse, batch, nheads, seqlen_q, q.dtype)
    step = max(1, CHUNK_ELEMENTS // (num_candidates * max(headdim, bq)))
    local = torch.arange(bq, device=device)
    row_ids = torch.arange(rows, device=device)
    # Gather and score buffers are allocated once: fresh tensors of tens of
    # MiB per chunk cost more in page faults than the work that fills them.
    kbuf = torch.empty(min(step, rows) * num_candidates, headdim, dtype=k.dtype, device=device)
    vbuf = torch.empty_like(kbuf)
    sbuf = torch.empty(min(step, rows) * bq * num_candidates, dtype=torch.float32, device=device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        n, r = stop - start, row_ids[start:stop]
        b, h, qb = r // (nheads * nqb), (r // nqb) % nheads, r % nqb
        pos = torch.cat([fixed_pos[qb], listed_pos[start:stop]], dim=1)  # (n, candidates)
        base = (b * nheads_k + h // group) * seqlen_k
        index = (base[:, None] + pos.clamp(0, seqlen_k - 1)).reshape(-1)
        kc = torch.index_select(k_rows, 0, index, out=kbuf[: n * num_candidates]).view(n, num_candidates, headdim)
        vc = torch.index_select(v_rows, 0, index, out=vbuf[: n * num_candidates]).view(n, num_candidates, headdim)
        if kc.dtype != torch.float32:
            kc, vc = kc.float(), vc.float()
        scores = torch.bmm(q_blocks[start:stop], kc.transpose(1, 2),
                           out=sbuf[: n * bq * num_candidates].view(n, bq, num_candidates))
        scores.mul_(scale)
        if softcap > 0:
            scores.div_(softcap).tanh_().mul_(softcap)
        qpos = (qb[:, None] * bq + local + layout.offset)[:, :, None]  # (n, bq, 1)
        kpos = pos[:, None, :]
        in_window = layout.in_window(qpos, kpos)
        beyond_sinks = kpos >= layout.sink_size
        visible = torch.where(
            kinds == SINK, torch.ones_like(in_window),
            torch.where(kinds == WINDOW, in_window & beyond_sinks, ~in_window & beyond_sinks),
        )
        visible &= (kpos >= 0) & (kpos < seqlen_k)
        if layout.causal:
            visible &= kpos <= qpos
        scores.masked_fill_(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        finite = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        probs = scores.sub_(finite[..., None]).exp_()  # rows that see nothing: exp(-inf) = 0
        torch.bmm(probs, vc, out=out[start:stop])
        lse[start:stop] = row_lse
    return _unblock(out, lse, batch, nheads, seqlen_q, q.dtype)


def _unblock(out, lse, batch, nheads, seqlen_q, dtype):
    out = out.reshape(batch, nheads, -1, out.shape[-1])[:, :, :seqlen_q]
    lse = lse.reshape(batch, nheads, -1)[:, :, :seqlen_q]
    return out.transpose(1, 2).to(dtype), lse.contiguous()
