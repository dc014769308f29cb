"""The stream-K planner: exact coverage, balance, and results equal to the
oracle for every worker count (executed by the eager stream-K twin)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.decode import plan_decode
from longattn.errors import ArgumentError
from longattn.kernels.decode.eager import decode_forward_streamk_eager
from longattn.masking import effective_window
from tests.decode.decode_cases import decode_cases
from tests.tolerance import assert_close_to_oracle


@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=6),
    st.sampled_from([(1, 1), (2, 1), (4, 1), (4, 2), (4, 4), (3, 3)]),
    st.integers(1, 64),
    st.integers(1, 40),
)
def test_every_lean_tile_is_covered_exactly_once(seqlens, heads, block_n, num_workers):
    nheads_k, heads_per_tile = heads
    plan = plan_decode(seqlens, nheads_k=nheads_k, num_workers=num_workers, block_n=block_n, heads_per_tile=heads_per_tile)
    covered = {}
    for seg in plan.segments:
        assert 0 <= seg.first < seg.last
        for blk in range(seg.first, seg.last):
            key = (seg.batch, seg.kv_head, blk)
            assert key not in covered, f"LeanTile {key} covered twice"
            covered[key] = seg.worker
    expected = {
        (b, h, blk)
        for b, n in enumerate(seqlens)
        for h in range(0, nheads_k, heads_per_tile)
        for blk in range(-(-n // block_n))
    }
    assert set(covered) == expected
    # Balance: every worker's share is within one LeanTile of every other's.
    shares = [end - start for start, end in (plan.worker_range(c) for c in range(num_workers))]
    assert max(shares) - min(shares) <= 1 and sum(shares) == plan.total_work
    # Merge order is worker order, and a whole tile has exactly one contributor.
    for segs in plan.contributors:
        assert [s.worker for s in segs] == sorted(s.worker for s in segs)
        assert [s.first for s in segs] == sorted(s.first for s in segs)
        if any(s.whole_tile for s in segs):
            assert len(segs) == 1


@given(decode_cases(dtypes=(torch.float32,), max_len=60), st.integers(1, 8), st.sampled_from([1, 4, 16]), st.data())
def test_streamk_eager_equals_oracle_for_any_worker_count(case, workers_small, block_n, data):
    heads_per_tile = data.draw(st.sampled_from([1, case.nheads_k]))
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    # Append new tokens through the front door's cache logic, then run the twin on the result.
    from longattn.kernels.decode.cache import check_cache

    view = check_cache(q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs.get("block_table"),
                       kwargs.get("k_new"), kwargs.get("v_new"))
    total = sum(-(-n // block_n) for n in case.seqlens) * case.nheads_k
    # Worker counts from 1 to more than the work.
    num_workers = data.draw(st.sampled_from([1, workers_small, max(1, total), total + 3]))
    plan = plan_decode(
        view.seqlens, nheads_k=case.nheads_k, num_workers=num_workers, block_n=block_n, heads_per_tile=heads_per_tile
    )
    out, lse = decode_forward_streamk_eager(
        q, view.k_cache, view.v_cache, view.seqlens, view.block_table,
        scale=case.headdim ** -0.5, window=effective_window(case.causal, case.window_size), softcap=case.softcap,
        plan=plan,
    )
    ref_out, ref_lse = case.oracle(q, logical_k, logical_v)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")
    again = decode_forward_streamk_eager(
        q, view.k_cache, view.v_cache, view.seqlens, view.block_table,
        scale=case.headdim ** -0.5, window=effective_window(case.causal, case.window_size), softcap=case.softcap,
        plan=plan,
    )
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])  # deterministic


def test_plan_example_from_the_docstring():
    plan = plan_decode([5, 3], nheads_k=1, num_workers=2, block_n=2)
    assert [(s.worker, s.tile, s.first, s.last, s.whole_tile) for s in plan.segments] == [
        (0, 0, 0, 2, False), (1, 0, 2, 3, False), (1, 1, 0, 2, True)
    ]
    tensors = plan.as_tensors()
    assert tensors["tile_first_partial"].tolist() == [0, 2, 2]
    assert tensors["worker_first_segment"].tolist() == [0, 1, 3]


def test_bad_plan_arguments():
    with pytest.raises(ArgumentError, match="num_workers must be an int >= 1"):
        plan_decode([4], nheads_k=1, num_workers=0)
    with pytest.raises(ArgumentError, match="seqlens must be >= 0"):
        plan_decode([4, -1], nheads_k=1, num_workers=2)
    with pytest.raises(ArgumentError, match="block_n must be an int >= 1"):
        plan_decode([4], nheads_k=1, num_workers=2, block_n=0)
    with pytest.raises(ArgumentError, match="heads_per_tile must be an int >= 1"):
        plan_decode([4], nheads_k=4, num_workers=2, heads_per_tile=0)


@pytest.mark.parametrize("nheads_k,asked,used", [
    (4, 3, 2), (2, 8, 2), (12, 8, 6), (8, 8, 8), (7, 4, 1), (6, 1, 1), (5, None, 5), (1, None, 1),
])
def test_heads_per_tile_is_an_upper_bound_lowered_to_a_divisor(nheads_k, asked, used):
    """The README's heads_per_tile=8 serves a model with 2 kv heads; None = every kv head."""
    plan = plan_decode([9, 4], nheads_k=nheads_k, num_workers=3, block_n=4, heads_per_tile=asked)
    assert plan.heads_per_tile == used and nheads_k % used == 0
    assert plan.num_tiles == 2 * nheads_k // used


def test_host_side_plan_facts_match_its_tensors():
    plan = plan_decode([5, 3, 0, 17], nheads_k=2, num_workers=3, block_n=2)
    assert plan.num_partial_slots == int(plan.as_tensors()["tile_first_partial"][-1])
    assert plan.max_seqlen == 17
    assert plan.as_tensors("cpu") is plan.as_tensors(torch.device("cpu"))  # one set per device


def test_front_door_accepts_a_reused_plan():
    q = torch.randn(2, 1, 4, 16)
    k_cache, v_cache = torch.randn(2, 10, 1, 16), torch.randn(2, 10, 1, 16)
    lens = torch.tensor([7, 10], dtype=torch.int32)
    plan = plan_decode(lens, nheads_k=1, num_workers=3)
    for _ in range(2):  # e.g. two layers of one decode step
        out = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, plan=plan)
        assert out.shape == q.shape
