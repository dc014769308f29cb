"""Decode attention, eager PyTorch twins: the readable specification.

Shapes (flash-attn's ``flash_attn_with_kvcache`` layout):
    q ``(batch, seqlen_q, nheads, headdim)`` (seqlen_q small: 1 for plain decode),
    contiguous cache ``(batch, max_seqlen, nheads_k, headdim)``, or paged cache
    ``(num_pages, page_size, nheads_k, headdim)`` with ``block_table
    (batch, max_pages)``; ``seqlens (batch,)``: keys attended per sequence.
    out like q, lse ``(batch, nheads, seqlen_q)`` float32.

Alignment is bottom-right within each sequence: query ``i`` of batch entry
``b`` sits at key position ``seqlens[b] - seqlen_q + i``, and ``window``
(the effective ``(left, right)``, causal folded in) is applied around it.

Two twins: :func:`decode_forward_eager` attends each sequence in one piece;
:func:`decode_forward_streamk_eager` executes a stream-K
:class:`~longattn.kernels.decode.plan.DecodePlan` segment by segment and merges the
partials in the plan's fixed order: the specification the CPU, Triton and
CUDA kernels follow.
"""

from __future__ import annotations

import torch

from longattn.kernels.decode.plan import DecodePlan
from longattn.kernels.merge import merge_states
from longattn.masking import visibility_mask


def gather_keys(cache: torch.Tensor, block_table: torch.Tensor | None, batch: int, start: int, end: int) -> torch.Tensor:
    """Keys ``[start, end)`` of sequence ``batch`` as ``(end - start, nheads_k, headdim)``.

    Contiguous caches give a view; paged caches gather page by page:
    position ``p`` lives in page ``block_table[batch, p // page_size]`` at
    offset ``p % page_size``.
    """
    if block_table is None:
        return cache[batch, start:end]
    page_size = cache.shape[1]
    positions = torch.arange(start, end, device=cache.device)
    pages = block_table[batch].to(torch.long)[positions // page_size]
    return cache[pages, positions % page_size]


def attend_slice(
    q_b: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    *,
    key_start: int,
    seqlen: int,
    scale: float,
    window: tuple[int, int],
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's queries against keys ``[key_start, key_start + n)`` of its
    ``seqlen`` keys; returns float32 ``out (seqlen_q, nheads, headdim)`` and
    ``lse (nheads, seqlen_q)`` (rows that see none of these keys: 0 and -inf)."""
    seqlen_q, nheads, dim = q_b.shape
    n, nheads_k = k_s.shape[0], k_s.shape[1]
    group = nheads // nheads_k
    if n == 0:
        return (
            torch.zeros(seqlen_q, nheads, dim, dtype=torch.float32, device=q_b.device),
            torch.full((nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q_b.device),
        )
    # Fold the query group into rows: (nheads_k, group * seqlen_q, dim).
    q_rows = q_b.to(torch.float32).reshape(seqlen_q, nheads_k, group, dim).permute(1, 2, 0, 3)
    q_rows = q_rows.reshape(nheads_k, group * seqlen_q, dim)
    k_f = k_s.to(torch.float32).permute(1, 2, 0)  # (nheads_k, dim, n)
    v_f = v_s.to(torch.float32).permute(1, 0, 2)  # (nheads_k, n, dim)
    scores = torch.bmm(q_rows, k_f).mul_(scale)
    if softcap > 0:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    mask = visibility_mask(
        torch.arange(seqlen_q, device=q_b.device),
        torch.arange(key_start, key_start + n, device=q_b.device),
        seqlen_q,
        seqlen,
        window,
    )
    if mask is not None:
        scores.view(nheads_k, group, seqlen_q, n).masked_fill_(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)  # empty rows: exp gives exact zeros
    probs = scores.sub_(row_max).exp_()
    denom = probs.sum(dim=-1, keepdim=True)
    acc = torch.bmm(probs, v_f).div_(denom.clamp_min(torch.finfo(torch.float32).tiny))
    lse = (row_max + denom.log()).reshape(nheads, seqlen_q)
    out = acc.reshape(nheads_k, group, seqlen_q, dim).permute(2, 0, 1, 3).reshape(seqlen_q, nheads, dim)
    return out, lse


def decode_forward_eager(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence attended in one piece (``plan`` is accepted and ignored)."""
    batch, seqlen_q, nheads, _ = q.shape
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    for b, length in enumerate(seqlens.tolist()):
        k_s = gather_keys(k_cache, block_table, b, 0, length)
        v_s = gather_keys(v_cache, block_table, b, 0, length)
        o, l = attend_slice(q[b], k_s, v_s, key_start=0, seqlen=length, scale=scale, window=window, softcap=softcap)
        out[b] = o.to(q.dtype)
        lse[b] = l
    return out, lse


def decode_forward_streamk_eager(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
    plan: DecodePlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Execute ``plan``: every segment's partial, merged per output tile in plan order."""
    batch, seqlen_q, nheads, dim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    for segments in plan.contributors:
        if not segments:
            continue  # a sequence with no keys: out 0, lse -inf
        b, hk = segments[0].batch, segments[0].kv_head
        kv_heads = slice(hk, hk + plan.heads_per_tile)
        heads = slice(hk * group, (hk + plan.heads_per_tile) * group)
        length = plan.seqlens[b]
        partial_outs, partial_lses = [], []
        for seg in segments:
            start, end = seg.first * plan.block_n, min(seg.last * plan.block_n, length)
            k_s = gather_keys(k_cache, block_table, b, start, end)[:, kv_heads]
            v_s = gather_keys(v_cache, block_table, b, start, end)[:, kv_heads]
            o, l = attend_slice(
                q[b, :, heads], k_s, v_s, key_start=start, seqlen=length, scale=scale, window=window, softcap=softcap
            )
            partial_outs.append(o[None])  # (1, seqlen_q, heads_per_tile * group, dim)
            partial_lses.append(l[None])  # (1, heads_per_tile * group, seqlen_q)
        o, l = merge_states(partial_outs, partial_lses, check=False) if len(segments) > 1 else (partial_outs[0], partial_lses[0])
        out[b, :, heads] = o[0].to(q.dtype)
        lse[b, heads] = l[0]
    return out, lse
