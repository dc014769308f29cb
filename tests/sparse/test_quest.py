"""Quest decode: page bounds, page selection, exact attention over the selected
pages, and the state across appended steps (contiguous and paged caches)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, LongAttnError, ShapeError, UnsupportedFeatureError
from longattn.reference import attention_ref
from longattn.sparse import HiP, Quest, QuestState
from tests.sparse.token_decode_cases import (
    Run,
    assert_restricted_oracle,
    assert_top,
    check_selection_shape,
    runs,
)
from tests.tolerance import assert_close_to_oracle


def page_bounds64(q: torch.Tensor, run: Run, b: int, n: int, ps: int) -> torch.Tensor:
    """``(nheads_k, pages)`` float64 page bounds written out from the definition:
    per query head ``sum_i max(q_i M_i, q_i m_i)`` over the page's keys, max over
    the query group."""
    pages = -(-n // ps)
    qg = q[b, 0].double().view(run.nheads_k, run.group, run.headdim)
    out = torch.empty(run.nheads_k, pages, dtype=torch.float64)
    for j in range(pages):
        keys = run.k_all[b, j * ps : min(n, (j + 1) * ps)].double()  # (t, hk, d)
        hi, lo = keys.amax(0)[:, None], keys.amin(0)[:, None]  # (hk, 1, d)
        out[:, j] = torch.maximum(qg * hi, qg * lo).sum(-1).amax(-1)
    return out


def check_quest_selection(selection, q, run: Run, lengths, cfg: Quest):
    """Whole pages, the current page, and the top ``token_budget // page_size``
    other pages by the float64 bound; returns the per-head sets."""
    sets = check_selection_shape(selection, lengths, run.nheads_k)
    ps = cfg.page_size
    for b, n in enumerate(lengths):
        pages = -(-n // ps)
        bounds = page_bounds64(q, run, b, n, ps)
        for h in range(run.nheads_k):
            chosen = {p // ps for p in sets[b][h]}
            # Whole pages: every position of a chosen page inside the sequence.
            assert sets[b][h] == {p for j in chosen for p in range(j * ps, min(n, (j + 1) * ps))}
            if n == 0:
                assert not chosen
                continue
            assert pages - 1 in chosen  # the current page, always
            slack = 1e-4 * (1 + float(bounds[h].abs().max()))
            assert_top(chosen - {pages - 1}, bounds[h, :pages - 1],
                       min(cfg.num_pages, pages - 1), slack=slack)
    return sets


@given(runs(), st.integers(1, 6), st.sampled_from([1, 4, 5]), st.booleans())
def test_steps_attend_exactly_the_top_pages(run, pages_budget, page_size, prefill):
    cfg = Quest(token_budget=pages_budget * page_size + (page_size - 1 if run.seed % 2 else 0), page_size=page_size)
    kc, vc, table, lens = run.prompt_cache()
    state = QuestState(cfg)
    if prefill:
        assert state.prefill(kc, lens, table) is state
    for _ in range(run.steps):
        q = run.query()
        k_new, v_new = run.new_tokens(lens)
        out, lse, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table,
                                                        k_new=k_new, v_new=v_new, sparse=cfg, state=state,
                                                        return_lse=True, return_selection=True)
        lens = lens + 1
        lengths = lens.tolist()
        assert state.lengths == tuple(lengths)
        sets = check_quest_selection(selection, q.float() * run.headdim ** -0.5, run, lengths, cfg)
        assert_restricted_oracle(out, lse, q, run, lengths, sets)
    # The state updated step by step equals one built from the final cache.
    fresh = QuestState(cfg).prefill(kc, lens, table)
    for b, n in enumerate(lens.tolist()):
        pages = -(-n // page_size)
        assert torch.equal(state.key_max[b, :pages], fresh.key_max[b, :pages])
        assert torch.equal(state.key_min[b, :pages], fresh.key_min[b, :pages])


@given(runs(max_steps=2))
def test_budget_covering_the_context_is_dense_decode(run):
    cfg = Quest(token_budget=max(4, run.capacity), page_size=4)
    kc, vc, table, lens = run.prompt_cache()
    state = QuestState(cfg).prefill(kc, lens, table)
    for _ in range(run.steps):
        q = run.query()
        k_new, v_new = run.new_tokens(lens)
        out, lse, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table,
                                                        k_new=k_new, v_new=v_new, sparse=cfg, state=state,
                                                        return_lse=True, return_selection=True)
        lens = lens + 1
        for b, n in enumerate(lens.tolist()):
            assert sorted(selection[b, 0][selection[b, 0] >= 0].tolist()) == list(range(n))
            ref_out, ref_lse = attention_ref(q[b : b + 1], run.k_all[b : b + 1, :n], run.v_all[b : b + 1, :n])
            assert_close_to_oracle(out[b : b + 1], ref_out, ref_out)
            assert_close_to_oracle(lse[b : b + 1], ref_lse, ref_lse, name="lse")


@given(st.integers(1, 40), st.sampled_from([1, 3, 16]), st.sampled_from([1, 4, 8]), st.sampled_from([15, 16, 33]),
       st.sampled_from([0.1, 1.0, 30.0]), st.integers(0, 2**16))
def test_page_bound_is_never_below_the_true_max_score(n, page_size, group, headdim, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    hk = 2
    keys = (torch.randn(1, n, hk, headdim, generator=gen) * magnitude
            + torch.randn(1, 1, hk, headdim, generator=gen) * magnitude)  # shared offsets: one-signed channels too
    q = torch.randn(1, hk * group, headdim, generator=gen) * magnitude
    state = QuestState(Quest(token_budget=page_size, page_size=page_size))
    state.prefill(keys, torch.tensor([n], dtype=torch.int32))
    bounds = state.page_scores(q).double()  # (1, nheads, pages)
    assert bounds.shape == (1, hk * group, -(-n // page_size))
    true = torch.einsum("hd,nhd->hn", q[0].double(), keys[0].repeat_interleave(group, dim=1).double())
    for j in range(bounds.shape[-1]):
        page_max = true[:, j * page_size : (j + 1) * page_size].amax(-1)
        # float32 rounding of a d-term sum: a few ulps of the sum of |terms|
        slack = 1e-5 * (q[0].double().abs() @ keys[0].double().abs().amax(0).repeat_interleave(group, 0).T).diag()
        assert bool((bounds[0, :, j] >= page_max - slack).all())


@given(st.sampled_from([None, 4]), st.sampled_from([1, 4, 8]), st.sampled_from([16, 15]), st.integers(0, 2**16))
def test_planted_needles_are_always_selected(cache_page, group, headdim, seed):
    gen = torch.Generator().manual_seed(seed)
    hk, n, ps = 2, 96, 4
    run = Run(batch=2, nheads_k=hk, group=group, headdim=headdim, starts=[n, n - 9], steps=1, page_size=cache_page,
              dtype=torch.float32, seed=seed)
    base = torch.randn(2, hk, headdim, generator=gen)
    q = (base[:, :, None] + 0.2 * torch.randn(2, hk, group, headdim, generator=gen)).reshape(2, 1, hk * group,
                                                                                           headdim)
    run.k_all.mul_(0.5)
    needles = {}
    for b in range(2):
        for h in range(hk):
            spots = torch.randperm(run.starts[b] - ps, generator=gen)[:3].tolist()  # not in the current page
            direction = base[b, h] / base[b, h].norm()
            for p in spots:
                run.k_all[b, p, h] = 4 * headdim ** 0.5 * direction
            needles[b, h] = spots
    kc, vc, table, lens = run.prompt_cache()
    cfg = Quest(token_budget=3 * ps, page_size=ps)
    state = QuestState(cfg).prefill(kc, lens, table)
    k_new, v_new = run.new_tokens(lens)
    _, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new,
                                             v_new=v_new, sparse=cfg, state=state, return_selection=True)
    for (b, h), spots in needles.items():
        assert set(spots) <= set(selection[b, h].tolist())


@given(runs(max_steps=2))
def test_no_state_selects_like_a_carried_state(run):
    cfg = Quest(token_budget=8, page_size=4)
    kc, vc, table, lens = run.prompt_cache()
    kc2, vc2 = kc.clone(), vc.clone()
    state = QuestState(cfg)
    for _ in range(run.steps):
        q = run.query()
        k_new, v_new = run.new_tokens(lens)
        a = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new, v_new=v_new,
                                      sparse=cfg, state=state, return_lse=True, return_selection=True)
        b = longattn.decode_attention(q, kc2, vc2, cache_seqlens=lens, block_table=table, k_new=k_new, v_new=v_new,
                                      sparse=cfg, return_lse=True, return_selection=True)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        lens = lens + 1


@pytest.mark.parametrize("kwargs, pattern", [
    ({"token_budget": 8, "page_size": 16}, "Quest token_budget must be >= page_size"),
    ({"page_size": 0}, "Quest page_size must be an int >= 1, got 0"),
    ({"token_budget": 2.5}, "Quest token_budget must be an int >= 1, got 2.5"),
    ({"token_budget": True}, "Quest token_budget must be an int"),
])
def test_bad_configs(kwargs, pattern):
    with pytest.raises(ArgumentError, match=pattern):
        Quest(**kwargs)
    with pytest.raises(ArgumentError, match="QuestState needs a longattn.sparse.Quest"):
        QuestState(HiP())


def _setup(batch=2, n=10, hk=2, group=2, d=8):
    gen = torch.Generator().manual_seed(0)
    kc = torch.randn(batch, 32, hk, d, generator=gen)
    vc = torch.randn(batch, 32, hk, d, generator=gen)
    lens = torch.full((batch,), n, dtype=torch.int32)
    q = torch.randn(batch, 1, hk * group, d, generator=gen)
    k_new, v_new = torch.randn(batch, 1, hk, d, generator=gen), torch.randn(batch, 1, hk, d, generator=gen)
    return q, kc, vc, lens, k_new, v_new


def test_mismatched_states_are_named_errors_and_change_nothing():
    q, kc, vc, lens, k_new, v_new = _setup()
    cfg = Quest(token_budget=8, page_size=4)
    state = QuestState(cfg).prefill(kc, lens)
    before = (kc.clone(), vc.clone(), state.key_max.clone(), state.lengths)

    def call(**over):
        kw = dict(cache_seqlens=lens, k_new=k_new, v_new=v_new, sparse=cfg, state=state)
        kw.update(over)
        return longattn.decode_attention(over.pop("q", q), kc, vc, **kw)

    cases = [
        (dict(cache_seqlens=lens + 1), ArgumentError, r"covers sequences of lengths \[10, 10\], but this call's "
                                                      r"cache_seqlens are \[11, 11\]"),
        (dict(sparse=Quest(token_budget=8, page_size=8)), ArgumentError, "QuestState for page_size 4"),
        (dict(state=QuestState(Quest(token_budget=8, page_size=4)).prefill(kc[:1], lens[:1])), ArgumentError,
         "covers sequences of lengths"),
        (dict(state=object()), ArgumentError, "state for sparse=Quest must be a longattn.sparse.QuestState"),
        (dict(window_size=(4, 0)), UnsupportedFeatureError, "window_size cannot be combined with sparse=Quest"),
        (dict(backend="cpp"), UnsupportedFeatureError, "backend='cpp' cannot serve sparse=Quest"),
        (dict(cache_seqlens=torch.tensor([10, 40], dtype=torch.int32)), ArgumentError, "cache overflow"),
    ]
    for over, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call(**over)
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
        assert torch.equal(state.key_max, before[2]) and state.lengths == before[3]
    with pytest.raises(UnsupportedFeatureError, match=r"\(seqlen_q 1\), got seqlen_q 2"):
        longattn.decode_attention(torch.cat([q, q], 1), kc, vc, cache_seqlens=lens, sparse=cfg, state=state)
    other_heads = QuestState(cfg).prefill(torch.randn(2, 32, 1, 8), lens)
    with pytest.raises(ArgumentError, match="nheads_k 1, headdim 8"):
        longattn.decode_attention(q, kc, vc, cache_seqlens=lens, sparse=cfg, state=other_heads)
    with pytest.raises(UnsupportedFeatureError, match="return_selection=True needs sparse="):
        longattn.decode_attention(q, kc, vc, cache_seqlens=lens, return_selection=True)
    with pytest.raises(ArgumentError, match="return_selection must be a bool"):
        longattn.decode_attention(q, kc, vc, cache_seqlens=lens, sparse=cfg, return_selection=1)
    with pytest.raises(ShapeError, match="cache_seqlens must have shape"):
        QuestState(cfg).prefill(kc, lens[:1])
    with pytest.raises(LongAttnError, match="cache_seqlens must be >= 0"):
        QuestState(cfg).prefill(kc, -lens)
    # After all that, the state still serves the step it was built for.
    out = call()
    assert out.shape == q.shape and state.lengths == (11, 11)


def test_empty_sequences_give_zero_and_minus_inf():
    cfg = Quest(token_budget=4, page_size=4)
    kc, vc = torch.zeros(2, 8, 1, 16), torch.zeros(2, 8, 1, 16)
    lens = torch.zeros(2, dtype=torch.int32)
    q = torch.randn(2, 1, 2, 16)
    out, lse, sel = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, sparse=cfg, state=QuestState(cfg),
                                              return_lse=True, return_selection=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    assert sel.shape[:2] == (2, 1) and bool((sel == -1).all())


def test_under_torch_compile_the_step_runs_eagerly_with_the_same_bits():
    """Not traceable yet: torch.compile breaks the graph around the step, which
    then runs (and updates the state) exactly as an eager call."""
    torch._dynamo.reset()
    cfg = Quest(token_budget=8, page_size=4)
    gen = torch.Generator().manual_seed(5)
    kc, vc = torch.randn(2, 32, 2, 16, generator=gen), torch.randn(2, 32, 2, 16, generator=gen)
    lens = torch.tensor([10, 7], dtype=torch.int32)
    q, k_new, v_new = (torch.randn(2, 1, 4, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen),
                       torch.randn(2, 1, 2, 16, generator=gen))
    kc2, vc2 = kc.clone(), vc.clone()
    state, state2 = QuestState(cfg).prefill(kc, lens), QuestState(cfg).prefill(kc2, lens)

    def step(q, kc, vc, state):
        return longattn.decode_attention(q, kc, vc, cache_seqlens=lens, k_new=k_new, v_new=v_new, sparse=cfg,
                                         state=state) * 2

    assert torch.equal(torch.compile(step)(q, kc, vc, state), step(q, kc2, vc2, state2))
    assert state.lengths == state2.lengths == (11, 8) and torch.equal(kc, kc2)
    assert torch.equal(state.key_max, state2.key_max)


def test_state_grows_with_the_cache():
    """A state prefilled from a smaller cache (e.g. the prompt's) keeps serving a
    larger one: its metadata grows as positions past its capacity arrive."""
    run = Run(batch=2, nheads_k=2, group=4, headdim=16, starts=[10, 7], steps=6, page_size=None,
              dtype=torch.float32, seed=11)
    cfg = Quest(token_budget=4, page_size=4)
    kc, vc, table, lens = run.prompt_cache()
    state = QuestState(cfg).prefill(kc[:, :10].clone(), lens)  # capacity 10: 3 pages
    for _ in range(run.steps):
        q = run.query()
        k_new, v_new = run.new_tokens(lens)
        out, lse, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, k_new=k_new, v_new=v_new,
                                                        sparse=cfg, state=state, return_lse=True,
                                                        return_selection=True)
        lens = lens + 1
        sets = check_quest_selection(selection, q.float() * 0.25, run, lens.tolist(), cfg)
        assert_restricted_oracle(out, lse, q, run, lens.tolist(), sets)
    assert state.key_max.shape[1] >= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_metadata_is_exact_float32_and_page_scores_mask_only_past_each_sequence(dtype):
    """The page min / max are kept in float32 whatever the cache dtype (exact: they
    are cache values); a step over a cache of another dtype is refused; bounds are
    -inf exactly past each sequence's last page (none masked when all are equally long)."""
    gen = torch.Generator().manual_seed(3)
    hk, group, d, ps = 2, 4, 16, 4
    kc = torch.randn(2, 40, hk, d, generator=gen).to(dtype)
    q = torch.randn(2, hk * group, d, generator=gen)
    for lengths in ([37, 37], [37, 9]):
        state = QuestState(Quest(token_budget=8, page_size=ps)).prefill(kc, torch.tensor(lengths, dtype=torch.int32))
        assert state.key_max.dtype == torch.float32 and state.key_min.dtype == torch.float32 and state.dtype == dtype
        assert state.key_max.shape[1:] == (10, hk, d)
        for b, n in enumerate(lengths):
            for j in range(-(-n // ps)):
                keys = kc[b, j * ps : min(n, (j + 1) * ps)].float()
                assert torch.equal(state.key_max[b, j], keys.amax(0))
                assert torch.equal(state.key_min[b, j], keys.amin(0))
        bounds = state.page_scores(q)
        assert bounds.shape == (2, hk * group, 10)
        for b, n in enumerate(lengths):
            pages = -(-n // ps)
            assert bool(torch.isfinite(bounds[b, :, :pages]).all())
            assert bool(torch.isneginf(bounds[b, :, pages:]).all())
            keys_run = SimpleNamespace(k_all=kc, nheads_k=hk, group=group, headdim=d)  # what page_bounds64 reads
            want = page_bounds64(q[:, None], keys_run, b, n, ps)  # (hk, pages), max over the group
            got = bounds[b, :, :pages].double().view(hk, group, pages).amax(1)
            assert_close_to_oracle(got.float(), want, want, name="page bounds")
    other = torch.randn(2, 40, hk, d, generator=gen).to(torch.float64 if dtype != torch.float64 else torch.float32)
    with pytest.raises(ArgumentError, match=f"dtype {dtype}; this call's cache has .* dtype {other.dtype}"):
        state.check_step(state.config, [37, 9], other)


def test_top_positions_without_a_mask_equals_an_all_true_mask():
    from longattn.sparse.token_select import top_positions

    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 500, generator=gen)
    for k in (1, 17, 499, 500, 600):
        got = top_positions(scores, None, k)
        assert torch.equal(got, top_positions(scores, torch.ones_like(scores, dtype=torch.bool), k))
        assert got.dtype == torch.int32 and got.shape == (2, 3, min(k, 500))
