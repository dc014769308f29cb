"""The pieces a rank computes against a block (longattn.parallel.pieces): exact coverage of the global mask.

No process group: for every rank and source block, the pieces' own
(bottom-right aligned) masks, placed on their rectangles, must add up to
exactly the global mask restricted to (local queries, block keys): every
visible pair once, no invisible pair, no overlap; and no piece carries a row
or key column that sees nothing.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.masking import dense_mask, effective_window
from longattn.parallel.layout import local_positions
from longattn.parallel.pieces import block_pieces, forward_steps


def _global_mask(total: int, causal: bool, window) -> torch.Tensor:
    return dense_mask(total, total, effective_window(causal, window))


@st.composite
def cases(draw):
    n = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["zigzag", "contiguous"]))
    local = 2 * draw(st.integers(1, 4))
    causal = draw(st.booleans())
    left = draw(st.integers(-1, 3 * local))
    right = -1 if causal and draw(st.booleans()) else (0 if causal else draw(st.integers(-1, 3 * local)))
    return n, layout, local, causal, (left, right)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_pieces_cover_the_global_mask_exactly(case):
    n, layout, local, causal, window = case
    total = n * local
    mask = _global_mask(total, causal, window)
    for r in range(n):
        rows = local_positions(total, layout, r, n)
        for src in range(n):
            cols = local_positions(total, layout, src, n)
            want = mask[rows][:, cols]
            got = torch.zeros(local, local, dtype=torch.int64)
            for row_slice, key_slice, piece_window in block_pieces(n, r, src, local, causal, window, layout):
                lq, lk = row_slice.stop - row_slice.start, key_slice.stop - key_slice.start
                assert lq > 0 and lk > 0
                piece = dense_mask(lq, lk, piece_window)
                assert piece.any(dim=1).all() and piece.any(dim=0).all(), "a piece carries a row or key seeing nothing"
                got[row_slice, key_slice] += piece.long()
            assert got.max() <= 1, f"overlapping pieces: rank {r}, src {src}"
            assert torch.equal(got.bool(), want), f"rank {r}, src {src}, window {window}, causal {causal}, {layout}"


@settings(max_examples=200, deadline=None)
@given(cases())
def test_forward_steps_cover_every_needed_block(case):
    n, layout, local, causal, window = case
    steps = forward_steps(n, local, causal, window, layout)
    assert 1 <= steps <= n
    for r in range(n):
        for step in range(steps, n):  # blocks that never arrive must contribute nothing
            assert block_pieces(n, r, (r - step) % n, local, causal, window, layout) == []
