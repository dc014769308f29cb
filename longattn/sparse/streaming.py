"""StreamingLLM attention: attention sinks plus a sliding window (the "Lambda" mask).

Query ``i`` (bottom-right aligned at key position ``p_i = i + seqlen_k -
seqlen_q``) sees key ``j`` iff ``j <= p_i`` and (``j < sink_size`` or ``j >
p_i - recent_size``): the window counts the token itself, so it holds
``recent_size`` keys ``(p_i - recent_size, p_i]``. A query whose position is
below ``sink_size + recent_size`` therefore sees every earlier key: short
sequences are dense attention.

Positions: longattn takes already-rotated q and k, so whether cached keys keep
their original rotary positions (DuoAttention's choice, what these functions
assume) or are re-rotated into the cache (StreamingLLM's reference) is the
caller's choice.

Prefill cost is ``seqlen * (sink_size + recent_size)`` per head, never a dense
pass: it is the block-sparse primitive with no listed blocks, which on a CPU
(``backend="auto"`` or ``"cpp"``) runs the C++ flash kernel with a sink and
a left window (:mod:`longattn.kernels.dense.cpp`: only the sink and window
tiles are visited). ``backend="eager"`` on a CPU, or ``"auto"`` without the
C++ kernel, runs PyTorch's fused kernel over each chunk's window span
(:func:`streaming_prefill_chunked`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError
from longattn.validation import check_int

# Queries per block of the block-sparse pass: each query block reads the
# window span of all its queries, window + QUERY_BLOCK - 1 keys.
QUERY_BLOCK = 64


@dataclass(frozen=True)
class Streaming:
    """Attention sinks + sliding window (validated on construction).

    Attributes:
        sink_size: leading keys every query sees (>= 0).
        recent_size: the latest keys each query sees, itself included (>= 1):
            ``recent_size=N`` is :func:`longattn.attention`'s ``window_size=(N - 1, 0)``
            (StreamingLLM's and DuoAttention's word; it was ``window_size``
            before 0.2, which read like the tuple and was off by one from it).
    """

    sink_size: int = 64
    recent_size: int = 1024

    def __post_init__(self) -> None:
        check_int("Streaming sink_size", self.sink_size, minimum=0)
        check_int("Streaming recent_size", self.recent_size, minimum=1)

    @property
    def budget(self) -> int:
        """Keys one query sees at most, and what a streaming cache holds: ``sink_size + recent_size``."""
        return self.sink_size + self.recent_size

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, softcap: float,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` under the Lambda mask (inputs validated by :func:`longattn.attention`)."""
        from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_forward

        if not causal:
            raise ArgumentError("sparse=Streaming(...) is defined for causal attention; pass causal=True")
        from longattn.kernels.block_sparse import cpp_reasons

        layout = BlockSparseLayout(q.shape[1], k.shape[1], QUERY_BLOCK, 1, self.sink_size, self.recent_size, True)
        # On a CPU without the C++ kernel, PyTorch's fused kernel per chunk beats the eager block-sparse twin.
        no_cpp = backend == "auto" and bool(cpp_reasons(q, layout))
        if (backend == "eager" or no_cpp) and softcap == 0 and q.device.type == "cpu" and _fused_available():
            return streaming_prefill_chunked(q, k, v, self.sink_size, self.recent_size, scale=scale)
        no_blocks = torch.empty(q.shape[0], q.shape[2], layout.num_q_blocks, 0, dtype=torch.long, device=q.device)
        return block_sparse_forward(q, k, v, no_blocks, layout, scale=scale, softcap=softcap, backend=backend)


def lambda_mask(seqlen_q: int, seqlen_k: int, sink_size: int, recent_size: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``(seqlen_q, seqlen_k)`` bool: the Lambda rule, for the oracle and tests."""
    p = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    return (j <= p) & ((j < sink_size) | (j > p - recent_size))


def reference_chunk_mask(start: int, n: int, sink_size: int, recent_size: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, start + n)`` bool: DuoAttention's reference rule for a chunk of
    ``n`` queries at positions ``start .. start + n - 1`` (``exact_lambda=False``
    of the streaming caches): what the cache held when the chunk began (the
    sinks and the latest ``recent_size`` tokens) plus the chunk causally."""
    p = torch.arange(start, start + n, device=device)[:, None]
    j = torch.arange(start + n, device=device)[None, :]
    return (j <= p) & ((j < sink_size) | (j >= start - recent_size))


# Queries per chunk of the chunked CPU pass: each chunk reads the sinks and
# its window span (window + CHUNK - 1 keys) as one contiguous slice. Smaller
# chunks waste less on the masked triangles at the span's ends, larger ones
# run the fused kernel more efficiently; 192 was the fastest of 96-448 at
# 32k here (within the VM's noise of 128-256).
CHUNK = 192


def _fused_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def streaming_prefill_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_size: int, recent_size: int, *, scale: float,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lambda mask on the CPU, chunk by chunk of ``chunk`` queries. A
    chunk's window span is a contiguous slice of K/V (read in place, no
    copy) and goes through PyTorch's fused CPU attention kernel with an
    additive mask -- the same mask for every chunk past the start, built
    once; when the span has moved past the sinks, the sinks (visible to the
    whole chunk: no mask) are a second call, merged in place. A
    kv head's query group is folded into its rows (GQA without repeating
    K/V). ``(out, lse)`` as every twin."""
    from longattn.kernels.merge import merge_two_in_place

    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group, offset = nheads // nheads_k, seqlen_k - seqlen_q
    out = torch.zeros(batch, seqlen_q, nheads, headdim, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    # (batch, kv head, group member, position, headdim): a kv head's queries as one block of rows.
    q_grouped = q.transpose(1, 2).float().reshape(batch, nheads_k, group, seqlen_q, headdim)
    kt, vt = k.transpose(1, 2).float(), v.transpose(1, 2).float()  # (batch, nheads_k, seqlen_k, headdim) views
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
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
        rows = q_grouped[:, :, :, c0:c1].reshape(batch, nheads_k, group * n, headdim)
        if lo > sink_end:  # span past the sinks: span (masked) and sinks (all visible), merged
            bias, seen = span_mask(lo, p1 + 1 - lo, p0, n)
            o_span, l_span = fused(rows, kt[:, :, lo : p1 + 1], vt[:, :, lo : p1 + 1], 0.0, False,
                                   attn_mask=bias, scale=scale)
            if sink_end:
                o_sink, l_sink = fused(rows, kt[:, :, :sink_end], vt[:, :, :sink_end], 0.0, False, scale=scale)
                l_span = l_span.float()
                merge_two_in_place(o_span, l_span, o_sink, l_sink.float())
        else:  # the span starts right after the sinks: one slice from key 0
            bias, seen = span_mask(0, p1 + 1, p0, n)
            o_span, l_span = fused(rows, kt[:, :, : p1 + 1], vt[:, :, : p1 + 1], 0.0, False,
                                   attn_mask=bias, scale=scale)
        o_span = o_span.reshape(batch, nheads, n, headdim)
        l_span = l_span.float().reshape(batch, nheads, n)
        if not bool(seen.all()):  # rows before the first key see nothing: the contract's 0 / -inf
            o_span = o_span.masked_fill(~seen[None, None, :, None], 0.0)
            l_span = l_span.masked_fill(~seen[None, None, :], float("-inf"))
        out[:, c0:c1] = o_span.transpose(1, 2)
        lse[:, :, c0:c1] = l_span
    return out, lse

