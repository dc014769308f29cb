"""HiP decode: selection reuse across steps, in contiguous and paged caches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_attention
from longattn.reference import attention_ref
from longattn.sparse import HiP, HiPDecodeState
from tests.tolerance import assert_close_to_oracle


def _caches(k, v, capacity, page_size, gen):
    """Contiguous (batch, capacity, ...) caches holding k/v, or paged ones with shuffled pages."""
    batch, length, nheads_k, headdim = k.shape
    kc = torch.zeros(batch, capacity, nheads_k, headdim, dtype=k.dtype)
    vc = torch.zeros_like(kc)
    kc[:, :length], vc[:, :length] = k, v
    if page_size is None:
        return kc, vc, None
    pages = capacity // page_size
    table = torch.randperm(batch * pages, generator=gen).reshape(batch, pages).to(torch.int32)
    kp = torch.full((batch * pages, page_size, nheads_k, headdim), float("nan"), dtype=k.dtype)
    vp = kp.clone()
    for b in range(batch):
        kp[table[b].long()] = kc[b].reshape(pages, page_size, nheads_k, headdim)
        vp[table[b].long()] = vc[b].reshape(pages, page_size, nheads_k, headdim)
    return kp, vp, table


@st.composite
def decode_runs(draw):
    block_k = draw(st.integers(1, 3))
    cfg = HiP(topk=block_k * draw(st.integers(1, 5)), block_q=draw(st.integers(4, 8)), block_k=block_k,
              query_stride=draw(st.integers(1, 4)), sink_size=draw(st.integers(0, 6)),
              recent_size=draw(st.integers(0, 12)), refresh_interval=draw(st.integers(1, 4)))
    return dict(
        cfg=cfg, batch=draw(st.integers(1, 3)), start=draw(st.integers(0, 60)), steps=draw(st.integers(1, 6)),
        seqlen_q=draw(st.integers(1, 3)), nheads_k=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 4, 8])), page_size=draw(st.sampled_from([None, 1, 8])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])), seed=draw(st.integers(0, 2**16)),
    )


@given(decode_runs())
def test_steps_equal_the_oracle_restricted_to_the_reused_selection(run):
    cfg, gen = run["cfg"], torch.Generator().manual_seed(run["seed"])
    batch, sq, hk, nheads, d = run["batch"], run["seqlen_q"], run["nheads_k"], run["nheads_k"] * run["group"], 16
    total = run["start"] + run["steps"] * sq
    capacity = -(-total // 8) * 8
    # Ragged: sequence b starts with start - b tokens (at least 0).
    starts = [max(0, run["start"] - b) for b in range(batch)]
    k_all = torch.randn(batch, capacity, hk, d, generator=gen).to(run["dtype"])
    v_all = torch.randn(batch, capacity, hk, d, generator=gen).to(run["dtype"])
    k_cache, v_cache, table = _caches(torch.zeros_like(k_all), torch.zeros_like(v_all), capacity, run["page_size"], gen)
    state = HiPDecodeState()
    lens = torch.zeros(batch, dtype=torch.int32)
    # Fill the prompt (no attention check), then decode.
    prompt = max(starts)
    if prompt:
        for b in range(batch):
            _write(k_cache, v_cache, table, b, 0, k_all[b, : starts[b]], v_all[b, : starts[b]], run["page_size"])
        lens = torch.tensor(starts, dtype=torch.int32)
    for step in range(run["steps"]):
        q = torch.randn(batch, sq, nheads, d, generator=gen).to(run["dtype"])
        k_new = torch.stack([k_all[b, starts[b] + step * sq: starts[b] + (step + 1) * sq] for b in range(batch)])
        v_new = torch.stack([v_all[b, starts[b] + step * sq: starts[b] + (step + 1) * sq] for b in range(batch)])
        out, lse = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, k_new=k_new,
                                             v_new=v_new, sparse=cfg, state=state, return_lse=True)
        assert state.refreshes == -(-(step + 1) // cfg.refresh_interval)
        for b in range(batch):
            n = int(lens[b]) + sq
            blocks = state.step_blocks[b]
            # The listed blocks are the stored selection plus, on reuse steps, the carried ones.
            expected = _expected_listed(state, b, n, cfg, causal=True)
            for h in range(nheads):
                listed = blocks[0, h, 0][blocks[0, h, 0] >= 0].tolist()
                assert len(listed) == len(set(listed))  # no block twice
                assert sorted(listed) == expected[0, h, 0][expected[0, h, 0] >= 0].tolist()
            layout = BlockSparseLayout(sq, n, sq, cfg.block_k, cfg.sink_size, cfg.recent_size, True)
            # Bitwise equal to the primitive's eager twin (the one decode runs) on
            # the logical keys with the listed blocks.
            again = block_sparse_attention(q[b : b + 1], k_all[b : b + 1, :n], v_all[b : b + 1, :n], blocks,
                                           block_q=sq, block_k=cfg.block_k, sink_size=cfg.sink_size,
                                           recent_size=cfg.recent_size, return_lse=True, backend="eager")
            assert torch.equal(out[b : b + 1], again[0]) and torch.equal(lse[b : b + 1], again[1])
            ref_out, ref_lse = attention_ref(q[b : b + 1], k_all[b : b + 1, :n], v_all[b : b + 1, :n],
                                             mask=layout.dense_mask(expected))
            assert_close_to_oracle(out[b : b + 1], ref_out, ref_out)
            assert_close_to_oracle(lse[b : b + 1], ref_lse, ref_lse, name="lse")
        lens = lens + sq


def _expected_listed(state, b, n, cfg, *, causal):
    """The listing rule of a step over ``n`` keys of sequence ``b``, written out
    independently of the implementation: the stored selection; on a step that
    reused it, also every key block from the first key the refresh (over
    ``n_s`` keys) could not search -- ``n_s - recent_size`` causal, ``n_s``
    non-causal -- to the block of the last key a query of this step may list.
    ``(1, nheads, 1, m)``, each row ascending, -1 padding."""
    stored = state.key_blocks[b]
    nheads = stored.shape[1]
    carried = set()
    if state.steps_since_refresh > 1:  # a reuse step
        n_s, bk = state.lengths[b], cfg.block_k
        first_key = max(0, n_s - cfg.recent_size if causal else n_s)
        last_key = n - 1 - cfg.recent_size if causal else n - 1
        if last_key >= 0:
            carried = set(range(first_key // bk, last_key // bk + 1))
    rows = [sorted(set(stored[0, h, 0][stored[0, h, 0] >= 0].tolist()) | carried) for h in range(nheads)]
    out = torch.full((1, nheads, 1, max(1, max(map(len, rows)))), -1, dtype=torch.long)
    for h, row in enumerate(rows):
        out[0, h, 0, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _write(k_cache, v_cache, table, b, at, k, v, page_size):
    if table is None:
        k_cache[b, at : at + k.shape[0]], v_cache[b, at : at + k.shape[0]] = k, v
        return
    for i in range(k.shape[0]):
        page, off = int(table[b, (at + i) // page_size]), (at + i) % page_size
        k_cache[page, off], v_cache[page, off] = k[i], v[i]


def test_dense_when_topk_covers_the_cache():
    torch.manual_seed(4)
    k, v = torch.randn(2, 100, 2, 32), torch.randn(2, 100, 2, 32)
    q = torch.randn(2, 1, 8, 32)
    lens = torch.tensor([100, 70], dtype=torch.int32)
    out = longattn.decode_attention(q, k, v, cache_seqlens=lens, sparse=HiP(topk=128, block_k=2),
                                    state=HiPDecodeState())
    for b, n in enumerate(lens.tolist()):
        ref, _ = attention_ref(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], causal=True)
        assert_close_to_oracle(out[b : b + 1], ref, ref)


def test_state_errors_name_the_problem():
    k, v = torch.randn(1, 64, 1, 16), torch.randn(1, 64, 1, 16)
    q = torch.randn(1, 1, 2, 16)
    cfg = HiP(topk=8, block_q=4, block_k=2, sink_size=2, recent_size=4)
    state = HiPDecodeState()
    longattn.decode_attention(q, k, v, cache_seqlens=torch.tensor([40], dtype=torch.int32), sparse=cfg, state=state)
    with pytest.raises(ArgumentError, match="reset"):  # a shorter sequence: another batch
        longattn.decode_attention(q, k, v, cache_seqlens=torch.tensor([10], dtype=torch.int32), sparse=cfg,
                                  state=state)
    with pytest.raises(ArgumentError, match="config"):
        longattn.decode_attention(q, k, v, cache_seqlens=torch.tensor([41], dtype=torch.int32),
                                  sparse=HiP(topk=16, block_q=4, block_k=2), state=state)
    state.reset()
    longattn.decode_attention(q, k, v, cache_seqlens=torch.tensor([10], dtype=torch.int32), sparse=cfg, state=state)
    lens = torch.tensor([40], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="HiPDecodeState"):
        longattn.decode_attention(q, k, v, cache_seqlens=lens, sparse=cfg, state={"blocks": 1})
    with pytest.raises(UnsupportedFeatureError, match="block_q"):
        longattn.decode_attention(torch.randn(1, 5, 2, 16), k, v, cache_seqlens=lens, sparse=cfg)
    with pytest.raises(UnsupportedFeatureError, match="recent_size"):
        longattn.decode_attention(q, k, v, cache_seqlens=lens, sparse=cfg, window_size=(8, 0))
    with pytest.raises(UnsupportedFeatureError, match="backend"):
        longattn.decode_attention(q, k, v, cache_seqlens=lens, sparse=cfg, backend="cpp")
    with pytest.raises(UnsupportedFeatureError, match="state"):
        longattn.decode_attention(q, k, v, cache_seqlens=lens, state=HiPDecodeState())


@pytest.mark.parametrize("page_size", [None, 4])
def test_search_in_a_cache_selects_what_the_eager_search_selects_on_the_logical_keys(page_size):
    # Few rows (a decode step): the C++ search reads a float32 cache in place,
    # contiguous or paged, instead of copying it.
    from longattn.kernels.block_sparse.eager import KeyRows
    from longattn.kernels.hip_score.cpp import score_unavailable_reason
    from longattn.sparse import hip_select_blocks
    from longattn.sparse.hip_mask import select_blocks

    if score_unavailable_reason() is not None:
        pytest.skip(f"the C++ HiP scorer does not build here: {score_unavailable_reason()}")
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(2, 300, 2, 32, generator=gen)
    k_cache, v_cache, table = _caches(k, k.clone(), 304, page_size, gen)
    keys = KeyRows.dense(k_cache, v_cache) if table is None else KeyRows.paged(k_cache, v_cache, table)
    cfg = HiP(topk=16, block_q=4, block_k=2, sink_size=3, recent_size=12)
    q = torch.randn(2, 1, 4, 32, generator=gen)
    for b, n in enumerate([300, 211]):
        in_place = select_blocks(q[b : b + 1], keys.sequence(b), n, cfg, backend="cpp")
        eager = hip_select_blocks(q[b : b + 1], k[b : b + 1, :n], cfg, backend="eager")
        assert torch.equal(in_place, eager)


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("seqlen_q,causal,dtype", [(1, True, torch.float32), (2, True, torch.bfloat16),
                                                    (1, False, torch.float32)])
def test_every_step_is_dense_when_topk_covers_the_context(page_size, seqlen_q, causal, dtype):
    # Many steps between and across refreshes, ragged batch, GQA: with topk
    # covering every searchable block, the keys that leave the window between
    # refreshes are carried, so no step drifts from dense decode.
    gen = torch.Generator().manual_seed(11 + seqlen_q)
    batch, nheads_k, group, d, steps = 3, 2, 2, 16, 11
    cfg = HiP(topk=64, block_q=4, block_k=2, query_stride=1, sink_size=3, recent_size=5, refresh_interval=3)
    starts = [37, 30, 21]
    capacity = 64
    assert max(starts) + steps * seqlen_q <= cfg.topk  # the budget covers every key
    k_all = torch.randn(batch, capacity, nheads_k, d, generator=gen).to(dtype)
    v_all = torch.randn(batch, capacity, nheads_k, d, generator=gen).to(dtype)
    k_cache, v_cache, table = _caches(k_all, v_all, capacity, page_size, gen)
    state, lens = HiPDecodeState(), torch.tensor(starts, dtype=torch.int32)
    for step in range(steps):
        q = torch.randn(batch, seqlen_q, nheads_k * group, d, generator=gen).to(dtype)
        # The new tokens are already in the cache (written by _caches): attend without appending.
        lens = lens + seqlen_q
        out, lse = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                             causal=causal, sparse=cfg, state=state, return_lse=True)
        base_out, base_lse = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                                       causal=causal, backend="eager", return_lse=True)
        for b, n in enumerate(lens.tolist()):
            ref_out, ref_lse = attention_ref(q[b : b + 1], k_all[b : b + 1, :n], v_all[b : b + 1, :n], causal=causal)
            assert_close_to_oracle(out[b : b + 1], ref_out, base_out[b : b + 1])
            assert_close_to_oracle(lse[b : b + 1], ref_lse, base_lse[b : b + 1], name="lse")
    assert state.refreshes == -(-steps // cfg.refresh_interval) >= 3


def test_drifted_before_keys_were_carried():
    # The failure the carried blocks fix, pinned: one refresh, then steps whose
    # window has moved past keys the search could not see. Listing only the
    # stored blocks (what a step did before) misses them; the step does not.
    gen = torch.Generator().manual_seed(3)
    cfg = HiP(topk=64, block_q=4, block_k=2, query_stride=1, sink_size=2, recent_size=4, refresh_interval=8)
    k, v = torch.randn(1, 40, 1, 16, generator=gen), torch.randn(1, 40, 1, 16, generator=gen)
    state = HiPDecodeState()
    for n in range(20, 27):
        q = torch.randn(1, 1, 2, 16, generator=gen)
        out = longattn.decode_attention(q, k, v, cache_seqlens=torch.tensor([n], dtype=torch.int32), sparse=cfg,
                                        state=state)
        ref, _ = attention_ref(q, k[:, :n], v[:, :n], causal=True)
        assert_close_to_oracle(out, ref, ref)
        stored_only = block_sparse_attention(q, k[:, :n], v[:, :n], state.key_blocks[0], block_q=1, block_k=2,
                                             sink_size=2, recent_size=4, backend="eager")
        if n > 20:  # keys 16.. left the window; the stored selection ends at key 15
            assert not torch.allclose(stored_only, ref.float(), atol=1e-4)
    assert state.refreshes == 1
