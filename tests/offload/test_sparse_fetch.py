"""TieredKVCache sparse page fetch: Quest / DoubleSparsity metadata kept at append
time selects exactly what decode_attention(sparse=...) selects on an in-memory
cache; only pages holding selected positions are read from disk; read-ahead of
the next layer; metadata survives demotion and reopen; argument errors."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, ShapeError, UnsupportedFeatureError
from longattn.offload.cache import TieredKVCache
from longattn.reference import attention_ref
from longattn.sparse import DoubleSparsity, DoubleSparsityState, Quest, QuestState
from tests.tolerance import assert_close_to_oracle


def _page_bytes(ps, hk, d, dtype):
    return 2 * ps * hk * d * torch.empty((), dtype=dtype).element_size()


def _in_memory(q, k, v, cfg, backend="auto"):
    """decode_attention(sparse=cfg) on a contiguous in-memory cache of the same
    tokens, with a fresh state prefilled from it: (out, lse, selection)."""
    lens = torch.tensor([k.shape[0]], dtype=torch.int32)
    state = QuestState(cfg) if isinstance(cfg, Quest) else DoubleSparsityState(cfg)
    state.prefill(k[None], lens)
    return longattn.decode_attention(q, k[None], v[None], cache_seqlens=lens, sparse=cfg, state=state,
                                     return_lse=True, return_selection=True, backend=backend)


def _restricted_oracle(q, k, v, selection):
    """The float64 oracle over exactly each kv head's selected positions."""
    hk = k.shape[1]
    group = q.shape[2] // hk
    outs, lses = [], []
    for h in range(hk):
        pos = selection[0, h]
        pos = pos[pos >= 0].long()
        o, lse = attention_ref(q[:, :, h * group:(h + 1) * group], k[pos, h][None, :, None],
                               v[pos, h][None, :, None], causal=False)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=1)


