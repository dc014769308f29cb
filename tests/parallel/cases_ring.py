"""Ring attention and shard/unshard cases, run on every rank by :mod:`tests.parallel.worker`.

Built with :mod:`tests.parallel.common` (every collective before every
assertion; outputs, lse and gradients vs the float64 oracle's slice). The
ring's own exact property: the bytes each rank sends are the K/V blocks it
passes on, one per step but the last (fewer under a contiguous causal window).
"""

from __future__ import annotations

import torch

from longattn.api import attention
from longattn.errors import ArgumentError, ShapeError
from longattn.parallel import local_positions, ring_attention, shard, unshard
from longattn.parallel.pieces import forward_steps
from longattn.reference import attention_ref
from tests.parallel.common import (
    by_rank,
    deterministic_grad_case,
    expect,
    forward_case,
    good,
    grad_case,
    last_rank_3d,
    last_rank_grad,
    last_rank_longer,
)
from tests.tolerance import assert_close_to_oracle


def _kv_bytes(layout, causal, window):
    def check(stats, q, ql, nheads_k, rank, world):
        block = 2 * ql.shape[0] * ql.shape[1] * nheads_k * ql.shape[3] * ql.element_size()
        want = (forward_steps(world, ql.shape[1], causal, window, layout) - 1) * block
        assert stats.bytes_sent == want, f"sent {stats.bytes_sent} bytes, expected {want}"
    return check


def _case(layout, causal, nheads, nheads_k, window=(-1, -1), **kw):
    return forward_case(ring_attention, layout, causal, nheads, nheads_k, window=window,
                        check_stats=_kv_bytes(layout, causal, window), **kw)


def _grad(layout, causal, nheads, nheads_k, **kw):
    return grad_case(ring_attention, layout, causal, nheads, nheads_k, **kw)


def _expect(error, make_inputs, **options):
    return expect(ring_attention, error, make_inputs, **options)


def _roundtrip(layout):
    def run(rank, world):
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4 * world, 3, 5, generator=gen)
        lse = torch.randn(2, 3, 4 * world, generator=gen)
        local = shard(x, layout)  # collectives first (see tests.parallel.common)
        back, lse_back = unshard(local, layout), unshard(shard(lse, layout, dim=2), layout, dim=2)
        assert torch.equal(local, x[:, local_positions(x.shape[1], layout, rank, world)])
        assert torch.equal(back, x), "unshard(shard(x)) != x"
        assert torch.equal(lse_back, lse)
        if world * (2 if layout == "zigzag" else 1) == 1:
            return  # contiguous over one rank: every length divides
        try:
            shard(torch.zeros(1, 4 * world + 1, 1, 1), layout)
        except ShapeError as exc:
            assert "pad" in str(exc), str(exc)
        else:
            raise AssertionError("an indivisible length did not raise ShapeError")
    return run



def _padded_odd_length(layout):
    """The documented rule for lengths that do not divide: pad at the end,
    run causal, drop the padded rows; the real rows equal the oracle's on the
    unpadded sequence (odd length, GQA)."""
    def run(rank, world):
        parts = world * (2 if layout == "zigzag" else 1)
        real = 3 * parts - 1  # never divisible by parts >= 2; odd whenever parts is even
        gen = torch.Generator().manual_seed(400 + world)
        q, k, v = (torch.randn(1, real, h, 8, generator=gen) for h in (4, 2, 2))
        pad = -real % parts or parts  # at least one padded token, the multiple shard's error names
        padded = [torch.cat([t, torch.zeros(1, pad, t.shape[2], 8)], 1) for t in (q, k, v)]
        out = unshard(ring_attention(*(shard(t, layout) for t in padded), causal=True, layout=layout), layout)
        ref, _ = attention_ref(q, k, v, causal=True)
        base = attention(q, k, v, causal=True, backend="eager")
        assert_close_to_oracle(out[:, :real], ref, base, name="real rows")
    return run


