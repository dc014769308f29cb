"""Block-sparse attention, ``sdpa`` twin: PyTorch's fused CPU attention kernel
(probed and called in :mod:`longattn.kernels.dense.sdpa`, the one place) over
each query block's candidate keys.

- Calls with no listed key blocks, causal (sinks + a window: StreamingLLM's
  Lambda mask): :func:`streaming_prefill_chunked`, a contiguous window span
  per chunk of queries, read in place.
- Otherwise the eager twin's gather algorithm with the fused kernel doing
  each chunk's attention (:func:`longattn.kernels.block_sparse.eager.block_sparse_forward_eager`
  with ``fused=True``).

CPU only, no softcap (the fused kernel has none).
"""

from __future__ import annotations

import torch
from einops import rearrange

from longattn.kernels.dense.sdpa import fused_cpu_attention, masked_attention_math
from longattn.kernels.merge import merge_two_in_place


def block_sparse_forward_sdpa(q, k, v, key_blocks, layout, *, scale: float, softcap: float):
    """``(out, lse)`` of a validated block-sparse call (``softcap`` must be 0)."""
    from longattn.kernels.block_sparse.eager import block_sparse_forward_eager

    if key_blocks.shape[-1] == 0 and layout.causal and layout.recent_size >= 1:
        return streaming_prefill_chunked(q, k, v, layout.sink_size, layout.recent_size, scale=scale)
    return block_sparse_forward_eager(q, k, v, key_blocks, layout, scale=scale, softcap=softcap, fused=True)


def masked_span_attention(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, *,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel over ``rows (..., m, d)`` and a span of ``keys``/``values``
    ``(..., n, d)`` with a 0/-inf ``bias (m, n)``; ``(out, lse)``. The kernel
    adds the bias, and a NaN score (NaN in q or k) plus -inf is NaN: a hidden
    NaN key would reach rows that do not see it. When the result holds NaN
    (rare), the span is done again with hidden scores set to -inf, so NaN
    reaches exactly the rows that see it, as in the oracle."""
    out, lse = fused_cpu_attention(rows, keys, values, attn_mask=bias, scale=scale)
    if not bool(torch.isnan(out).any()):
        return out, lse
    return masked_attention_math(rows, keys, values, ~torch.isneginf(bias), scale=scale)


# Queries per chunk of the chunked CPU pass: each chunk reads the sinks and
# its window span (window + CHUNK - 1 keys) as one contiguous slice. Smaller
# chunks waste less on the masked triangles at the span's ends, larger ones
# run the fused kernel more efficiently; 192 was the fastest of 96-448 at
# 32k here (within the VM's noise of 128-256).
CHUNK = 192


def streaming_prefill_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_size: int, recent_size: int, *, scale: float,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lambda mask on the CPU, chunk by chunk of ``chunk`` queries. A
    chunk's window span is a contiguous slice of K/V (read in place, no
    copy) and goes through PyTorch's fused CPU attention kernel with an
    additive mask (:func:`masked_span_attention`) -- the same mask for every
    chunk past the start, built once; when the span has moved past the
    sinks, the sinks (visible to the whole chunk: no mask) are a second
    call, merged in place. A
    kv head's query group is folded into its rows (GQA without repeating
    K/V). ``(out, lse)`` as every twin."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group, offset = nheads // nheads_k, seqlen_k - seqlen_q
    out = torch.zeros(batch, seqlen_q, nheads, headdim, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    # (batch, kv head, group member, position, headdim): a kv head's queries as one block of rows.
    q_grouped = rearrange(q.float(), "b s (hk g) d -> b hk g s d", g=group)
    kt, vt = k.transpose(1, 2).float(), v.transpose(1, 2).float()  # (batch, nheads_k, seqlen_k, headdim) views
    masks: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def span_mask(first_key: int, num_keys: int, p0: int, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Depends only on where the span starts relative to the chunk: cached.
        key = (first_key - p0, num_keys, num_queries, p0 if first_key < sink_size else -1)
        if key not in masks:
            qpos = torch.arange(p0, p0 + num_queries)[:, None]
            pos = torch.arange(first_key, first_key + num_keys)[None, :]
            visible = (pos <= qpos) & ((pos < sink_size) | (pos > qpos - recent_size))
            bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).repeat(group, 1)
            masks[key] = bias, visible.any(dim=-1)
        return masks[key]

    for c0 in range(0, seqlen_q, chunk):
        c1 = min(c0 + chunk, seqlen_q)
        n = c1 - c0
        p0, p1 = c0 + offset, c1 - 1 + offset  # key positions of the chunk's first and last query
        if p1 < 0:
            continue  # every query of the chunk sits before the first key: out 0, lse -inf
        sink_end = min(sink_size, p1 + 1)  # sinks that exist by the chunk's last query
        lo = max(sink_end, p0 - recent_size + 1)  # first key of the window span
        rows = rearrange(q_grouped[:, :, :, c0:c1], "b hk g n d -> b hk (g n) d")
        if lo > sink_end:  # span past the sinks: span (masked) and sinks (all visible), merged
            bias, seen = span_mask(lo, p1 + 1 - lo, p0, n)
            o_span, l_span = masked_span_attention(rows, kt[:, :, lo : p1 + 1], vt[:, :, lo : p1 + 1], bias,
                                                   scale=scale)
            if sink_end:
                o_sink, l_sink = fused_cpu_attention(rows, kt[:, :, :sink_end], vt[:, :, :sink_end], scale=scale)
                l_span = l_span.float()
                merge_two_in_place(o_span, l_span, o_sink, l_sink.float())
        else:  # the span starts right after the sinks: one slice from key 0
            bias, seen = span_mask(0, p1 + 1, p0, n)
            o_span, l_span = masked_span_attention(rows, kt[:, :, : p1 + 1], vt[:, :, : p1 + 1], bias,
                                                   scale=scale)
        o_span = o_span.reshape(batch, nheads, n, headdim)
        l_span = l_span.float().reshape(batch, nheads, n)
        if not bool(seen.all()):  # rows before the first key see nothing: the contract's 0 / -inf
            o_span = o_span.masked_fill(~seen[None, None, :, None], 0.0)
            l_span = l_span.masked_fill(~seen[None, None, :], float("-inf"))
        out[:, c0:c1] = o_span.transpose(1, 2)
        lse[:, :, c0:c1] = l_span
    return out, lse