def _disk_pages_of(cache, layer, seq_id, selection):
    """Disk store pages (one kv head of one cache page: ``page * nheads_k + h``, the
    head-major disk layout) holding a position that head selected."""
    seq = cache._layers[layer][seq_id]
    hk = cache.nheads_k
    units = set()
    for h in range(hk):
        sel = selection[0, h]
        sel = sel[sel >= 0].long()
        units |= {int(p) * hk + h for p in torch.unique(sel // cache.page_size) if p < seq.ndisk}
    return units


def _parts(cache, layer, seq_id, selection):
    seq = cache._layers[layer][seq_id]
    pages = selection[selection >= 0].long() // cache.page_size
    tiers = {0 if p < seq.ndisk else 1 if p < seq.ndisk + seq.nhost else 2 for p in pages.tolist()}
    return len(tiers)


def _check_step(cache, layer, seq_id, q, k, v, cfg):
    before = cache.stats()
    out, lse, sel = cache.attend(layer, seq_id, q, sparse=cfg, return_lse=True, return_selection=True)
    ref_out, ref_lse, ref_sel = _in_memory(q, k, v, cfg)
    assert torch.equal(sel, ref_sel)  # same metadata, same scores, same ties
    if _parts(cache, layer, seq_id, sel) <= 1:
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    else:
        oracle_out, oracle_lse = _restricted_oracle(q, k, v, sel)
        eager_out, eager_lse, _ = _in_memory(q, k, v, cfg, backend="eager")
        assert_close_to_oracle(out, oracle_out, eager_out)
        assert_close_to_oracle(lse, oracle_lse, eager_lse, name="lse")
    # Only the (page, kv head) store pages holding positions that head selected were read
    # (those not held already; the next layer's read-ahead is counted apart, under prefetch_*).
    if before["store"] is not None:
        read = cache.stats()["sparse_pages_read"] - before["sparse_pages_read"]
        assert read <= len(_disk_pages_of(cache, layer, seq_id, sel))
        assert set(cache._fetched.get((layer, seq_id)).rows if (layer, seq_id) in cache._fetched else ()) \
            == _disk_pages_of(cache, layer, seq_id, sel)
    return sel


@st.composite
def sparse_cases(draw):
    page_size = draw(st.sampled_from([2, 4, 8]))
    hk = draw(st.sampled_from([1, 2]))
    d = 16
    if draw(st.booleans()):
        p = draw(st.sampled_from([q for q in (1, 2, 4, 8) if page_size % q == 0]))
        budgets = [p * draw(st.integers(1, 6)), 10**6]
        cfg = Quest(token_budget=budgets[0], page_size=p)
    else:
        r = draw(st.integers(1, 3))
        channels = [draw(st.permutations(range(d)))[:r] for _ in range(hk)]
        budgets = [draw(st.integers(1, 40)), 10**6]
        cfg = DoubleSparsity(channels, token_budget=budgets[0])
    return dict(dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), page_size=page_size, nheads_k=hk,
                group=draw(st.sampled_from([1, 2, 4])), headdim=d, cfg=cfg, budgets=budgets,
                chunks=draw(st.lists(st.sampled_from([1, 2, 5, 13, 31]), min_size=1, max_size=4)),
                device_pages=draw(st.sampled_from([0, 1, 3, 10**6])), host_pages=draw(st.sampled_from([0, 2, 10**6])),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(sparse_cases())
def test_sparse_attend_equals_in_memory_sparse_decode(case):
    """2 layers x 2 sequences, appended in interleaved chunks (demotions cross
    pairs), a sparse step after every round at the config's budget, a budget >=
    the context (then dense decode) and a second budget: the selection equals
    decode_attention's; the output is bitwise when one tier holds it all, else
    the oracle restricted to the selection; only selected pages are read."""
    dtype, ps, hk, d, cfg = case["dtype"], case["page_size"], case["nheads_k"], case["headdim"], case["cfg"]
    pb = _page_bytes(ps, hk, d, dtype)
    gen = torch.Generator().manual_seed(case["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        with TieredKVCache(2, hk, d, dtype, ps, case["device_pages"] * pb, case["host_pages"] * pb, disk_dir=tmp,
                           selection=cfg) as cache:
            ks = {(layer, sid): [] for layer in range(2) for sid in (0, 7)}
            vs = {key: [] for key in ks}
            for n in case["chunks"]:
                for (layer, sid) in ks:
                    k = torch.randn(n, hk, d, generator=gen).to(dtype)
                    v = torch.randn(n, hk, d, generator=gen).to(dtype)
                    cache.append(layer, sid, k, v)
                    ks[(layer, sid)].append(k)
                    vs[(layer, sid)].append(v)
                q = torch.randn(1, 1, hk * case["group"], d, generator=gen).to(dtype)
                for (layer, sid) in ks:
                    k, v = torch.cat(ks[(layer, sid)]), torch.cat(vs[(layer, sid)])
                    for budget in case["budgets"]:
                        step_cfg = type(cfg)(**{**cfg.__dict__, "token_budget": budget})
                        sel = _check_step(cache, layer, sid, q, k, v, step_cfg)
                        if budget >= k.shape[0]:  # every position: dense decode
                            assert sorted(sel[0, 0][sel[0, 0] >= 0].tolist()) == list(range(k.shape[0]))


def _filled(tmp, cfg, *, layers=2, tokens=200, ps=8, hk=2, d=16, dtype=torch.float32, device_pages=0,
            host_pages=0, seed=0):
    pb = _page_bytes(ps, hk, d, dtype)
    cache = TieredKVCache(layers, hk, d, dtype, ps, device_pages * pb, host_pages * pb, disk_dir=tmp, selection=cfg)
    gen = torch.Generator().manual_seed(seed)
    kv = []
    for layer in range(layers):
        k = torch.randn(tokens, hk, d, generator=gen).to(dtype)
        v = torch.randn(tokens, hk, d, generator=gen).to(dtype)
        cache.append(layer, 0, k, v)
        kv.append((k, v))
    return cache, kv


def test_consecutive_steps_reuse_fetched_pages(tmp_path):
    """All on disk: the first step reads exactly the pages holding selected
    positions (cold); a second step with the same query reads nothing."""
    cfg = Quest(token_budget=24, page_size=4)
    cache, kv = _filled(tmp_path / "kv", cfg)
    with cache:
        q = torch.randn(1, 1, 4, 16, generator=torch.Generator().manual_seed(1))
        s0 = cache.stats()["store"]["bytes_read"]
        sel = _check_step(cache, 0, 0, q, *kv[0], cfg)
        pages = _disk_pages_of(cache, 0, 0, sel)
        assert cache.stats()["store"]["bytes_read"] - s0 == len(pages) * cache.unit_bytes
        assert cache.stats()["sparse_pages_read"] == len(pages)
        s1 = cache.stats()["store"]["bytes_read"]
        _check_step(cache, 0, 0, q, *kv[0], cfg)
        st_ = cache.stats()
        assert st_["store"]["bytes_read"] == s1 and st_["fetched_reused"] == len(pages)


def test_read_ahead_fetches_next_layer(tmp_path):
    """Step 1 attends both layers from host memory; appends then demote their
    pages to disk. Step 2: attend(0) reads layer 0's pages and starts reading
    the pages layer 1's last query selects; attend(1) finds them fetched (hits)
    and reads nothing itself; outputs still match."""
    cfg = Quest(token_budget=32, page_size=4)
    ps, hk, d = 8, 2, 16
    cache, kv = _filled(tmp_path / "kv", cfg, tokens=160, host_pages=40)  # 2 x 20 pages: all on the host
    gen = torch.Generator().manual_seed(3)
    with cache:
        qs = [torch.randn(1, 1, 4, d, generator=gen) for _ in range(2)]
        for layer in range(2):
            _check_step(cache, layer, 0, qs[layer], *kv[layer], cfg)
        assert cache.stats()["sparse_pages_read"] == 0
        for layer in range(2):  # 10 more pages per layer: 20 pages go to disk
            k, v = torch.randn(80, hk, d, generator=gen), torch.randn(80, hk, d, generator=gen)
            cache.append(layer, 0, k, v)
            kv[layer] = (torch.cat([kv[layer][0], k]), torch.cat([kv[layer][1], v]))
        assert cache._layers[1][0].ndisk > 0
        _check_step(cache, 0, 0, qs[0], *kv[0], cfg)
        before = cache.stats()
        assert cache._fetched[(1, 0)].pending is not None  # read-ahead of layer 1 in flight (or done)
        sel = _check_step(cache, 1, 0, qs[1], *kv[1], cfg)
        after = cache.stats()
        wanted = _disk_pages_of(cache, 1, 0, sel)
        assert wanted and after["prefetch_hits"] - before["prefetch_hits"] == len(wanted)
        assert after["sparse_pages_read"] == before["sparse_pages_read"]  # attend(1) read nothing itself
        assert after["prefetch_pages"] == len(wanted) and 0 <= after["sparse_overlap"] <= 1


def test_prefetch_with_the_next_query_makes_attend_read_nothing(tmp_path):
    """A caller that knows (or predicts) layer 1's query calls prefetch(1, q)
    before attend(0): layer 1's selected disk pages are read in the background,
    attend(1) finds all of them (hits) and reads nothing itself; the output is
    unchanged. A wrong prediction only costs unused pages; bad calls are named."""
    cfg = Quest(token_budget=32, page_size=4)
    cache, kv = _filled(tmp_path / "kv", cfg, tokens=160)  # every page on disk
    gen = torch.Generator().manual_seed(4)
    with cache:
        q0, q1, wrong = (torch.randn(1, 1, 4, 16, generator=gen) for _ in range(3))
        started = cache.prefetch(1, 0, q1, sparse=cfg)
        assert started > 0
        _check_step(cache, 0, 0, q0, *kv[0], cfg)
        before = cache.stats()
        sel = _check_step(cache, 1, 0, q1, *kv[1], cfg)
        after = cache.stats()
        wanted = _disk_pages_of(cache, 1, 0, sel)
        assert len(wanted) == started and after["prefetch_hits"] - before["prefetch_hits"] == started
        assert after["sparse_pages_read"] == before["sparse_pages_read"]
        assert cache.prefetch(1, 0, q1, sparse=cfg) == 0  # everything held already
        assert cache.prefetch(0, 0, wrong, sparse=cfg) >= 0
        _check_step(cache, 0, 0, q0, *kv[0], cfg)  # a wrong prediction: still the right output
        with pytest.raises(ArgumentError, match="sparse"):
            cache.prefetch(0, 0, q0, sparse=None)
        with pytest.raises(ShapeError, match="seqlen_q"):
            cache.prefetch(0, 0, torch.zeros(1, 2, 4, 16), sparse=cfg)
        with pytest.raises(ArgumentError, match="seq_id"):
            cache.prefetch(0, 7, q0, sparse=cfg)


def test_metadata_survives_demotion_and_reopen(tmp_path):
    """The selection of a sequence is unchanged when its pages move down to
    disk (appends to another sequence), and after close + open(selection=...),
    which rebuilds the metadata by reading each disk page once (counted)."""
    channels = [[1, 5, 9], [0, 2, 15]]
    for i, cfg in enumerate([Quest(token_budget=40, page_size=8), DoubleSparsity(channels, token_budget=30)]):
        d = tmp_path / f"kv{i}"
        cache, kv = _filled(d, cfg, layers=1, tokens=150, host_pages=19)  # all in host memory
        q = torch.randn(1, 1, 2, 16, generator=torch.Generator().manual_seed(5))
        first = _check_step(cache, 0, 0, q, *kv[0], cfg)
        assert cache._layers[0][0].ndisk == 0
        gen = torch.Generator().manual_seed(9)
        cache.append(0, 1, torch.randn(120, 2, 16, generator=gen), torch.randn(120, 2, 16, generator=gen))
        assert cache._layers[0][0].ndisk > 0
        assert torch.equal(_check_step(cache, 0, 0, q, *kv[0], cfg), first)
        cache.close()
        with TieredKVCache.open(d, device_budget_bytes=0, host_budget_bytes=0, selection=cfg) as again:
            ndisk = sum(s.ndisk for s in again._layers[0].values())
            assert again.stats()["metadata_rebuild_pages_read"] == ndisk
            assert torch.equal(_check_step(again, 0, 0, q, *kv[0], cfg), first)


def test_sparse_argument_errors(tmp_path):
    cfg = Quest(token_budget=16, page_size=4)
    with pytest.raises(ArgumentError, match="must divide"):
        TieredKVCache(1, 2, 16, torch.float32, 6, 0, 1 << 20, selection=cfg)
    with pytest.raises(ArgumentError, match="one per layer"):
        TieredKVCache(2, 2, 16, torch.float32, 8, 0, 1 << 20, selection=[cfg])
    with pytest.raises(ArgumentError, match="Quest or DoubleSparsity"):
        TieredKVCache(1, 2, 16, torch.float32, 8, 0, 1 << 20, selection="quest")
    with pytest.raises(ArgumentError, match="headdim"):
        TieredKVCache(1, 2, 16, torch.float32, 8, 0, 1 << 20, selection=DoubleSparsity([[0], [16]]))
    plain = TieredKVCache(1, 2, 16, torch.float32, 8, 0, 1 << 20)
    plain.append(0, 0, torch.randn(9, 2, 16), torch.randn(9, 2, 16))
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ArgumentError, match="selection="):
        plain.attend(0, 0, q, sparse=cfg)
    ds = DoubleSparsity([[0], [1]], token_budget=8)
    cache = TieredKVCache(2, 2, 16, torch.float32, 8, 0, 1 << 20, selection=[cfg, ds])
    cache.append(0, 0, torch.randn(9, 2, 16), torch.randn(9, 2, 16))
    with pytest.raises(ArgumentError, match="state must be None"):
        cache.attend(0, 0, q, sparse=cfg, state=QuestState(cfg))
    with pytest.raises(ArgumentError, match="is for Quest"):
        cache.attend(0, 0, q, sparse=ds)
    with pytest.raises(ArgumentError, match="page_size"):
        cache.attend(0, 0, q, sparse=Quest(token_budget=16, page_size=8))
    with pytest.raises(ArgumentError, match="channels"):
        cache.attend(1, 0, q, sparse=DoubleSparsity([[0], [2]]))
    with pytest.raises(UnsupportedFeatureError, match="seqlen_q 1"):
        cache.attend(0, 0, torch.randn(1, 2, 2, 16), sparse=cfg)
    with pytest.raises(ArgumentError, match="return_selection"):
        cache.attend(0, 0, q, return_selection=True)
    # another token budget than the construction-time one is fine; an empty layer: out 0, lse -inf
    out, sel = cache.attend(0, 0, q, sparse=Quest(token_budget=4, page_size=4), return_selection=True)
    assert sel.shape[-1] == 8
    out, lse = cache.attend(1, 0, q, sparse=ds, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == -torch.inf)


def test_sparse_step_reads_exactly_the_selected_page_heads(tmp_path):
    """Head-major disk tier: a cold sparse step reads exactly the store pages (cache page,
    kv head) holding a position THAT head selected, in one read_pages call, keyed
    ``(seq_id, page * nheads_k + h)``; not the union over heads."""
    hk, ps = 4, 4
    for cfg in (Quest(token_budget=16, page_size=4),
                DoubleSparsity([[0, 3], [1, 2], [5, 7], [4, 9]], token_budget=12)):
        d = tmp_path / type(cfg).__name__
        cache, kv = _filled(d, cfg, layers=1, tokens=96, ps=ps, hk=hk, seed=11)
        with cache:
            calls = []
            real = cache._store.read_pages
            cache._store.read_pages = lambda layer, keys, out, rows=None: calls.append(list(keys)) or real(
                layer, keys, out, rows)
            q = torch.randn(1, 1, 2 * hk, 16, generator=torch.Generator().manual_seed(2))
            sel = _check_step(cache, 0, 0, q, *kv[0], cfg)
            want = _disk_pages_of(cache, 0, 0, sel)
            assert len(calls) == 1 and sorted(calls[0]) == sorted((0, u) for u in want)
            union = {u // hk for u in want}
            assert len(want) < len(union) * hk  # heads chose differently: fewer bytes than whole pages
            assert cache.stats()["sparse_bytes_read"] == len(want) * cache.unit_bytes == len(want) * cache.page_bytes // hk


def test_dense_read_of_consecutive_pages_is_coalesced(tmp_path, monkeypatch):
    """Pages written in one batch take adjacent slots head by head, so a dense attend
    of them is one preadv (up to the store's run size), all heads included."""
    import os

    hk, ps, d = 4, 16, 64  # store pages of one head: 2 * 16 * 64 * 4 B = 8 KiB, slot-aligned
    cache = TieredKVCache(1, hk, d, torch.float32, ps, 0, 0, disk_dir=tmp_path / "kv")
    with cache:
        gen = torch.Generator().manual_seed(0)
        k, v = torch.randn(20 * ps, hk, d, generator=gen), torch.randn(20 * ps, hk, d, generator=gen)
        cache.append(0, 0, k, v)  # 20 pages x 4 heads = 80 store pages (640 KiB), one commit
        assert cache._layers[0][0].ndisk == 20 and cache.stats()["store"]["commits"] == 1
        calls = []
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off))
        q = torch.randn(1, 1, 2 * hk, d, generator=gen)
        out, lse = cache.attend(0, 0, q, return_lse=True)
        monkeypatch.undo()
        assert calls == [80]  # one call, one buffer per store page (no padding)
        oracle_out, oracle_lse = attention_ref(q, k[None], v[None], causal=True)
        eager_out, eager_lse = longattn.decode_attention(q, k[None], v[None],
                                                         cache_seqlens=torch.tensor([k.shape[0]], dtype=torch.int32),
                                                         return_lse=True, backend="eager")
        assert_close_to_oracle(out, oracle_out, eager_out)
        assert_close_to_oracle(lse, oracle_lse, eager_lse, name="lse")
