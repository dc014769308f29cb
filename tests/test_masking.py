"""The visibility rule's helpers agree with each other."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from longattn.masking import dense_mask, visible_key_range


@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(-1, 10),
    st.integers(-1, 10),
    st.data(),
)
def test_visible_key_range_covers_exactly_the_visible_columns(seqlen_q, seqlen_k, left, right, data):
    window = (left, right)
    mask = dense_mask(seqlen_q, seqlen_k, window)
    r0 = data.draw(st.integers(0, seqlen_q - 1))
    r1 = data.draw(st.integers(r0 + 1, seqlen_q))
    lo, hi = visible_key_range(r0, r1, seqlen_q, seqlen_k, window)
    seen = mask[r0:r1].any(dim=0).nonzero().flatten()
    if seen.numel() == 0:
        assert lo >= hi
    else:
        # Tight: the range starts at the first and ends after the last visible key.
        assert (lo, hi) == (int(seen.min()), int(seen.max()) + 1)


def test_bottom_right_causal_picture():
    # seqlen_q=3, seqlen_k=5, causal: the picture in longattn/masking.py.
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(dense_mask(3, 5, (-1, 0)), expected)
    # More queries than keys: the first rows are empty.
    assert torch.equal(dense_mask(3, 2, (-1, 0)).sum(1), torch.tensor([0, 1, 2]))
