"""Sparse page fetch for :class:`longattn.offload.cache.TieredKVCache`: the
resident selection metadata and the host cache of fetched disk pages.

- :func:`check_selection` validates the cache's ``selection=`` argument (one
  :class:`~longattn.sparse.Quest` / :class:`~longattn.sparse.DoubleSparsity`,
  or a list with one per layer) against the cache's shape.
- :class:`SelectionMeta`: one (layer, sequence)'s metadata, a batch-1
  :class:`~longattn.sparse.QuestState` / :class:`~longattn.sparse.DoubleSparsityState`
  on the cache's device, extended at append time from the new tokens' cache
  pages while they are in memory. Selection is the state's own ``select``,
  so a step picks exactly the positions ``decode_attention(sparse=cfg,
  state=...)`` picks on an in-memory cache holding the same tokens (the
  metadata values are the same: max / min and channel restriction are exact;
  the same select code then gives the same scores and ties).
- :class:`SparseFetchMixin`: the cache's sparse step, fetch and read-ahead
  methods (mixed into ``TieredKVCache``; they use its pools, store and
  counters).
- :class:`FetchedPages`: one (layer, sequence)'s host buffer of disk store
  pages (one kv head of one cache page each: the disk tier is head-major,
  see the cache module) read by the last step (or read ahead for the next
  one), keyed by store page number ``page_no * nheads_k + h``; rows are
  reused, the buffer only grows.

A step reads, per kv head, only the pages holding positions THAT head
selected (heads select independently: the union over heads of a page would
cover most of the context), in one ``read_pages`` call (the store coalesces
adjacent slots and issues independent runs from several threads), and
attends all heads in one ``gather_decode`` call with the kv heads as the
batch (each head its own block table row into the head-major buffer and its
query group): the same per-head arithmetic as the in-memory call, bitwise.

Why Quest's logical page size must divide the cache's ``page_size``: a
logical page ``j`` (positions ``j * P .. (j + 1) * P - 1``) then lies inside
ONE cache page, so a selected logical page costs one cache page read, never
two; and the metadata of the logical pages a new token touches can be
recomputed from the affected cache pages alone (the partial last logical page
is inside the partial last cache page, whose content the append has at hand).
"""

from __future__ import annotations

import heapq
import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from longattn.errors import ArgumentError
from longattn.kernels.merge import merge_states
from longattn.offload.policy import DEVICE, HOST
from longattn.sparse import DoubleSparsity, DoubleSparsityState, Quest, QuestState


def check_selection(selection: object, num_layers: int, nheads_k: int, headdim: int,
                    page_size: int) -> list | None:
    """``selection`` (None, one config, or a list/tuple of ``num_layers`` configs)
    -> a per-layer list of configs (or None). Quest's page_size must divide
    ``page_size``; DoubleSparsity's channels must fit ``nheads_k, headdim``."""
    if selection is None:
        return None
    if isinstance(selection, (list, tuple)):
        if len(selection) != num_layers:
            raise ArgumentError(f"selection must be one Quest / DoubleSparsity config or a list of num_layers="
                                f"{num_layers} (one per layer), got a list of {len(selection)}")
        configs = list(selection)
    else:
        configs = [selection] * num_layers
    for i, cfg in enumerate(configs):
        if isinstance(cfg, Quest):
            if page_size % cfg.page_size:
                raise ArgumentError(
                    f"selection (layer {i}): Quest page_size {cfg.page_size} must divide the cache's page_size "
                    f"{page_size} (a selected logical page then maps to one cache page)")
        elif isinstance(cfg, DoubleSparsity):
            cfg.check_cache(nheads_k, headdim)
        else:
            raise ArgumentError(f"selection (layer {i}) must be a longattn.sparse.Quest or DoubleSparsity config, "
                                f"got {type(cfg).__name__}")
    return configs


def check_step_config(built: object, cfg: object, layer: int) -> None:
    """``attend(sparse=cfg)`` must match the metadata the cache maintains for the
    layer (``built``): same type, and the same Quest page_size / DS channels
    (the token_budget may differ)."""
    if built is None:
        raise ArgumentError(f"sparse={type(cfg).__name__}(...) needs selection metadata: make the cache with "
                            "selection=Quest(...) or DoubleSparsity(...) (its metadata is maintained at append time)")
    if type(cfg) is not type(built):
        raise ArgumentError(f"sparse= is a {type(cfg).__name__} but layer {layer}'s selection metadata is for "
                            f"{type(built).__name__} (the cache's selection=); they must match")
    if isinstance(cfg, Quest) and cfg.page_size != built.page_size:
        raise ArgumentError(f"sparse=Quest(page_size={cfg.page_size}) but layer {layer}'s metadata is kept per "
                            f"logical page of {built.page_size} (the cache's selection=); they must match")
    if isinstance(cfg, DoubleSparsity) and cfg.channels != built.channels:
        raise ArgumentError(f"sparse=DoubleSparsity(...) has other channels than layer {layer}'s label cache (the "
                            "cache's selection=); they must match (each layer has its own channels)")


