"""merge_states: merging attention over any partition of the keys equals
attention over all keys."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.reference import attention_ref
from tests.strategies import cases
from tests.tolerance import assert_close_to_oracle


@given(cases(max_seqlen=50, dtypes=[torch.float32], windows=False, softcaps=False), st.data())
def test_merging_any_key_partition_equals_full_attention(case, data):
    q, k, v = case.tensors()
    # Random cut points (duplicates allowed: empty parts must merge as no-ops).
    cuts = sorted(data.draw(st.lists(st.integers(0, case.seqlen_k), max_size=4)))
    bounds = [0, *cuts, case.seqlen_k]
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        # Each part sees keys [lo, hi) with the queries' causal limit; the mask
        # keeps the global bottom-right alignment.
        mask = None
        if case.causal:
            full = torch.ones(case.seqlen_q, case.seqlen_k, dtype=torch.bool).tril(case.seqlen_k - case.seqlen_q)
            mask = full[:, lo:hi]
        o, l = attention_ref(q, k[:, lo:hi], v[:, lo:hi], mask=mask)
        outs.append(o.float())
        lses.append(l.float())
    out, lse = longattn.merge_states(outs, lses)
    ref_out, ref_lse = attention_ref(q, k, v, causal=case.causal)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_merge_of_public_attention_parts():
    q = torch.randn(2, 9, 4, 32)
    k = torch.randn(2, 30, 2, 32)
    v = torch.randn(2, 30, 2, 32)
    parts = [longattn.attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in [(0, 7), (7, 8), (8, 30)]]
    out, lse = longattn.merge_states(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref_out, ref_lse = attention_ref(q, k, v)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_all_empty_parts_give_zero_and_minus_inf():
    outs = torch.zeros(3, 1, 4, 2, 8)
    lses = torch.full((3, 1, 2, 4), float("-inf"))
    out, lse = longattn.merge_states(outs, lses)
    assert torch.equal(out, torch.zeros(1, 4, 2, 8)) and torch.isneginf(lse).all()


def test_half_precision_parts_merge_in_float32():
    q = torch.randn(1, 6, 2, 16)
    k = torch.randn(1, 20, 2, 16)
    v = torch.randn(1, 20, 2, 16)
    parts = [longattn.attention(q.half(), k[:, a:b].half(), v[:, a:b].half(), return_lse=True) for a, b in [(0, 10), (10, 20)]]
    out, lse = longattn.merge_states([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    ref_out, _ = attention_ref(q.half(), k.half(), v.half())
    eager = longattn.attention(q.half(), k.half(), v.half(), backend="eager")
    # Two roundings to fp16 (parts, then merge) instead of one: allow the 2x rule.
    assert_close_to_oracle(out, ref_out, eager)


def test_bad_input_names_the_argument():
    good_out = torch.zeros(1, 4, 2, 8)
    good_lse = torch.zeros(1, 2, 4)
    with pytest.raises(ArgumentError, match="outs"):
        longattn.merge_states([], [])
    with pytest.raises(ShapeError, match="lses"):
        longattn.merge_states([good_out], [torch.zeros(1, 4, 2)])
    with pytest.raises(ShapeError, match=r"outs\[1\]"):
        longattn.merge_states([good_out, torch.zeros(1, 5, 2, 8)], [good_lse, good_lse])
    with pytest.raises(DTypeError, match=r"outs\[0\]"):
        longattn.merge_states(["x"], [good_lse])
    with pytest.raises(ArgumentError, match="NaN"):
        longattn.merge_states([good_out], [torch.full((1, 2, 4), float("nan"))])


def test_merge_two_in_place_equals_full_attention():
    """merge_two_in_place over two key parts (one of them empty for some rows)
    against the oracle over all keys; lse positions of -inf must line up."""
    from longattn.kernels.merge import merge_two_in_place

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 3, 8, generator=gen)
    k, v = (torch.randn(2, 12, 3, 8, generator=gen) for _ in range(2))
    # Causal over 12 keys with 5 queries: query i sees keys <= i + 7. Part one is
    # keys [0, 9): every row sees some. Part two is keys [9, 12): rows 0, 1 see
    # none there (their partial state is empty: out 0, lse -inf).
    mask = torch.ones(5, 12, dtype=torch.bool).tril(7)
    o1, l1 = attention_ref(q, k[:, :9], v[:, :9], mask=mask[:, :9])
    o2, l2 = attention_ref(q, k[:, 9:], v[:, 9:], mask=mask[:, 9:])
    assert torch.isneginf(l2[:, :, :2]).all()
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    # merge_two_in_place takes (..., d) with lse (...): heads before positions, like lse.
    for first, second in (((o1, l1), (o2, l2)), ((o2, l2), (o1, l1))):  # the empty part on either side
        out, lse = first[0].float().transpose(1, 2).contiguous(), first[1].float().clone()
        merge_two_in_place(out, lse, second[0].float().transpose(1, 2), second[1].float())
        assert_close_to_oracle(out.transpose(1, 2), ref_out, ref_out)
        assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_merge_two_in_place_of_two_empty_parts_is_empty():
    from longattn.kernels.merge import merge_two_in_place

    out, lse = torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), float("-inf"))
    merge_two_in_place(out, lse, torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), float("-inf")))
    assert torch.equal(out, torch.zeros(1, 2, 3, 4)) and torch.isneginf(lse).all()
