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
from longattn.sparse.token_select import (
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
        key_max, key_min: ``(batch, pages, nheads_k, headdim)`` in the keys'
            dtype: element-wise max / min of each logical page's keys (pages
            past a sequence's length hold stale values and are never read).
    """

    def __init__(self, config: Quest) -> None:
        if not isinstance(config, Quest):
            raise ArgumentError(f"QuestState needs a longattn.sparse.Quest config, got {type(config).__name__}")
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget everything (the next step, or ``prefill``, fills it again)."""
        self.lengths: tuple[int, ...] | None = None
        self.key_max: torch.Tensor | None = None
        self.key_min: torch.Tensor | None = None

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
        shape = (batch, pages, k_cache.shape[2], k_cache.shape[3])
        self.key_max = torch.zeros(shape, dtype=k_cache.dtype, device=k_cache.device)
        self.key_min = torch.zeros_like(self.key_max)
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
        if (k_cache.shape[2], k_cache.shape[3]) != (hk, d) or k_cache.dtype != self.key_max.dtype:
            raise ArgumentError(
                f"state was filled for a cache with nheads_k {hk}, headdim {d}, dtype {self.key_max.dtype}; this "
                f"call's cache has nheads_k {k_cache.shape[2]}, headdim {k_cache.shape[3]}, dtype {k_cache.dtype}"
            )
        if k_cache.device != self.key_max.device:
            raise ArgumentError(f"state lives on {self.key_max.device} but the cache is on {k_cache.device}")
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
            self.key_max[b_idx, p_idx] = mx[write]
            self.key_min[b_idx, p_idx] = mn[write]

    def _grow(self, pages: int) -> None:
        """Room for ``pages`` logical pages (a cache that grew since the fill)."""
        have = self.key_max.shape[1]
        if pages > have:
            extra = max(pages, 2 * have) - have
            pad = self.key_max.new_zeros((self.key_max.shape[0], extra, *self.key_max.shape[2:]))
            self.key_max = torch.cat([self.key_max, pad], dim=1)
            self.key_min = torch.cat([self.key_min, pad], dim=1)

    # --- selection ---------------------------------------------------------------

    def page_scores(self, q: torch.Tensor) -> torch.Tensor:
        """Per query head the page bound ``sum_i max(q_i M_i, q_i m_i)``:
        ``q (batch, nheads, headdim)`` -> ``(batch, nheads, pages)`` float32 over
        the pages of the longest sequence, ``-inf`` past each sequence's last page.
        (Computed as ``relu(q) . M + min(q, 0) . m``, the same sum.)"""
        if not self.filled:
            raise ArgumentError("QuestState.page_scores needs a filled state (call prefill first)")
        batch, nheads, d = q.shape
        _, _, hk, dk = self.key_max.shape
        if batch != len(self.lengths) or dk != d or nheads % hk:
            raise ShapeError(f"q must be (batch, nheads, headdim) with batch {len(self.lengths)}, headdim {dk} and "
                             f"nheads a multiple of {hk}, got {tuple(q.shape)}")
        ps = self.config.page_size
        counts = [-(-n // ps) for n in self.lengths]
        pages = max(counts, default=0)
        qg = q.float().view(batch, hk, nheads // hk, d)
        upper = torch.einsum("bhgd,bphd->bhgp", qg.clamp(min=0), self.key_max[:, :pages].float())
        lower = torch.einsum("bhgd,bphd->bhgp", qg.clamp(max=0), self.key_min[:, :pages].float())
        scores = (upper + lower).reshape(batch, nheads, pages)
        inside = length_mask(counts, pages, q.device)[:, None, :]
        return scores.masked_fill(~inside, float("-inf"))

    def select(self, q: torch.Tensor, token_budget: int | None = None) -> torch.Tensor:
        """The positions a step attends: ``q (batch, nheads, headdim)`` (scaled by
        the softmax scale) -> ``(batch, nheads_k, n)`` int32, ascending, then ``-1``
        padding (only the current page can be partial, and it is the last one
        kept). ``token_budget`` defaults to the config's."""
        budget = self.config.token_budget if token_budget is None else token_budget
        ps = self.config.page_size
        batch, nheads, _ = q.shape
        hk = self.key_max.shape[2]
        scores = self.page_scores(q)
        pages = scores.shape[-1]
        scores = scores.view(batch, hk, nheads // hk, pages).amax(dim=2)  # max over the query group
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