# name -> (minimum world size, case)
CASES = {
    "roundtrip_zigzag": (1, _roundtrip("zigzag")),
    "roundtrip_contiguous": (1, _roundtrip("contiguous")),
    "padded_odd_length_zigzag": (1, _padded_odd_length("zigzag")),
    "padded_odd_length_contiguous": (2, _padded_odd_length("contiguous")),
    "zigzag_causal_mha": (1, _case("zigzag", True, 4, 4)),
    "zigzag_causal_gqa": (1, _case("zigzag", True, 4, 2)),
    "zigzag_full_gqa": (1, _case("zigzag", False, 4, 1, scale=0.3)),
    "contiguous_causal_gqa": (1, _case("contiguous", True, 4, 2)),
    "contiguous_full_mha": (1, _case("contiguous", False, 2, 2)),
    "zigzag_causal_softcap": (1, _case("zigzag", True, 2, 1, softcap=2.0)),
    "zigzag_causal_fp16": (1, _case("zigzag", True, 4, 2, dtype=torch.float16)),
    "contiguous_causal_bf16": (1, _case("contiguous", True, 2, 2, dtype=torch.bfloat16)),
    "subgroup_zigzag_causal": (3, _case("zigzag", True, 4, 2, group_ranks=[1, 2])),
    # windows: 3 tokens per zigzag chunk, 6 per rank: (4, 0) reaches one or two chunks back, (7, 5) both ways
    "zigzag_causal_window": (1, _case("zigzag", True, 4, 2, window=(4, 0))),
    "contiguous_causal_window_early_stop": (1, _case("contiguous", True, 4, 2, window=(5, 0))),
    "contiguous_causal_window_one_block": (1, _case("contiguous", True, 2, 1, window=(0, 0))),
    "zigzag_full_window": (1, _case("zigzag", False, 4, 2, window=(7, 5))),
    "contiguous_full_window_right_only": (1, _case("contiguous", False, 2, 2, window=(-1, 2))),
    "grad_zigzag_causal_gqa": (1, _grad("zigzag", True, 4, 2)),
    "grad_zigzag_full_mha": (1, _grad("zigzag", False, 2, 2)),
    "grad_contiguous_causal_gqa": (1, _grad("contiguous", True, 4, 1)),
    "grad_contiguous_full_gqa": (1, _grad("contiguous", False, 4, 2)),
    "grad_zigzag_causal_softcap_lse": (1, _grad("zigzag", True, 2, 1, softcap=2.0, with_lse=True)),
    "grad_zigzag_causal_lse_one_rank": (2, _grad("zigzag", True, 2, 2, with_lse=True, lse_rank=0)),
    "grad_contiguous_causal_fp16": (1, _grad("contiguous", True, 2, 2, dtype=torch.float16)),
    "grad_zigzag_causal_window": (1, _grad("zigzag", True, 4, 2, window=(4, 0))),
    "grad_contiguous_causal_window_lse": (1, _grad("contiguous", True, 2, 1, window=(5, 0), with_lse=True)),
    "grad_zigzag_full_window_softcap": (1, _grad("zigzag", False, 2, 2, softcap=2.0, window=(3, 8))),
    "grad_deterministic": (1, deterministic_grad_case(ring_attention)),
    "wrong_shape_every_rank_raises": (2, _expect(ShapeError, last_rank_longer(), causal=True)),
    "wrong_ndim_every_rank_raises": (1, _expect(ShapeError, last_rank_3d(), causal=True)),
    "grad_on_one_rank_only_raises": (2, _expect(ArgumentError, last_rank_grad(), words=("autograd",), causal=True)),
    "causal_right_window_refused": (1, _expect(ArgumentError, good(), window_size=(2, 1), causal=True)),
    "ranks_disagree_on_window": (2, _expect(ArgumentError, good(), words=("window",),
                                            window_size=by_rank((2, 0), (3, 0)), causal=True)),
}