class SelectionMeta:
    """One (layer, sequence)'s selection metadata (a batch-1 state) on ``device``."""

    def __init__(self, config: Quest | DoubleSparsity, device: torch.device):
        self.config = config
        self.device = device
        self.state = QuestState(config) if isinstance(config, Quest) else DoubleSparsityState(config)

    @property
    def length(self) -> int:
        return self.state.lengths[0] if self.state.filled else 0

    def extend(self, k_pages: torch.Tensor, first_page: int, length: int) -> None:
        """Cover the tokens up to ``length``: ``k_pages (n, page_size, nheads_k,
        headdim)`` are the keys of cache pages ``first_page .. first_page + n - 1``
        (their full content: Quest recomputes the partial logical page from all
        of its keys), which must hold every position from the metadata's current
        length (rounded down to a cache page) to ``length``. Positions before
        ``first_page`` are never read: the block table maps them to page 0."""
        if length <= self.length:
            return
        k_pages = k_pages.to(self.device)
        table = torch.zeros((1, first_page + k_pages.shape[0]), dtype=torch.int32, device=self.device)
        table[0, first_page:] = torch.arange(k_pages.shape[0], dtype=torch.int32, device=self.device)
        self.state.extend(k_pages, table, [length])

    def select(self, scaled_q: torch.Tensor, token_budget: int) -> torch.Tensor:
        """``scaled_q (1, nheads, headdim)`` float32 (q times the softmax scale) ->
        ``(1, nheads_k, n)`` int32 positions, ascending, -1 padding (the state's
        ``select``)."""
        return self.state.select(scaled_q.to(self.device), token_budget)


