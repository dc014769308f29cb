"""A paged KV cache over three tiers (device, host memory, disk) with attention where the KV lives.

:class:`TieredKVCache` keeps, per layer and sequence, a list of pages of
``page_size`` tokens (``(2, page_size, nheads_k, headdim)``: K then V). Each
page lives in exactly one tier:

- **device**: a page pool per layer on ``device`` (``(capacity, 2, page_size,
  nheads_k, headdim)``), attended in place with the device's decode kernel;
- **host**: the same pool in host memory (pinned when ``device`` is a GPU),
  attended in place with the CPU kernel (the C++ twin; q is copied to the
  host, never the KV to the device);
- **disk**: a :class:`longattn.offload.disk.PageStore` under ``disk_dir``,
  stored HEAD-MAJOR (below); pages are read with ``read_pages`` into a
  reusable host buffer, chunk by chunk (the next chunk is read by a
  background thread while this one is attended: reads release the GIL), and
  attended there, the kv heads as the batch of one kernel call.

Head-major disk layout (why: Quest and Double Sparsity select per kv head, so
a sparse step must be able to read one head's part of a page alone). The
store holds ``nheads_k=1`` pages: cache page ``page_no`` of sequence
``seq_id`` is the ``nheads_k`` store pages keyed ``(seq_id, page_no *
nheads_k + h)`` for kv heads ``h = 0 .. nheads_k - 1``, each ``(2,
page_size, 1, headdim)`` (K then V of that head) with the page's ntokens;
the ``nheads_k`` store pages of a cache page are always written (and freed)
in the same commit. Within one write batch the store pages are given to
``write_pages`` ordered by ``(seq_id, h, page_no)``, so they take adjacent
slots head by head: a prefill's pages of one head are one contiguous file
region (a sparse head's span of pages is one read), and the whole batch is
still one region (a dense read of consecutive pages stays a few large
coalesced ``preadv`` runs). The cache's ``nheads_k`` and layout are kept in
``<disk_dir>/tiered_kv.json`` (written by temp file + fsync + rename when
the cache is made; :meth:`TieredKVCache.open` needs it). Checksums are per
(page, head). ``stats()`` counts ``pages_read`` / ``pages_written`` and the
sparse page counters in store pages (one kv head of one cache page).

``attend`` merges the partial ``(out, lse)`` of every part with
:func:`longattn.kernels.merge.merge_states` (disk chunks oldest first, then
host, then device: a fixed order, so results are deterministic). A single
part is returned as the kernel gave it.

Placement policy (:mod:`longattn.offload.policy`):

- The budgets count pages of ``page_bytes = 2 * page_size * nheads_k *
  headdim * itemsize`` bytes over every layer and sequence together: the
  device holds at most ``device_budget_bytes // page_bytes`` pages, the host
  at most ``host_budget_bytes // page_bytes``; disk is unbounded.
- Within each (layer, sequence) the tiers are contiguous by position: the
  oldest pages on disk, then host, the most recent on the device.
- ``append`` writes the new tokens into the partial last page (which moves
  up to the device with them when the budget allows: if it lived on disk,
  its disk slot is freed) and new pages, placed on the device; then the
  oldest pages are demoted (device -> host -> disk; the oldest page is the
  one with the most newer pages in its own sequence) until the budgets hold.
  Pages going to disk are written as one ``write_pages`` batch per layer
  (one commit each). Pages never move up otherwise.
- Without ``disk_dir``, an append that would overflow the host budget raises
  :class:`~longattn.errors.OffloadCapacityError` before anything is written.
  Every append is all-or-nothing: the plan is computed on counts first, disk
  writes (the only step that can fail) happen before any memory changes.

Durability: ``flush()`` writes every page not yet current on disk into the
store as a *checkpoint copy* (one commit per layer) and syncs; the page
keeps its tier (its home), and a later demotion of an unmodified page needs
no write. Appending to a page with a checkpoint copy leaves the copy stale
on disk until the next flush or demotion (no commit per decode step): after
a crash, reopen finds each sequence as of its last commit for that page.
``close()`` flushes (when there is a disk tier) and releases the store's
lock. Reopen (:meth:`TieredKVCache.open`) takes the sequences from the
store: every layer's pages ``0, 1, ...`` of a sequence up to the first gap or
partial page (pages past it, left by a crash between commits, are freed);
the sequence lengths come from the pages' ntokens (a sequence or layer with
no tokens is not persisted). The most recent pages are
then promoted by the policy (:func:`~longattn.offload.policy.initial_split`)
into the device and host budgets (read back, keeping their disk copy as a
clean checkpoint); the rest stay on disk.

Causal alignment (bottom-right, as ``decode_attention``): with ``L`` tokens
and ``seqlen_q`` queries, query ``i`` sees positions ``0 .. L - seqlen_q +
i``. A part holding positions ``[p0, p1)`` is attended as a paged cache of
``p1 - p0`` tokens with ``window_size=(-1, L - p1)`` (not causal): query
``i`` then sees part positions ``<= i + (p1 - p0) - seqlen_q + (L - p1)``,
exactly the causal rule; when ``L - p1 >= seqlen_q - 1`` every query sees
the whole part and the call is a plain non-causal one, and the newest part
(``p1 = L``) is plain causal. So any tier split is exact, whatever tiers
hold the last ``seqlen_q - 1`` positions.

Sparse page fetch (``selection=`` and ``attend(..., sparse=cfg)``, seqlen_q 1):

- Metadata: with ``selection=Quest(...)`` / ``DoubleSparsity(...)`` (or one
  per layer) the cache keeps, per (layer, sequence), a batch-1
  ``QuestState`` / ``DoubleSparsityState`` on ``device``
  (:class:`longattn.offload.selection.SelectionMeta`), extended by every
  ``append`` from the affected pages' keys while they are in memory (the
  partial last page included: Quest's logical page size must divide
  ``page_size``, so a logical page lies in one cache page). Selection never
  touches disk; the metadata does not move with the pages.
- A step: the state's ``select`` with ``q * softmax_scale`` and the step's
  ``token_budget`` (the positions ``decode_attention(sparse=cfg,
  state=...)`` selects on an in-memory cache of the same tokens), then
  ``gather_decode`` per tier over only the selected positions: device and
  host pages in place through a block table over the pool; disk pages: only
  the (page, kv head) store pages holding a position that head selected, not
  already in the pair's fetched-pages buffer
  (:class:`~longattn.offload.selection.FetchedPages`) are read into it, the
  others are reused; pages not selected this step are evicted. Parts merged
  by lse, disk then host then device; one part is bitwise
  ``decode_attention``'s result.
- Read-ahead: after layer ``l`` has read its own pages, the pages that layer
  ``l + 1``'s (wrapping to 0: the next step) last query selects over its
  current metadata, and that its buffer does not hold, are read on the
  reader thread while layer ``l`` computes; ``attend(l + 1)`` waits for that
  read and uses the pages (``prefetch_hits``). While a read-ahead is in
  flight its pair's buffer belongs to the reader thread; ``append`` calls
  that move pages, ``drop`` and ``close`` wait for every read-ahead first.
- Reopen: ``open(..., selection=...)`` rebuilds the metadata from the keys
  (disk pages read once, counted in ``metadata_rebuild_pages_read``).
- ``stats()``: ``sparse_pages_read`` / ``sparse_bytes_read`` (read by steps
  themselves), ``prefetch_pages`` / ``prefetch_bytes`` / ``prefetch_hits`` /
  ``prefetch_unused``, ``fetched_reused`` (held from the last step),
  ``sparse_wait_seconds`` (steps waiting for reads: their own plus
  read-aheads not yet done), ``sparse_overlap = 1 - wait / read time``,
  ``selected_token_bytes`` (the selected tokens' K and V per kv head: the
  I/O amplification's denominator).

Precision: the parts come back from ``decode_attention`` in the cache's
dtype, so in float16/bfloat16 a merged result carries the rounding of each
part plus the final one (within the tolerance rule of the tests; a single
part is bitwise the kernel's result).
"""

