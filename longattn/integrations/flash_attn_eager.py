"""The PyTorch path of :mod:`longattn.integrations.flash_attn`: what longattn's
kernels have no input for (an ALiBi bias, with keys gathered from a cache
through ``block_table`` / ``cache_batch_idx`` / ``cache_leftpad``), in plain
float32 PyTorch.

Layouts are flash-attn's: ``q (batch, seqlen_q, nheads, headdim)``, keys and
values ``(batch, seqlen_k, nheads_k, headdim)``; query head ``h`` reads key
head ``h // (nheads // nheads_k)``.
"""

from __future__ import annotations

import torch

# Rotary lives with the decode primitive (decode_attention applies it); re-exported here for old imports.
from longattn.kernels.decode.rotary import apply_rotary  # noqa: F401

# Score elements (float32) one query chunk may hold: bounds the memory of the
# bias path to ~64 MiB of scores whatever the sequence lengths.
CHUNK_ELEMENTS = 1 << 24


def attention_with_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    seqlens_k: torch.Tensor | None,
    scale: float,
    window: tuple[int, int],
    softcap: float,
    alibi: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with flash-attn's ALiBi bias, in float32, chunked over query rows.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; with ``seqlens_k``,
            sequence ``b`` uses only its first ``seqlens_k[b]`` keys (the rest is
            padding and never read into the result).
        seqlens_k: ``(batch,)`` int64 keys per sequence, or None (all ``seqlen_k``).
        window: effective ``(left, right)`` (causal folded in, -1 unbounded),
            bottom-right aligned per sequence: query ``i`` of sequence ``b``
            sits at key position ``p = i + L_b - seqlen_q``.
        alibi: ``(batch, nheads)`` float32 slopes or None. The score of query
            ``i`` and key ``j`` gets ``-slope * |p - j|`` added after scaling and
            softcap (flash-attn's order). When the window is exactly causal
            (``left < 0, right == 0``), flash-attn's kernel adds ``+slope * j``
            instead -- the same softmax, an lse larger by ``slope * p`` -- and
            that lse is what is returned here too.

    Returns:
        ``out`` like q (q's dtype) and ``lse (batch, nheads, seqlen_q)``
        float32; a query that sees no key gets out 0 and lse -inf.
        Differentiable in q, k, v.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    device = q.device
    lengths = (torch.full((batch,), seqlen_k, dtype=torch.int64, device=device) if seqlens_k is None
               else seqlens_k.to(device=device, dtype=torch.int64))
    left, right = window
    causal_form = alibi is not None and left < 0 and right == 0
    # (batch, nheads_k, 1, seqlen_k, headdim): GQA by broadcasting, no repeated keys
    kf = k.float().permute(0, 2, 1, 3)[:, :, None]
    vf = v.float().permute(0, 2, 1, 3)[:, :, None]
    cols = torch.arange(seqlen_k, device=device)
    chunk = max(1, min(seqlen_q, CHUNK_ELEMENTS // max(1, batch * nheads * seqlen_k)))
    outs, lses = [], []
    for start in range(0, seqlen_q, chunk):
        rows = torch.arange(start, min(seqlen_q, start + chunk), device=device)
        n = rows.numel()
        qf = q[:, start:start + n].float().reshape(batch, n, nheads_k, group, headdim).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (batch, nheads_k, group, n, seqlen_k)
        scores = scores.reshape(batch, nheads, n, seqlen_k)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        pos = rows[None, :] + (lengths[:, None] - seqlen_q)  # (batch, n): key position of each query
        dist = pos[:, :, None] - cols[None, None, :]  # (batch, n, seqlen_k): p - j
        visible = cols[None, None, :] < lengths[:, None, None]
        if left >= 0:
            visible = visible & (dist <= left)
        if right >= 0:
            visible = visible & (dist >= -right)
        if alibi is not None:
            scores = scores - alibi[:, :, None, None] * dist.abs()[:, None].to(torch.float32)
        visible = visible[:, None].expand(batch, nheads, n, seqlen_k)
        scores = scores.masked_fill(~visible, float("-inf"))
        empty = ~visible.any(dim=-1)  # (batch, nheads, n)
        # Empty rows: compute on zeros (no exp(-inf - -inf) = NaN, finite gradients), then write 0 / -inf.
        safe = scores.masked_fill(empty[..., None], 0.0)
        lse = torch.logsumexp(safe, dim=-1)
        probs = torch.exp(safe - lse[..., None]).masked_fill(empty[..., None], 0.0)
        out = torch.matmul(probs.reshape(batch, nheads_k, group, n, seqlen_k), vf)  # (b, hk, g, n, d)
        outs.append(out.permute(0, 3, 1, 2, 4).reshape(batch, n, nheads, headdim))
        if causal_form:
            lse = lse + alibi[:, :, None] * pos[:, None, :].to(torch.float32)
        lses.append(lse.masked_fill(empty, float("-inf")))
    if not outs:  # seqlen_q == 0
        return q.new_zeros(q.shape), torch.zeros(batch, nheads, 0, dtype=torch.float32, device=device)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 2)


def key_slots(
    rows: torch.Tensor | None,
    starts: torch.Tensor | None,
    block_table: torch.Tensor | None,
    page_size: int,
    batch: int,
    width: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where logical key ``j`` (``0 <= j < width``) of each sequence lives in a cache,
    as index tensors ``(first, second)`` of shape ``(batch, width)`` into the
    cache's first two dimensions.

    Contiguous cache: row ``rows[b]`` (``cache_batch_idx``; None = ``b``), slot
    ``starts[b] + j`` (``cache_leftpad``; None = 0). Paged: page
    ``block_table[b, j // page_size]``, slot ``j % page_size``; ``page_size``
    is the cache's second dimension either way. Entries past what a sequence
    holds point somewhere in range: callers mask them."""
    j = torch.arange(width, device=device)[None, :].expand(batch, width)
    if block_table is not None:
        table = block_table.to(torch.int64)
        cols = (j // page_size).clamp(max=max(table.shape[1] - 1, 0))
        return torch.gather(table, 1, cols), j % page_size
    first = (torch.arange(batch, device=device) if rows is None else rows.to(torch.int64))[:, None].expand(batch, width)
    second = j if starts is None else j + starts.to(torch.int64)[:, None]
    return first, second.clamp(max=max(page_size - 1, 0))