class FetchedPages:
    """Disk store pages of one (layer, sequence) held in host memory between
    steps: ``rows[unit] = row`` of ``buffer (capacity, 2, page_size, 1,
    headdim)``, ``unit = page_no * nheads_k + h``. A read-ahead reserves rows and fills them from the reader
    thread (``pending`` holds its future); everything else runs on the
    caller's thread after the pending read is settled."""

    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype):
        self.page_shape, self.dtype = page_shape, dtype
        self.buffer = torch.empty((0, *page_shape), dtype=dtype)
        self.rows: dict[int, int] = {}
        self.free: list[int] = []  # heap of free rows
        self.prefetched: set[int] = set()  # pages read ahead and not yet used by a step
        self.pending = None  # (future, pages) of a read-ahead in flight

    def reserve(self, pages: list[int]) -> list[int]:
        """Rows for ``pages`` (store page numbers, none held yet), lowest free rows
        first, growing the buffer (1.5x) when needed; returns the row of each page (in
        the order of ``pages``: one ``read_pages(..., rows=)`` target)."""
        if len(self.free) < len(pages):
            cap = self.buffer.shape[0]
            new_cap = max(cap + len(pages) - len(self.free), cap + cap // 2)
            buf = torch.empty((new_cap, *self.page_shape), dtype=self.dtype)
            buf[:cap] = self.buffer
            self.buffer = buf
            for r in range(cap, new_cap):
                heapq.heappush(self.free, r)
        out = []
        for page in pages:
            row = self.rows[page] = heapq.heappop(self.free)
            out.append(row)
        return out

    def evict(self, pages) -> None:
        for p in pages:
            row = self.rows.pop(p, None)
            if row is not None:
                heapq.heappush(self.free, row)
            self.prefetched.discard(p)

    def clear(self) -> None:
        self.evict(list(self.rows))


class SparseFetchMixin:
    """The sparse page fetch part of :class:`longattn.offload.cache.TieredKVCache`
    (its module docstring, "Sparse page fetch"). Uses the cache's ``_layers``,
    ``_pools``, ``_store``, ``_meta``, ``_fetched``, ``_last_q``, ``_reader``,
    ``_io`` / ``_sparse_io`` counters and ``_read``."""

    def _attend_sparse(self, layer: int, seq_id: int, seq, q: torch.Tensor, cfg, scale: float,
                       softcap: float):
        """One sparse decode step (the cache module's docstring, "Sparse page fetch"):
        ``(out (1, 1, nheads, headdim), lse (1, nheads, 1), selection (1, nheads_k, n))``."""
        from longattn.kernels.gather import gather_decode

        key = (layer, seq_id)
        nheads = q.shape[2]
        length = seq.length if seq is not None else 0
        scaled = q[:, 0].float() * scale  # decode_attention scores the selection with q * softmax_scale
        if length == 0:
            out = torch.zeros_like(q)
            lse = torch.full((1, nheads, 1), -math.inf, dtype=torch.float32, device=q.device)
            return out, lse, torch.empty((1, self.nheads_k, 0), dtype=torch.int32, device=q.device)
        self._settle(key)  # this pair's read-ahead (if any) is done before its tiers or buffer are used
        selection = self._meta[key].select(scaled, cfg.token_budget)  # (1, nheads_k, n) int32
        self._last_q[key] = (scaled.clone(), cfg.token_budget)
        io = self._sparse_io
        io["sparse_steps"] += 1
        listed = selection >= 0
        io["selected_token_bytes"] += int(listed.sum()) * 2 * self.headdim * self._itemsize
        pages = torch.where(listed, torch.div(selection, self.page_size, rounding_mode="floor"), -1)
        q3 = q[:, 0]
        parts = []  # (indices, pool (n, 2, ps, hk, d), block_table (1, npages)) in merge order

        if seq.ndisk:
            in_disk = listed & (pages < seq.ndisk)
            needed = self._units(pages, in_disk)
            if needed:
                fetched = self._fetch(layer, seq_id, needed)
                # kv heads as the batch: head h's block table row maps its pages to its rows
                hk = self.nheads_k
                table = torch.zeros((hk, seq.npages), dtype=torch.int32)
                units = torch.tensor(needed, dtype=torch.long)
                table[units % hk, units // hk] = torch.tensor([fetched.rows[u] for u in needed], dtype=torch.int32)
                parts.append((torch.where(in_disk, selection, -1).cpu(), fetched.buffer, table))
        # The next layer's pages, read while this layer computes.
        self._prefetch_next(layer, seq_id)
        for tier in (HOST, DEVICE):
            start, stop = seq.tier_range(tier)
            if stop == start:
                continue
            inside = listed & (pages >= start) & (pages < stop)
            if not bool(inside.any()):
                continue
            pool = self._pools[layer][tier].data
            slots = [0 if s_ is None else s_ for s_ in seq.slots]
            table = torch.tensor([slots], dtype=torch.int32, device=pool.device)
            parts.append((torch.where(inside, selection, -1).to(pool.device), pool, table))

        outs, lses = [], []
        for indices, pool, table in parts:
            q_part = q3.to(pool.device)
            if table.shape[0] > 1 or pool.shape[3] != self.nheads_k:  # head-major disk part: heads as batch
                hk = self.nheads_k
                out, lse = gather_decode(q_part[0].view(hk, nheads // hk, self.headdim), pool[:, 0], pool[:, 1],
                                         indices[0][:, None], block_table=table, softmax_scale=scale,
                                         softcap=softcap, check=False)
                out, lse = out.reshape(1, nheads, self.headdim), lse.reshape(1, nheads)
            else:
                out, lse = gather_decode(q_part, pool[:, 0], pool[:, 1], indices, block_table=table,
                                         softmax_scale=scale, softcap=softcap, check=False)
            outs.append(out[:, None].to(self.device))
            lses.append(lse[..., None].to(self.device))
        if len(outs) == 1:
            out, lse = outs[0], lses[0]
        else:  # at least one part: the current (last) page or token is always selected
            out, lse = merge_states(outs, lses, check=False)
        return out, lse, selection

    def _units(self, pages: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Store pages ``page * nheads_k + h`` (ascending) holding a position kv head ``h``
        selected: ``pages (1, nheads_k, n)`` cache page of each position, ``mask`` which count."""
        if not bool(mask.any()):
            return []
        heads = torch.arange(self.nheads_k, device=pages.device).view(1, -1, 1).expand_as(pages)
        return torch.unique(pages[mask].long() * self.nheads_k + heads[mask]).tolist()

    def _fetch(self, layer: int, seq_id: int, needed: list[int]) -> FetchedPages:
        """Disk store pages ``needed`` (ascending ``page * nheads_k + h``) of (layer,
        seq_id) in its fetched-pages buffer: those held from the last step or read
        ahead are used as they are, the others read now (one ``read_pages`` call);
        those not needed are evicted."""
        key = (layer, seq_id)
        fetched = self._fetched.get(key)
        if fetched is None:
            fetched = self._fetched[key] = FetchedPages(self.unit_shape, self.dtype)
        io = self._sparse_io
        want = set(needed)
        io["prefetch_hits"] += len(fetched.prefetched & want)
        io["prefetch_unused"] += len(fetched.prefetched - want)
        io["fetched_reused"] += sum(1 for p in fetched.rows if p in want and p not in fetched.prefetched)
        fetched.evict([p for p in fetched.rows if p not in want])
        fetched.prefetched.clear()
        missing = [p for p in needed if p not in fetched.rows]
        t0 = time.perf_counter()
        if missing:
            rows = fetched.reserve(missing)
            self._read_units(layer, [(seq_id, u) for u in missing], fetched.buffer, rows)
        waited = time.perf_counter() - t0
        io["sparse_pages_read"] += len(missing)
        io["sparse_bytes_read"] += len(missing) * self.unit_bytes
        io["sparse_read_seconds"] += waited
        io["sparse_wait_seconds"] += waited
        return fetched

    def _prefetch_next(self, layer: int, seq_id: int) -> None:
        """Start reading, on the reader thread, the disk pages the next layer's
        (wrapping to layer 0: the next step) last query selects over its current
        metadata and that its fetched-pages buffer does not hold."""
        nxt = (layer + 1) % self.num_layers
        key = (nxt, seq_id)
        if nxt == layer or key not in self._last_q:
            return  # one layer: the next step's pages are this step's, held already
        scaled, budget = self._last_q[key]
        self._start_read_ahead(nxt, seq_id, scaled, budget)

    def _start_read_ahead(self, layer: int, seq_id: int, scaled: torch.Tensor, budget: int) -> int:
        """Start reading, on the reader thread, the disk pages of (layer, seq_id)
        that the scaled query ``scaled (1, nheads, headdim)`` selects and its
        fetched-pages buffer does not hold; returns how many store pages it reads
        (0: nothing to read, or a read-ahead is already in flight)."""
        key = (layer, seq_id)
        seq = self._layers[layer].get(seq_id)
        fetched = self._fetched.get(key)
        if (key not in self._meta or seq is None or not seq.ndisk
                or (fetched is not None and fetched.pending is not None)):
            return 0
        selection = self._meta[key].select(scaled, budget)
        listed = selection >= 0
        pages = torch.div(selection, self.page_size, rounding_mode="floor")
        units = self._units(pages, listed & (pages < seq.ndisk))
        if not units:
            return 0
        if fetched is None:
            fetched = self._fetched[key] = FetchedPages(self.unit_shape, self.dtype)
        missing = [u for u in units if u not in fetched.rows]
        if not missing:
            return 0
        rows = fetched.reserve(missing)
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longattn-kv-read")
        fetched.pending = (self._reader.submit(self._read_ahead, layer, seq_id, fetched.buffer, missing, rows),
                           missing)
        return len(missing)

    def _read_ahead(self, layer: int, seq_id: int, buffer: torch.Tensor, units: list[int], rows: list[int]) -> float:
        """Reader thread: the read-ahead's store pages into ``buffer`` rows; returns the
        seconds spent reading (the caller's thread does the bookkeeping)."""
        t0 = time.perf_counter()
        self._store.read_pages(layer, [(seq_id, u) for u in units], buffer, rows)
        return time.perf_counter() - t0

    def _settle(self, key: tuple[int, int]) -> None:
        """Wait for (layer, seq_id)'s read-ahead, if one is in flight (the wait
        counts as attend waiting for reads). A failed read-ahead only loses its
        pages (a step that needs them reads them itself, and then raises)."""
        fetched = self._fetched.get(key)
        if fetched is None or fetched.pending is None:
            return
        future, pages = fetched.pending
        t0 = time.perf_counter()
        try:
            seconds = future.result()
        except Exception:
            fetched.pending = None
            fetched.evict(pages)
            return
        finally:
            self._sparse_io["sparse_wait_seconds"] += time.perf_counter() - t0
        fetched.pending = None
        fetched.prefetched.update(pages)
        n = len(pages)
        self._sparse_io["prefetch_pages"] += n
        self._sparse_io["prefetch_bytes"] += n * self.unit_bytes
        self._sparse_io["prefetch_read_seconds"] += seconds
        self._io["bytes_read"] += n * self.unit_bytes
        self._io["pages_read"] += n
        self._io["read_seconds"] += seconds

    def _settle_all(self) -> None:
        for key in list(self._fetched):
            self._settle(key)

