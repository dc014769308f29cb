"""PageStore: the crash-safe on-disk page store of the KV offload's disk tier.

The byte layout (headers, page slots, journal records, snapshot) and the commit
protocol are described in :mod:`longattn.offload.format`; the lock in
:mod:`longattn.offload.locking`. In short: one data file per layer with fixed
4096-aligned page slots, an append-only journal of commits (each record checksummed,
each page's xxh3_64 stored in it and verified on every read), compaction into a
snapshot by temp file + fsync + rename + fsync(directory).

Guarantees:

- ``write_pages`` / ``free_pages`` / ``drop_sequence`` are each ONE atomic commit:
  after they return the change is durable and visible; if they raise (or the process
  dies inside them) none of it is visible, now or after reopening.
- Rewriting a page writes a fresh slot (copy-on-write); slots freed by a commit are
  reused only by later batches, so a crash never exposes a half-written slot.
- A commit costs O(pages changed): the slot writes, two fdatasyncs and a journal record.
  Compaction (O(live pages)) runs when the journal holds more than
  ``compact_factor (4) * live + compact_min_entries (4096)`` entries, so its cost is amortized O(1) per change.
- Bad bytes are never used: CorruptKVError names the file, layer, seq and page.
  I/O failures (disk full, file size limit, permission, file removed) raise
  OffloadIOError naming the file; the failed batch is not committed and the store stays
  usable.

Thread safety: one lock serializes the store's bookkeeping and its writes/commits;
``read_pages`` holds it only to look slots up and does its I/O outside it with
``os.preadv`` (explicit offsets on shared fds: concurrent reads are safe; the GIL is
released), from a small thread pool when a call has several runs. A slot freed while
a read is in flight is reused only after every read in flight has ended, so a read
never sees a slot rewritten under it; ``close`` waits for reads in flight.
"""

from __future__ import annotations

import errno
import heapq
import os
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from longattn.errors import (
    ArgumentError,
    CorruptKVError,
    DeviceError,
    DTypeError,
    OffloadIOError,
    ShapeError,
)
from longattn.offload import format as fmt
from longattn.offload.locking import StoreLock

JOURNAL = "journal"
SNAPSHOT = "snapshot"
CRASH_ENV = "LONGATTN_OFFLOAD_CRASH_AT"  # test hook: "<point>[:<n>]" -> os._exit(86) at the n-th hit
_IOV_MAX = 1024  # buffers per preadv/pwritev call (Linux IOV_MAX)
_RUN_BYTES = 2 << 20  # bytes per preadv/pwritev: the checksum then reads the run while it is still in cache


def _layer_name(layer: int) -> str:
    return f"layer_{layer:05d}.kv"