from __future__ import annotations

import heapq
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longattn.decode_api import decode_attention
from longattn.errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    OffloadCapacityError,
    ShapeError,
    UnsupportedFeatureError,
)
from longattn.kernels.merge import merge_states
from longattn.offload import policy
from longattn.offload.policy import DEVICE, DISK, HOST
from longattn.offload.selection import (
    FetchedPages,
    SelectionMeta,
    SparseFetchMixin,
    check_selection,
    check_step_config,
)
from longattn.validation import FLOAT_DTYPES, check_attention_options, check_tensor

_TIER_NAMES = {DEVICE: "device", HOST: "host", DISK: "disk"}

# Store copy of a memory page: none, current (a clean checkpoint), stale (the
# page got tokens after it was written).
_NO_COPY, _CLEAN, _STALE = 0, 1, 2

DEFAULT_DISK_CHUNK_BYTES = 64 << 20

# The disk tier's side file (module docstring, "Head-major disk layout").
LAYOUT_FILE = "tiered_kv.json"
LAYOUT_MAGIC, LAYOUT_VERSION = "longattn-tiered-kv", 1


def _disk_store_class():
    # Imported lazily: a cache without a disk tier works without the store module.
    from longattn.offload.disk import PageStore

    return PageStore


@dataclass
class _Seq:
    """One sequence in one layer. Page ``i`` is on disk for ``i < ndisk``,
    on the host for ``i < ndisk + nhost``, else on the device."""

    length: int = 0
    ndisk: int = 0
    nhost: int = 0
    ndevice: int = 0
    slots: list = field(default_factory=list)  # pool slot per page (None for disk pages)
    copy: list = field(default_factory=list)  # _NO_COPY / _CLEAN / _STALE per page

    @property
    def npages(self) -> int:
        return len(self.slots)

    def counts(self) -> list[int]:
        return [self.ndisk, self.nhost, self.ndevice]

    def tier_of(self, page: int) -> int:
        return DISK if page < self.ndisk else HOST if page < self.ndisk + self.nhost else DEVICE

    def tier_range(self, tier: int) -> tuple[int, int]:
        start = {DISK: 0, HOST: self.ndisk, DEVICE: self.ndisk + self.nhost}[tier]
        return start, start + self.counts()[tier]


