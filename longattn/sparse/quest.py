"""Quest (query-aware page selection) for decode:
``decode_attention(q, ..., sparse=Quest(...), state=QuestState(config))``.

The cache's sequence positions are cut into *logical pages* of ``page_size``
consecutive positions (page ``j`` holds positions ``j * page_size .. (j + 1)
* page_size - 1``; independent of a paged cache's own page size). Per
sequence, logical page and kv head the state keeps the element-wise max
``M`` and min ``m`` of the page's keys (over the positions the sequence
holds). For a query ``q`` (already multiplied by the softmax scale),

    bound(page) = sum_i max(q_i * M_i, q_i * m_i)  >=  q . k  for every key k in the page,

since each term bounds ``q_i * k_i`` for ``m_i <= k_i <= M_i``. A step takes,
per kv head, the max of the bound over the query heads of its group, keeps
the ``token_budget // page_size`` pages of highest bound plus the current
(last, possibly partial) page, and attends exactly their positions that lie
inside the sequence (``gather_decode``). With ``token_budget`` >= the
sequence's length every page is kept: the step is dense decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError, ShapeError
from longattn.sparse.token_select import (  # noqa: I001
    register_state,
    SCAN_CHUNK,
    capacity_of,
    check_prefill_cache,
    check_state_batch,
    clamped_table,
    key_rows,
    length_mask,
    top_positions,
)
from longattn.validation import check_int


@dataclass(frozen=True)
class Quest:
    """Quest settings (validated on construction).

    Attributes:
        token_budget: tokens attended per step and kv head, in whole pages:
            ``token_budget // page_size`` selected pages plus the current
            page (so up to ``(token_budget // page_size + 1) * page_size``
            positions). Must be >= ``page_size``.
        page_size: positions per logical page (the unit of selection).
    """

    token_budget: int = 2048
    page_size: int = 16

    def __post_init__(self) -> None:
        check_int("Quest token_budget", self.token_budget, minimum=1)
        check_int("Quest page_size", self.page_size, minimum=1)
        if self.token_budget < self.page_size:
            raise ArgumentError(f"Quest token_budget must be >= page_size (at least one page), got "
                                f"token_budget={self.token_budget}, page_size={self.page_size}")

    @property
    def num_pages(self) -> int:
        """Pages selected by score per step (the current page comes on top)."""
        return self.token_budget // self.page_size


class QuestState:
    """Quest's page metadata for one layer, held by the caller.

    Build it once from the prompt (``state.prefill(k_cache, cache_seqlens,
    block_table)``) or let the first ``decode_attention`` step fill it from
    the cache; every later step updates it with the keys it appends. It
    follows one batch of growing sequences: a step whose ``cache_seqlens``
    differ from the lengths it covers, or whose cache has other heads, head
    dim or dtype, or whose ``Quest`` has another ``page_size``, raises
    :class:`~longattn.errors.ArgumentError` (the ``token_budget`` may change
    between steps: the metadata does not depend on it).

    Attributes:
        config: the :class:`Quest` it was made for.
        lengths: tokens covered per sequence (None before it is filled).
        dtype: the keys' dtype (None before it is filled).
        key_max, key_min: ``(batch, pages, nheads_k, headdim)`` float32
            whatever the keys' dtype (the min / max of bf16 / fp16 values are
            exact in float32): element-wise max / min of each logical page's
            keys (pages past a sequence's length hold stale values and are
            never read). Views of one head-major ``(batch, nheads_k, pages, 2
            * headdim)`` block ``[M | m]``, so a step's bounds for a kv head
            are one matmul over contiguous memory (no per-step permute or
            dtype conversion of the metadata).
    """

    def __init__(self, config: Quest) -> None:
        self.handle = register_state(self)  # for torch.compile: see token_select.register_state
        if not isinstance(config, Quest):
            raise ArgumentError(f"QuestState needs a longattn.sparse.Quest config, got {type(config).__name__}")
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget everything (the next step, or ``prefill``, fills it again)."""
        self.lengths: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self._meta: torch.Tensor | None = None  # (batch, nheads_k, pages, 2 * headdim) float32: [M | m]

    @property
    def key_max(self) -> torch.Tensor | None:
        """``(batch, pages, nheads_k, headdim)`` float32 page maxima (a view)."""
        if self._meta is None:
            return None
        return self._meta[..., : self._meta.shape[-1] // 2].permute(0, 2, 1, 3)

    @property
    def key_min(self) -> torch.Tensor | None:
        """``(batch, pages, nheads_k, headdim)`` float32 page minima (a view)."""
        if self._meta is None:
            return None
        return self._meta[..., self._meta.shape[-1] // 2 :].permute(0, 2, 1, 3)

    @property
    def filled(self) -> bool:
        return self.lengths is not None

    def __repr__(self) -> str:
        return f"QuestState({self.config}, lengths={self.lengths})"

    # --- building and updating ------------------------------------------------

    def prefill(self, k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                block_table: torch.Tensor | None = None) -> QuestState:
        """Build the metadata from the first ``cache_seqlens[b]`` keys of each
        sequence of ``k_cache`` (contiguous ``(batch, capacity, nheads_k,
        headdim)`` or paged with ``block_table``); replaces any earlier content.
        Returns the state."""
        k_cache, block_table, lengths = check_prefill_cache("QuestState", k_cache, cache_seqlens, block_table)
        self.reset()
        self._fill(k_cache, block_table, lengths)
        return self

    def _fill(self, k_cache: torch.Tensor, block_table: torch.Tensor | None, lengths: list[int]) -> None:
        """Fill from a validated cache (the engine's checks already passed)."""
        batch, ps = len(lengths), self.config.page_size
        pages = -(-capacity_of(k_cache, block_table) // ps)
        shape = (batch, k_cache.shape[2], pages, 2 * k_cache.shape[3])
        self._meta = torch.zeros(shape, dtype=torch.float32, device=k_cache.device)
        self.dtype = k_cache.dtype
        self._refresh(k_cache, block_table, [0] * batch, lengths)
        self.lengths = tuple(lengths)

    def check_step(self, config: Quest, lengths: list[int], k_cache: torch.Tensor) -> None:
        """Raise unless this state (when filled) can serve a step of ``config``
        over a cache holding ``lengths`` tokens (before appending). Reads only."""
        if config.page_size != self.config.page_size:
            raise ArgumentError(f"state is a QuestState for page_size {self.config.page_size}, but sparse= has "
                                f"page_size {config.page_size}; use one state per layer and page size")
        if not self.filled:
            return
        _, _, hk, d = self.key_max.shape
        if (k_cache.shape[2], k_cache.shape[3]) != (hk, d) or k_cache.dtype != self.dtype:
            raise ArgumentError(
                f"state was filled for a cache with nheads_k {hk}, headdim {d}, dtype {self.dtype}; this "
                f"call's cache has nheads_k {k_cache.shape[2]}, headdim {k_cache.shape[3]}, dtype {k_cache.dtype}"
            )
        if k_cache.device != self._meta.device:
            raise ArgumentError(f"state lives on {self._meta.device} but the cache is on {k_cache.device}")
        check_state_batch("QuestState", self.lengths, lengths)

    def extend(self, k_cache: torch.Tensor, block_table: torch.Tensor | None, lengths: list[int]) -> None:
        """Cover the keys appended since the last update: the cache (validated)
        now holds ``lengths[b] >= self.lengths[b]`` tokens. Recomputes each touched
        page from all of its keys (the partial page's old keys included)."""
        if not self.filled:
            self._fill(k_cache, block_table, lengths)
            return
        self._refresh(k_cache, block_table, list(self.lengths), lengths)
        self.lengths = tuple(lengths)

    def _refresh(self, k_cache: torch.Tensor, block_table: torch.Tensor | None, starts: list[int],
                 ends: list[int]) -> None:
        """Recompute every page holding a position in ``starts[b] .. ends[b] - 1``."""
        ps = self.config.page_size
        device = k_cache.device
        first = [s // ps for s in starts]
        last = [-(-e // ps) for e in ends]  # one past the last page touched
        self._grow(max(last, default=0))
        span = max((max(0, b - a) for a, b in zip(first, last)), default=0)
        if span == 0:
            return
        table = clamped_table(block_table, k_cache.shape[0])
        first_t = torch.tensor(first, dtype=torch.long, device=device)
        last_t = torch.tensor(last, dtype=torch.long, device=device)
        ends_t = torch.tensor(ends, dtype=torch.long, device=device)
        batch = len(ends)
        rows_b = torch.arange(batch, device=device)[:, None]
        step = max(1, SCAN_CHUNK // ps)
        for c0 in range(0, span, step):
            cp = min(step, span - c0)
            page = first_t[:, None] + c0 + torch.arange(cp, device=device)[None, :]  # (batch, cp)
            pos = (page[:, :, None] * ps + torch.arange(ps, device=device)).reshape(batch, cp * ps)
            valid = pos < ends_t[:, None]
            rows = key_rows(k_cache, table, torch.where(valid, pos, torch.zeros_like(pos)))
            hide = ~valid[:, :, None, None]
            shape = (batch, cp, ps, *rows.shape[2:])
            mx = rows.masked_fill(hide, float("-inf")).view(shape).amax(dim=2)
            mn = rows.masked_fill(hide, float("inf")).view(shape).amin(dim=2)
            write = page < last_t[:, None]  # pages with at least one key
            b_idx, p_idx = rows_b.expand_as(page)[write], page[write]
            # (n, nheads_k, 2 * headdim) rows [M | m] written into the head-major block.
            self._meta[b_idx, :, p_idx] = torch.cat([mx[write], mn[write]], dim=-1).float()

    def _grow(self, pages: int) -> None:
        """Room for ``pages`` logical pages (a cache that grew since the fill)."""
        batch, hk, have, width = self._meta.shape
        if pages > have:
            extra = max(pages, 2 * have) - have
            self._meta = torch.cat([self._meta, self._meta.new_zeros((batch, hk, extra, width))], dim=2)

    # --- selection ---------------------------------------------------------------

    def page_scores(self, q: torch.Tensor) -> torch.Tensor:
        """Per query head the page bound ``sum_i max(q_i M_i, q_i m_i)``:
        ``q (batch, nheads, headdim)`` -> ``(batch, nheads, pages)`` float32 over
        the pages of the longest sequence, ``-inf`` past each sequence's last page.
        (Computed as ``relu(q) . M + min(q, 0) . m``, the same sum.)"""
        scores = self._group_scores(q)
        batch, hk, pages, group = scores.shape
        counts = [-(-n // self.config.page_size) for n in self.lengths]
        scores = scores.transpose(-1, -2).reshape(batch, hk * group, pages)
        if any(c != pages for c in counts):
            inside = length_mask(counts, pages, q.device)[:, None, :]
            scores = scores.masked_fill(~inside, float("-inf"))
        return scores

    def _group_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``q (batch, nheads, headdim)`` -> ``(batch, nheads_k, pages, group)``
        float32 bounds over the pages of the longest sequence (pages past a
        shorter sequence's last page are garbage: callers mask them)."""
        if not self.filled:
            raise ArgumentError("QuestState.page_scores needs a filled state (call prefill first)")
        batch, nheads, d = q.shape
        _, hk, _, width = self._meta.shape
        if batch != len(self.lengths) or width != 2 * d or nheads % hk:
            raise ShapeError(f"q must be (batch, nheads, headdim) with batch {len(self.lengths)}, headdim "
                             f"{width // 2} and nheads a multiple of {hk}, got {tuple(q.shape)}")
        ps = self.config.page_size
        pages = max((-(-n // ps) for n in self.lengths), default=0)
        qg = q.float().reshape(batch, hk, nheads // hk, d)
        # [relu(q) | min(q, 0)] . [M | m] = relu(q) . M + min(q, 0) . m: one matmul per kv head
        # reading the metadata once in place, as the row-major left operand (pages x 2d): BLAS
        # runs this orientation about twice as fast as (group x 2d) @ its transposed view.
        qcat = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], dim=-1)  # (batch, hk, group, 2d)
        return torch.matmul(self._meta[:, :, :pages], qcat.transpose(-1, -2))

    def select(self, q: torch.Tensor, token_budget: int | None = None) -> torch.Tensor:
        """The positions a step attends: ``q (batch, nheads, headdim)`` (scaled by
        the softmax scale) -> ``(batch, nheads_k, n)`` int32, ascending, then ``-1``
        padding (only the current page can be partial, and it is the last one
        kept). ``token_budget`` defaults to the config's."""
        budget = self.config.token_budget if token_budget is None else token_budget
        ps = self.config.page_size
        scores = self._group_scores(q).amax(dim=3)  # max over the query group: (batch, hk, pages)
        batch, hk, pages = scores.shape
        counts = torch.tensor([-(-n // ps) for n in self.lengths], dtype=torch.long, device=q.device)
        page_ids = torch.arange(pages, device=q.device)
        valid = (page_ids[None, :] < counts[:, None])[:, None, :].expand_as(scores)
        # The current (last) page is always kept: rank it above every other.
        current = (page_ids[None, :] == (counts - 1)[:, None])[:, None, :]
        scores = scores.masked_fill(current, float("inf"))
        chosen = top_positions(scores, valid, budget // ps + 1).to(torch.long)  # (batch, hk, kp)
        positions = chosen[..., None] * ps + torch.arange(ps, device=q.device)
        lens = torch.tensor(self.lengths, dtype=torch.long, device=q.device)[:, None, None, None]
        keep = (chosen[..., None] >= 0) & (positions < lens)
        positions = torch.where(keep, positions, torch.full_like(positions, -1))
        return positions.reshape(batch, hk, -1).to(torch.int32)