def _crash_point(name: str, counts: dict[str, int]) -> None:
    """Die like a killed process at a named point of the commit protocol (tests only)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    counts[name] = counts.get(name, 0) + 1
    if counts[name] >= int(nth or 1):
        os._exit(86)


def _io_error(path, action: str, e: OSError) -> OffloadIOError:
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        why += " (disk full or file size limit; nothing of this batch was committed)"
    return OffloadIOError(f"{path}: {action} failed: {why}")


def _write_all(fd: int, data: bytes, offset: int, path, action: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            raise _io_error(path, action, e) from e
        view = view[n:]
        offset += n


def _page_bytes_view(t: torch.Tensor):
    """A writable uint8 numpy view of a contiguous CPU tensor's memory (works for bfloat16)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class PageStore:
    """Fixed-size KV pages on disk, one data file per layer, crash-safe commits.

    A page is one ``(2, page_size, nheads_k, headdim)`` tensor (K then V) of the
    store's dtype, addressed by ``(layer, seq_id, page_no)``; ``ntokens`` (1..page_size)
    says how many leading tokens are valid. Create with :meth:`create`, reopen with
    :meth:`open`.
    """

    # Compaction runs when the journal holds more than compact_factor * live + compact_min_entries
    # entries (instance attributes may override them; tests do, to compact often).
    compact_factor = 4
    compact_min_entries = 4096
    # Reads: independent runs of one read_pages call go to up to read_threads threads (small
    # random reads are latency-bound: several in flight overlap it); runs of at most
    # random_run_bytes are read through a second fd advised POSIX_FADV_RANDOM (no readahead:
    # it would inflate small random reads), larger ones through the normal fd (readahead on).
    read_threads = 4
    random_run_bytes = 256 << 10

    # ---------------------------------------------------------------- construction
    def __init__(self):  # use create() / open()
        self._closed = True
        self._lock = None

    @classmethod
    def create(cls, directory, *, num_layers, nheads_k, headdim, dtype, page_size) -> PageStore:
        """A new store in an empty or missing ``directory``; takes the writer lock.

        A directory already holding a store -> OffloadIOError."""
        for name, v in (("num_layers", num_layers), ("nheads_k", nheads_k),
                        ("headdim", headdim), ("page_size", page_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ArgumentError(f"{name} must be a positive int, got {v!r}")
        if num_layers > 0xFFFF:
            raise ArgumentError(f"num_layers must be at most 65535, got {num_layers}")
        if dtype not in fmt.DTYPE_NAMES:
            raise DTypeError(f"dtype must be one of {', '.join(fmt.DTYPES)}, got {dtype!r}")
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error(directory, "creating the store directory", e) from e
        self = cls()
        self._lock = StoreLock(directory, exclusive=True)
        try:
            for name in (JOURNAL, SNAPSHOT):
                if (directory / name).exists():
                    raise OffloadIOError(
                        f"{directory}: already holds a longattn store ({name} exists); "
                        "open it with PageStore.open or use an empty directory"
                    )
            itemsize = torch.empty((), dtype=dtype).element_size()
            page_bytes = 2 * page_size * nheads_k * headdim * itemsize
            hdr = fmt.Header(fmt.KIND_DATA, 0, num_layers, nheads_k, headdim, page_size,
                             fmt.DTYPE_NAMES[dtype], page_bytes,
                             fmt.round_up(page_bytes, fmt.ALIGN), 0, uuid.uuid4().bytes)
            self._init_geometry(directory, hdr, readonly=False)
            fds = []
            try:
                for layer in range(num_layers):
                    path = self._data_paths[layer]
                    fd = self._open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, "creating")
                    fds.append(fd)
                    _write_all(fd, self._header(fmt.KIND_DATA, layer, 0), 0, path, "writing the header")
                    self._fsync(fd, path)
                # The journal appears last and atomically: its existence marks a complete store.
                self._replace_file(JOURNAL, self._header(fmt.KIND_JOURNAL, fmt.NO_LAYER, 0))
                jfd = self._open(self._journal_path, os.O_RDWR, "opening")
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            self._data_fds = fds
            self._journal_fd = jfd
            self._journal_end = fmt.HEADER_SIZE
            self._generation = 0
            self._commit_no = 0
            self._journal_entries = 0
            self._index = [dict() for _ in range(num_layers)]
            self._free = [[] for _ in range(num_layers)]
            self._nslots = [0] * num_layers
            self._open_random_fds()
            self._closed = False
        except BaseException:
            self._lock.release()
            raise
        return self

    @classmethod
    def open(cls, directory, *, readonly=False) -> PageStore:
        """Reopen a store: headers, snapshot and journal replay.

        Writer lock (exclusive) unless ``readonly`` (shared). A store held by a live
        writer -> OffloadIOError naming the lock file."""
        directory = Path(directory)
        if not directory.is_dir():
            raise OffloadIOError(f"{directory}: no such store directory")
        self = cls()
        self._lock = StoreLock(directory, exclusive=not readonly)
        fds = []
        try:
            jpath = directory / JOURNAL
            if not jpath.exists():
                raise OffloadIOError(f"{jpath}: missing: {directory} holds no (complete) longattn store")
            mode = os.O_RDONLY if readonly else os.O_RDWR
            jfd = self._open(jpath, mode, "opening")
            fds.append(jfd)
            jbuf = self._read_whole(jfd, jpath)
            jhdr = fmt.unpack_header(jbuf[: fmt.HEADER_SIZE], jpath, fmt.KIND_JOURNAL)
            self._init_geometry(directory, jhdr, readonly=readonly)
            self._journal_fd = jfd
            for layer in range(self.num_layers):
                path = self._data_paths[layer]
                if not path.exists():
                    raise OffloadIOError(f"{path}: missing (data file of layer {layer} was removed)")
                fd = self._open(path, mode, "opening")
                fds.append(fd)
                raw = os.pread(fd, fmt.HEADER_SIZE, 0)
                h = fmt.unpack_header(raw, path, fmt.KIND_DATA)
                if not h.same_store(jhdr) or h.layer != layer:
                    raise CorruptKVError(f"{path}: belongs to another store or layer than {jpath}")
            self._data_fds = fds[1:]
            self._replay(jbuf, jhdr)
            fds = []  # owned by the store now
            self._open_random_fds()
            self._closed = False
        except BaseException:
            for fd in fds:
                os.close(fd)
            self._lock.release()
            raise
        return self

    def _init_geometry(self, directory: Path, hdr: fmt.Header, *, readonly: bool) -> None:
        self.directory = directory
        self.readonly = readonly
        self.num_layers = hdr.num_layers
        self.nheads_k = hdr.nheads_k
        self.headdim = hdr.headdim
        self.page_size = hdr.page_size
        self.dtype = fmt.DTYPES[hdr.dtype_name]
        self.page_bytes = hdr.page_bytes
        self.slot_bytes = hdr.slot_bytes
        self._hdr = hdr
        self._journal_path = directory / JOURNAL
        self._data_paths = [directory / _layer_name(i) for i in range(hdr.num_layers)]
        self._mutex = threading.RLock()
        self._idle = threading.Condition(self._mutex)  # notified when a read ends
        self._readers = 0  # read_pages calls doing I/O outside the lock
        self._deferred: list[list[int]] = [[] for _ in range(hdr.num_layers)]  # freed during reads
        self._pool: ThreadPoolExecutor | None = None
        self._random_fds: list[int] = []
        self._crash_counts: dict[str, int] = {}
        self._broken: str | None = None
        self._pad = bytes(self.slot_bytes - self.page_bytes)
        self._scratch = bytearray(max(1, self.slot_bytes - self.page_bytes))
        self._stats = dict(bytes_read=0, bytes_written=0, read_seconds=0.0, write_seconds=0.0,
                           checksum_seconds=0.0, commits=0, compactions=0, read_calls=0, read_runs=0)

    # ---------------------------------------------------------------- small helpers
    def _header(self, kind: int, layer: int, generation: int) -> bytes:
        h = self._hdr
        return fmt.Header(kind, layer, h.num_layers, h.nheads_k, h.headdim, h.page_size,
                          h.dtype_name, h.page_bytes, h.slot_bytes, generation, h.store_id).pack()

    @staticmethod
    def _open(path, flags: int, action: str) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _io_error(path, action, e) from e

    @staticmethod
    def _fsync(fd: int, path) -> None:
        try:
            os.fdatasync(fd)
        except OSError as e:
            raise _io_error(path, "fsync", e) from e

    @staticmethod
    def _read_whole(fd: int, path) -> bytes:
        try:
            size = os.fstat(fd).st_size
            chunks, pos = [], 0
            while pos < size:
                b = os.pread(fd, size - pos, pos)
                if not b:
                    break
                chunks.append(b)
                pos += len(b)
            return b"".join(chunks)
        except OSError as e:
            raise _io_error(path, "reading", e) from e

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _io_error(self.directory, "fsync of the directory", e) from e

    def _replace_file(self, name: str, data: bytes) -> None:
        """Atomically replace ``<dir>/name``: temp file, fsync, rename, fsync(directory)."""
        tmp = self.directory / (name + ".tmp")
        final = self.directory / name
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "creating")
        try:
            _write_all(fd, data, 0, tmp, "writing")
            try:
                os.fsync(fd)
            except OSError as e:
                raise _io_error(tmp, "fsync", e) from e
        finally:
            os.close(fd)
        _crash_point(f"{name}_tmp_written", self._crash_counts)
        try:
            os.replace(tmp, final)
        except OSError as e:
            raise _io_error(final, "renaming the temp file over", e) from e
        self._fsync_dir()

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise ArgumentError(f"PageStore at {self.directory} is closed")
        if write and self.readonly:
            raise ArgumentError(f"PageStore at {self.directory} was opened readonly=True; it refuses writes")
        if write and self._broken:
            raise OffloadIOError(self._broken)

    def _check_layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ArgumentError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    @staticmethod
    def _check_key(name: str, key) -> tuple[int, int]:
        ok = isinstance(key, tuple) and len(key) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in key)
        if not ok:
            raise ArgumentError(f"{name} must be a (seq_id, page_no) tuple of ints >= 0, got {key!r}")
        return key

    def _check_alive(self, fd: int, path) -> None:
        """A file unlinked under us keeps working through its fd, but commits into it would be lost."""
        try:
            if os.fstat(fd).st_nlink == 0:
                raise OffloadIOError(f"{path}: file was removed while the store is open; "
                                     "nothing more can be committed (earlier pages stay readable)")
        except OSError as e:
            raise _io_error(path, "fstat", e) from e

    def _open_random_fds(self) -> None:
        """Second read-only fds on the data files, advised POSIX_FADV_RANDOM (advice is per
        open file, so the normal fds keep readahead for large runs). Best effort: without
        them (no posix_fadvise, an error) every read uses the normal fds."""
        if not hasattr(os, "posix_fadvise") or self.random_run_bytes <= 0:
            return
        fds = []
        try:
            for path in self._data_paths:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            for fd in fds:
                os.close(fd)
            return
        self._random_fds = fds

    def _slot_offset(self, slot: int) -> int:
        return fmt.HEADER_SIZE + slot * self.slot_bytes

    # ---------------------------------------------------------------- replay
    def _replay(self, jbuf: bytes, jhdr: fmt.Header) -> None:
        L = self.num_layers
        index: list[dict] = [dict() for _ in range(L)]
        used: list[dict] = [dict() for _ in range(L)]  # slot -> key, to catch two keys in one slot
        spath = self.directory / SNAPSHOT
        sgen, commit = 0, 0
        if spath.exists():
            sgen, commit = self._load_snapshot(spath, jhdr, index, used)
        if jhdr.generation > sgen:
            raise CorruptKVError(
                f"{self._journal_path}: journal generation {jhdr.generation} is newer than the "
                f"snapshot's ({sgen}): {spath} is missing or stale")
        pos = fmt.HEADER_SIZE
        entries_seen = 0
        if jhdr.generation == sgen:
            while pos < len(jbuf):
                rec = fmt.parse_record(jbuf, pos)
                if rec is None or rec[0] != commit + 1:
                    nxt = fmt.valid_record_after(jbuf, pos)
                    if rec is not None or nxt is not None:
                        what = (f"commit number {rec[0]}, expected {commit + 1}" if rec is not None
                                else f"bad record at byte {pos} followed by a valid one at byte {nxt}")
                        raise CorruptKVError(f"{self._journal_path}: journal corrupted: {what}")
                    break  # torn tail: an uncommitted batch cut short by a crash
                commit, entries, pos = rec
                entries_seen += len(entries)
                for e in entries:
                    self._apply_entry(e, index, used, self._journal_path)
        else:
            pos = len(jbuf)  # journal older than the snapshot: everything in it is in the snapshot
        self._index = index
        self._commit_no = commit
        self._generation = sgen
        self._journal_entries = entries_seen
        self._journal_end = pos
        self._nslots, self._free = [], []
        for layer in range(L):
            size = os.fstat(self._data_fds[layer]).st_size
            n = max(0, -(-(size - fmt.HEADER_SIZE) // self.slot_bytes))
            n = max(n, max(used[layer], default=-1) + 1)
            free = [s for s in range(n) if s not in used[layer]]
            heapq.heapify(free)
            self._nslots.append(n)
            self._free.append(free)
        if not self.readonly:
            # Leftovers of a crash: a torn journal tail (the next append must follow the last
            # valid record, else it would look like corruption in the middle) and temp files.
            if jhdr.generation < sgen:
                self._replace_file(JOURNAL, self._header(fmt.KIND_JOURNAL, fmt.NO_LAYER, sgen))
                newfd = self._open(self._journal_path, os.O_RDWR, "opening")
                os.close(self._journal_fd)
                self._journal_fd = newfd  # (open()'s cleanup list still holds the old, closed fd)
                self._journal_end = fmt.HEADER_SIZE
            elif pos < len(jbuf):
                try:
                    os.ftruncate(self._journal_fd, pos)
                    os.fsync(self._journal_fd)
                except OSError as e:
                    raise _io_error(self._journal_path, "truncating a torn tail", e) from e
            for name in (JOURNAL + ".tmp", SNAPSHOT + ".tmp"):
                try:
                    os.unlink(self.directory / name)
                except OSError:
                    pass  # harmless: a leftover temp file is never read, the next compaction replaces it

    def _apply_entry(self, e, index, used, path) -> None:
        op, _, layer, ntokens, seq, page_no, slot, csum = e
        key = (seq, page_no)
        if layer >= self.num_layers:
            raise CorruptKVError(f"{path}: entry names layer {layer} of a {self.num_layers}-layer store")
        if op == fmt.OP_PUT:
            if not 1 <= ntokens <= self.page_size or slot in used[layer]:
                raise CorruptKVError(f"{path}: inconsistent put of layer {layer} seq {seq} page {page_no}")
            old = index[layer].get(key)
            if old is not None:
                del used[layer][old[0]]
            index[layer][key] = (slot, ntokens, csum)
            used[layer][slot] = key
        elif op == fmt.OP_FREE:
            old = index[layer].pop(key, None)
            if old is None:
                raise CorruptKVError(f"{path}: frees absent page: layer {layer} seq {seq} page {page_no}")
            del used[layer][old[0]]
        else:
            raise CorruptKVError(f"{path}: unknown journal op {op}")

    def _load_snapshot(self, spath: Path, jhdr: fmt.Header, index, used) -> tuple[int, int]:
        fd = self._open(spath, os.O_RDONLY, "opening")
        try:
            buf = self._read_whole(fd, spath)
        finally:
            os.close(fd)
        h = fmt.unpack_header(buf[: fmt.HEADER_SIZE], spath, fmt.KIND_SNAPSHOT)
        if not h.same_store(jhdr):
            raise CorruptKVError(f"{spath}: belongs to another store than {self._journal_path}")
        head = fmt.HEADER_SIZE + fmt.SNAPSHOT_HEAD.size
        if len(buf) < head:
            raise CorruptKVError(f"{spath}: truncated snapshot")
        commit, n, csum = fmt.SNAPSHOT_HEAD.unpack_from(buf, fmt.HEADER_SIZE)
        body = memoryview(buf)[head:]
        if len(body) != n * fmt.ENTRY.size or fmt.checksum(body) != csum:
            raise CorruptKVError(f"{spath}: snapshot body truncated or failing its checksum")
        for i in range(n):
            e = fmt.ENTRY.unpack_from(body, i * fmt.ENTRY.size)
            if e[0] != fmt.OP_PUT:
                raise CorruptKVError(f"{spath}: snapshot holds a non-put entry")
            self._apply_entry(e, index, used, spath)
        return h.generation, commit

    # ---------------------------------------------------------------- commits
    def _commit(self, entries: list[tuple]) -> None:
        """Append one journal record and make it durable; on failure nothing is committed."""
        self._check_alive(self._journal_fd, self._journal_path)
        record = fmt.pack_record(self._commit_no + 1, entries)
        start = self._journal_end
        try:
            if os.environ.get(CRASH_ENV, "").startswith("journal_half"):
                _write_all(self._journal_fd, record[: len(record) // 2], start, self._journal_path, "")
                _crash_point("journal_half", self._crash_counts)
            _write_all(self._journal_fd, record, start, self._journal_path, "appending a commit record")
            _crash_point("journal_written", self._crash_counts)
            self._fsync(self._journal_fd, self._journal_path)
        except OffloadIOError:
            # Cut the partial record away so the next append follows the last valid record.
            try:
                os.ftruncate(self._journal_fd, start)
                os.fdatasync(self._journal_fd)
            except OSError as e:
                self._broken = (f"{self._journal_path}: could not remove a failed commit record "
                                f"({e.strerror}); reopen the store")
            raise
        self._journal_end = start + len(record)
        self._commit_no += 1
        self._journal_entries += len(entries)
        self._stats["commits"] += 1
        _crash_point("committed", self._crash_counts)

    def _apply_committed(self, entries: list[tuple]) -> None:
        """Update the in-memory index after a durable commit; freed slots become reusable now."""
        for op, _, layer, ntokens, seq, page_no, slot, csum in entries:
            key = (seq, page_no)
            old = self._index[layer].pop(key, None)
            if old is not None:
                if self._readers:  # a read in flight may still be reading this slot
                    self._deferred[layer].append(old[0])
                else:
                    heapq.heappush(self._free[layer], old[0])
            if op == fmt.OP_PUT:
                self._index[layer][key] = (slot, ntokens, csum)
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        live = sum(len(ix) for ix in self._index)
        if self._journal_entries <= self.compact_factor * live + self.compact_min_entries:
            return
        try:
            self._compact()
        except OffloadIOError as e:
            # The commit itself is durable; only the log stays long. Retry after more commits.
            self._journal_entries = self.compact_factor * live  # back off: next attempt after compact_min_entries more
            warnings.warn(f"longattn PageStore: journal compaction failed, will retry: {e}",
                          RuntimeWarning, stacklevel=3)

    def _compact(self) -> None:
        gen = self._generation + 1
        entries = [(fmt.OP_PUT, 0, layer, nt, seq, page_no, slot, csum)
                   for layer, ix in enumerate(self._index)
                   for (seq, page_no), (slot, nt, csum) in ix.items()]
        body = b"".join(fmt.ENTRY.pack(*e) for e in entries)
        snap = (self._header(fmt.KIND_SNAPSHOT, fmt.NO_LAYER, gen)
                + fmt.SNAPSHOT_HEAD.pack(self._commit_no, len(entries), fmt.checksum(body)) + body)
        self._replace_file(SNAPSHOT, snap)
        self._generation = gen  # from here on the snapshot alone holds the state
        _crash_point("snapshot_renamed", self._crash_counts)
        try:
            self._replace_file(JOURNAL, self._header(fmt.KIND_JOURNAL, fmt.NO_LAYER, gen))
            newfd = self._open(self._journal_path, os.O_RDWR, "opening")
        except OffloadIOError as e:
            # The old journal is now older than the snapshot: a reopen ignores it, so commits
            # appended to it would be lost. Refuse writes until a reopen starts a fresh one.
            self._broken = f"{e}; the store must be reopened before further writes"
            raise
        os.close(self._journal_fd)
        self._journal_fd = newfd
        self._journal_end = fmt.HEADER_SIZE
        self._journal_entries = 0
        self._stats["compactions"] += 1

    # ---------------------------------------------------------------- public API
    def write_pages(self, layer: int, items: list[tuple[int, int, torch.Tensor, int]]) -> None:
        """Write pages of ``layer`` as one atomic commit.

        items: ``(seq_id, page_no, kv, ntokens)`` with kv a CPU tensor
        ``(2, page_size, nheads_k, headdim)`` of the store's dtype and ``1 <= ntokens <=
        page_size``. Each page goes to a fresh slot (a rewritten key too: copy-on-write);
        the slots are fdatasynced, then one journal record commits the batch. Visible only
        after return; on OffloadIOError nothing of the batch is committed."""
        with self._mutex:
            self._check_open(write=True)
            layer = self._check_layer(layer)
            if not isinstance(items, (list, tuple)):
                raise ArgumentError(f"items must be a list of (seq_id, page_no, kv, ntokens), got {type(items).__name__}")
            want = (2, self.page_size, self.nheads_k, self.headdim)
            pages, seen = [], set()
            for i, item in enumerate(items):
                if not isinstance(item, tuple) or len(item) != 4:
                    raise ArgumentError(f"items[{i}] must be a (seq_id, page_no, kv, ntokens) tuple, got {item!r:.80}")
                seq, page_no, kv, ntokens = item
                key = self._check_key(f"items[{i}] (seq_id, page_no)", (seq, page_no))
                if key in seen:
                    raise ArgumentError(f"items[{i}]: page {key} appears twice in one batch")
                seen.add(key)
                self._check_pages_tensor(f"items[{i}] kv", kv, want, "(2, page_size, nheads_k, headdim)")
                if isinstance(ntokens, bool) or not isinstance(ntokens, int) or not 1 <= ntokens <= self.page_size:
                    raise ArgumentError(f"items[{i}] ntokens must be an int in [1, {self.page_size}], got {ntokens!r}")
                pages.append((key, kv.contiguous(), ntokens))
            if not pages:
                return
            path, fd = self._data_paths[layer], self._data_fds[layer]
            t0 = time.perf_counter()
            self._check_alive(fd, path)
            # Fresh slots only: the free list holds slots freed by EARLIER commits.
            slots, taken = [], []
            for _ in pages:
                if self._free[layer]:
                    s = heapq.heappop(self._free[layer])
                    taken.append(s)
                else:
                    s = self._nslots[layer]
                    self._nslots[layer] += 1
                slots.append(s)
            entries = []
            try:
                bufs = [_page_bytes_view(kv) for _, kv, _ in pages]
                for (key, _, nt), s, b in zip(pages, slots, bufs):
                    entries.append((fmt.OP_PUT, 0, layer, nt, key[0], key[1], s, fmt.checksum(b)))
                order = sorted(range(len(pages)), key=lambda j: slots[j])
                self._pwrite_runs(fd, path, [(slots[j], bufs[j]) for j in order])
                _crash_point("slots_written", self._crash_counts)
                self._fsync(fd, path)
                _crash_point("data_synced", self._crash_counts)
                self._commit(entries)
            except BaseException:
                for s in slots:  # never referenced by the index: safe to hand out again
                    heapq.heappush(self._free[layer], s)
                raise
            self._stats["bytes_written"] += len(pages) * self.page_bytes
            self._apply_committed(entries)
            self._stats["write_seconds"] += time.perf_counter() - t0

    def _check_pages_tensor(self, name: str, t: object, want: tuple, layout: str) -> None:
        """A CPU tensor of the store's dtype shaped ``want`` (named errors)."""
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ShapeError(f"{name} must have shape {layout} = {want}, got {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise DTypeError(f"{name} must be {self.dtype} (the store's dtype), got {t.dtype}")
        if t.device.type != "cpu":
            raise DeviceError(f"{name} must be a CPU tensor, got device {t.device}")

    def _slot_runs(self, slots: list[int]) -> list[tuple[int, int, int]]:
        """Group sorted ``slots`` into runs of adjacent slots for one pwritev/preadv
        each: ``(first index, end index, bytes from the first page's start to the
        last page's end)``, at most ``_RUN_BYTES`` (so a run stays in cache for
        its checksums) and ``_IOV_MAX`` buffers (pages plus padding)."""
        runs, i = [], 0
        while i < len(slots):
            j, nbytes = i + 1, self.page_bytes
            while (j < len(slots) and slots[j] == slots[j - 1] + 1
                   and 2 * (j - i + 1) <= _IOV_MAX and nbytes < _RUN_BYTES):
                j += 1
                nbytes += self.slot_bytes
            runs.append((i, j, nbytes))
            i = j
        return runs

    def _pwrite_runs(self, fd: int, path, slot_bufs) -> None:
        """pwritev runs of adjacent slots (padding between pages written as zeros)."""
        for i, j, _ in self._slot_runs([slot for slot, _ in slot_bufs]):
            iov = []
            for k in range(i, j):
                iov.append(slot_bufs[k][1])
                if self._pad and k + 1 < j:
                    iov.append(self._pad)
            total = sum(len(memoryview(b)) for b in iov)
            offset = self._slot_offset(slot_bufs[i][0])
            try:
                n = os.pwritev(fd, iov, offset)
            except OSError as e:
                raise _io_error(path, "writing page slots", e) from e
            if n < total:  # short write (e.g. reaching a file size limit): finish byte-wise
                _write_all(fd, b"".join(bytes(memoryview(b)) for b in iov)[n:], offset + n, path,
                           "writing page slots")

    def read_pages(self, layer: int, keys: list[tuple[int, int]], out: torch.Tensor,
                   rows: list[int] | None = None) -> list[int]:
        """Read committed pages into ``out`` in place; returns ntokens per page.

        out: contiguous CPU tensor ``(nrows, 2, page_size, nheads_k, headdim)`` of the
        store's dtype; page ``keys[i]`` goes to ``out[rows[i]]`` (``rows`` distinct, in
        ``[0, nrows)``; default ``rows = range(len(keys))`` with ``nrows == len(keys)``).
        Pages in adjacent slots are read by one ``os.preadv`` whatever their rows
        (scatter), runs of at most ``_RUN_BYTES``; independent runs are issued from up to
        ``read_threads`` threads at once (reads release the GIL: small random reads are
        latency-bound, several in flight overlap their latency). Every page's xxh3_64 is
        verified on the same buffer. A missing key -> ArgumentError; bad or missing bytes
        -> CorruptKVError.

        Concurrency: the store's lock is held only to look the slots up; the reads run
        outside it, so reads from several threads, and commits in another thread, proceed
        at once. A slot read here is not reused while the read lasts (slots freed by a
        commit during reads are handed out only once no read is in flight)."""
        with self._mutex:
            self._check_open()
            layer = self._check_layer(layer)
            if not isinstance(keys, (list, tuple)):
                raise ArgumentError(f"keys must be a list of (seq_id, page_no), got {type(keys).__name__}")
            page_shape = (2, self.page_size, self.nheads_k, self.headdim)
            if rows is None:
                want = (len(keys), *page_shape)
                self._check_pages_tensor("out", out, want, "(len(keys), 2, page_size, nheads_k, headdim)")
                rows = range(len(keys))
            else:
                if not isinstance(rows, (list, tuple, range)) or len(rows) != len(keys):
                    raise ArgumentError(f"rows must be a list of len(keys)={len(keys)} row indices, got {rows!r:.80}")
                nrows = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() >= 1 else 0
                self._check_pages_tensor("out", out, (nrows, *page_shape), "(nrows, 2, page_size, nheads_k, headdim)")
                if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < nrows for r in rows) \
                        or len(set(rows)) != len(rows):
                    raise ArgumentError(f"rows must be distinct ints in [0, {nrows}) (out's first dimension), "
                                        f"got {list(rows)!r:.80}")
            if not out.is_contiguous():
                raise DeviceError("out must be a contiguous CPU tensor (pages are read into its memory)")
            index = self._index[layer]
            found, ntokens = [], []
            for i, key in enumerate(keys):
                key = self._check_key(f"keys[{i}]", key)
                ent = index.get(key)
                if ent is None:
                    raise ArgumentError(f"keys[{i}]: page {key} of layer {layer} is not in the store")
                found.append((ent[0], rows[i], key, ent[2]))
                ntokens.append(ent[1])
            if not keys:
                return []
            self._readers += 1  # from here until the reads end, freed slots are not reused
        nruns = 0
        try:
            t_read, t_sum, nruns = self._read_found(layer, found, out)
        finally:
            with self._mutex:
                self._readers -= 1
                if self._readers == 0:
                    self._release_deferred()
                self._stats["bytes_read"] += len(found) * self.page_bytes
                self._stats["read_calls"] += 1
                self._stats["read_runs"] += nruns
                self._idle.notify_all()
        with self._mutex:
            self._stats["read_seconds"] += t_read
            self._stats["checksum_seconds"] += t_sum
        return ntokens

    def _read_found(self, layer: int, found: list, out: torch.Tensor) -> tuple[float, float, int]:
        """The reads of :meth:`read_pages` (outside the lock): ``found`` holds
        ``(slot, row, key, checksum)``; returns (seconds in preadv, seconds verifying)
        summed over the runs (with several threads, more than the wall time), and the
        number of runs (preadv calls, short reads aside)."""
        rows = out.view(out.shape[0], -1).view(torch.uint8).numpy()  # (nrows, page_bytes) over out's memory
        path = self._data_paths[layer]
        found.sort()
        runs = [found[i:j] for i, j, _ in self._slot_runs([f[0] for f in found])]
        if len(runs) == 1 or self.read_threads <= 1:
            totals = [self._read_run(layer, path, run, rows) for run in runs]
        else:
            pool = self._read_pool()
            futures = [pool.submit(self._read_run, layer, path, run, rows) for run in runs]
            totals, error = [], None
            for f in futures:  # every run settles before we return: none may still write into `out`
                try:
                    totals.append(f.result())
                except BaseException as e:  # noqa: B036 - re-raised below, the first one in slot order
                    error = error or e
            if error is not None:
                raise error
        return sum(t for t, _ in totals), sum(c for _, c in totals), len(runs)

    def _read_pool(self) -> ThreadPoolExecutor:
        with self._mutex:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="longattn-store-read")
            return self._pool

    def _read_run(self, layer: int, path, run: list, rows) -> tuple[float, float]:
        """One run of adjacent slots: one preadv (small runs through the fd with random-access
        advice, no readahead), then the checksums."""
        iov = []
        for k, (_, row, _, _) in enumerate(run):
            iov.append(rows[row])
            if self._pad and k + 1 < len(run):
                iov.append(bytearray(len(self._pad)))  # per call: runs may be read concurrently
        nbytes = len(run) * self.page_bytes + (len(run) - 1) * len(self._pad)
        fd = self._random_fds[layer] if nbytes <= self.random_run_bytes and self._random_fds else self._data_fds[layer]
        t0 = time.perf_counter()
        try:
            n = os.preadv(fd, iov, self._slot_offset(run[0][0]))
        except OSError as e:
            raise _io_error(path, "reading page slots", e) from e
        if n < nbytes:
            self._read_short_run(layer, fd, path, run, rows)
        t1 = time.perf_counter()
        for slot, row, key, csum in run:
            if fmt.checksum(rows[row]) != csum:
                raise CorruptKVError(
                    f"{path}: checksum mismatch in layer {layer} seq {key[0]} page {key[1]} "
                    f"(slot {slot} at byte {self._slot_offset(slot)}); the page is corrupt")
        return t1 - t0, time.perf_counter() - t1

    def _release_deferred(self) -> None:
        """No read in flight: slots freed meanwhile become reusable."""
        for layer, slots in enumerate(self._deferred):
            for s in slots:
                heapq.heappush(self._free[layer], s)
            slots.clear()

    def _read_short_run(self, layer, fd, path, run, rows) -> None:
        """A preadv came back short: read page by page; a page past EOF is a truncated file."""
        for slot, row, key, _ in run:
            off = self._slot_offset(slot)
            got = 0
            while got < self.page_bytes:
                try:
                    n = os.preadv(fd, [rows[row][got:]], off + got)
                except OSError as e:
                    raise _io_error(path, "reading page slots", e) from e
                if n == 0:
                    raise CorruptKVError(
                        f"{path}: truncated: layer {layer} seq {key[0]} page {key[1]} (slot {slot}, "
                        f"bytes {off}..{off + self.page_bytes}) lies beyond the end of the file")
                got += n

    def free_pages(self, layer: int, keys: list[tuple[int, int]]) -> None:
        """Remove pages of ``layer`` in one commit; their slots are reusable afterwards.

        A key not in the store -> ArgumentError (nothing is freed)."""
        with self._mutex:
            self._check_open(write=True)
            layer = self._check_layer(layer)
            if not isinstance(keys, (list, tuple)):
                raise ArgumentError(f"keys must be a list of (seq_id, page_no), got {type(keys).__name__}")
            entries, seen = [], set()
            for i, key in enumerate(keys):
                key = self._check_key(f"keys[{i}]", key)
                if key not in self._index[layer]:
                    raise ArgumentError(f"keys[{i}]: page {key} of layer {layer} is not in the store")
                if key in seen:
                    raise ArgumentError(f"keys[{i}]: page {key} appears twice")
                seen.add(key)
                entries.append((fmt.OP_FREE, 0, layer, 0, key[0], key[1], 0, 0))
            self._commit_and_apply(entries)

    def drop_sequence(self, seq_id: int) -> None:
        """Free every page of ``seq_id`` in every layer, in one commit (no-op if it has none)."""
        with self._mutex:
            self._check_open(write=True)
            if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id < 2**63:
                raise ArgumentError(f"seq_id must be an int >= 0, got {seq_id!r}")
            entries = [(fmt.OP_FREE, 0, layer, 0, seq, page_no, 0, 0)
                       for layer, ix in enumerate(self._index)
                       for (seq, page_no) in ix if seq == seq_id]
            self._commit_and_apply(entries)

    def _commit_and_apply(self, entries) -> None:
        if not entries:
            return
        t0 = time.perf_counter()
        self._commit(entries)
        self._apply_committed(entries)
        self._stats["write_seconds"] += time.perf_counter() - t0

    def pages(self, layer: int) -> dict[tuple[int, int], int]:
        """Committed pages of ``layer``: ``{(seq_id, page_no): ntokens}`` (a copy)."""
        with self._mutex:
            self._check_open()
            layer = self._check_layer(layer)
            return {k: v[1] for k, v in self._index[layer].items()}

    def sync(self) -> None:
        """Every write_pages/free_pages/drop_sequence is durable when it returns: a no-op."""
        with self._mutex:
            self._check_open()

    def stats(self) -> dict:
        """bytes_read / bytes_written (page bytes), read_calls (read_pages calls), read_runs
        (their preadv runs of adjacent slots),
        read_seconds (preadv time only, summed over reader threads),
        checksum_seconds (verifying pages on read), write_seconds (slot writes, fsyncs,
        journal), commits, compactions, pages_per_layer (list of live page counts)."""
        with self._mutex:
            s = dict(self._stats)
            s["pages_per_layer"] = [len(ix) for ix in getattr(self, "_index", [])]
            return s

    def close(self) -> None:
        """Close the files and release the lock; idempotent."""
        lock = getattr(self, "_lock", None)
        if getattr(self, "_closed", True):
            if lock is not None:
                lock.release()
            return
        with self._mutex:
            self._closed = True  # no new read starts; reads in flight finish on open fds
            while self._readers:
                self._idle.wait()
            pool, self._pool = self._pool, None
            for fd in [self._journal_fd, *self._data_fds, *self._random_fds]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._random_fds = []
            self._lock.release()
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("readonly" if self.readonly else "writer")
        return (f"PageStore({str(getattr(self, 'directory', '?'))!r}, {state}, layers={getattr(self, 'num_layers', '?')}, "
                f"page_size={getattr(self, 'page_size', '?')}, dtype={getattr(self, 'dtype', '?')})")

    @staticmethod
    def drop_os_cache(path) -> None:
        """Evict a store's data files (or one file) from the OS page cache:
        ``posix_fadvise(POSIX_FADV_DONTNEED)`` (cold reads for benchmarks); no-op where
        unavailable. Dirty pages are written back first so they can be dropped."""
        if not hasattr(os, "posix_fadvise"):
            return
        path = Path(path)
        files = sorted(path.glob("layer_*.kv")) if path.is_dir() else [path]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
