"""TieredKVCache: any tier split attends like an in-memory cache; placement,
capacity errors, drop, flush + reopen (in a fresh process), stats, validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn
from longattn.errors import (
    ArgumentError,
    DTypeError,
    OffloadCapacityError,
    OffloadIOError,
    ShapeError,
    UnsupportedFeatureError,
)
from longattn.offload import policy
from longattn.offload.cache import TieredKVCache
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle

REPO = Path(__file__).resolve().parents[2]


def _page_bytes(ps, hk, d, dtype):
    return 2 * ps * hk * d * torch.empty((), dtype=dtype).element_size()


def _tokens(gen, n, hk, d, dtype):
    return torch.randn(n, hk, d, generator=gen).to(dtype), torch.randn(n, hk, d, generator=gen).to(dtype)


def _contiguous(q, k, v, backend="auto"):
    """decode_attention on an ordinary contiguous cache holding the same tokens."""
    lens = torch.tensor([k.shape[0]], dtype=torch.int32)
    return longattn.decode_attention(q, k[None].contiguous(), v[None].contiguous(), cache_seqlens=lens,
                                     return_lse=True, backend=backend)


def _parts(cache, layer, seq_id):
    """How many partial results attend merges for this sequence."""
    s = cache._layers[layer][seq_id]
    disk_chunks = -(-s.ndisk // cache._chunk_pages)
    return disk_chunks + (s.nhost > 0) + (s.ndevice > 0)


def _check_against_memory(cache, layer, seq_id, q, k, v):
    out, lse = cache.attend(layer, seq_id, q, return_lse=True)
    s = cache._layers[layer].get(seq_id)
    # Disk parts are attended head-major (kv heads as the kernel's batch): the same math, but the
    # kernel's work split differs from the one-sequence call's, so bitwise only with one kv head.
    head_major = s is not None and s.ndisk > 0 and cache.nheads_k > 1
    if _parts(cache, layer, seq_id) <= 1 and not head_major:
        # One part: the same kernel over the same tokens, paged instead of contiguous.
        ref_out, ref_lse = _contiguous(q, k, v)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    else:
        oracle_out, oracle_lse = attention_ref(q, k[None], v[None], causal=True)
        eager_out, eager_lse = _contiguous(q, k, v, backend="eager")
        assert_close_to_oracle(out, oracle_out, eager_out)
        assert_close_to_oracle(lse, oracle_lse, eager_lse, name="lse")
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (1, q.shape[2], q.shape[1])


@st.composite
def tier_cases(draw):
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        page_size=draw(st.sampled_from([1, 2, 3, 5, 8])),
        nheads_k=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 4])),
        headdim=draw(st.sampled_from([16, 24])),
        chunks=draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 7, 13, 25]), min_size=1, max_size=4)),
        seqlen_q=draw(st.sampled_from([1, 2, 5])),
        device_pages=draw(st.sampled_from([0, 1, 2, 7, 10**6])),
        host_pages=draw(st.sampled_from([0, 1, 3, 10**6])),
        disk=draw(st.booleans()),
        chunk_pages=draw(st.sampled_from([1, 3, 1000])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60)  # cheap (~50 ms each): more splits than the profile's default
@given(tier_cases())
def test_any_tier_split_attends_like_memory(case):
    """2 layers x 2 sequences appended in interleaved chunks (demotions cross
    sequences and layers), attended after every round against the in-memory
    decode: bitwise when one part, else the oracle with the tolerance rule."""
    dtype, ps, hk, d = case["dtype"], case["page_size"], case["nheads_k"], case["headdim"]
    pb = _page_bytes(ps, hk, d, dtype)
    gen = torch.Generator().manual_seed(case["seed"])
    host_pages = case["host_pages"] if case["disk"] else 10**6  # no disk tier: room for everything
    with tempfile.TemporaryDirectory() as tmp:
        cache = TieredKVCache(2, hk, d, dtype, ps, case["device_pages"] * pb, host_pages * pb,
                              disk_dir=tmp if case["disk"] else None, disk_chunk_bytes=case["chunk_pages"] * pb)
        with cache:
            ks = {(layer, sid): [] for layer in range(2) for sid in (3, 11)}
            vs = {key: [] for key in ks}
            for n in case["chunks"]:
                for (layer, sid) in ks:
                    k, v = _tokens(gen, n, hk, d, dtype)
                    cache.append(layer, sid, k if layer else k[None], v if layer else v[None])  # batch dim 1 too
                    ks[(layer, sid)].append(k)
                    vs[(layer, sid)].append(v)
                q = torch.randn(1, case["seqlen_q"], hk * case["group"], d, generator=gen).to(dtype)
                for (layer, sid) in ks:
                    k, v = torch.cat(ks[(layer, sid)]), torch.cat(vs[(layer, sid)])
                    assert cache.seqlen(layer, sid) == k.shape[0]
                    _check_against_memory(cache, layer, sid, q, k, v)
            _check_invariants(cache)


def _check_invariants(cache):
    st_ = cache.stats()
    assert st_["device_pages"] <= cache.cap_device
    if cache._store is None:
        assert st_["disk_pages"] == 0
    else:
        assert st_["host_pages"] <= cache.cap_host
    total = sum(s.npages for seqs in cache._layers for s in seqs.values())
    assert st_["device_pages"] + st_["host_pages"] + st_["disk_pages"] == total
    for seqs in cache._layers:
        for s in seqs.values():
            assert s.ndisk + s.nhost + s.ndevice == s.npages == -(-s.length // cache.page_size)
            assert all(slot is None for slot in s.slots[:s.ndisk])
            assert all(slot is not None for slot in s.slots[s.ndisk:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_query_alignment_across_tiers(dtype, tmp_path):
    """seqlen_q > 1 with the last seqlen_q - 1 positions spread over disk,
    host and device (page_size 1: every page a different part): the masked
    tiers get the shifted window; queries past the start see nothing."""
    hk, d, ps = 2, 16, 1
    pb = _page_bytes(ps, hk, d, dtype)
    gen = torch.Generator().manual_seed(5)
    cache = TieredKVCache(1, hk, d, dtype, ps, 2 * pb, 3 * pb, disk_dir=tmp_path, disk_chunk_bytes=2 * pb)
    k, v = _tokens(gen, 10, hk, d, dtype)
    cache.append(0, 0, k, v)
    s = cache._layers[0][0]
    assert (s.ndisk, s.nhost, s.ndevice) == (5, 3, 2)
    for sq in (1, 3, 6, 9, 10, 13):  # 13 > L: the first three queries see no key
        q = torch.randn(1, sq, 4, d, generator=gen).to(dtype)
        _check_against_memory(cache, 0, 0, q, k, v)
    out, lse = cache.attend(0, 0, torch.randn(1, 13, 4, d, generator=gen).to(dtype), return_lse=True)
    assert torch.all(out[0, :3] == 0) and torch.all(lse[0, :, :3] == -torch.inf)
    cache.close()


def test_placement_keeps_recent_pages_high():
    """The documented policy on one sequence: newest pages on the device, then host."""
    hk, d, ps = 1, 16, 4
    pb = _page_bytes(ps, hk, d, torch.float32)
    cache = TieredKVCache(1, hk, d, torch.float32, ps, 2 * pb, 10 * pb)
    gen = torch.Generator().manual_seed(0)
    for n in (4, 4, 3, 1, 1, 6):
        cache.append(0, 0, *_tokens(gen, n, hk, d, torch.float32))
    s = cache._layers[0][0]
    assert s.length == 19 and (s.ndisk, s.nhost, s.ndevice) == (0, 3, 2)


def test_policy_counts():
    counts = {(0, 0): [0, 0, 5], (0, 1): [0, 0, 2], (1, 0): [0, 1, 3]}
    policy.demote(counts, 4, 4, current=(0, 1))
    # Device: oldest first (the most device pages), ties to the current pair;
    # then host: the most host + device pages. Tiers stay contiguous per pair.
    assert counts == {(0, 0): [2, 2, 1], (0, 1): [0, 1, 1], (1, 0): [1, 1, 2]}
    split = policy.initial_split({(0, 0): 5, (0, 1): 1, (1, 0): 3}, 4, 3)
    assert split == {(0, 0): [2, 1, 2], (0, 1): [0, 0, 1], (1, 0): [0, 2, 1]}


def test_capacity_error_leaves_cache_unchanged():
    hk, d, ps = 2, 16, 2
    pb = _page_bytes(ps, hk, d, torch.float32)
    gen = torch.Generator().manual_seed(1)
    cache = TieredKVCache(2, hk, d, torch.float32, ps, 2 * pb, 3 * pb)
    k0, v0 = _tokens(gen, 7, hk, d, torch.float32)  # 4 pages
    cache.append(0, 0, k0, v0)
    q = torch.randn(1, 2, 4, d, generator=gen)
    before_out, before_lse = cache.attend(0, 0, q, return_lse=True)
    before_stats = cache.stats()
    with pytest.raises(OffloadCapacityError, match="host_budget_bytes"):
        cache.append(1, 5, *_tokens(gen, 3, hk, d, torch.float32))  # 2 more pages: 6 > 5
    with pytest.raises(OffloadCapacityError):
        cache.append(0, 0, *_tokens(gen, 4, hk, d, torch.float32))
    assert cache.stats() == before_stats and cache.seqlen(0, 0) == 7 and cache.seq_ids == [0]
    out, lse = cache.attend(0, 0, q, return_lse=True)
    assert torch.equal(out, before_out) and torch.equal(lse, before_lse)
    cache.append(0, 0, *_tokens(gen, 1, hk, d, torch.float32))  # still fits (the partial page)
    assert cache.seqlen(0, 0) == 8


def test_failed_disk_write_leaves_cache_unchanged(tmp_path, monkeypatch):
    hk, d, ps = 1, 16, 2
    pb = _page_bytes(ps, hk, d, torch.float32)
    gen = torch.Generator().manual_seed(2)
    cache = TieredKVCache(1, hk, d, torch.float32, ps, 1 * pb, 1 * pb, disk_dir=tmp_path)
    k, v = _tokens(gen, 5, hk, d, torch.float32)
    cache.append(0, 0, k, v)
    q = torch.randn(1, 3, 2, d, generator=gen)
    before = cache.attend(0, 0, q, return_lse=True)
    stats = cache.stats()

    def refuse(layer, items):
        raise OffloadIOError(f"{tmp_path}: no space left on device (test)")

    monkeypatch.setattr(cache._store, "write_pages", refuse)
    with pytest.raises(OffloadIOError):
        cache.append(0, 0, *_tokens(gen, 4, hk, d, torch.float32))
    monkeypatch.undo()
    after = cache.attend(0, 0, q, return_lse=True)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and cache.seqlen(0, 0) == 5
    st_ = cache.stats()
    assert {k_: st_[k_] for k_ in ("device_pages", "host_pages", "disk_pages")} == \
        {k_: stats[k_] for k_ in ("device_pages", "host_pages", "disk_pages")}
    k2, v2 = _tokens(gen, 4, hk, d, torch.float32)
    cache.append(0, 0, k2, v2)  # the store is still usable
    _check_against_memory(cache, 0, 0, q, torch.cat([k, k2]), torch.cat([v, v2]))
    cache.close()


def test_drop_frees_every_tier(tmp_path):
    hk, d, ps = 2, 16, 3
    pb = _page_bytes(ps, hk, d, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    cache = TieredKVCache(2, hk, d, torch.bfloat16, ps, 2 * pb, 2 * pb, disk_dir=tmp_path)
    for sid in (1, 2):
        for layer in range(2):
            cache.append(layer, sid, *_tokens(gen, 10, hk, d, torch.bfloat16))
    st_ = cache.stats()
    assert st_["device_pages"] == 2 and st_["host_pages"] == 2 and st_["disk_pages"] == 12
    commits = st_["store"]["commits"]
    cache.drop(1)
    st_ = cache.stats()
    assert st_["store"]["commits"] == commits + 1  # one commit for every layer
    assert st_["device_pages"] + st_["host_pages"] + st_["disk_pages"] == 8
    assert sum(st_["store"]["pages_per_layer"]) == st_["disk_pages"] * hk  # one store page per (page, kv head)
    cache.drop(2)
    st_ = cache.stats()
    assert (st_["device_pages"], st_["host_pages"], st_["disk_pages"]) == (0, 0, 0)
    assert st_["device_bytes"] == st_["host_bytes"] == st_["disk_bytes"] == 0
    assert st_["store"]["pages_per_layer"] == [0, 0] and cache.seq_ids == []
    with pytest.raises(ArgumentError, match="seq_id 1"):
        cache.attend(0, 1, torch.zeros(1, 1, 2, d, dtype=torch.bfloat16))
    with pytest.raises(ArgumentError, match="seq_id 1"):
        cache.drop(1)
    # Freed slots are reused: the pools do not grow for a sequence of the same size.
    caps = [cache._pools[layer][t].capacity for layer in range(2) for t in (policy.HOST, policy.DEVICE)]
    for layer in range(2):
        cache.append(layer, 9, *_tokens(gen, 10, hk, d, torch.bfloat16))
    assert [cache._pools[layer][t].capacity for layer in range(2) for t in (policy.HOST, policy.DEVICE)] == caps
    cache.close()


def test_stats_counts(tmp_path):
    hk, d, ps = 1, 16, 4
    pb = _page_bytes(ps, hk, d, torch.float32)
    gen = torch.Generator().manual_seed(4)
    cache = TieredKVCache(1, hk, d, torch.float32, ps, 1 * pb, 1 * pb, disk_dir=tmp_path)
    cache.append(0, 0, *_tokens(gen, 15, hk, d, torch.float32))  # 4 pages: disk 2, host 1, device 1
    st_ = cache.stats()
    assert (st_["disk_pages"], st_["host_pages"], st_["device_pages"]) == (2, 1, 1)
    assert (st_["disk_bytes"], st_["host_bytes"], st_["device_bytes"]) == (2 * pb, pb, pb)
    assert st_["pages_written"] == 2 and st_["bytes_written"] == 2 * pb and st_["bytes_read"] == 0
    assert st_["store"]["commits"] == 1 and st_["store"]["pages_per_layer"] == [2]
    cache.attend(0, 0, torch.randn(1, 1, 1, d, generator=gen))
    st_ = cache.stats()
    assert st_["pages_read"] == 2 and st_["bytes_read"] == 2 * pb == st_["store"]["bytes_read"]
    assert st_["read_seconds"] > 0 and st_["write_seconds"] > 0
    cache.flush()  # checkpoint copies of the two memory pages: one commit
    st_ = cache.stats()
    assert st_["disk_copies"] == 2 and st_["pages_written"] == 4 and st_["store"]["commits"] == 2
    assert st_["store"]["pages_per_layer"] == [4] and st_["disk_pages"] == 2
    cache.append(0, 0, *_tokens(gen, 1, hk, d, torch.float32))  # fills the partial page: its copy goes stale
    assert cache.stats()["disk_copies"] == 1
    # A new page: the stale device page moves to the host, the clean host page
    # to disk without a write (its checkpoint copy is current).
    cache.append(0, 0, *_tokens(gen, 4, hk, d, torch.float32))
    st_ = cache.stats()
    assert (st_["disk_pages"], st_["host_pages"], st_["device_pages"]) == (3, 1, 1)
    assert st_["pages_written"] == 4 and st_["disk_copies"] == 0
    cache.append(0, 0, *_tokens(gen, 4, hk, d, torch.float32))  # now the stale page reaches disk: written
    st_ = cache.stats()
    assert (st_["disk_pages"], st_["host_pages"], st_["device_pages"]) == (4, 1, 1)
    assert st_["pages_written"] == 5 and st_["store"]["pages_per_layer"] == [4]
    cache.close()


_CHILD = r"""
import json, sys, torch
from longattn.offload.cache import TieredKVCache
disk, pb, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
payload = torch.load(out_path.replace("out", "in"))
res = {}
outs = {}
# All on disk, read as one chunk: one part per sequence, bitwise the in-memory decode.
with TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0, disk_chunk_bytes=1 << 30) as cache:
    for (layer, sid), q in payload["q"].items():
        outs[("disk", layer, sid)] = cache.attend(layer, sid, q, return_lse=True)
