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
C++ kernel, the block-sparse ``sdpa`` twin runs PyTorch's fused kernel over
each chunk's window span (:func:`longattn.kernels.block_sparse.sdpa.streaming_prefill_chunked`).
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

    def check_call(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
        """The checks of :meth:`prefill` that read no tensor data."""
        if not causal:
            raise ArgumentError("sparse=Streaming(...) is defined for causal attention; pass causal=True")

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, softcap: float,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` under the Lambda mask (inputs validated by :func:`longattn.attention`)."""
        from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_forward

        self.check_call(q, k, causal)
        layout = BlockSparseLayout(q.shape[1], k.shape[1], QUERY_BLOCK, 1, self.sink_size, self.recent_size, True)
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
