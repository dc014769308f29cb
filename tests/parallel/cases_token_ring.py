"""TokenRing attention cases, run on every rank by :mod:`tests.parallel.worker`.

Built with :mod:`tests.parallel.common` (every collective before every
assertion; outputs, lse and gradients vs the float64 oracle's slice). TokenRing's
own exact property: the bytes each rank sends are N-1 q blocks plus the
partial outputs of the non-empty pieces it computed for other owners.
"""

from __future__ import annotations

import torch

from longattn.errors import ArgumentError, ShapeError
from longattn.parallel.pieces import block_pieces
from longattn.parallel.token_ring import token_ring_attention
from tests.parallel.common import (
    deterministic_grad_case,
    expect,
    forward_case,
    grad_case,
    last_rank_3d,
    last_rank_grad,
    last_rank_longer,
)


def _expected_bytes(layout, causal, window):
    """N-1 q hops plus, for steps 1..N-1, the non-empty partial outputs for
    owner (rank - step), each row and head carrying headdim values and the
    float32 lse (4 bytes) in q's dtype."""
    def check(stats, q, ql, nheads_k, rank, world):
        batch, seqlen, nheads, headdim = ql.shape
        size = ql.element_size()
        want = (world - 1) * ql.numel() * size
        for step in range(1, world):
            pieces = block_pieces(world, (rank - step) % world, rank, seqlen, causal, window, layout)
            rows = sum(r.stop - r.start for r, _, _ in pieces)
            want += batch * rows * nheads * (headdim * size + 4)
        assert stats.bytes_sent == want, f"stats.sent counted {stats.bytes_sent} bytes, expected {want}"
    return check


def _case(layout, causal, nheads, nheads_k, window=(-1, -1), **kw):
    return forward_case(token_ring_attention, layout, causal, nheads, nheads_k, window=window, seed=3000,
                        check_stats=_expected_bytes(layout, causal, window), **kw)


def _grad(layout, causal, nheads, nheads_k, **kw):
    return grad_case(token_ring_attention, layout, causal, nheads, nheads_k, seed=4000, **kw)


def _expect(error, make_inputs, **options):
    return expect(token_ring_attention, error, make_inputs, **options)


# name -> (minimum world size, case)
CASES = {
    "zigzag_causal_mha": (1, _case("zigzag", True, 4, 4)),
    "zigzag_causal_gqa": (1, _case("zigzag", True, 4, 2)),
    "zigzag_full_mqa_scale": (1, _case("zigzag", False, 4, 1, scale=0.3)),
    "contiguous_causal_gqa": (1, _case("contiguous", True, 4, 2)),
    "contiguous_full_mha": (1, _case("contiguous", False, 2, 2)),
    "zigzag_causal_softcap": (1, _case("zigzag", True, 2, 1, softcap=2.0)),
    "zigzag_causal_fp16": (1, _case("zigzag", True, 4, 2, dtype=torch.float16)),
    "contiguous_causal_bf16": (1, _case("contiguous", True, 2, 2, dtype=torch.bfloat16)),
    "subgroup_zigzag_causal": (3, _case("zigzag", True, 4, 2, group_ranks=[1, 2])),
    "zigzag_causal_window": (1, _case("zigzag", True, 4, 2, window=(4, 0))),
    "contiguous_full_window": (1, _case("contiguous", False, 2, 1, window=(7, 2))),
    "wrong_shape_every_rank_raises": (2, _expect(ShapeError, last_rank_longer(), causal=True)),
    "wrong_ndim_every_rank_raises": (1, _expect(ShapeError, last_rank_3d(), causal=True)),
    "grad_on_one_rank_only_raises": (2, _expect(ArgumentError, last_rank_grad(), words=("autograd",), causal=True)),
    "grad_zigzag_causal_gqa": (1, _grad("zigzag", True, 4, 2)),
    "grad_zigzag_full_mqa": (1, _grad("zigzag", False, 4, 1)),
    "grad_contiguous_causal_gqa": (1, _grad("contiguous", True, 4, 2)),
    "grad_contiguous_full_mha": (1, _grad("contiguous", False, 2, 2)),
    "grad_zigzag_causal_softcap_lse": (1, _grad("zigzag", True, 2, 1, softcap=2.0, with_lse=True)),
    "grad_zigzag_causal_lse_one_rank": (2, _grad("zigzag", True, 2, 2, with_lse=True, lse_rank=0)),
    "grad_contiguous_causal_fp16": (1, _grad("contiguous", True, 2, 2, dtype=torch.float16)),
    "grad_zigzag_full_window": (1, _grad("zigzag", False, 4, 2, window=(3, 5))),
    "grad_contiguous_causal_window_lse": (1, _grad("contiguous", True, 2, 2, window=(5, 0), with_lse=True)),
    "grad_deterministic": (1, deterministic_grad_case(token_ring_attention)),
}
