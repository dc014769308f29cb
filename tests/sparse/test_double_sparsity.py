"""Double Sparsity decode: label cache, approximate top-k selection, exact
attention over the selected tokens, the state across appended steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, ShapeError
from longattn.reference import attention_ref
from longattn.sparse import DoubleSparsity, DoubleSparsityState, Quest
from tests.sparse.token_decode_cases import Run, assert_restricted_oracle, assert_top, check_selection_shape, runs
from tests.tolerance import assert_close_to_oracle


def random_channels(run: Run, r: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(run.seed + 1)
    return torch.stack([torch.randperm(run.headdim, generator=gen)[:r] for _ in range(run.nheads_k)])


def approx_scores64(q, run: Run, channels: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """``(nheads_k, n)`` float64 approximate scores from the definition: query
    head h's channels of kv head h // group, dotted with the keys' same
    channels; max over the group."""
    out = torch.empty(run.nheads_k, run.group, n, dtype=torch.float64)
    for h in range(run.nheads):
        g = h // run.group
        c = channels[g].long()
        out[g, h % run.group] = run.k_all[b, :n, g][:, c].double() @ q[b, 0, h, c].double()
    return out.amax(1)


@given(runs(), st.integers(1, 4), st.integers(1, 30), st.booleans())
def test_steps_attend_exactly_the_top_approximate_tokens(run, r, budget, prefill):
    channels = random_channels(run, min(r, run.headdim))
    cfg = DoubleSparsity(channels, token_budget=budget)
    kc, vc, table, lens = run.prompt_cache()
    state = DoubleSparsityState(cfg)
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
        assert selection.shape[2] == min(budget, max(lengths))
        sets = check_selection_shape(selection, lengths, run.nheads_k)
        for b, n in enumerate(lengths):
            scores = approx_scores64(q, run, channels, b, n)
            for h in range(run.nheads_k):
                assert_top(sets[b][h], scores[h], budget, slack=1e-4 * (1 + float(scores[h].abs().max())))
        assert_restricted_oracle(out, lse, q, run, lengths, sets)
    # The label cache appended step by step equals one built from the final cache.
    fresh = DoubleSparsityState(cfg).prefill(kc, lens, table)
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(state.label[b, :n], fresh.label[b, :n])
        want = run.k_all[b, :n].gather(-1, channels[None].expand(n, -1, -1).long())
        assert torch.equal(state.label[b, :n], want)


@given(runs(max_steps=2), st.integers(1, 3))
def test_budget_covering_the_context_is_dense_decode(run, r):
    cfg = DoubleSparsity(random_channels(run, r), token_budget=run.capacity)
    kc, vc, table, lens = run.prompt_cache()
    state = DoubleSparsityState(cfg)
    for _ in range(run.steps):
        q = run.query()
        k_new, v_new = run.new_tokens(lens)
        out, lse = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new,
                                             v_new=v_new, sparse=cfg, state=state, return_lse=True)
        lens = lens + 1
        for b, n in enumerate(lens.tolist()):
            ref_out, ref_lse = attention_ref(q[b : b + 1], run.k_all[b : b + 1, :n], run.v_all[b : b + 1, :n])
            assert_close_to_oracle(out[b : b + 1], ref_out, ref_out)
            assert_close_to_oracle(lse[b : b + 1], ref_lse, ref_lse, name="lse")


@given(st.sampled_from([None, 1, 4]), st.sampled_from([1, 4, 8]), st.sampled_from([16, 15]), st.integers(0, 2**16))
def test_planted_needles_are_always_selected(cache_page, group, headdim, seed):
    """Queries with large outlier channels; needle keys aligned with them there;
    the rest noise. The label cache holds exactly those channels."""
    gen = torch.Generator().manual_seed(seed)
    hk, n, r = 2, 80, 3
    run = Run(batch=2, nheads_k=hk, group=group, headdim=headdim, starts=[n, n - 7], steps=1, page_size=cache_page,
              dtype=torch.float32, seed=seed)
    channels = torch.stack([torch.randperm(headdim, generator=gen)[:r] for _ in range(hk)])
    q = torch.randn(2, 1, hk * group, headdim, generator=gen)
    signs = torch.randn(2, hk, r, generator=gen).sign()
    for h in range(hk * group):
        q[:, 0, h, channels[h // group]] = 6.0 * signs[:, h // group]
    needles = {}
    for b in range(2):
        for h in range(hk):
            spots = torch.randperm(run.starts[b], generator=gen)[:4].tolist()
            for p in spots:
                run.k_all[b, p, h, channels[h]] = 3.0 * signs[b, h]
            needles[b, h] = spots
    kc, vc, table, lens = run.prompt_cache()
    cfg = DoubleSparsity(channels, token_budget=4)
    k_new, v_new = run.new_tokens(lens)
    _, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new,
                                             v_new=v_new, sparse=cfg, state=DoubleSparsityState(cfg),
                                             return_selection=True)
    for (b, h), spots in needles.items():
        assert set(spots) == set(selection[b, h].tolist())


@given(runs(max_steps=1), st.sampled_from([-0.7, 0.05]), st.sampled_from([0.0, 2.0]))
def test_softmax_scale_and_softcap(run, scale, softcap):
    """The selection ranks by ``scale * q . k`` (a negative scale flips it); the
    attention over it uses the scale and softcap like dense decode."""
    channels = random_channels(run, 2 if run.headdim > 1 else 1)
    cfg = DoubleSparsity(channels, token_budget=5)
    kc, vc, table, lens = run.prompt_cache()
    q = run.query()
    k_new, v_new = run.new_tokens(lens)
    out, lse, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, block_table=table, k_new=k_new,
                                                    v_new=v_new, sparse=cfg, state=DoubleSparsityState(cfg),
                                                    softmax_scale=scale, softcap=softcap, return_lse=True,
                                                    return_selection=True)
    lengths = (lens + 1).tolist()
    sets = check_selection_shape(selection, lengths, run.nheads_k)
    for b, n in enumerate(lengths):
        scores = approx_scores64(q.double() * scale, run, channels, b, n)
        for h in range(run.nheads_k):
            assert_top(sets[b][h], scores[h], 5, slack=1e-4 * (1 + float(scores[h].abs().max())))
    assert_restricted_oracle(out, lse, q, run, lengths, sets, scale=scale, softcap=softcap)


def test_channels_accept_tensors_and_nested_tuples_alike():
    a = DoubleSparsity(torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), token_budget=5)
    b = DoubleSparsity(((3, 1), (0, 2)), token_budget=5)
    c = DoubleSparsity([[3, 1], [0, 2]], token_budget=5)
    assert a == b == c and hash(a) == hash(b)
    assert a.channels == ((3, 1), (0, 2)) and a.nheads_k == 2 and a.r == 2
    assert torch.equal(a.channel_index(), torch.tensor([[3, 1], [0, 2]]))


@pytest.mark.parametrize("channels, error, pattern", [
    ([[0, 0]], ArgumentError, r"channels\[0\] must be distinct, got \[0, 0\]"),
    ([[0, -1]], ArgumentError, r"channels\[0\] must hold channel indices \(ints >= 0\), got -1"),
    ([[0, 1.5]], ArgumentError, r"channels\[0\] must hold channel indices"),
    ([[0, True]], ArgumentError, r"channels\[0\] must hold channel indices"),
    ([[0, 1], [2]], ShapeError, "same r >= 1 channels per kv head"),
    ([[]], ShapeError, "same r >= 1 channels per kv head"),
    ([], ShapeError, "at least one kv head row"),
    ([0, 1], ShapeError, "must be \\(nheads_k, r\\)"),
    (torch.tensor([0, 1]), ShapeError, "must be \\(nheads_k, r\\), got a tensor of shape \\(2,\\)"),
    (torch.tensor([[0.0, 1.0]]), ArgumentError, "must be an integer tensor, got torch.float32"),
    ({"layer": 0}, ArgumentError, "got dict"),
])
def test_bad_channels(channels, error, pattern):
    with pytest.raises(error, match=pattern):
        DoubleSparsity(channels)


def test_bad_budget_and_calls_are_named_errors_and_change_nothing():
    with pytest.raises(ArgumentError, match="DoubleSparsity token_budget must be an int >= 1, got 0"):
        DoubleSparsity([[0]], token_budget=0)
    with pytest.raises(ArgumentError, match="DoubleSparsityState needs a longattn.sparse.DoubleSparsity"):
        DoubleSparsityState(Quest())
    gen = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(2, 16, 2, 8, generator=gen), torch.randn(2, 16, 2, 8, generator=gen)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 8, generator=gen)
    k_new, v_new = torch.randn(2, 1, 2, 8, generator=gen), torch.randn(2, 1, 2, 8, generator=gen)
    cfg = DoubleSparsity([[0, 7], [1, 2]], token_budget=4)
    state = DoubleSparsityState(cfg).prefill(kc, lens)
    before = (kc.clone(), vc.clone(), state.label.clone(), state.lengths)
    cases = [
        (dict(sparse=DoubleSparsity([[0, 8], [1, 2]])), ArgumentError, "channels must be in 0 .. headdim - 1 = 7, "
                                                                      "got channel 8"),
        (dict(sparse=DoubleSparsity([[0, 1]])), ShapeError, "channels has 1 kv head rows, but the cache has "
                                                            "nheads_k 2"),
        (dict(sparse=DoubleSparsity([[0, 6], [1, 2]])), ArgumentError, "for other channels than sparse= holds"),
        (dict(cache_seqlens=lens - 1), ArgumentError, r"covers sequences of lengths \[5, 9\]"),
        (dict(state=DoubleSparsityState(cfg).prefill(kc.half(), lens)), ArgumentError, "from a torch.float16 cache"),
        (dict(state=object()), ArgumentError, "must be a longattn.sparse.DoubleSparsityState"),
        (dict(plan=object()), Exception, "plan= schedules dense stream-K decode; it does not apply to "
                                         "sparse=DoubleSparsity"),
    ]
    for over, error, pattern in cases:
        kw = dict(cache_seqlens=lens, k_new=k_new, v_new=v_new, sparse=cfg, state=state)
        kw.update(over)
        with pytest.raises(error, match=pattern):
            longattn.decode_attention(q, kc, vc, **kw)
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
        assert torch.equal(state.label, before[2]) and state.lengths == before[3]
    with pytest.raises(ArgumentError, match="channels must be in 0 .. headdim - 1 = 7"):
        DoubleSparsityState(DoubleSparsity([[0, 8], [1, 2]])).prefill(kc, lens)
    out = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, k_new=k_new, v_new=v_new, sparse=cfg,
                                    state=state)
    assert out.shape == q.shape and state.lengths == (6, 10)


def test_state_grows_with_the_cache():
    run = Run(batch=2, nheads_k=2, group=4, headdim=16, starts=[10, 7], steps=6, page_size=None,
              dtype=torch.float32, seed=11)
    channels = random_channels(run, 3)
    cfg = DoubleSparsity(channels, token_budget=5)
    kc, vc, table, lens = run.prompt_cache()
    state = DoubleSparsityState(cfg).prefill(kc[:, :10].clone(), lens)  # capacity 10
    for _ in range(run.steps):
        q = run.query()
        k_new, v_new = run.new_tokens(lens)
        out, lse, selection = longattn.decode_attention(q, kc, vc, cache_seqlens=lens, k_new=k_new, v_new=v_new,
                                                        sparse=cfg, state=state, return_lse=True,
                                                        return_selection=True)
        lens = lens + 1
        sets = check_selection_shape(selection, lens.tolist(), run.nheads_k)
        assert_restricted_oracle(out, lse, q, run, lens.tolist(), sets)
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(state.label[b, :n], run.k_all[b, :n].gather(-1, channels[None].expand(n, -1, -1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_label_cache_and_scores_for_any_cache_dtype(dtype):
    """The label cache is float32 (exact copies of the cache's values); per-head
    scores are -inf exactly past each sequence's length and their group max is
    what the selection ranks by; a cache of another dtype is refused."""
    gen = torch.Generator().manual_seed(4)
    hk, group, d, r = 2, 4, 16, 3
    run = Run(batch=2, nheads_k=hk, group=group, headdim=d, starts=[30, 30], steps=1, page_size=None, dtype=dtype,
              seed=4)
    channels = random_channels(run, r)
    cfg = DoubleSparsity(channels, token_budget=5)
    q = torch.randn(2, 1, hk * group, d, generator=gen)
    for lengths in ([30, 30], [30, 11]):
        state = DoubleSparsityState(cfg).prefill(run.k_all, torch.tensor(lengths, dtype=torch.int32))
        assert state.label.dtype == torch.float32 and state.dtype == dtype
        scores = state.approx_scores(q[:, 0])
        assert scores.shape == (2, hk * group, 30) and scores.dtype == torch.float32
        grouped = state.group_scores(q[:, 0])
        for b, n in enumerate(lengths):
            exact = run.k_all[b, :n].float().gather(-1, channels[None].expand(n, -1, -1))
            assert torch.equal(state.label[b, :n], exact)
            assert bool(torch.isneginf(scores[b, :, n:]).all())
            want = approx_scores64(q, run, channels, b, n)  # (hk, n), max over the group
            got = scores[b, :, :n].view(hk, group, n).amax(1)
            assert_close_to_oracle(got, want, want, name="approximate scores")
            assert_close_to_oracle(grouped[b, :, :n], want, got, name="group scores")
    with pytest.raises(ArgumentError, match=f"filled from a {dtype} cache"):
        state.check_step(cfg, lengths, run.k_all.to(torch.float16))