class _Pool:
    """One tier's page pool of one layer: ``data (capacity, 2, page_size,
    nheads_k, headdim)``, grown on demand (1.5x, capped at the tier's budget:
    the memory held can exceed the pages in use by that margin), slots reused
    lowest first."""

    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, limit: int,
                 pin: bool):
        self.page_shape, self.dtype, self.device, self.limit, self.pin = page_shape, dtype, device, limit, pin
        self.data = torch.empty((0, *page_shape), dtype=dtype, device=device)
        self.free: list[int] = []  # heap of free slots below capacity

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    def alloc(self, n: int) -> list[int]:
        if len(self.free) < n:
            cap = self.capacity
            new_cap = min(self.limit, max(cap + n - len(self.free), cap + cap // 2))
            data = torch.empty((new_cap, *self.page_shape), dtype=self.dtype, device=self.device,
                               pin_memory=self.pin)
            data[:cap] = self.data
            self.data = data
            for s in range(cap, new_cap):
                heapq.heappush(self.free, s)
        return [heapq.heappop(self.free) for _ in range(n)]

    def release(self, slots) -> None:
        for s in slots:
            heapq.heappush(self.free, s)


def _check_int(name: str, value: object, minimum: int) -> int:
    if type(value) is not int or value < minimum:  # bool is not an int here
        raise ArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class TieredKVCache(SparseFetchMixin):
    """A paged KV cache over device, host and disk; see the module docstring.

    Args:
        num_layers, nheads_k, headdim: the model's shape (ints >= 1).
        dtype: float32, float16 or bfloat16; every appended K/V and q has it.
        page_size: tokens per page (>= 1).
        device_budget_bytes, host_budget_bytes: byte budgets (>= 0) of the
            device and host tiers, over all layers and sequences.
        disk_dir: a directory for the disk tier (a new
            :class:`~longattn.offload.disk.PageStore`; it must be empty or
            missing), or None for no disk tier.
        device: where the device tier lives ("cpu" on this machine).
        disk_chunk_bytes: size of the reusable buffer disk pages are read
            into, per chunk (two chunks are held for read-ahead).
        selection: None, or a :class:`~longattn.sparse.Quest` /
            :class:`~longattn.sparse.DoubleSparsity` config (or a list of one
            per layer: DS channels are per layer) whose metadata the cache
            maintains at append time for ``attend(..., sparse=...)``
            (module docstring, "Sparse page fetch"). Quest's page_size must
            divide ``page_size``.

    Example::

        with TieredKVCache(32, 8, 128, torch.bfloat16, 256, 2 << 30, 8 << 30, disk_dir="kv") as cache:
            cache.append(layer, seq_id, k, v)        # k, v (seqlen_new, nheads_k, headdim)
            out = cache.attend(layer, seq_id, q)      # q (1, seqlen_q, nheads, headdim)
    """

    def __init__(self, num_layers: int, nheads_k: int, headdim: int, dtype: torch.dtype, page_size: int,
                 device_budget_bytes: int, host_budget_bytes: int, disk_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", *, disk_chunk_bytes: int = DEFAULT_DISK_CHUNK_BYTES,
                 selection: object | None = None, _store=None):
        _check_int("num_layers", num_layers, 1)
        _check_int("nheads_k", nheads_k, 1)
        _check_int("headdim", headdim, 1)
        _check_int("page_size", page_size, 1)
        _check_int("device_budget_bytes", device_budget_bytes, 0)
        _check_int("host_budget_bytes", host_budget_bytes, 0)
        _check_int("disk_chunk_bytes", disk_chunk_bytes, 1)
        if dtype not in FLOAT_DTYPES:
            raise DTypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise DeviceError(f"device must be a torch device or its name, got {device!r}") from exc
        if disk_dir is not None and not isinstance(disk_dir, (str, Path)):
            raise ArgumentError(f"disk_dir must be a path (str or pathlib.Path) or None, got {disk_dir!r}")
        self.num_layers, self.nheads_k, self.headdim, self.dtype = num_layers, nheads_k, headdim, dtype
        self.page_size, self.device = page_size, device
        self.device_budget_bytes, self.host_budget_bytes = device_budget_bytes, host_budget_bytes
        self.page_shape = (2, page_size, nheads_k, headdim)
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self.page_bytes = 2 * page_size * nheads_k * headdim * self._itemsize
        self.cap_device = device_budget_bytes // self.page_bytes
        self.cap_host = host_budget_bytes // self.page_bytes
        pin = device.type == "cuda"
        self._pools = [{DEVICE: _Pool(self.page_shape, dtype, device, self.cap_device, False),
                        HOST: _Pool(self.page_shape, dtype, torch.device("cpu"), self.cap_host, pin)}
                       for _ in range(num_layers)]
        self._layers: list[dict[int, _Seq]] = [{} for _ in range(num_layers)]
        self._seq_ids: set[int] = set()
        self._chunk_pages = max(1, disk_chunk_bytes // self.page_bytes)
        # Disk tier: store pages of one kv head (module docstring, "Head-major disk layout").
        self.unit_shape = (2, page_size, 1, headdim)
        self.unit_bytes = self.page_bytes // nheads_k
        self._disk_buffer = torch.empty((0, *self.unit_shape), dtype=dtype)  # grown when needed, reused
        self._reader: ThreadPoolExecutor | None = None
        self._io = {"bytes_read": 0, "bytes_written": 0, "read_seconds": 0.0, "write_seconds": 0.0,
                    "read_wait_seconds": 0.0, "pages_read": 0, "pages_written": 0}
        # Sparse page fetch (module docstring, "Sparse page fetch"): per (layer, seq_id) the
        # selection metadata, the host cache of fetched disk pages and the last scaled query.
        self._selection = check_selection(selection, num_layers, nheads_k, headdim, page_size)
        self._meta: dict[tuple[int, int], SelectionMeta] = {}
        self._fetched: dict[tuple[int, int], FetchedPages] = {}
        self._last_q: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        self._sparse_io = {"sparse_steps": 0, "sparse_pages_read": 0, "sparse_bytes_read": 0,
                           "sparse_read_seconds": 0.0, "selected_token_bytes": 0, "fetched_reused": 0,
                           "prefetch_pages": 0, "prefetch_bytes": 0, "prefetch_read_seconds": 0.0,
                           "prefetch_hits": 0, "prefetch_unused": 0, "sparse_wait_seconds": 0.0,
                           "metadata_rebuild_pages_read": 0}
        self._closed = False
        self.readonly = False  # set by open(readonly=True)
        if _store is not None:
            self._store = _store
        elif disk_dir is not None:
            self._store = _disk_store_class().create(disk_dir, num_layers=num_layers, nheads_k=1,
                                                     headdim=headdim, dtype=dtype, page_size=page_size)
            try:
                _write_layout(Path(disk_dir), nheads_k)
            except BaseException:
                self._store.close()
                raise
        else:
            self._store = None

    # --- reopen -------------------------------------------------------------

    @classmethod
    def open(cls, disk_dir: str | Path, *, device_budget_bytes: int, host_budget_bytes: int,
             device: str | torch.device = "cpu", disk_chunk_bytes: int = DEFAULT_DISK_CHUNK_BYTES,
             selection: object | None = None, readonly: bool = False) -> TieredKVCache:
        """Reopen a cache flushed (or closed) under ``disk_dir``: every
        sequence comes back from the store, its most recent pages promoted
        into the budgets (module docstring), the rest left on disk. Takes the
        store's writer lock (a live writer elsewhere: OffloadIOError).

        ``readonly=True`` takes a shared lock instead: any number of processes
        can open a closed cache read-only at once (a live writer still refuses
        them), ``attend``/``prefetch`` work, and ``append``, ``drop`` and
        ``flush`` raise ArgumentError; nothing on disk changes (pages a crash
        left past a sequence's committed prefix are ignored, not freed).

        ``selection`` (as in the constructor; not stored on disk): the
        metadata is rebuilt from the keys, which reads every disk-resident
        page of the layers that have a selection config once, chunk by chunk
        (counted in ``stats()["metadata_rebuild_pages_read"]``); the pages
        promoted into memory are read anyway."""
        if not isinstance(disk_dir, (str, Path)):
            raise ArgumentError(f"disk_dir must be a path (str or pathlib.Path), got {disk_dir!r}")
        if readonly is not True and readonly is not False:
            raise ArgumentError(f"readonly must be a bool, got {readonly!r}")
        store = _disk_store_class().open(disk_dir, readonly=readonly)
        try:
            nheads_k = _read_layout(Path(disk_dir), store)
            cache = cls(store.num_layers, nheads_k, store.headdim, store.dtype, store.page_size,
                        device_budget_bytes, host_budget_bytes, device=device, disk_chunk_bytes=disk_chunk_bytes,
                        selection=selection, _store=store)
            cache.readonly = readonly
            cache._load_from_store()
            cache._rebuild_metadata()
        except BaseException:
            store.close()
            raise
        return cache

    def _load_from_store(self) -> None:
        store, ps = self._store, self.page_size
        hk = self.nheads_k
        for layer in range(self.num_layers):
            heads: dict[tuple[int, int], dict[int, int]] = {}  # (seq_id, page_no) -> {head: ntokens}
            for (seq_id, unit), ntokens in store.pages(layer).items():
                heads.setdefault((seq_id, unit // hk), {})[unit % hk] = ntokens
            by_seq: dict[int, dict[int, int]] = {}
            broken = []  # a cache page is all of its heads with one ntokens (one commit wrote them)
            for (seq_id, page_no), nt in heads.items():
                if len(nt) == hk and len(set(nt.values())) == 1:
                    by_seq.setdefault(seq_id, {})[page_no] = nt[0]
                else:
                    broken += [(seq_id, page_no * hk + h) for h in nt]
                    by_seq.setdefault(seq_id, {})
            orphans = []
            for seq_id, pages in sorted(by_seq.items()):
                n, length = 0, 0
                while n in pages:  # the committed prefix: full pages, then at most one partial page
                    length += pages[n]
                    n += 1
                    if pages[n - 1] < ps:
                        break
                orphans += [(seq_id, p * hk + h) for p in pages if p >= n for h in range(hk)]
                self._seq_ids.add(seq_id)
                if n:
                    self._layers[layer][seq_id] = _Seq(length, n, 0, 0, [None] * n, [_CLEAN] * n)
            if (orphans or broken) and not self.readonly:
                store.free_pages(layer, sorted(orphans + broken))
        # Promote the most recent pages into the memory budgets.
        split = policy.initial_split({(layer, sid): s.npages for layer, seqs in enumerate(self._layers)
                                      for sid, s in seqs.items()}, self.cap_device, self.cap_host)
        for (layer, seq_id), (ndisk, nhost, ndevice) in split.items():
            seq = self._layers[layer][seq_id]
            if nhost + ndevice == 0:
                continue
            keys = [(seq_id, p) for p in range(ndisk, seq.npages)]
            buf = torch.empty((len(keys), *self.page_shape), dtype=self.dtype)
            self._read(layer, keys, buf)
            for tier, start, stop in ((HOST, ndisk, ndisk + nhost), (DEVICE, ndisk + nhost, seq.npages)):
                slots = self._pools[layer][tier].alloc(stop - start)
                data = self._pools[layer][tier].data
                for i, slot in zip(range(start, stop), slots):
                    data[slot].copy_(buf[i - ndisk])
                    seq.slots[i] = slot
            seq.ndisk, seq.nhost, seq.ndevice = ndisk, nhost, ndevice

    def _rebuild_metadata(self) -> None:
        """Selection metadata of every (layer, seq) from its keys, in page order:
        memory pages from their pools, disk pages read chunk by chunk."""
        if self._selection is None:
            return
        for layer, seqs in enumerate(self._layers):
            for seq_id, seq in sorted(seqs.items()):
                if not seq.length:
                    continue
                meta = self._meta_for(layer, seq_id)
                for start in range(0, seq.npages, self._chunk_pages):
                    stop = min(seq.npages, start + self._chunk_pages)
                    keys = torch.empty((stop - start, *self.page_shape[1:]), dtype=self.dtype)
                    disk = [p for p in range(start, stop) if seq.tier_of(p) == DISK]
                    if disk:
                        buf = torch.empty((len(disk), *self.page_shape), dtype=self.dtype)
                        self._read(layer, [(seq_id, p) for p in disk], buf)
                        self._sparse_io["metadata_rebuild_pages_read"] += len(disk)
                        keys[disk[0] - start:disk[-1] + 1 - start] = buf[:, 0]
                    for p in range(start, stop):
                        if seq.tier_of(p) != DISK:
                            keys[p - start] = self._pools[layer][seq.tier_of(p)].data[seq.slots[p], 0].to("cpu")
                    meta.extend(keys, start, min(seq.length, stop * self.page_size))

    # --- validation ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ArgumentError("this TieredKVCache is closed; reopen it with TieredKVCache.open(disk_dir, ...)")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self.readonly:
            raise ArgumentError(f"{what}: this TieredKVCache was opened read-only (TieredKVCache.open(..., "
                                "readonly=True)); reopen it without readonly to change it")

    def _check_layer(self, layer: object) -> int:
        if type(layer) is not int or not 0 <= layer < self.num_layers:
            raise ArgumentError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _check_seq_id(self, seq_id: object) -> int:
        if type(seq_id) is not int or seq_id < 0:
            raise ArgumentError(f"seq_id must be an int >= 0, got {seq_id!r}")
        return seq_id

    def _check_kv(self, name: str, t: object) -> torch.Tensor:
        layout = f"(seqlen_new, nheads_k={self.nheads_k}, headdim={self.headdim}) or (1, seqlen_new, ...)"
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ShapeError(f"{name} with a batch dimension must have batch 1, got shape {tuple(t.shape)}")
            t = t[0]
        if t.dim() != 3 or tuple(t.shape[1:]) != (self.nheads_k, self.headdim):
            raise ShapeError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but the cache holds {self.dtype}")
        return t

    # --- append -------------------------------------------------------------

    def append(self, layer: int, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v (seqlen_new, nheads_k, headdim)`` (or with a leading
        batch dimension of 1) to sequence ``seq_id`` of ``layer`` (created by
        its first append), then demote pages until the budgets hold. All or
        nothing: a call that raises leaves the cache as it was."""
        self._check_writable("append")
        layer, seq_id = self._check_layer(layer), self._check_seq_id(seq_id)
        k, v = self._check_kv("k", k), self._check_kv("v", v)
        if v.shape != k.shape:
            raise ShapeError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
        n_new = k.shape[0]
        seq = self._layers[layer].get(seq_id)
        if n_new == 0:
            self._seq_ids.add(seq_id)
            if seq is None:
                self._layers[layer][seq_id] = _Seq()
            return
        ps = self.page_size
        old = seq if seq is not None else _Seq()
        first = old.length // ps  # the partial last page, or the first new page
        partial = old.length % ps != 0
        if partial and old.length + n_new <= (first + 1) * ps and old.tier_of(first) != DISK:
            # The decode step's fast path: the tokens fit the partial last page,
            # which is in memory; no page count changes, so nothing moves.
            offset = old.length - first * ps
            page = self._pools[layer][old.tier_of(first)].data[old.slots[first]]
            page[0, offset:offset + n_new] = k
            page[1, offset:offset + n_new] = v
            old.length += n_new
            if old.copy[first] == _CLEAN:
                old.copy[first] = _STALE
            self._extend_meta(layer, seq_id, page[0][None], first, old.length)
            return
        # Pages move or change: no read-ahead may be in flight (it reads pages and tier ranges).
        self._settle_all()
        npages = -(-(old.length + n_new) // ps)
        n_affected = npages - first

        # 1. The plan, on counts only: affected pages (partial + new) start on the device.
        key = (layer, seq_id)
        counts = {(ly, sid): s.counts() for ly, seqs in enumerate(self._layers) for sid, s in seqs.items()}
        mine = old.counts()
        if partial:
            mine[old.tier_of(first)] -= 1
        mine[DEVICE] += n_affected
        counts[key] = mine
        before = {k_: list(c) for k_, c in counts.items()}
        # Without a disk tier the host has nowhere to demote to: demote device -> host only, then check.
        policy.demote(counts, self.cap_device, self.cap_host if self._store is not None else None, key)
        if self._store is None:
            used = sum(c[DEVICE] + c[HOST] for c in counts.values())
            if sum(c[HOST] for c in counts.values()) > self.cap_host:
                raise OffloadCapacityError(
                    f"appending {n_new} tokens to layer {layer}, seq_id {seq_id} would hold {used} pages of "
                    f"{self.page_bytes} bytes but the budgets hold {self.cap_device} (device_budget_bytes="
                    f"{self.device_budget_bytes}) + {self.cap_host} (host_budget_bytes={self.host_budget_bytes}) "
                    f"and there is no disk tier (pass disk_dir=...)")

        # 2. The affected pages' new contents (nothing written yet).
        offset = old.length - first * ps  # tokens already in the partial page
        flat = torch.zeros((2, n_affected * ps, self.nheads_k, self.headdim), dtype=self.dtype, device=self.device)
        if partial:
            flat[:, :ps].copy_(self._page_content(layer, seq_id, old, first))
        flat[0, offset:offset + n_new] = k.to(self.device)
        flat[1, offset:offset + n_new] = v.to(self.device)
        block = flat.view(2, n_affected, ps, self.nheads_k, self.headdim).transpose(0, 1)  # (n, 2, ps, ...)
        new_seq = _Seq(old.length + n_new, *counts[key], list(old.slots[:first]) + [None] * n_affected,
                       list(old.copy[:first]) + [_NO_COPY] * n_affected)

        # 3. Disk writes (the only step that can fail), one commit per layer,
        # the appended layer last: a failure there leaves earlier layers'
        # demoted pages as clean copies of pages still in memory.
        moves = {}  # pair -> list of (page, old tier or None if affected, new tier)
        for pair, c in counts.items():
            if pair != key and c == before[pair]:
                continue
            s = self._layers[pair[0]][pair[1]] if pair != key else new_seq
            src = self._layers[pair[0]].get(pair[1]) if pair == key else s
            old_counts = src.counts() if src is not None else [0, 0, 0]
            tmp = _Seq(0, *old_counts)
            new = _Seq(0, *c)
            lst = []
            for page in range(s.npages):
                affected = pair == key and page >= first
                was = None if affected else tmp.tier_of(page)
                now = new.tier_of(page)
                if affected or was != now:
                    lst.append((page, was, now))
            moves[pair] = lst
        for ly in sorted({pair[0] for pair in moves}, key=lambda x: (x == layer, x)):
            items, marks = [], []
            for pair in sorted(p for p in moves if p[0] == ly):
                sid = pair[1]
                s = self._layers[ly][sid] if pair != key else old
                for page, was, now in moves[pair]:
                    if now != DISK:
                        continue
                    if was is None:
                        content, ntok = block[page - first], min(ps, new_seq.length - page * ps)
                    elif s.copy[page] == _CLEAN:
                        continue  # its checkpoint copy is current: nothing to write
                    else:
                        content, ntok = self._pools[ly][was].data[s.slots[page]], self._ntokens(s, page)
                    items.append((sid, page, content.to("cpu").contiguous(), ntok))
                    marks.append((new_seq if pair == key else s, page))
            if items:
                self._write(ly, items)  # one commit per layer
                for s, page in marks:
                    s.copy[page] = _CLEAN

        # 4. Memory moves (cannot fail but for memory exhaustion): read every
        # moving page's content first, then free, allocate and copy.
        promoted_from_disk = []
        if partial and old.tier_of(first) == DISK:
            promoted_from_disk = [(seq_id, first)] if new_seq.tier_of(first) != DISK else []
        staged = []
        for pair, lst in moves.items():
            ly, sid = pair
            s_old = self._layers[ly].get(sid)
            for page, was, now in lst:
                if was is None:
                    content = block[page - first]
                elif was == DISK:
                    content = None  # demotion only: a page never moves up from disk here
                elif now == DISK:
                    content = None  # written to the store above
                else:
                    content = self._pools[ly][was].data[s_old.slots[page]].clone()
                staged.append((pair, page, was, now, content))
        for pair, page, was, now, _ in staged:
            if was in (HOST, DEVICE):
                s_old = self._layers[pair[0]][pair[1]]
                self._pools[pair[0]][was].release([s_old.slots[page]])
        if seq is not None and partial and old.tier_of(first) in (HOST, DEVICE):
            # the partial page is affected (was=None above) but its old slot must be freed
            self._pools[layer][old.tier_of(first)].release([old.slots[first]])
        for pair, page, was, now, content in staged:
            ly, sid = pair
            target = new_seq if pair == key else self._layers[ly][sid]
            if now == DISK:
                target.slots[page] = None
                continue
            slot = self._pools[ly][now].alloc(1)[0]
            self._pools[ly][now].data[slot].copy_(content)
            target.slots[page] = slot
        for pair, c in counts.items():
            if pair != key:
                s = self._layers[pair[0]][pair[1]]
                s.ndisk, s.nhost, s.ndevice = c
        if partial and new_seq.copy[first] == _NO_COPY and old.copy[first] != _NO_COPY \
                and new_seq.tier_of(first) != DISK:
            new_seq.copy[first] = _STALE if not promoted_from_disk else _NO_COPY
        self._layers[layer][seq_id] = new_seq
        self._seq_ids.add(seq_id)
        fetched = self._fetched.get(key)
        if fetched is not None:  # pages from `first` on changed: their fetched copies are stale
            fetched.evict([u for u in fetched.rows if u >= first * self.nheads_k])  # keyed page * hk + h
        self._extend_meta(layer, seq_id, block[:, 0], first, new_seq.length)
        if promoted_from_disk:
            # Its disk slot is freed (one commit). The move above is already
            # done: if the store refuses, the page keeps a stale copy there,
            # harmless (replaced by the next write of that page).
            try:
                self._store.free_pages(layer, [k_ for sid, p in promoted_from_disk
                                               for k_ in self._store_keys(sid, [p])])
            except OSError:
                new_seq.copy[first] = _STALE

    def _meta_for(self, layer: int, seq_id: int) -> SelectionMeta:
        meta = self._meta.get((layer, seq_id))
        if meta is None:
            meta = self._meta[(layer, seq_id)] = SelectionMeta(self._selection[layer], self.device)
        return meta

    def _extend_meta(self, layer: int, seq_id: int, k_pages: torch.Tensor, first: int, length: int) -> None:
        """The selection metadata of (layer, seq_id) covers ``length`` tokens:
        ``k_pages`` are the keys of cache pages ``first ..`` (module docstring)."""
        if self._selection is not None:
            self._meta_for(layer, seq_id).extend(k_pages, first, length)

    def _ntokens(self, seq: _Seq, page: int) -> int:
        return min(self.page_size, seq.length - page * self.page_size)

    def _page_content(self, layer: int, seq_id: int, seq: _Seq, page: int) -> torch.Tensor:
        tier = seq.tier_of(page)
        if tier == DISK:
            buf = torch.empty((1, *self.page_shape), dtype=self.dtype)
            self._read(layer, [(seq_id, page)], buf)
            return buf[0]
        return self._pools[layer][tier].data[seq.slots[page]]

    def _store_keys(self, seq_id: int, pages) -> list[tuple[int, int]]:
        """Store keys of ``pages`` (cache page numbers), page by page, heads inner."""
        hk = self.nheads_k
        return [(seq_id, p * hk + h) for p in pages for h in range(hk)]

    def _read_units(self, layer: int, keys: list, out: torch.Tensor, rows: list[int] | None = None) -> float:
        """Store pages ``keys`` into ``out (nrows, 2, page_size, 1, headdim)``; returns the seconds."""
        t0 = time.perf_counter()
        self._store.read_pages(layer, keys, out, rows)
        seconds = time.perf_counter() - t0
        self._io["read_seconds"] += seconds
        self._io["bytes_read"] += len(keys) * self.unit_bytes
        self._io["pages_read"] += len(keys)
        return seconds

    def _read(self, layer: int, pairs: list, out: torch.Tensor) -> None:
        """Whole cache pages ``pairs [(seq_id, page_no)]`` into ``out (n, 2, page_size,
        nheads_k, headdim)`` (page moves and metadata rebuilds, not attention: the heads
        are read head-major and put back into the page layout, one copy)."""
        hk = self.nheads_k
        units = torch.empty((len(pairs) * hk, *self.unit_shape), dtype=self.dtype)
        self._read_units(layer, [(sid, p * hk + h) for sid, p in pairs for h in range(hk)], units)
        # (n * hk, 2, ps, 1, d) -> (n, 2, ps, hk, d)
        out.copy_(units.view(len(pairs), hk, 2, self.page_size, self.headdim).permute(0, 2, 3, 1, 4))

    def _write(self, layer: int, items: list) -> None:
        """Cache pages ``items [(seq_id, page_no, kv (2, page_size, nheads_k, headdim) CPU, ntokens)]``
        as one commit of their per-head store pages, ordered (seq_id, head, page_no): adjacent slots
        head by head (module docstring, "Head-major disk layout")."""
        hk = self.nheads_k
        units = []
        for sid, page, kv, ntok in items:
            for h in range(hk):
                units.append(((sid, h, page), (sid, page * hk + h, kv[:, :, h:h + 1].contiguous(), ntok)))
        units.sort(key=lambda u: u[0])
        t0 = time.perf_counter()
        self._store.write_pages(layer, [u for _, u in units])
        self._io["write_seconds"] += time.perf_counter() - t0
        self._io["bytes_written"] += len(units) * self.unit_bytes
        self._io["pages_written"] += len(units)

    # --- attend -------------------------------------------------------------

    def _check_query(self, q: object) -> torch.Tensor:
        q = check_tensor("q", q, 4, "(1, seqlen_q, nheads, headdim)")
        if q.shape[0] != 1:
            raise ShapeError(f"q must have batch 1 (one sequence per call), got shape {tuple(q.shape)}")
        if q.shape[3] != self.headdim:
            raise ShapeError(f"q has headdim {q.shape[3]} but the cache has {self.headdim}")
        if q.shape[2] == 0 or q.shape[2] % self.nheads_k:
            raise ShapeError(f"q has {q.shape[2]} heads, which is not a multiple of the cache's nheads_k "
                             f"{self.nheads_k}")
        if q.dtype != self.dtype:
            raise DTypeError(f"q has dtype {q.dtype} but the cache holds {self.dtype}")
        if q.device != self.device:
            raise DeviceError(f"q is on {q.device} but the cache's device tier is on {self.device}")
        return q

    def prefetch(self, layer: int, seq_id: int, q: torch.Tensor, *, sparse: object,
                 softmax_scale: float | None = None) -> int:
        """Start reading, in the background, the disk pages that ``q (1, 1,
        nheads, headdim)`` would select in ``layer`` with ``sparse`` (the same
        config ``attend`` will get): a caller that can predict the next layer's
        query (e.g. the current hidden state through the next layer's query
        projection, as InfiniGen does) overlaps that layer's reads with this
        layer's compute. The next ``attend(layer, seq_id, ...)`` waits for the
        read and uses the pages its own selection shares with the prediction
        (``stats()``: prefetch hits / unused). Returns the number of store pages
        it started reading (0 when everything is held already or a read-ahead
        for that layer is in flight). Without it, ``attend`` reads ahead the
        next layer's pages by that layer's previous query."""
        self._check_open()
        layer, seq_id = self._check_layer(layer), self._check_seq_id(seq_id)
        from longattn.sparse import DoubleSparsity, Quest

        if not isinstance(sparse, (Quest, DoubleSparsity)):
            raise ArgumentError(f"sparse must be a Quest or DoubleSparsity config, got {type(sparse).__name__}")
        check_step_config(None if self._selection is None else self._selection[layer], sparse, layer)
        q = self._check_query(q)
        if q.shape[1] != 1:
            raise ShapeError(f"prefetch takes one query (seqlen_q 1), got seqlen_q {q.shape[1]}")
        _, _, scale, _, _ = check_attention_options(self.headdim, True, False, softmax_scale, (-1, -1), 0.0)
        if seq_id not in self._seq_ids:
            raise ArgumentError(f"seq_id {seq_id} is not in the cache (append to create it)")
        return self._start_read_ahead(layer, seq_id, q[:, 0].float() * scale, sparse.token_budget)

    def attend(self, layer: int, seq_id: int, q: torch.Tensor, *, softmax_scale: float | None = None,
               softcap: float = 0.0, return_lse: bool = False, sparse: object | None = None,
               state: object | None = None, return_selection: bool = False):
        """Causal attention of ``q (1, seqlen_q, nheads, headdim)`` over the
        sequence's tokens in ``layer``, ``decode_attention``'s semantics
        (bottom-right: query ``i`` sees positions ``0 .. L - seqlen_q + i``).

        ``sparse=Quest(...)`` / ``DoubleSparsity(...)`` (seqlen_q 1; the cache
        must have been made with a matching ``selection=``, whose metadata it
        holds: ``state`` must stay None): attention over the positions the
        method selects, read where they live (module docstring, "Sparse page
        fetch"); ``return_selection`` then also returns them, ``(1, nheads_k,
        n)`` int32 (-1 = none), as ``decode_attention`` does.

        Returns ``out`` like q (on the cache's device), then ``lse (1, nheads,
        seqlen_q)`` float32 with ``return_lse``, then the selection with
        ``return_selection``. A query that sees no key gets out 0, lse -inf."""
        self._check_open()
        layer, seq_id = self._check_layer(layer), self._check_seq_id(seq_id)
        if state is not None:
            raise ArgumentError(f"state must be None for a TieredKVCache: the cache holds the selection state "
                                f"(metadata kept at append time), got {type(state).__name__}")
        if return_selection is not True and return_selection is not False:
            raise ArgumentError(f"return_selection must be a bool, got {return_selection!r}")
        if sparse is None and return_selection:
            raise ArgumentError("return_selection=True needs sparse=Quest(...) or DoubleSparsity(...)")
        if sparse is not None:
            from longattn.sparse import DoubleSparsity, Quest

            if not isinstance(sparse, (Quest, DoubleSparsity)):
                raise UnsupportedFeatureError(f"sparse= over a TieredKVCache must be a Quest or DoubleSparsity "
                                              f"config, got {type(sparse).__name__}")
            check_step_config(None if self._selection is None else self._selection[layer], sparse, layer)
        q = self._check_query(q)
        _, return_lse, scale, _, softcap = check_attention_options(self.headdim, True, return_lse, softmax_scale,
                                                                   (-1, -1), softcap)
        if seq_id not in self._seq_ids:
            raise ArgumentError(f"seq_id {seq_id} is not in the cache (append to create it)")
        seq = self._layers[layer].get(seq_id)
        length = seq.length if seq is not None else 0
        seqlen_q = q.shape[1]
        if sparse is not None:
            if seqlen_q != 1:
                raise UnsupportedFeatureError(
                    f"sparse={type(sparse).__name__} decodes one query per call (seqlen_q 1), got seqlen_q "
                    f"{seqlen_q}; run longer chunks densely (sparse=None)")
            out, lse, selection = self._attend_sparse(layer, seq_id, seq, q, sparse, scale, softcap)
            result = (out,) + ((lse,) if return_lse else ()) + ((selection,) if return_selection else ())
            return result if len(result) > 1 else out
        outs, lses = [], []

        def attend_part(pool: torch.Tensor, slots: list[int], p0: int, p1: int, q_part: torch.Tensor,
                        head_major: bool = False):
            # Positions [p0, p1) of the sequence in `pool`'s pages `slots` (module docstring's alignment).
            # head_major: `pool` holds store pages (n * nheads_k, 2, ps, 1, d), page i's head h in row
            # slots[i] * nheads_k + h; the kv heads become the batch (each its own block table row and
            # its query group), so the pages are attended where they were read, without a copy.
            right = length - p1
            causal, window = (True, (-1, -1)) if right == 0 else (False, (-1, right if right < seqlen_q - 1 else -1))
            if head_major:
                hk = self.nheads_k
                base = torch.tensor(slots, dtype=torch.int32, device=pool.device) * hk
                table = base[None] + torch.arange(hk, dtype=torch.int32, device=pool.device)[:, None]
                lens = torch.full((hk,), p1 - p0, dtype=torch.int32, device=pool.device)
                nh = q_part.shape[2]
                q_b = q_part[0].view(seqlen_q, hk, nh // hk, self.headdim).transpose(0, 1)  # (hk, sq, group, d)
            else:
                table = torch.tensor([slots], dtype=torch.int32, device=pool.device)
                lens = torch.tensor([p1 - p0], dtype=torch.int32, device=pool.device)
                q_b = q_part
            out, lse = decode_attention(q_b, pool[:, 0], pool[:, 1], cache_seqlens=lens, block_table=table,
                                        softmax_scale=scale, softcap=softcap, causal=causal, window_size=window,
                                        return_lse=True)
            if head_major:  # (hk, sq, group, d) -> (1, sq, nheads, d); lse (hk, group, sq) -> (1, nheads, sq)
                out = out.transpose(0, 1).reshape(1, seqlen_q, -1, self.headdim)
                lse = lse.reshape(1, -1, seqlen_q)
            outs.append(out.to(self.device))
            lses.append(lse.to(self.device))

        if seq is not None and length:
            ps = self.page_size
            if seq.ndisk:
                self._attend_disk(layer, seq_id, seq, q.to("cpu"), attend_part)
            for tier in (HOST, DEVICE):
                start, stop = seq.tier_range(tier)
                if stop > start:
                    q_part = q.to("cpu") if tier == HOST else q
                    attend_part(self._pools[layer][tier].data, seq.slots[start:stop], start * ps,
                                min(stop * ps, length), q_part)
        if not outs:
            out = torch.zeros_like(q)
            lse = torch.full((1, q.shape[2], seqlen_q), -math.inf, dtype=torch.float32, device=q.device)
        elif len(outs) == 1:
            out, lse = outs[0], lses[0]
        else:
            out, lse = merge_states(outs, lses, check=False)
        return (out, lse) if return_lse else out

    def _attend_disk(self, layer: int, seq_id: int, seq: _Seq, q_host: torch.Tensor, attend_part) -> None:
        """Disk pages chunk by chunk through the reusable buffer; with more
        than one chunk, the next one is read by a background thread while
        this one is attended (two halves of the buffer)."""
        ps, chunk, hk = self.page_size, self._chunk_pages, self.nheads_k
        npages = seq.ndisk
        starts = list(range(0, npages, chunk))
        width = min(chunk, npages) * hk  # store pages per chunk
        halves = 2 if len(starts) > 1 else 1
        if self._disk_buffer.shape[0] < halves * width:
            self._disk_buffer = torch.empty((halves * width, *self.unit_shape), dtype=self.dtype)
        bufs = [self._disk_buffer[h * width:(h + 1) * width] for h in range(halves)]

        def read(i: int):
            start = starts[i]
            n = min(chunk, npages - start)
            self._read_units(layer, self._store_keys(seq_id, range(start, start + n)), bufs[i % halves][:n * hk])
            return n

        if halves == 1:
            read(0)
            attend_part(bufs[0], list(range(npages)), 0, min(npages * ps, seq.length), q_host, True)
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longattn-kv-read")
        pending = self._reader.submit(read, 0)
        try:
            for i, start in enumerate(starts):
                t0 = time.perf_counter()
                n = pending.result()
                pending = None
                self._io["read_wait_seconds"] += time.perf_counter() - t0
                if i + 1 < len(starts):
                    pending = self._reader.submit(read, i + 1)
                # attend_part is done with bufs[i % 2] before read(i + 2) (next iteration) refills it.
                attend_part(bufs[i % halves], list(range(n)), start * ps, min((start + n) * ps, seq.length),
                            q_host, True)
        finally:
            if pending is not None:  # an error while attending: never leave a read filling the buffer
                pending.exception()

    # --- drop, flush, close, stats -----------------------------------------

    def drop(self, seq_id: int) -> None:
        """Free every page of ``seq_id`` in every layer and tier (the store:
        one commit). Unknown ``seq_id``: ArgumentError."""
        self._check_writable("drop")
        seq_id = self._check_seq_id(seq_id)
        if seq_id not in self._seq_ids:
            raise ArgumentError(f"seq_id {seq_id} is not in the cache")
        self._settle_all()
        if self._store is not None:
            self._store.drop_sequence(seq_id)  # first: if it fails, nothing changed
        for table in (self._meta, self._fetched, self._last_q):
            for key in [key for key in table if key[1] == seq_id]:
                del table[key]
        for layer, seqs in enumerate(self._layers):
            seq = seqs.pop(seq_id, None)
            if seq is None:
                continue
            for tier in (HOST, DEVICE):
                start, stop = seq.tier_range(tier)
                self._pools[layer][tier].release(seq.slots[start:stop])
        self._seq_ids.discard(seq_id)

    def flush(self) -> None:
        """Make the cache durable: every page without a current copy in the
        store is written there as a checkpoint copy (one commit per layer),
        then the store syncs. Needs a disk tier."""
        self._check_writable("flush")
        if self._store is None:
            raise UnsupportedFeatureError("flush() needs a disk tier; this cache was made with disk_dir=None")
        for layer, seqs in enumerate(self._layers):
            items, marks = [], []
            for sid in sorted(seqs):
                s = seqs[sid]
                for page in range(s.ndisk, s.npages):
                    if s.copy[page] != _CLEAN:
                        content = self._pools[layer][s.tier_of(page)].data[s.slots[page]].to("cpu")
                        items.append((sid, page, content, self._ntokens(s, page)))
                        marks.append((s, page))
            if items:
                self._write(layer, items)
                for s, page in marks:
                    s.copy[page] = _CLEAN
        self._store.sync()

    def close(self) -> None:
        """Flush (with a disk tier), release the store's lock and the memory.
        Idempotent."""
        if self._closed:
            return
        try:
            if self._store is not None and not self.readonly:
                self.flush()
        finally:
            self._closed = True
            try:
                self._settle_all()
            except Exception:
                pass
            self._meta, self._fetched, self._last_q = {}, {}, {}
            if self._reader is not None:
                self._reader.shutdown(wait=True)
                self._reader = None
            if self._store is not None:
                self._store.close()
            self._layers = [{} for _ in range(self.num_layers)]
            self._seq_ids = set()
            self._pools = []
            self._disk_buffer = torch.empty(0)

    def __enter__(self) -> TieredKVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def seqlen(self, layer: int, seq_id: int) -> int:
        """Tokens appended so far to ``seq_id`` in ``layer``."""
        self._check_open()
        layer, seq_id = self._check_layer(layer), self._check_seq_id(seq_id)
        if seq_id not in self._seq_ids:
            raise ArgumentError(f"seq_id {seq_id} is not in the cache")
        seq = self._layers[layer].get(seq_id)
        return seq.length if seq is not None else 0

    @property
    def seq_ids(self) -> list[int]:
        return sorted(self._seq_ids)

    def release_fetched(self) -> None:
        """Forget the disk pages held in host memory for sparse steps (fetched by
        the last steps or read ahead; their buffers are freed): the next sparse
        step reads what it selects from disk again. Waits for read-aheads in flight."""
        self._check_open()
        self._settle_all()
        self._fetched.clear()

    def stats(self) -> dict:
        """Pages and bytes per tier (a page counts in its home tier only;
        ``disk_copies`` counts memory pages with a current checkpoint copy),
        the cache's I/O (bytes and pages read/written, seconds in reads and
        writes, seconds attend waited for reads), and the store's own stats
        under ``"store"`` (None without a disk tier)."""
        pages = {DEVICE: 0, HOST: 0, DISK: 0}
        copies = 0
        for seqs in self._layers:
            for s in seqs.values():
                pages[DISK] += s.ndisk
                pages[HOST] += s.nhost
                pages[DEVICE] += s.ndevice
                copies += sum(1 for page in range(s.ndisk, s.npages) if s.copy[page] == _CLEAN)
        out = {f"{name}_pages": pages[t] for t, name in _TIER_NAMES.items()}
        out.update({f"{name}_bytes": pages[t] * self.page_bytes for t, name in _TIER_NAMES.items()})
        out["disk_copies"] = copies
        out["page_bytes"] = self.page_bytes
        out.update(self._io)
        out.update(self._sparse_io)
        read_s = self._sparse_io["sparse_read_seconds"] + self._sparse_io["prefetch_read_seconds"]
        out["sparse_overlap"] = 1.0 - self._sparse_io["sparse_wait_seconds"] / read_s if read_s > 0 else None
        out["store"] = self._store.stats() if self._store is not None and not self._closed else None
        return out


def _write_layout(directory: Path, nheads_k: int) -> None:
    """``<directory>/tiered_kv.json``: the cache's kv heads and the store key mapping
    (module docstring), by temp file + fsync + rename + fsync(directory)."""
    from longattn.errors import OffloadIOError

    data = json.dumps({"magic": LAYOUT_MAGIC, "version": LAYOUT_VERSION, "nheads_k": nheads_k,
                       "layout": "head-major", "store_key": "(seq_id, page_no * nheads_k + head)"}).encode()
    tmp, final = directory / (LAYOUT_FILE + ".tmp"), directory / LAYOUT_FILE
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise OffloadIOError(f"{final}: writing the cache layout file failed: {e.strerror or e}") from e


def _read_layout(directory: Path, store) -> int:
    """The cache's nheads_k from ``<directory>/tiered_kv.json`` (checked against the store)."""
    from longattn.errors import CorruptKVError, OffloadIOError

    path = directory / LAYOUT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OffloadIOError(f"{path}: missing: {directory} holds a PageStore but not a TieredKVCache "
                             "(the layout file is written when the cache is made)") from None
    except OSError as e:
        raise OffloadIOError(f"{path}: reading failed: {e.strerror or e}") from e
    try:
        meta = json.loads(raw)
        ok = (meta.get("magic") == LAYOUT_MAGIC and meta.get("version") == LAYOUT_VERSION
              and meta.get("layout") == "head-major" and type(meta.get("nheads_k")) is int and meta["nheads_k"] >= 1)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise CorruptKVError(f"{path}: not a longattn TieredKVCache layout file (version {LAYOUT_VERSION})")
    if store.nheads_k != 1:
        raise CorruptKVError(f"{path}: the store holds pages of {store.nheads_k} kv heads; a TieredKVCache "
                             "stores one kv head per store page (head-major)")
    return meta["nheads_k"]