with TieredKVCache.open(disk, device_budget_bytes=3 * pb, host_budget_bytes=2 * pb) as cache:
    res["seq_ids"] = cache.seq_ids
    res["lengths"] = {f"{l},{s}": cache.seqlen(l, s) for l in range(2) for s in cache.seq_ids}
    st = cache.stats()
    res["tiers"] = [st["device_pages"], st["host_pages"], st["disk_pages"]]
    for (layer, sid), q in payload["q"].items():
        outs[(layer, sid)] = cache.attend(layer, sid, q, return_lse=True)
    cache.append(0, 4, payload["k_more"], payload["v_more"])
    outs["more"] = cache.attend(0, 4, payload["q"][(0, 4)], return_lse=True)
torch.save(outs, out_path)
print(json.dumps(res))
"""


def test_flush_and_reopen_in_a_fresh_process(tmp_path):
    hk, d, ps, dtype = 2, 16, 3, torch.bfloat16
    pb = _page_bytes(ps, hk, d, dtype)
    gen = torch.Generator().manual_seed(6)
    disk = tmp_path / "kv"
    cache = TieredKVCache(2, hk, d, dtype, ps, 2 * pb, 3 * pb, disk_dir=disk)
    kv = {}
    for n in (8, 1, 5):
        for layer in range(2):
            for sid in (4, 9):
                k, v = _tokens(gen, n, hk, d, dtype)
                cache.append(layer, sid, k, v)
                kv.setdefault((layer, sid), []).append((k, v))
    cache.append(1, 12, *_tokens(gen, 0, hk, d, dtype))  # an empty sequence is not persisted
    cache.flush()
    with pytest.raises(OffloadIOError):  # the writer lock is held until close
        TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0)
    cache.close()
    cache.close()  # idempotent
    qs = {key: torch.randn(1, 3, 4, d, generator=gen).to(dtype) for key in kv}
    k_more, v_more = _tokens(gen, 4, hk, d, dtype)
    torch.save({"q": qs, "k_more": k_more, "v_more": v_more}, tmp_path / "in.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(disk), str(pb), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["seq_ids"] == [4, 9]
    assert res["lengths"] == {f"{layer},{sid}": 14 for layer in range(2) for sid in (4, 9)}
    assert res["tiers"] == [3, 2, 20 - 5]  # 5 pages x 4 pairs; the newest promoted into the budgets
    outs = torch.load(tmp_path / "out.pt")
    for key, pieces in kv.items():
        k, v = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
        oracle_out, oracle_lse = attention_ref(qs[key], k[None], v[None], causal=True)
        eager_out, eager_lse = _contiguous(qs[key], k, v, backend="eager")
        assert_close_to_oracle(outs[key][0], oracle_out, eager_out)
        assert_close_to_oracle(outs[key][1], oracle_lse, eager_lse, name="lse")
        same_out, same_lse = _contiguous(qs[key], k, v)
        assert torch.equal(outs[("disk",) + key][0], same_out) and torch.equal(outs[("disk",) + key][1], same_lse)
    # The child's appends were made durable by its close: a third open sees them.
    with TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0) as again:
        assert again.seqlen(0, 4) == 18 and again.seqlen(1, 4) == 14
        k = torch.cat([p[0] for p in kv[(0, 4)]] + [k_more])
        v = torch.cat([p[1] for p in kv[(0, 4)]] + [v_more])
        _check_against_memory(again, 0, 4, qs[(0, 4)], k, v)
        oracle_out, _ = attention_ref(qs[(0, 4)], k[None], v[None], causal=True)
        eager_out, _ = _contiguous(qs[(0, 4)], k, v, backend="eager")
        assert_close_to_oracle(outs["more"][0], oracle_out, eager_out)  # what the child attended


def test_reopen_after_crash_keeps_the_committed_prefix(tmp_path):
    """Pages past a gap or a partial page (a crash between commits) are dropped on open."""
    hk, d, ps = 1, 16, 2
    pb = _page_bytes(ps, hk, d, torch.float32)
    gen = torch.Generator().manual_seed(7)
    cache = TieredKVCache(1, hk, d, torch.float32, ps, 0, 0, disk_dir=tmp_path)
    k, v = _tokens(gen, 7, hk, d, torch.float32)
    cache.append(0, 0, k, v)  # pages 0..3 on disk, page 3 partial
    store = cache._store
    store.write_pages(0, [(0, 5, torch.zeros(2, ps, hk, d), ps)])  # after a gap: not part of the sequence
    store.write_pages(0, [(1, 1, torch.zeros(2, ps, hk, d), ps)])  # no page 0: nothing of seq 1
    cache._closed = True  # "crash": no flush; release the lock only
    store.close()
    with TieredKVCache.open(tmp_path, device_budget_bytes=pb, host_budget_bytes=0) as again:
        assert again.seqlen(0, 0) == 7 and again.seq_ids == [0, 1] and again.seqlen(0, 1) == 0
        assert sorted(again._store.pages(0)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
        _check_against_memory(again, 0, 0, torch.randn(1, 2, 1, d, generator=gen), k, v)


def test_validation_errors(tmp_path):
    f32 = torch.float32
    with pytest.raises(ArgumentError, match="page_size"):
        TieredKVCache(1, 1, 16, f32, 0, 0, 0)
    with pytest.raises(ArgumentError, match="device_budget_bytes"):
        TieredKVCache(1, 1, 16, f32, 4, -1, 0)
    with pytest.raises(ArgumentError, match="host_budget_bytes"):
        TieredKVCache(1, 1, 16, f32, 4, 0, 1.5)
    with pytest.raises(ArgumentError, match="num_layers"):
        TieredKVCache(0, 1, 16, f32, 4, 0, 0)
    with pytest.raises(DTypeError, match="dtype"):
        TieredKVCache(1, 1, 16, torch.int8, 4, 0, 0)
    cache = TieredKVCache(2, 2, 16, f32, 4, 1 << 20, 1 << 20)
    k = torch.zeros(3, 2, 16)
    with pytest.raises(ArgumentError, match="layer"):
        cache.append(2, 0, k, k)
    with pytest.raises(ArgumentError, match="seq_id"):
        cache.append(0, -1, k, k)
    with pytest.raises(ShapeError, match="k must have shape"):
        cache.append(0, 0, torch.zeros(3, 1, 16), k)
    with pytest.raises(ShapeError, match="batch 1"):
        cache.append(0, 0, torch.zeros(2, 3, 2, 16), torch.zeros(2, 3, 2, 16))
    with pytest.raises(ShapeError, match="v has shape"):
        cache.append(0, 0, k, torch.zeros(4, 2, 16))
    with pytest.raises(DTypeError, match="bfloat16"):
        cache.append(0, 0, k.bfloat16(), k.bfloat16())
    cache.append(0, 0, k, k)
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ArgumentError, match="seq_id 5"):
        cache.attend(0, 5, q)
    with pytest.raises(ShapeError, match="multiple"):
        cache.attend(0, 0, torch.zeros(1, 1, 3, 16))
    with pytest.raises(ShapeError, match="headdim"):
        cache.attend(0, 0, torch.zeros(1, 1, 4, 8))
    with pytest.raises(ShapeError, match="batch 1"):
        cache.attend(0, 0, torch.zeros(2, 1, 4, 16))
    with pytest.raises(DTypeError, match="q has dtype"):
        cache.attend(0, 0, q.half())
    with pytest.raises(UnsupportedFeatureError, match="sparse"):
        cache.attend(0, 0, q, sparse=object())
    with pytest.raises(ArgumentError, match="state must be None"):  # the cache holds the selection state
        cache.attend(0, 0, q, state=object())
    with pytest.raises(ArgumentError, match="softcap"):
        cache.attend(0, 0, q, softcap=-1.0)
    with pytest.raises(UnsupportedFeatureError, match="disk_dir"):
        cache.flush()
    # A sequence that exists but has no tokens in this layer: empty rows.
    out, lse = cache.attend(1, 0, q, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == -torch.inf)
    cache.close()
    with pytest.raises(ArgumentError, match="closed"):
        cache.append(0, 0, k, k)
    with pytest.raises(OffloadIOError):  # a directory already holding a store
        TieredKVCache(1, 1, 16, f32, 4, 0, 0, disk_dir=tmp_path).close()
        TieredKVCache(1, 1, 16, f32, 4, 0, 0, disk_dir=tmp_path)


def test_demotions_of_several_sequences_are_one_commit(tmp_path):
    hk, d, ps = 1, 16, 1
    pb = _page_bytes(ps, hk, d, torch.float32)
    gen = torch.Generator().manual_seed(8)
    cache = TieredKVCache(1, hk, d, torch.float32, ps, 0, 6 * pb, disk_dir=tmp_path)
    for sid in (0, 1):
        cache.append(0, sid, *_tokens(gen, 3, hk, d, torch.float32))
    assert cache.stats()["store"]["commits"] == 0
    cache.append(0, 2, *_tokens(gen, 2, hk, d, torch.float32))  # the oldest page of seq 0 and of seq 1 go down
    st_ = cache.stats()
    assert st_["store"]["commits"] == 1 and st_["pages_written"] == 2
    assert sorted(cache._store.pages(0)) == [(0, 0), (1, 0)]
    assert [cache._layers[0][sid].counts() for sid in (0, 1, 2)] == [[1, 2, 0], [1, 2, 0], [0, 2, 0]]
    cache.close()


_READER = r"""
import sys, torch
from longattn.errors import OffloadIOError
from longattn.offload.cache import TieredKVCache
disk, q_path = sys.argv[1], sys.argv[2]
try:
    with TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0, readonly=True) as cache:
        torch.save(cache.attend(0, 3, torch.load(q_path)), q_path + ".out")
    print("READ OK")
