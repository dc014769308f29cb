"""TidalDecode: the layer schedule, selection layers (dense + top-k by true
score), reuse layers (exact attention over the carried selection), the
per-step state and its checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.reference import attention_ref
from longattn.sparse import Quest, TidalDecode, TidalLayer, TidalState
from tests.sparse.token_decode_cases import (
    Run,
    assert_restricted_oracle,
    assert_top,
    check_selection_shape,
    runs,
    true_scores,
)
from tests.tolerance import assert_close_to_oracle


def layer_runs(run: Run, num_layers: int) -> list[Run]:
    """One Run (own keys, values and caches) per layer, same shapes and lengths."""
    return [Run(batch=run.batch, nheads_k=run.nheads_k, group=run.group, headdim=run.headdim, starts=run.starts,
                steps=run.steps, page_size=run.page_size, dtype=run.dtype, seed=run.seed + 7919 * i)
            for i in range(num_layers)]


def assert_dense(out, lse, q, run: Run, lengths):
    for b, n in enumerate(lengths):
        ref_out, ref_lse = attention_ref(q[b : b + 1], run.k_all[b : b + 1, :n], run.v_all[b : b + 1, :n])
        assert_close_to_oracle(out[b : b + 1], ref_out, ref_out)
        assert_close_to_oracle(lse[b : b + 1], ref_lse, ref_lse, name="lse")


@given(runs(max_start=40, max_steps=2), st.integers(5, 7), st.integers(1, 30), st.booleans(), st.booleans())
def test_a_step_of_layers_follows_the_schedule(run, num_layers, budget, one_state, explicit):
    selection_layers = (2, 4) if explicit else None
    tidal = TidalDecode(num_layers, selection_layers=selection_layers, token_budget=budget)
    assert tidal.selection_layers == ((2, 4) if explicit else tuple(sorted({2, num_layers // 2})))
    layers = layer_runs(run, num_layers)
    caches = [r.prompt_cache() for r in layers]
    lens = caches[0][3]
    shared = TidalState()
    for _ in range(run.steps):
        state = shared if one_state else TidalState()
        lengths = (lens + 1).tolist()
        for i, (r, (kc, vc, table, _)) in enumerate(zip(layers, caches)):
            cfg = tidal.layer(i)
            q = r.query()
            k_new, v_new = r.new_tokens(lens)
            out, lse, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table,
                                                            k_new=k_new, v_new=v_new, sparse=cfg, state=state,
                                                            return_lse=True, return_selection=True)
            sets = check_selection_shape(selection, lengths, run.nheads_k)
            if cfg.role == "dense":
                assert i in (0, 1)
                assert all(s == set(range(n)) for row, n in zip(sets, lengths) for s in row)
                assert_dense(out, lse, q, r, lengths)
            elif cfg.role == "selection":
                assert state.layer == i and torch.equal(state.selection, selection)
                assert_dense(out, lse, q, r, lengths)
                for b, n in enumerate(lengths):
                    scores = true_scores(q, r, b, n)
                    for h in range(run.nheads_k):
                        assert_top(sets[b][h], scores[h], budget, slack=1e-4 * (1 + float(scores[h].abs().max())))
            else:
                assert cfg.source == max(s for s in tidal.selection_layers if s < i)
                assert state.layer == cfg.source and torch.equal(state.selection, selection)
                assert_restricted_oracle(out, lse, q, r, lengths, sets)
        lens = lens + 1


@given(runs(max_start=40, max_steps=2))
def test_budget_covering_the_context_makes_every_layer_dense(run):
    tidal = TidalDecode(4, dense_layers=(0,), selection_layers=(1,), token_budget=run.capacity)
    layers = layer_runs(run, 4)
    caches = [r.prompt_cache() for r in layers]
    lens = caches[0][3]
    for _ in range(run.steps):
        state = TidalState()
        for i, (r, (kc, vc, table, _)) in enumerate(zip(layers, caches)):
            q = r.query()
            k_new, v_new = r.new_tokens(lens)
            out, lse = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new,
                                                 v_new=v_new, sparse=tidal.layer(i), state=state, return_lse=True)
            assert_dense(out, lse, q, r, (lens + 1).tolist())
        lens = lens + 1


@given(st.sampled_from([None, 4]), st.sampled_from([1, 4, 8]), st.sampled_from([16, 15]), st.integers(0, 2**16))
def test_planted_needles_are_selected_and_reused(cache_page, group, headdim, seed):
    gen = torch.Generator().manual_seed(seed)
    hk, n = 2, 90
    tidal = TidalDecode(4, dense_layers=(0,), selection_layers=(1,), token_budget=4)
    base = Run(batch=2, nheads_k=hk, group=group, headdim=headdim, starts=[n, n - 11], steps=1,
               page_size=cache_page, dtype=torch.float32, seed=seed)
    layers = layer_runs(base, 4)
    direction = torch.randn(2, hk, headdim, generator=gen)
    direction /= direction.norm(dim=-1, keepdim=True)
    needles = {(b, h): torch.randperm(base.starts[b], generator=gen)[:4].tolist() for b in range(2) for h in range(hk)}
    for r in layers:  # the same needle positions in every layer (the method's premise)
        r.k_all.mul_(0.5)
        for (b, h), spots in needles.items():
            r.k_all[b, spots, h] = 4 * headdim ** 0.5 * direction[b, h]
    caches = [r.prompt_cache() for r in layers]
    lens = caches[0][3]
    state = TidalState()
    for i, (r, (kc, vc, table, _)) in enumerate(zip(layers, caches)):
        q = (direction[:, :, None] * headdim ** 0.5 + 0.3 * torch.randn(2, hk, group, headdim, generator=gen))
        q = q.reshape(2, 1, hk * group, headdim)
        k_new, v_new = r.new_tokens(lens)
        _, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new,
                                                 v_new=v_new, sparse=tidal.layer(i), state=state,
                                                 return_selection=True)
        if i >= 1:
            for (b, h), spots in needles.items():
                assert set(spots) == set(selection[b, h].tolist())


def test_schedule_roles():
    tidal = TidalDecode(32)
    assert tidal.dense_layers == (0, 1) and tidal.selection_layers == (2, 16) and tidal.token_budget == 2048
    roles = [tidal.role(i) for i in range(32)]
    assert roles[:3] == ["dense", "dense", "selection"] and roles[16] == "selection"
    assert roles.count("reuse") == 28
    assert tidal.layer(3) == TidalLayer(3, "reuse", 2048, 2) and tidal.layer(31).source == 16
    assert tidal.layer(2) == TidalLayer(2, "selection", 2048)
    assert TidalDecode(5).selection_layers == (2,)  # 5 // 2 == 2: one entry
    assert TidalDecode(1, dense_layers=(0,), selection_layers=()).role(0) == "dense"


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(num_layers=0), ArgumentError, "TidalDecode num_layers must be an int >= 1, got 0"),
    (dict(num_layers=2), ArgumentError, "num_layers=2 has no layer 2 for the default selection_layers"),
    (dict(num_layers=8, dense_layers=(0, 9)), ArgumentError, r"dense_layers must be layer indices in 0 \.\. 7"),
    (dict(num_layers=8, selection_layers=(2, 2)), ArgumentError, "selection_layers must not repeat a layer"),
    (dict(num_layers=8, selection_layers=(1, 4)), ArgumentError, r"layers \[1\] are both in dense_layers"),
    (dict(num_layers=8, selection_layers=(3,)), ArgumentError, "layer 2 is the first layer that is not dense"),
    (dict(num_layers=8, dense_layers=(0,), selection_layers=()), ArgumentError, "layer 1 is the first layer"),
    (dict(num_layers=8, selection_layers=4), ArgumentError, "selection_layers must be a tuple"),
    (dict(num_layers=8, token_budget=0), ArgumentError, "TidalDecode token_budget must be an int >= 1"),
    (dict(num_layers=8, correction_interval=0), ArgumentError, "correction_interval must be an int >= 1"),
])
def test_bad_schedules(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        TidalDecode(**kwargs)


def test_bad_layer_configs():
    with pytest.raises(ArgumentError, match=r"TidalDecode.layer takes a layer index in 0 \.\. 7, got 8"):
        TidalDecode(8).layer(8)
    with pytest.raises(ArgumentError, match="TidalLayer role must be one of"):
        TidalLayer(3, "sparse", 16)
    with pytest.raises(ArgumentError, match="source must name a selection layer exactly for role 'reuse'"):
        TidalLayer(3, "reuse", 16)
    with pytest.raises(ArgumentError, match="source must be a layer before 3, got 5"):
        TidalLayer(3, "reuse", 16, 5)


def test_state_mismatches_are_named_errors_and_change_nothing():
    gen = torch.Generator().manual_seed(3)
    tidal = TidalDecode(6, selection_layers=(2, 4), token_budget=3)
    kc = [torch.randn(2, 16, 2, 8, generator=gen) for _ in range(6)]
    vc = [torch.randn(2, 16, 2, 8, generator=gen) for _ in range(6)]
    lens = torch.tensor([6, 9], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 8, generator=gen)
    k_new, v_new = torch.randn(2, 1, 2, 8, generator=gen), torch.randn(2, 1, 2, 8, generator=gen)

    def step(i, state, seqlens=lens, **kw):
        return longattn.decode_attention(q, kc[i], vc[i], cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                                         sparse=tidal.layer(i), state=state, **kw)

    state = TidalState()
    step(2, state)
    before = [t.clone() for t in kc[3:]]
    cases = [
        (lambda: step(3, None), "needs state=, the step's TidalState"),
        (lambda: step(3, TidalState()), "state holds no selection: layer 3 reuses layer 2's"),
        (lambda: step(5, state), "state holds layer 2's selection, but layer 5 reuses layer 4's"),
        (lambda: step(3, state, seqlens=lens + 1), r"covers sequences of lengths \[7, 10\], but this call attends "
                                                   r"\(cache_seqlens \+ seqlen_new\) \[8, 11\]"),
        (lambda: step(3, object()), "state for sparse=TidalLayer must be a longattn.sparse.TidalState"),
        (lambda: longattn.decode_attention(q, kc[3][:, :, :1], vc[3][:, :, :1], cache_seqlens=lens,
                                           sparse=tidal.layer(3), state=state, k_new=k_new[:, :, :1],
                                           v_new=v_new[:, :, :1]), "selection has 2 kv heads"),
    ]
    for call, pattern in cases:
        with pytest.raises(ArgumentError, match=pattern):
            call()
        assert all(torch.equal(a, b) for a, b in zip(kc[3:], before))
    with pytest.raises(UnsupportedFeatureError, match=r"pass one layer's config, tidal.layer\(i\)"):
        longattn.decode_attention(q, kc[0], vc[0], cache_seqlens=lens, sparse=tidal)
    with pytest.raises(UnsupportedFeatureError, match=r"sparse=TidalLayer decodes one query per sequence"):
        longattn.decode_attention(torch.cat([q, q], 1), kc[0], vc[0], cache_seqlens=lens, sparse=tidal.layer(0))
    with pytest.raises(ArgumentError, match="must be a longattn.sparse.TidalState"):
        step(2, Quest())
    # The reuse layer still serves its step after the refusals.
    out, selection = step(3, state, return_selection=True)
    assert out.shape == q.shape and torch.equal(selection, state.selection) and selection.shape == (2, 2, 3)
