"""HiP (hierarchically pruned attention, arXiv 2406.09827): the configuration
and the prefill method.

For every block of ``block_q`` queries HiP searches, by halving branches of
key blocks (:func:`longattn.sparse.hip_mask.hip_select_blocks`), for the
``topk // block_k`` key blocks of highest score, then runs block-sparse
attention over them plus ``sink_size`` attention sinks and a ``recent_size``
local window (:func:`longattn.kernels.block_sparse.block_sparse_attention`).
Which keys a query sees, exactly (positions bottom-right aligned, ``p_i = i +
seqlen_k - seqlen_q``):

- the sinks ``j < sink_size``;
- the window: causal ``p_i - recent_size < j <= p_i``; non-causal
  ``|j - p_i| < recent_size``;
- every other key ``j >= sink_size`` of a selected key block (block ``m``
  holds keys ``[m * block_k, (m + 1) * block_k)``);

and, with ``causal=True``, only keys ``j <= p_i``. When the searchable range
of a query block (causal: ``[sink_size, p_last - recent_size]`` with
``p_last`` its last query's position; non-causal: ``[sink_size, seqlen_k)``)
holds at most ``topk`` keys' worth of blocks, all of it is selected and the
result is exactly dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError
from longattn.validation import check_int


@dataclass(frozen=True)
class HiP:
    """HiP attention settings (validated on construction).

    Attributes:
        topk: keys kept per query block and head by the search (a multiple of
            ``block_k``); ``topk // block_k`` key blocks.
        block_q: queries per query block (they share one selection).
        block_k: keys per key block (the unit of selection).
        query_stride: the search scores a query block with every
            ``query_stride``-th query, counting back from its last one.
        sink_size: leading keys every query sees.
        recent_size: local window every query sees (0: none).
        refresh_interval: decode steps a selection is reused before it is
            searched again (decode only).
    """

    topk: int = 512
    block_q: int = 64
    block_k: int = 2
    query_stride: int = 2
    sink_size: int = 16
    recent_size: int = 256
    refresh_interval: int = 8

    def __post_init__(self) -> None:
        for name in ("topk", "block_q", "block_k", "query_stride", "refresh_interval"):
            check_int(f"HiP {name}", getattr(self, name), minimum=1)
        for name in ("sink_size", "recent_size"):
            check_int(f"HiP {name}", getattr(self, name), minimum=0)
        if self.topk % self.block_k:
            raise ArgumentError(
                f"HiP topk must be a multiple of block_k, got topk={self.topk}, block_k={self.block_k}"
            )
        if self.query_stride > self.block_q:
            raise ArgumentError(
                f"HiP query_stride must be <= block_q, got query_stride={self.query_stride}, block_q={self.block_q}"
            )

    @property
    def num_blocks(self) -> int:
        """Key blocks selected per query block and head: ``topk // block_k``."""
        return self.topk // self.block_k

    def as_ints(self) -> list[int]:
        """The fields in constructor order: ``HiP(*config.as_ints()) == config``
        (how a config crosses a custom op's boundary under torch.compile)."""
        return [self.topk, self.block_q, self.block_k, self.query_stride, self.sink_size, self.recent_size,
                self.refresh_interval]

    def check_call(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
        """The checks of :meth:`prefill` that read no tensor data: none (HiP takes any
        causal flag and head layout :func:`longattn.attention` accepts)."""

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, softcap: float,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select key blocks (no gradient flows through the choice), then attend
        over them, the sinks and the window: ``(out, lse)``. ``backend`` picks
        the block-sparse twin ("auto", "cpp", "eager", "triton"). Inputs are
        validated by :func:`longattn.attention`."""
        from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_forward
        from longattn.kernels.block_sparse.eager import KeyRows
        from longattn.sparse.hip_mask import select_blocks_and_key_copy

        with torch.no_grad():
            key_blocks, key_copy = select_blocks_and_key_copy(q, KeyRows.dense(k, k), k.shape[1], self,
                                                              causal=causal)
        # On a CPU the attention reads K head-major (each head's keys adjacent:
        # HiP's 2-key blocks are scattered); the search made such a copy, so K
        # is read from it rather than copied again. (longattn.attention runs
        # sparse methods without gradients; a direct caller of prefill whose k
        # requires one keeps k: the copy is outside the graph.)
        if key_copy is not None and q.device.type == "cpu" and not (torch.is_grad_enabled() and k.requires_grad):
            k = key_copy
        layout = BlockSparseLayout(q.shape[1], k.shape[1], self.block_q, self.block_k, self.sink_size,
                                   self.recent_size, causal)
        return block_sparse_forward(q, k, v, key_blocks, layout, scale=scale, softcap=softcap, backend=backend)

