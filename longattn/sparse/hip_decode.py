"""HiP decode: ``decode_attention(..., sparse=HiP(...), state=HiPDecodeState())``.

A decode step's queries (``seqlen_q <= block_q``, bottom-right: query ``i``
of sequence ``b`` sits at position ``L_b - seqlen_q + i``) form one query
block. On a *refresh* (a cache of ``n`` keys) the tree search
(:mod:`longattn.sparse.hip_mask`) selects ``topk // block_k`` key blocks per
head from the cache, in place (contiguous or paged), out of the searchable
keys ``[sink_size, e]`` with ``e = n - 1 - recent_size`` (causal; ``n - 1``
non-causal). The next ``refresh_interval - 1`` steps reuse that selection
and only attend. A query at position ``p`` of any step sees:

- the sinks ``j < sink_size``;
- the window: causal ``p - recent_size < j <= p``, non-causal ``|j - p| < recent_size``;
- every other key ``j >= sink_size`` of a *listed* key block, outside the
  window (causal: ``j <= p - recent_size``). The listed blocks are the
  stored selection, plus -- on the steps that reuse it -- the *carried*
  blocks: every key block holding a key after ``e`` (block
  ``(e + 1) // block_k`` on). Those keys were not searchable at the refresh
  (they were in its window, or not written yet); without them, the keys
  that leave the window between two refreshes would be seen by nobody. So
  the approximation is exactly the search's choice among the keys it saw,
  and with ``topk`` covering the searchable range every step is dense
  attention.

The state is explicit: one :class:`HiPDecodeState` per layer, held by the
caller. ``state=None`` searches on every step (nothing is carried).

Under ``torch.compile(fullgraph=True)`` a step is the custom op
``longattn::hip_decode_step`` (in :mod:`longattn.decode_api`), which takes
the state as three tensors (:meth:`HiPDecodeState.as_tensors`, made on the
first traced step and kept on the state) and mutates them in place, like the
caches: the op loads them into a state object, runs the same uncompiled step,
and writes them back. So compiled and uncompiled steps give the same bits,
and a compiled state holds no Python value the graph would have to update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longattn.kernels.decode.cache import CacheView
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.block_sparse.eager import KeyRows, block_sparse_rows_eager
from longattn.sparse.hip import HiP
from longattn.sparse.hip_mask import select_blocks


@dataclass
class HiPDecodeState:
    """HiP's selection carried between decode steps of one layer.

    Attributes:
        key_blocks: per sequence, ``(1, nheads, 1, topk // block_k)`` key block
            indices chosen at the last refresh (None before the first step).
        lengths: keys per sequence at that refresh.
        steps_since_refresh: steps served by the current selection,
            including the refresh step; a refresh is due when it reaches the
            config's ``refresh_interval``.
        refreshes: how many times the search has run (for inspection).
        carry_from: per sequence, the first key the last refresh could not
            search (``e + 1`` in the module docstring): reuse steps also list
            every key block from ``carry_from // block_k`` on.
        step_blocks: per sequence, the ``(1, nheads, 1, n)`` key blocks the
            last step listed (the stored selection plus the carried blocks;
            -1 = none), for inspection and tests.
        compiled: None, or the state as tensors once a step ran under
            ``torch.compile`` (see :meth:`as_tensors`). A compiled step
            updates only these tensors (it cannot set Python attributes from
            lengths it reads when it runs), so after compiled steps the
            attributes above are stale: ``state.load_tensors(*state.compiled)``
            refreshes them. An uncompiled step on such a state continues from
            the tensors and updates both (``step_blocks`` is set by
            uncompiled steps only). :meth:`reset` drops them.
    """

    key_blocks: list[torch.Tensor] | None = None
    lengths: tuple[int, ...] | None = None
    steps_since_refresh: int = 0
    refreshes: int = 0
    config: HiP | None = None
    nheads: int | None = None
    carry_from: tuple[int, ...] | None = None
    step_blocks: list[torch.Tensor] | None = None
    # The same state as tensors (blocks, info, counts; see as_tensors), made by the
    # first step traced by torch.compile; from then on they are the truth.
    compiled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False,
                                                                              compare=False)

    def reset(self) -> None:
        """Forget the selection: the next step searches (e.g. for a new batch)."""
        self.key_blocks, self.lengths, self.steps_since_refresh = None, None, 0
        self.config, self.nheads = None, None
        self.carry_from, self.step_blocks = None, None
        self.compiled = None

    # --- torch.compile ----------------------------------------------------------
    # A traced step cannot update Python attributes from data it reads when it
    # runs (the lengths), so a compiled step keeps the state in three tensors it
    # passes to the longattn::hip_decode_step op, which mutates them in place:
    #   blocks (batch, nheads, topk // block_k) int64: the stored selection;
    #   info   (batch, 2) int64: lengths and carry_from of the last refresh;
    #   counts (4 + 7,) int64: steps_since_refresh, refreshes, filled (0/1),
    #          nheads, and the filling config's fields (HiP's 7 ints).
    # The op loads them into a HiPDecodeState, runs the uncompiled step, and
    # stores the result back (only after the step succeeded).

    def as_tensors(self, batch: int, nheads: int, config: HiP, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The state as ``(blocks, info, counts)`` (made on first use from the
        attributes; traceable: reads host attributes only)."""
        if self.compiled is None:
            filled = self.key_blocks is not None
            spec = (self.config if filled else config).as_ints()
            counts = [self.steps_since_refresh, self.refreshes, int(filled), self.nheads if filled else nheads, *spec]
            if filled:
                blocks = torch.cat([kb[:, :, 0] for kb in self.key_blocks]).to(torch.int64)
                info = torch.tensor([[n, c] for n, c in zip(self.lengths, self.carry_from)], dtype=torch.int64,
                                    device=device)
            else:
                blocks = torch.full((batch, nheads, config.num_blocks), -1, dtype=torch.int64, device=device)
                info = torch.zeros((batch, 2), dtype=torch.int64, device=device)
            self.compiled = (blocks, info, torch.tensor(counts, dtype=torch.int64, device=device))
        return self.compiled

    def load_tensors(self, blocks: torch.Tensor, info: torch.Tensor, counts: torch.Tensor) -> None:
        """Set the attributes from :meth:`as_tensors`' form (reads them on the host)."""
        c = counts.tolist()
        self.steps_since_refresh, self.refreshes = c[0], c[1]
        if not c[2]:
            self.key_blocks, self.lengths, self.config, self.nheads, self.carry_from = None, None, None, None, None
            return
        self.nheads, self.config = c[3], HiP(*c[4:])
        self.key_blocks = [blocks[b : b + 1, :, None].clone() for b in range(blocks.shape[0])]
        rows = info.tolist()
        self.lengths = tuple(r[0] for r in rows)
        self.carry_from = tuple(r[1] for r in rows)

    def store_tensors(self, blocks: torch.Tensor, info: torch.Tensor, counts: torch.Tensor) -> None:
        """Write the attributes into :meth:`as_tensors`' form, in place (same shapes)."""
        filled = self.key_blocks is not None
        spec = self.config.as_ints() if filled else counts[4:].tolist()
        counts.copy_(torch.tensor([self.steps_since_refresh, self.refreshes, int(filled),
                                   self.nheads if filled else int(counts[3]), *spec], dtype=torch.int64))
        if filled:
            blocks.copy_(torch.cat([kb[:, :, 0] for kb in self.key_blocks]))
            info.copy_(torch.tensor([[n, c] for n, c in zip(self.lengths, self.carry_from)], dtype=torch.int64))

    def refresh_due(self, config: HiP, lengths: tuple[int, ...], nheads: int) -> bool:
        """True when the next step must search; raises if the state belongs to other sequences."""
        if self.key_blocks is None:
            return True
        if config != self.config or nheads != self.nheads:
            raise ArgumentError(
                f"state was filled with {self.config} and {self.nheads} heads, this call uses {config} and "
                f"{nheads} heads; use one HiPDecodeState per layer and config (or call state.reset())"
            )
        if len(lengths) != len(self.lengths) or any(n < m for n, m in zip(lengths, self.lengths)):
            raise ArgumentError(
                f"state was filled for sequences of lengths {list(self.lengths)}, this call attends "
                f"{list(lengths)}: a state follows one batch of growing sequences; call state.reset() "
                "for a new batch"
            )
        return self.steps_since_refresh >= config.refresh_interval


def hip_decode(
    q: torch.Tensor,
    cache: CacheView,
    config: HiP,
    state: HiPDecodeState | None,
    *,
    scale: float,
    softcap: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a HiP decode step over a validated cache (tokens already appended)."""
    batch, seqlen_q, nheads, _ = q.shape
    if seqlen_q > config.block_q:
        raise UnsupportedFeatureError(
            f"HiP decode takes seqlen_q <= block_q ({config.block_q}) queries per step, got {seqlen_q}; "
            "run longer chunks through longattn.attention(..., sparse=HiP(...))"
        )
    if state is not None and not isinstance(state, HiPDecodeState):
        raise ArgumentError(f"state for sparse=HiP must be a longattn.sparse.HiPDecodeState, got {type(state).__name__}")
    lengths = tuple(cache.seqlens.tolist())
    keys = (KeyRows.paged(cache.k_cache, cache.v_cache, cache.block_table) if cache.paged
            else KeyRows.dense(cache.k_cache, cache.v_cache))
    refresh = state is None or state.refresh_due(config, lengths, nheads)
    if refresh:
        selection = [select_blocks(q[b : b + 1], keys.sequence(b), n, config, causal=causal)
                     for b, n in enumerate(lengths)]
        if state is not None:
            state.key_blocks, state.lengths, state.steps_since_refresh = selection, lengths, 0
            state.config, state.nheads = config, nheads
            state.carry_from = tuple(searchable_end(n, config, causal) + 1 for n in lengths)
            state.refreshes += 1
    else:
        selection = [with_carried(stored, carry, n, config, causal)
                     for stored, carry, n in zip(state.key_blocks, state.carry_from, lengths)]
    if state is not None:
        state.steps_since_refresh += 1
        state.step_blocks = selection

    outs, lses = [], []
    for b, n in enumerate(lengths):
        # One query block holds the step's queries; block_q = seqlen_q keeps
        # the window span to the queries that exist.
        layout = BlockSparseLayout(seqlen_q, n, seqlen_q, config.block_k, config.sink_size, config.recent_size,
                                   causal)
        out, lse = block_sparse_rows_eager(q[b : b + 1], keys.sequence(b), selection[b], layout, scale=scale,
                                           softcap=softcap)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def searchable_end(length: int, config: HiP, causal: bool) -> int:
    """The last key a refresh over ``length`` keys searches (the step's last
    query sits at ``length - 1``); below ``sink_size`` when it searches none."""
    return length - 1 - config.recent_size if causal else length - 1


def with_carried(stored: torch.Tensor, carry_from: int, length: int, config: HiP, causal: bool) -> torch.Tensor:
    """The key blocks a reuse step lists: ``stored (1, nheads, 1, nb)`` plus every
    block from ``carry_from // block_k`` up to the last one a query of this step
    can list (causal: the block of ``length - 1 - recent_size``). The stored
    blocks all lie at or before block ``(carry_from - 1) // block_k``, so only
    the first carried block can repeat one: there it is dropped from the
    stored part. Built on the selection's device from host integers (no sync)."""
    bk = config.block_k
    first = max(0, carry_from) // bk
    last = searchable_end(length, config, causal) // bk if causal else (length - 1) // bk
    if last < first:
        return stored
    carried = torch.arange(first, last + 1, dtype=stored.dtype, device=stored.device)
    stored = torch.where(stored == first, torch.full_like(stored, -1), stored)
    return torch.cat([stored, carried.expand(*stored.shape[:-1], -1)], dim=-1)
