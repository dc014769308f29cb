"""Gather decode, eager PyTorch twin: the readable specification.

Shapes:
    q ``(batch, nheads, headdim)``: one query per sequence and head (a decode step);
    contiguous cache ``(batch, capacity, nheads_k, headdim)``, or paged cache
    ``(num_pages, page_size, nheads_k, headdim)`` with ``block_table (batch, max_pages)``;
    indices ``(batch, nlists, n)`` integer token positions into each sequence
    (``-1`` = no token), ``nlists`` either ``nheads_k`` (one list per kv head,
    shared by its query group) or ``nheads`` (one list per query head).
    out like q, lse ``(batch, nheads)`` float32 (natural log).

Query head ``h`` (kv head ``h // group``) attends exactly the tokens its list
names -- no causal or window rule: the list is the visibility. A list with no
token gives out 0 and lse -inf. A token listed twice counts twice (callers pass
distinct positions; not checked). Math in float32. This twin gathers the
listed rows into a copy; the kernels read them in place.
"""

from __future__ import annotations

import torch


def gather_rows(cache: torch.Tensor, block_table: torch.Tensor | None, positions: torch.Tensor,
                kv_heads: torch.Tensor) -> torch.Tensor:
    """``cache`` rows at ``positions (batch, L, n)`` (>= 0) of kv head ``kv_heads (L,)``
    per list: ``(batch, L, n, headdim)``. Paged: position ``p`` of sequence ``b``
    lives in page ``block_table[b, p // page_size]`` at offset ``p % page_size``."""
    batch = positions.shape[0]
    b = torch.arange(batch, device=positions.device)[:, None, None]
    h = kv_heads[None, :, None]
    if block_table is None:
        return cache[b, positions, h]
    page_size = cache.shape[1]
    pages = block_table.to(torch.long)[b, positions // page_size]
    return cache[pages, positions % page_size, h]


def gather_decode_eager(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor,
                        block_table: torch.Tensor | None, *, scale: float,
                        softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as in the module docstring."""
    batch, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    group = nheads // nheads_k
    nlists = indices.shape[1]
    per_query = nlists == nheads
    device = q.device
    idx = indices.to(torch.long)
    valid = idx >= 0
    positions = idx.clamp(min=0)
    list_heads = torch.arange(nlists, device=device)
    kv_heads = list_heads // group if per_query else list_heads
    keys = gather_rows(k_cache, block_table, positions, kv_heads).float()  # (batch, L, n, d)
    values = gather_rows(v_cache, block_table, positions, kv_heads).float()
    if per_query:
        qg = q.float().unsqueeze(2)  # (batch, nheads, 1, d): each head its own list
    else:
        qg = q.float().reshape(batch, nheads_k, group, headdim)  # a kv head's list serves its group
    scores = torch.einsum("blgd,blnd->blgn", qg, keys) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (batch, L, g)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    probs = probs.masked_fill(~valid[:, :, None, :], 0.0)
    out = torch.einsum("blgn,blnd->blgd", probs, values)
    return out.reshape(batch, nheads, -1).to(q.dtype), lse.reshape(batch, nheads)