except OffloadIOError as exc:
    print("REFUSED", exc)
"""


def _reader_process(disk, q_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _READER, str(disk), str(q_path)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_readonly_opens_share_a_closed_cache_and_a_live_writer_refuses_them(tmp_path):
    """Another process opens a closed cache read-only while this one has it
    open read-only (both attend: same bits); a writer is refused meanwhile; a
    read-only cache refuses changes and writes nothing on close; once a writer
    holds the cache, a read-only open from another process is refused by name."""
    hk, d, ps, dtype = 2, 16, 4, torch.float32
    gen = torch.Generator().manual_seed(8)
    disk = tmp_path / "kv"
    k, v = _tokens(gen, 30, hk, d, dtype)
    with TieredKVCache(1, hk, d, dtype, ps, 0, 0, disk_dir=disk) as cache:
        cache.append(0, 3, k, v)
    q = torch.randn(1, 1, 4, d, generator=gen)
    torch.save(q, tmp_path / "q.pt")
    journal = (disk / "journal").read_bytes()
    reader = TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0, readonly=True)
    assert reader.readonly
    assert _reader_process(disk, tmp_path / "q.pt") == "READ OK"  # a second reader, another process
    mine = reader.attend(0, 3, q)
    assert torch.equal(mine, torch.load(str(tmp_path / "q.pt") + ".out"))
    assert torch.equal(mine, _contiguous(q, k, v)[0])
    with pytest.raises(OffloadIOError, match="lock"):
        TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0)
    for change in (lambda: reader.append(0, 3, k[:1], v[:1]), lambda: reader.drop(3), reader.flush):
        with pytest.raises(ArgumentError, match="read-only"):
            change()
    reader.close()
    assert (disk / "journal").read_bytes() == journal  # nothing written by the readers
    with TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0) as writer:
        verdict = _reader_process(disk, tmp_path / "q.pt")
        assert verdict.startswith("REFUSED") and "lock" in verdict, verdict
        writer.append(0, 3, k[:2], v[:2])
    with pytest.raises(ArgumentError, match="readonly"):
        TieredKVCache.open(disk, device_budget_bytes=0, host_budget_bytes=0, readonly="yes")
