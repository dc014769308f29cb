"""The stream-K (LeanAttention) schedule for decode attention.

Work is cut into *LeanTiles*: ``block_n`` consecutive keys of one *output
tile*, where an output tile is one ``(batch, kv_head)`` pair with its whole
query group (and all of its ``seqlen_q`` queries) folded in, as in GQA
decode. Output tile ``t`` is ``(batch, kv_head) = divmod(t, nheads_k)`` and
holds ``ceil(seqlens[batch] / block_n)`` LeanTiles; in all there are ``W``.

Worker ``c`` of ``G`` gets the contiguous global LeanTile range
``[c * W // G, (c + 1) * W // G)`` (imbalance at most one LeanTile), which may
cross output-tile boundaries. Where a worker covers a whole output tile it
writes the final output; otherwise each contributor writes a partial
``(out, lse)`` and the partials of a tile are merged in worker order (which
is also key order), so the result is deterministic for a fixed ``G``. The
kernels use "last contributor merges" (no spinning); the order of the merge
is fixed here, whoever performs it.

Example: seqlens (5, 3) keys, nheads_k 1, block_n 2 -> LeanTiles per tile
(3, 2), W = 5; with G = 2, worker 0 gets global [0, 2) = tile 0 blocks 0-1,
worker 1 gets [2, 5) = tile 0 block 2 and tile 1 blocks 0-1. Tile 0 has two
contributors (merged), tile 1 one (written directly).

Plan once per decode step and reuse it across layers (FlashInfer's plan/run
split): it depends only on the lengths, ``nheads_k``, ``block_n`` and ``G``.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.validation import check_int


@dataclass(frozen=True)
class Segment:
    """A worker's piece of one output tile: LeanTiles ``[first, last)`` of tile ``tile``,
    i.e. keys ``[first * block_n, min(last * block_n, seqlen))`` of ``(batch, kv_head)``."""

    worker: int
    tile: int
    batch: int
    kv_head: int  # first kv head of the tile (heads_per_tile of them)
    first: int
    last: int
    whole_tile: bool  # covers every LeanTile of its tile: writes the output, no merge


@dataclass(frozen=True)
class DecodePlan:
    """A stream-K schedule. Build with :func:`plan_decode`.

    Attributes:
        seqlens: keys attended per batch entry (cache length after appending).
        nheads_k: kv heads.
        heads_per_tile: kv heads folded into one output tile (1 on GPUs, where
            tiles are many; all of them on a CPU, where reading every head of a
            key position together streams the cache sequentially). Output tile
            ``t`` is batch ``t // tiles_per_sequence``, kv heads from
            ``(t % tiles_per_sequence) * heads_per_tile``.
        block_n: keys per LeanTile.
        num_workers: ``G``.
        tile_starts: ``(num_tiles + 1,)`` prefix sums: tile ``t`` owns global
            LeanTiles ``[tile_starts[t], tile_starts[t + 1])``.
    """

    seqlens: tuple[int, ...]
    nheads_k: int
    block_n: int
    num_workers: int
    tile_starts: tuple[int, ...]
    heads_per_tile: int = 1

    @property
    def tiles_per_sequence(self) -> int:
        return self.nheads_k // self.heads_per_tile

    @cached_property
    def max_seqlen(self) -> int:
        """The longest sequence (0 for an empty batch): host-side, so a call can
        check a reused plan against the cache's capacity without reading device data."""
        return max(self.seqlens, default=0)

    @cached_property
    def min_seqlen(self) -> int:
        """The shortest sequence (0 for an empty batch). When > 0 every output
        tile has work, so the kernels write every output row."""
        return min(self.seqlens, default=0)

    @cached_property
    def num_partial_slots(self) -> int:
        """Partial ``(out, lse)`` slots the plan's merges need (segments of
        tiles with several contributors): the kernels' workspace size, known
        on the host."""
        return sum(len(segs) for segs in self.contributors if len(segs) > 1)

    @property
    def num_tiles(self) -> int:
        return len(self.tile_starts) - 1

    @property
    def total_work(self) -> int:
        """``W``, the number of LeanTiles."""
        return self.tile_starts[-1]

    def worker_range(self, worker: int) -> tuple[int, int]:
        """Global LeanTile range ``[start, end)`` of ``worker``."""
        w, g = self.total_work, self.num_workers
        return worker * w // g, (worker + 1) * w // g

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        """Every worker's segments, in worker order then key order."""
        out = []
        for worker in range(self.num_workers):
            start, end = self.worker_range(worker)
            pos = start
            while pos < end:
                # The tile holding global LeanTile `pos` (empty tiles are skipped by bisect_right).
                tile = bisect.bisect_right(self.tile_starts, pos) - 1
                tile_begin, tile_end = self.tile_starts[tile], self.tile_starts[tile + 1]
                stop = min(end, tile_end)
                batch, head_tile = divmod(tile, self.tiles_per_sequence)
                kv_head = head_tile * self.heads_per_tile
                out.append(
                    Segment(
                        worker, tile, batch, kv_head, pos - tile_begin, stop - tile_begin,
                        whole_tile=(pos == tile_begin and stop == tile_end),
                    )
                )
                pos = stop
        return tuple(out)

    @cached_property
    def contributors(self) -> tuple[tuple[Segment, ...], ...]:
        """Per output tile, its segments in merge order (worker order = key order).
        Empty for tiles with no keys (their output is 0, lse -inf)."""
        per_tile: list[list[Segment]] = [[] for _ in range(self.num_tiles)]
        for seg in self.segments:
            per_tile[seg.tile].append(seg)
        return tuple(tuple(s) for s in per_tile)

    def as_tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The plan as int32 tensors on ``device`` (built once per device: a
        plan reused across layers pays for this once). See :meth:`_build_tensors`."""
        cache = self.__dict__.setdefault("_tensor_cache", {})  # frozen dataclass: cache outside fields
        # Keyed by what the caller passed first (no torch.device() per call on
        # the hot path), then by the canonical name, so "cpu" and
        # torch.device("cpu") share one set of tensors.
        found = cache.get(device)
        if found is None:
            key = str(torch.device(device))
            found = cache.get(key)
            if found is None:
                found = cache[key] = self._build_tensors(device)
            cache[device] = found
        return found

    def _build_tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """int32 tensors for kernels: ``segments (num_segments, 6)`` rows of
        ``(worker, tile, first, last, whole_tile, partial_slot)``,
        ``worker_first_segment (num_workers + 1,)`` (segments of worker ``c`` are
        rows ``[wfs[c], wfs[c+1])``), ``tile_first_partial (num_tiles + 1,)``
        (partials of tile ``t`` sit in slots ``[tfp[t], tfp[t+1])`` in merge
        order; whole tiles take no slot) and ``seqlens (batch,)``."""
        rows, worker_first = [], [0] * (self.num_workers + 1)
        slot_of: dict[Segment, int] = {}
        tile_first = [0]
        for segs in self.contributors:
            partial = [s for s in segs if not s.whole_tile]
            for s in partial:
                slot_of[s] = len(slot_of)
            tile_first.append(len(slot_of))
        for seg in self.segments:
            rows.append([seg.worker, seg.tile, seg.first, seg.last, int(seg.whole_tile), slot_of.get(seg, -1)])
            worker_first[seg.worker + 1] += 1
        for c in range(self.num_workers):
            worker_first[c + 1] += worker_first[c]
        as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        return {
            "segments": as_i32(rows).reshape(-1, 6),
            "worker_first_segment": as_i32(worker_first),
            "tile_first_partial": as_i32(tile_first),
            "seqlens": as_i32(list(self.seqlens)),
        }


def plan_decode(
    seqlens: Sequence[int] | torch.Tensor,
    *,
    nheads_k: int,
    num_workers: int,
    block_n: int = 64,
    heads_per_tile: int | None = 1,
) -> DecodePlan:
    """Plan stream-K decode over sequences of ``seqlens`` keys.

    Args:
        seqlens: keys attended per batch entry (``cache_seqlens`` plus any
            appended tokens): a sequence of ints or an integer tensor ``(batch,)``
            (a tensor is read on the host once: plan outside the hot loop).
        nheads_k: number of kv heads.
        num_workers: ``G`` >= 1 (threads on a CPU, CTAs on a GPU). More
            workers than LeanTiles is allowed: the extra ones get nothing.
        block_n: keys per LeanTile (>= 1).
        heads_per_tile: kv heads per output tile, an upper bound. 1 (the
            default) suits GPUs, where more, smaller tiles spread better;
            ``None`` puts every kv head in one tile, the CPU layout (each key
            position's heads are read together, in address order; what the
            C++ twin plans for itself). A value that does not divide
            ``nheads_k`` is lowered to the largest divisor of ``nheads_k`` not
            above it (``heads_per_tile=8`` with 2 kv heads gives 2, with 12
            gives 6), so one setting serves every model; the plan's
            ``heads_per_tile`` attribute holds the value used.
    """
    if isinstance(seqlens, torch.Tensor):
        if seqlens.dim() != 1:
            raise ShapeError(f"seqlens must be 1-D (batch,), got shape {tuple(seqlens.shape)}")
        if seqlens.dtype.is_floating_point or seqlens.dtype == torch.bool:
            raise DTypeError(f"seqlens must be an integer tensor, got {seqlens.dtype}")
        seqlens = seqlens.tolist()
    lengths = tuple(int(s) for s in seqlens)
    if any(s < 0 for s in lengths):
        raise ArgumentError(f"seqlens must be >= 0, got {list(lengths)}")
    for name, value in (("nheads_k", nheads_k), ("num_workers", num_workers), ("block_n", block_n)):
        check_int(name, value)
    if heads_per_tile is None:
        heads_per_tile = nheads_k
    heads_per_tile = tile_heads(nheads_k, check_int("heads_per_tile", heads_per_tile))
    starts = [0]
    for length in lengths:
        blocks = -(-length // block_n)
        for _ in range(nheads_k // heads_per_tile):
            starts.append(starts[-1] + blocks)
    return DecodePlan(lengths, nheads_k, block_n, num_workers, tuple(starts), heads_per_tile)


def tile_heads(nheads_k: int, at_most: int) -> int:
    """The largest divisor of ``nheads_k`` that is ``<= at_most`` (both >= 1)."""
    for heads in range(min(at_most, nheads_k), 0, -1):
        if nheads_k % heads == 0:
            return heads
    return 1


# --- torch.compile ------------------------------------------------------------
# A plan crosses a custom op's boundary as ints (ops take primitives); the op
# rebuilds the same plan, cached.

def plan_spec(plan: DecodePlan | None) -> list[int]:
    """``plan`` as ``[nheads_k, block_n, num_workers, heads_per_tile, *seqlens]`` (``[]`` for None)."""
    if plan is None:
        return []
    return [plan.nheads_k, plan.block_n, plan.num_workers, plan.heads_per_tile, *plan.seqlens]


@functools.lru_cache(maxsize=64)
def plan_from_spec(spec: tuple[int, ...]) -> DecodePlan | None:
    """The inverse of :func:`plan_spec` (an equal plan; cached, plans are immutable)."""
    if not spec:
        return None
    nheads_k, block_n, num_workers, heads_per_tile, *seqlens = spec
    return plan_decode(seqlens, nheads_k=nheads_k, num_workers=num_workers, block_n=block_n,
                       heads_per_tile=heads_per_tile)
