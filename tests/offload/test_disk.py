"""PageStore (longattn.offload.disk): round trips, crash safety, corruption, I/O errors, locking.

Real files in tmp_path and real processes. Child processes come from a
multiprocessing *forkserver* whose server preloads torch and the store: each
child is a fresh process (its own files, locks and rlimits; SIGKILL kills it
for real) without paying the ~2 s torch import per child, which keeps the 30
kill rounds affordable.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time

import pytest
import torch

from longattn.errors import ArgumentError, CorruptKVError, DTypeError, OffloadIOError, ShapeError
from longattn.offload import format as fmt
from longattn.offload.disk import CRASH_ENV, PageStore

pytestmark = pytest.mark.timeout(60)

# Geometry of the crash tests: small pages, two layers.
GEOM = dict(num_layers=2, nheads_k=2, headdim=8, dtype=torch.float16, page_size=5)
PAGE_SHAPE = (2, 5, 2, 8)


def _ctx():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "longattn.offload.disk", __name__])
    return ctx


def rand_page(seed: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------- deterministic batch model
def page_content(batch: int, layer: int, key) -> torch.Tensor:
    return rand_page(batch * 1_000_003 + layer * 10_007 + key[0] * 101 + key[1], PAGE_SHAPE, GEOM["dtype"])


def batch_op(b: int, state):
    """The operation of batch ``b`` given the state before it (every op changes the state)."""
    rng = random.Random(b)
    r = rng.random()
    live = [layer for layer in range(2) if state[layer]]
    if r < 0.15 and live:
        layer = rng.choice(live)
        keys = rng.sample(sorted(state[layer]), rng.randint(1, min(3, len(state[layer]))))
        return ("free", layer, keys)
    seqs = sorted({k[0] for layer in range(2) for k in state[layer]})
    if r < 0.22 and seqs:
        return ("drop", rng.choice(seqs))
    layer = rng.randrange(2)
    keys = rng.sample([(s, p) for s in range(4) for p in range(8)], rng.randint(1, 6))
    return ("write", layer, [(k, rng.randint(1, 5)) for k in keys])


def apply_op(b: int, op, state) -> None:
    if op[0] == "free":
        for k in op[2]:
            del state[op[1]][k]
    elif op[0] == "drop":
        for layer in range(2):
            for k in [k for k in state[layer] if k[0] == op[1]]:
                del state[layer][k]
    else:
        for k, nt in op[2]:
            state[op[1]][k] = (b, nt)


def do_op(store: PageStore, b: int, op) -> None:
    if op[0] == "free":
        store.free_pages(op[1], op[2])
    elif op[0] == "drop":
        store.drop_sequence(op[1])
    else:
        store.write_pages(op[1], [(k[0], k[1], page_content(b, op[1], k), nt) for k, nt in op[2]])


def fold(batches) -> list[dict]:
    state = [{}, {}]
    for b in batches:
        apply_op(b, batch_op(b, state), state)
    return state


def store_matches(store: PageStore, state) -> bool:
    """Bitwise: the store holds exactly the pages of ``state`` with their contents."""
    for layer in range(2):
        got = store.pages(layer)
        if got != {k: nt for k, (_, nt) in state[layer].items()}:
            return False
        keys = sorted(got)
        out = torch.empty((len(keys), *PAGE_SHAPE), dtype=GEOM["dtype"])
        store.read_pages(layer, keys, out)
        for i, k in enumerate(keys):
            if not torch.equal(out[i], page_content(state[layer][k][0], layer, k)):
                return False
    return True


# ----------------------------------------------------------------- child processes
def child_append(directory, batches, crash_env, compact_min, fsize_limit, conn):
    """Append ``batches`` (ids) in order, sending each id after write returns.

    With ``fsize_limit``: RLIMIT_FSIZE is lowered (SIGXFSZ ignored); failing batches are
    skipped (sent as -1 - id), then the limit is lifted and the rest must succeed."""
    if crash_env:
        os.environ[CRASH_ENV] = crash_env
    import resource

    store = PageStore.open(directory)
    store.compact_min_entries = compact_min
    store.compact_factor = 1
    state = fold(conn.recv())  # ids committed before this child
    if fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, hard))
    failures = 0
    for i, b in enumerate(batches):
        if fsize_limit and i == len(batches) // 2:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space returns
        op = batch_op(b, state)
        try:
            do_op(store, b, op)
        except OffloadIOError as e:
            if not fsize_limit or i >= len(batches) // 2:
                raise
            assert "file size limit" in str(e) and str(e).startswith(str(directory)), str(e)
            failures += 1
            conn.send_bytes(struct.pack("<q", -1 - b))
            continue
        apply_op(b, op, state)
        conn.send_bytes(struct.pack("<q", b))
    assert store_matches(store, state)
    store.close()
    conn.send_bytes(struct.pack("<q", 1 << 62))  # done marker


def child_hold(directory, readonly, conn):
    """Open the store and keep it open until told to go (or killed)."""
    store = PageStore.open(directory, readonly=readonly)
    conn.send_bytes(b"open")
    conn.recv_bytes()
    store.close()


def run_child(ctx, target, *args):
    parent, child = ctx.Pipe(duplex=True)
    p = ctx.Process(target=target, args=(*args, child), daemon=True)
    p.start()
    child.close()
    return p, parent


def drain(conn) -> list[int]:
    got = []
    while True:
        try:
            if not conn.poll(0.0):
                return got
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return got
        if len(raw) == 8:
            got.append(struct.unpack("<q", raw)[0])


def new_store(tmp_path, name="store"):
    d = tmp_path / name
    PageStore.create(d, **GEOM).close()
    return d


def run_batches(s, batch_ids, state=None):
    """Apply the seeded batches ``batch_ids`` to store ``s``; return the expected state."""
    state = [{}, {}] if state is None else state
    for b in batch_ids:
        op = batch_op(b, state)
        do_op(s, b, op)
        apply_op(b, op, state)
    return state


# ----------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nheads_k,headdim,page_size", [(1, 8, 1), (2, 16, 7), (4, 64, 16), (3, 5, 3)])
def test_round_trip_reopen_bitwise(tmp_path, dtype, nheads_k, headdim, page_size):
    shape = (2, page_size, nheads_k, headdim)
    d = tmp_path / "s"
    expect = {}
    with PageStore.create(d, num_layers=3, nheads_k=nheads_k, headdim=headdim, dtype=dtype,
                          page_size=page_size) as s:
        assert s.page_bytes == 2 * page_size * nheads_k * headdim * torch.empty((), dtype=dtype).element_size()
        for layer in range(3):
            items = []
            for p in range(5):
                kv = rand_page(layer * 100 + p, shape, dtype)
                nt = page_size if p < 4 else max(1, page_size // 2)  # last page partial
                items.append((layer + 10, p, kv, nt))
                expect[(layer, layer + 10, p)] = (kv, nt)
            s.write_pages(layer, items)
        # rewrite (copy-on-write) and free
        kv = rand_page(999, shape, dtype)
        s.write_pages(1, [(11, 2, kv, 1)])
        expect[(1, 11, 2)] = (kv, 1)
        s.free_pages(2, [(12, 0), (12, 3)])
        del expect[(2, 12, 0)], expect[(2, 12, 3)]
    for readonly in (False, True):
        with PageStore.open(d, readonly=readonly) as s:
            assert (s.nheads_k, s.headdim, s.page_size, s.dtype, s.num_layers) == (nheads_k, headdim, page_size, dtype, 3)
            for layer in range(3):
                want = {k[1:]: v[1] for k, v in expect.items() if k[0] == layer}
                assert s.pages(layer) == want
                keys = list(reversed(sorted(want)))
                out = torch.empty((len(keys), *shape), dtype=dtype)
                assert s.read_pages(layer, keys, out) == [want[k] for k in keys]
                for i, k in enumerate(keys):
                    assert torch.equal(out[i].view(torch.uint8), expect[(layer, *k)][0].view(torch.uint8))


def test_copy_on_write_and_slot_reuse_after_commit(tmp_path):
    d = new_store(tmp_path)
    with PageStore.open(d) as s:
        s.write_pages(0, [(0, p, page_content(0, 0, (0, p)), 5) for p in range(4)])
        old = dict(s._index[0])
        size = os.path.getsize(d / "layer_00000.kv")
        s.write_pages(0, [(0, 1, page_content(1, 0, (0, 1)), 5)])  # rewrite goes to a fresh slot
        assert s._index[0][(0, 1)][0] not in {v[0] for v in old.values()}
        assert old[(0, 1)][0] in s._free[0]  # the old slot is free only now, after the commit
        s.free_pages(0, [(0, 2), (0, 3)])
        before = os.path.getsize(d / "layer_00000.kv")
        s.write_pages(0, [(1, p, page_content(2, 0, (1, p)), 5) for p in range(3)])
        assert os.path.getsize(d / "layer_00000.kv") == before >= size  # freed slots were reused
        assert s.stats()["pages_per_layer"] == [5, 0]


def test_reads_batch_adjacent_slots_into_one_preadv(tmp_path, monkeypatch):
    d = tmp_path / "s"
    with PageStore.create(d, num_layers=1, nheads_k=2, headdim=64, dtype=torch.float32, page_size=16) as s:
        assert s.page_bytes % 4096 == 0
        pages = [rand_page(p, (2, 16, 2, 64), torch.float32) for p in range(8)]
        s.write_pages(0, [(0, p, pages[p], 16) for p in range(8)])
        calls = []
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off))
        out = torch.empty((8, 2, 16, 2, 64))
        keys = [(0, p) for p in (3, 1, 0, 2, 7, 6, 5, 4)]
        s.read_pages(0, keys, out)
        assert calls == [8]
        for i, k in enumerate(keys):
            assert torch.equal(out[i], pages[k[1]])
        st = s.stats()
        assert st["bytes_read"] == 8 * s.page_bytes and st["commits"] == 1


def test_read_into_rows_scatters_and_checks_rows(tmp_path):
    """rows=: page keys[i] lands in out[rows[i]] (one preadv for adjacent slots whatever the rows);
    bad rows -> ArgumentError naming rows."""
    with PageStore.create(tmp_path / "s", num_layers=1, nheads_k=1, headdim=64, dtype=torch.float32,
                          page_size=16) as s:
        pages = [rand_page(p, (2, 16, 1, 64), torch.float32) for p in range(4)]
        s.write_pages(0, [(0, p, pages[p], 16) for p in range(4)])
        out = torch.zeros((6, 2, 16, 1, 64))
        assert s.read_pages(0, [(0, 0), (0, 1), (0, 3)], out, rows=[5, 0, 2]) == [16, 16, 16]
        assert torch.equal(out[5], pages[0]) and torch.equal(out[0], pages[1]) and torch.equal(out[2], pages[3])
        assert torch.all(out[1] == 0) and torch.all(out[3] == 0)
        for rows in ([0, 0], [0, 6], [0], [True, 1]):
            with pytest.raises(ArgumentError, match="rows"):
                s.read_pages(0, [(0, 0), (0, 1)], out, rows=rows)


def test_concurrent_reads_while_another_thread_commits(tmp_path):
    """4 threads read (several runs per call, so the store's read threads run too) while a
    writer frees, rewrites and writes pages: every read returns exactly a version of the page
    it asked for (a slot freed during a read is not reused until the read ends; checksums pass)."""
    import threading

    shape = (2, 16, 1, 64)  # 8 KiB pages: slot-aligned, no padding
    nkeys = 24

    def content(key, version):
        return torch.full(shape, float(key * 1000 + version))

    with PageStore.create(tmp_path / "s", num_layers=1, nheads_k=1, headdim=64, dtype=torch.float32,
                          page_size=16) as s:
        s.read_threads = 3
        s.write_pages(0, [(0, k, content(k, 0), 16) for k in range(nkeys)])
        stop = threading.Event()
        errors = []
        live = set(range(nkeys))  # keys the writer never frees: readers may always ask for them
        stable = set(range(0, nkeys, 2))

        def reader(seed):
            rng = random.Random(seed)
            out = torch.empty((8, *shape))
            try:
                while not stop.is_set():
                    keys = rng.sample(sorted(stable), 4) + rng.sample(sorted(live - stable), 4)
                    s.read_pages(0, [(0, k) for k in keys], out)
                    for i, k in enumerate(keys):
                        v = out[i].flatten()
                        assert torch.all(v == v[0]) and int(v[0]) // 1000 == k, (k, v[0])
            except BaseException as e:  # noqa: B036 - reported by the main thread
                errors.append(e)

        def writer():
            try:
                for version in range(1, 60):
                    churn = [k for k in range(1, nkeys, 2)]
                    s.write_pages(0, [(0, k, content(k, version), 16) for k in churn])  # copy-on-write
                    extra = [(0, 100 + version * 10 + i) for i in range(3)]
                    s.write_pages(0, [(0, key[1], content(key[1], 0), 16) for key in extra])
                    s.free_pages(0, extra)  # freed slots go back to the free list (or wait for readers)
            except BaseException as e:  # noqa: B036
                errors.append(e)
            finally:
                stop.set()

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[0]
        st = s.stats()
        assert st["read_calls"] > 0 and st["commits"] == 1 + 59 * 3
        out = torch.empty((nkeys, *shape))
        s.read_pages(0, [(0, k) for k in range(nkeys)], out)
        for k in range(nkeys):
            assert torch.equal(out[k], content(k, 59 if k % 2 else 0))
    with PageStore.open(tmp_path / "s", readonly=True) as again:  # and the index on disk agrees
        assert sorted(again.pages(0)) == [(0, k) for k in range(nkeys)]


def test_bad_arguments(tmp_path):
    d = new_store(tmp_path)
    with PageStore.open(d) as s:
        kv = page_content(0, 0, (0, 0))
        with pytest.raises(ShapeError, match="kv must have shape"):
            s.write_pages(0, [(0, 0, kv[:, :4], 5)])
        with pytest.raises(DTypeError, match="float16"):
            s.write_pages(0, [(0, 0, kv.float(), 5)])
        with pytest.raises(ArgumentError, match="ntokens"):
            s.write_pages(0, [(0, 0, kv, 6)])
        with pytest.raises(ArgumentError, match="layer"):
            s.write_pages(2, [(0, 0, kv, 5)])
        with pytest.raises(ArgumentError, match="twice"):
            s.write_pages(0, [(0, 0, kv, 5), (0, 0, kv, 5)])
        s.write_pages(0, [(0, 0, kv, 5)])
        with pytest.raises(ArgumentError, match=r"\(0, 1\).*not in the store"):
            s.read_pages(0, [(0, 1)], torch.empty((1, *PAGE_SHAPE), dtype=torch.float16))
        with pytest.raises(ShapeError, match="out must have shape"):
            s.read_pages(0, [(0, 0)], torch.empty(PAGE_SHAPE, dtype=torch.float16))
        with pytest.raises(ArgumentError, match="not in the store"):
            s.free_pages(0, [(5, 5)])
    with pytest.raises(OffloadIOError, match="already holds"):
        PageStore.create(d, **GEOM)
    with PageStore.open(d, readonly=True) as r:
        for call in (lambda: r.write_pages(0, [(1, 0, kv, 5)]), lambda: r.free_pages(0, [(0, 0)]),
                     lambda: r.drop_sequence(0)):
            with pytest.raises(ArgumentError, match="readonly"):
                call()
    r.close()  # idempotent
    with pytest.raises(ArgumentError, match="closed"):
        r.pages(0)


# ----------------------------------------------------------------- corruption
def _one_page_store(tmp_path):
    d = new_store(tmp_path)
    with PageStore.open(d) as s:
        s.write_pages(1, [(3, p, page_content(0, 1, (3, p)), 5) for p in range(3)])
        slot = s._index[1][(3, 1)][0]
    return d, fmt.HEADER_SIZE + slot * 4096


def test_flipped_bit_raises_naming_file_and_page(tmp_path):
    d, off = _one_page_store(tmp_path)
    path = d / "layer_00001.kv"
    with open(path, "r+b") as f:
        f.seek(off + 37)
        b = f.read(1)
        f.seek(off + 37)
        f.write(bytes([b[0] ^ 0x10]))
    with PageStore.open(d, readonly=True) as s:
        out = torch.empty((1, *PAGE_SHAPE), dtype=torch.float16)
        s.read_pages(1, [(3, 0)], out)  # other pages stay usable
        with pytest.raises(CorruptKVError, match=r"layer_00001\.kv.*layer 1 seq 3 page 1"):
            s.read_pages(1, [(3, 0), (3, 1)], torch.empty((2, *PAGE_SHAPE), dtype=torch.float16))


def test_truncated_data_file_raises_naming_file_and_page(tmp_path):
    d, off = _one_page_store(tmp_path)
    path = d / "layer_00001.kv"
    os.truncate(path, off + 10)
    with PageStore.open(d, readonly=True) as s:
        with pytest.raises(CorruptKVError, match=r"layer_00001\.kv: truncated.*layer 1 seq 3 page"):
            s.read_pages(1, [(3, 0), (3, 1), (3, 2)], torch.empty((3, *PAGE_SHAPE), dtype=torch.float16))
    os.truncate(path, 100)  # the header itself is cut
    with pytest.raises(CorruptKVError, match=r"layer_00001\.kv: not a longattn KV file"):
        PageStore.open(d)


@pytest.mark.parametrize("name", ["journal", "layer_00000.kv"])
def test_bad_magic_or_version_raises_naming_file(tmp_path, name):
    d, _ = _one_page_store(tmp_path)
    with open(d / name, "r+b") as f:
        f.write(b"NOTAKVFL")
    with pytest.raises(CorruptKVError, match=f"{name}: not a longattn KV file"):
        PageStore.open(d, readonly=True)
    with open(d / name, "r+b") as f:
        f.write(fmt.MAGIC + struct.pack("<I", 99))
    with pytest.raises(CorruptKVError, match=f"{name}: format version 99"):
        PageStore.open(d, readonly=True)


def test_torn_journal_tail_is_ignored_and_cut(tmp_path):
    d = new_store(tmp_path)
    batches = list(range(6))
    with PageStore.open(d) as s:
        state = run_batches(s, batches)
    j = d / "journal"
    good = os.path.getsize(j)
    rec = fmt.pack_record(7, [(fmt.OP_PUT, 0, 0, 5, 0, 0, 40, 123)] * 3)
    for tail in (rec[:10], rec[:-7], rec[:-1] + bytes([rec[-1] ^ 1]), b"\0" * 200):
        os.truncate(j, good)
        with open(j, "ab") as f:
            f.write(tail)
        with PageStore.open(d, readonly=True) as r:
            assert store_matches(r, state)
        assert os.path.getsize(j) == good + len(tail)  # readonly never writes
    with PageStore.open(d) as s:  # the writer cuts the torn tail, then appends after it
        assert os.path.getsize(j) == good
        op = batch_op(6, state)
        do_op(s, 6, op)
        apply_op(6, op, state)
    with PageStore.open(d) as s:
        assert store_matches(s, state)


def test_corrupted_journal_middle_raises_naming_journal(tmp_path):
    d = new_store(tmp_path)
    with PageStore.open(d) as s:
        state = run_batches(s, range(5))
    raw = bytearray((d / "journal").read_bytes())
    raw[fmt.HEADER_SIZE + fmt.RECORD_HEAD_SIZE + 9] ^= 0x01  # inside the first record's entries
    (d / "journal").write_bytes(bytes(raw))
    with pytest.raises(CorruptKVError, match=r"journal: journal corrupted: bad record at byte 4096"):
        PageStore.open(d, readonly=True)


def test_file_removed_under_us(tmp_path):
    d = new_store(tmp_path)
    with PageStore.open(d) as s:
        s.write_pages(0, [(0, 0, page_content(0, 0, (0, 0)), 5)])
        os.unlink(d / "layer_00000.kv")
        with pytest.raises(OffloadIOError, match=r"layer_00000\.kv: file was removed"):
            s.write_pages(0, [(0, 1, page_content(0, 0, (0, 1)), 5)])
        out = torch.empty((1, *PAGE_SHAPE), dtype=torch.float16)
        s.read_pages(0, [(0, 0)], out)  # committed pages stay readable
        assert torch.equal(out[0], page_content(0, 0, (0, 0)))
        assert s.pages(0) == {(0, 0): 5}
    with pytest.raises(OffloadIOError, match=r"layer_00000\.kv: missing"):
        PageStore.open(d)


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod does not stop root from writing")
def test_permission_denied(tmp_path):
    d = new_store(tmp_path)
    os.chmod(d / "journal", 0o444)
    try:
        with pytest.raises(OffloadIOError, match="journal.*Permission denied"):
            PageStore.open(d)
        with PageStore.open(d, readonly=True) as r:
            assert r.pages(0) == {}
    finally:
        os.chmod(d / "journal", 0o644)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(OffloadIOError, match="Permission denied"):
            PageStore.create(ro / "x", **GEOM)
    finally:
        os.chmod(ro, 0o755)


def test_compaction_snapshot_round_trip(tmp_path):
    d = new_store(tmp_path)
    ids = list(range(40))
    with PageStore.open(d) as s:
        s.compact_min_entries = 4
        s.compact_factor = 1
        state = run_batches(s, ids)
        assert s.stats()["compactions"] >= 2
        assert (d / "snapshot").exists() and not (d / "snapshot.tmp").exists()
        assert store_matches(s, state)
    for readonly in (True, False):
        with PageStore.open(d, readonly=readonly) as s:
            assert store_matches(s, state)


# ----------------------------------------------------------------- crashes
CRASH_POINTS = ["slots_written", "data_synced", "journal_half", "journal_written", "committed",
                "snapshot_tmp_written", "snapshot_renamed", "journal_tmp_written"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_each_commit_step(tmp_path, point):
    """The child dies (os._exit) at a named step of its 3rd commit or compaction; a reopen
    shows every reported batch, the dying batch all or nothing, and appends continue."""
    ctx = _ctx()
    d = new_store(tmp_path)
    committed: list[int] = []
    for round_ in range(2):
        start = committed[-1] + 1 if committed else 0
        nth = 1 if "tmp" in point or "snapshot" in point else 3
        p, conn = run_child(ctx, child_append, str(d), list(range(start, start + 60)),
                            f"{point}:{nth}" if round_ == 0 else "", 0, 0)
        conn.send(committed)
        p.join(30)
        got = drain(conn)
        if round_ == 0:
            assert p.exitcode == 86, f"the child did not reach crash point {point}"
        else:
            assert p.exitcode == 0 and got[-1] == 1 << 62
            got = got[:-1]
        committed += got
        with PageStore.open(d, readonly=True) as s:
            nxt = committed[-1] + 1 if committed else 0
            if round_ == 1 or point in ("slots_written", "data_synced", "journal_half"):
                assert store_matches(s, fold(committed))  # the dying batch left no trace
            elif point == "journal_written":  # record written, not fsynced: the page cache has it
                assert store_matches(s, fold(committed)) or store_matches(s, fold(committed + [nxt]))
            else:  # died after the record was durable (compaction runs after the commit)
                assert store_matches(s, fold(committed + [nxt]))
            if round_ == 0 and not store_matches(s, fold(committed)):
                committed.append(nxt)
        if point == "committed" and round_ == 0:
            assert committed == list(range(3)), "a commit that returned durable must survive"


def test_kill9_random_points_many_rounds(tmp_path):
    """30 rounds: a child appends batches in a loop; SIGKILL after a random delay; the reopen
    holds exactly the reported batches (plus possibly, atomically, the one in flight)."""
    ctx = _ctx()
    d = new_store(tmp_path)
    rng = random.Random(1234)
    committed: list[int] = []
    in_flight_seen = 0
    for _ in range(30):
        start = committed[-1] + 1 if committed else 0
        p, conn = run_child(ctx, child_append, str(d), list(range(start, start + 100_000)), "", 8, 0)
        conn.send(committed)
        time.sleep(rng.uniform(0.05, 0.3))
        p.kill()
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        committed += drain(conn)
        with PageStore.open(d) as s:  # writer open: also cuts a torn tail
            if not store_matches(s, fold(committed)):
                nxt = committed[-1] + 1 if committed else 0
                assert store_matches(s, fold(committed + [nxt])), "reopen shows a partial batch"
                committed.append(nxt)
                in_flight_seen += 1
    assert len(committed) > 30  # the children really were appending when killed


def test_disk_full_then_space_returns(tmp_path):
    """RLIMIT_FSIZE in the child: OffloadIOError naming the file, nothing of the failed
    batch committed, the same store object keeps working once the limit is lifted."""
    ctx = _ctx()
    d = new_store(tmp_path)
    with PageStore.open(d) as s:
        state = run_batches(s, range(5))
    limit = max(os.path.getsize(d / n) for n in os.listdir(d)) + 6000
    p, conn = run_child(ctx, child_append, str(d), list(range(5, 45)), "", 4096, limit)
    conn.send(list(range(5)))
    p.join(30)
    got = drain(conn)
    assert p.exitcode == 0 and got[-1] == 1 << 62
    ok = list(range(5)) + [b for b in got[:-1] if b >= 0]
    failed = [-1 - b for b in got if b < 0]
    assert failed, "the file size limit never bit"
    with PageStore.open(d) as s:
        assert store_matches(s, fold(ok))
        state = fold(ok)
        op = batch_op(1000, state)
        do_op(s, 1000, op)
        apply_op(1000, op, state)
    with PageStore.open(d, readonly=True) as s:
        assert store_matches(s, state)


def test_disk_full_error_message(tmp_path):
    """In this process: a failing pwrite (ENOSPC) -> OffloadIOError naming the data file;
    a failing journal append is cut away so the next commit follows the last valid one."""
    import errno

    d = new_store(tmp_path)
    with PageStore.open(d) as s:
        s.write_pages(0, [(0, 0, page_content(0, 0, (0, 0)), 5)])
        real_pwritev, real_pwrite = os.pwritev, os.pwrite

        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")

        os.pwritev = full
        try:
            with pytest.raises(OffloadIOError, match=r"layer_00000\.kv: writing page slots failed: No space"):
                s.write_pages(0, [(0, 1, page_content(0, 0, (0, 1)), 5)])
        finally:
            os.pwritev = real_pwritev
        jsize = os.path.getsize(d / "journal")
        calls = []

        def half(fd, data, off):  # the journal record gets half written, then the disk is full
            calls.append(1)
            if len(calls) == 1:
                return real_pwrite(fd, bytes(data)[: len(data) // 2], off)
            raise OSError(errno.ENOSPC, "No space left on device")

        os.pwrite = half
        try:
            with pytest.raises(OffloadIOError, match="journal: appending a commit record failed"):
                s.free_pages(0, [(0, 0)])
        finally:
            os.pwrite = real_pwrite
        assert os.path.getsize(d / "journal") == jsize
        assert s.pages(0) == {(0, 0): 5}
        s.write_pages(0, [(0, 2, page_content(0, 0, (0, 2)), 4)])
    with PageStore.open(d) as s:
        assert s.pages(0) == {(0, 0): 5, (0, 2): 4}


# ----------------------------------------------------------------- locking
def test_locking_between_processes(tmp_path):
    ctx = _ctx()
    d = new_store(tmp_path)
    # readonly + readonly coexist (a child and this process); a writer is refused meanwhile
    p, conn = run_child(ctx, child_hold, str(d), True)
    assert conn.recv_bytes() == b"open"
    with PageStore.open(d, readonly=True) as r:
        assert r.pages(0) == {}
        with pytest.raises(OffloadIOError, match=r"/lock: store is locked by read-only"):
            PageStore.open(d)
    conn.send_bytes(b"go")
    p.join(10)
    assert p.exitcode == 0
    # a live writer refuses a reader and a second writer, naming the lock and the pid
    p, conn = run_child(ctx, child_hold, str(d), False)
    assert conn.recv_bytes() == b"open"
    for readonly in (True, False):
        with pytest.raises(OffloadIOError, match=rf"/lock: store is locked by writer pid {p.pid}"):
            PageStore.open(d, readonly=readonly)
    # kill -9 the writer: the OS drops its flock, the store opens again
    p.kill()
    p.join(10)
    with PageStore.open(d) as s:
        with pytest.raises(OffloadIOError, match="lock"):
            PageStore.open(d, readonly=True)  # same process, second open: refused too
        s.write_pages(0, [(0, 0, page_content(0, 0, (0, 0)), 5)])


def test_permission_denied_simulated(tmp_path, monkeypatch):
    """Runs as root too (where chmod does not bind): EACCES injected at os.open.

    Opening -> OffloadIOError naming the file; a compaction that cannot create its temp
    file warns, the commits stay durable, and a later reopen sees them all."""
    import errno

    d = new_store(tmp_path)
    real_open = os.open

    def deny(name):
        def fake(path, *a, **k):
            if str(path).endswith(name):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(path, *a, **k)
        return fake

    monkeypatch.setattr(os, "open", deny("journal"))
    with pytest.raises(OffloadIOError, match=r"journal: opening failed: Permission denied"):
        PageStore.open(d)
    monkeypatch.setattr(os, "open", real_open)
    with PageStore.open(d) as s:
        s.compact_min_entries, s.compact_factor = 0, 1
        monkeypatch.setattr(os, "open", deny("snapshot.tmp"))
        state = [{}, {}]
        with pytest.warns(RuntimeWarning, match=r"snapshot\.tmp: creating failed: Permission denied"):
            for b in range(12):
                op = batch_op(b, state)
                do_op(s, b, op)
                apply_op(b, op, state)
        monkeypatch.setattr(os, "open", real_open)
        assert s.stats()["compactions"] == 0 and not (d / "snapshot").exists()
        for b in range(12, 30):  # compaction works again once permission returns
            op = batch_op(b, state)
            do_op(s, b, op)
            apply_op(b, op, state)
        assert s.stats()["compactions"] >= 1
    with PageStore.open(d, readonly=True) as s:
        assert store_matches(s, state)
