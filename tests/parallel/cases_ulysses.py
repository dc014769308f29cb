"""Ulysses attention cases, run on every rank by :mod:`tests.parallel.worker`.

Built with :mod:`tests.parallel.common` (every collective before every
assertion; outputs, lse and gradients vs the float64 oracle's slice). Ulysses'
own exact properties: the bytes each rank sends equal the docstring's formula,
in 2 (N - 1) messages; the head rules raise named errors on every rank.
"""

from __future__ import annotations

import torch

from longattn.errors import ArgumentError, ShapeError
from longattn.parallel import local_positions, shard
from longattn.parallel.ulysses import ulysses_attention
from longattn.reference import attention_ref
from tests.parallel.common import (
    by_rank,
    expect,
    forward_case,
    full_qkv,
    good,
    grad_case,
    last_rank_grad,
    last_rank_longer,
)
from tests.tolerance import assert_close_to_oracle


def _bytes_and_messages(stats, q, ql, nheads_k, rank, world):
    """The docstring's per-rank bytes: (N-1) blocks of (q, k, v) in, (N-1) blocks of out + lse back."""
    batch, seqlen, nheads, headdim = q.shape
    n, e, local = world, q.element_size(), seqlen // world
    hk = nheads_k // n if nheads_k % n == 0 else 1
    inward = (n - 1) * batch * local * (nheads // n + 2 * hk) * headdim * e
    outward = (n - 1) * batch * local * (nheads // n) * (headdim * e + 4)
    assert stats.bytes_sent == inward + outward, f"bytes sent {stats.bytes_sent} != analytical {inward + outward}"
    assert stats.messages == 2 * (world - 1), stats.messages


def _case(layout, causal, nheads, nheads_k, **kw):
    return forward_case(ulysses_attention, layout, causal, nheads, nheads_k, seed=3000,
                        check_stats=_bytes_and_messages, **kw)


def _grad(layout, causal, nheads, nheads_k, **kw):
    return grad_case(ulysses_attention, layout, causal, nheads, nheads_k, seed=4000, **kw)


def _expect(error, make_inputs, **options):
    return expect(ulysses_attention, error, make_inputs, **options)


def _lse_only_grad(rank, world):
    """A loss that uses only lse still runs both backward all-to-alls on every
    rank (no hang), and out's missing gradient counts as zero."""
    q, k, v = full_qkv(world, 12, 1 if world == 3 else 2, seed=5000 + world)  # world 4: replicated
    pos = local_positions(q.shape[1], "zigzag", rank, world)
    leaves = [shard(t, "zigzag").requires_grad_() for t in (q, k, v)]
    _, lse = ulysses_attention(*leaves, causal=True, return_lse=True)
    lse.sum().backward()
    full = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, ref_lse = attention_ref(*full, causal=True)
    ref = torch.autograd.grad(ref_lse.sum(), full, allow_unused=True)  # lse does not depend on v: dv = 0
    ref = [torch.zeros_like(t) if r is None else r for t, r in zip(full, ref)]
    for name, leaf, r in zip(("dq", "dk", "dv"), leaves, ref):
        assert leaf.grad is not None, name
        assert_close_to_oracle(leaf.grad, r[:, pos], r[:, pos], name=name)


def _heads_not_divisible(rank, world):
    h = world + 1  # never divisible by world >= 2
    return torch.randn(1, 4, h, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)


def _kv_heads_unfit(rank, world):
    h, hk = {3: (6, 2), 4: (12, 3)}[world]  # nheads_k neither divisible by nor dividing the world size
    return torch.randn(1, 4, h, 8), torch.randn(1, 4, hk, 8), torch.randn(1, 4, hk, 8)


def _per_world(world):
    return world


def _twice_world(world):
    return 2 * world


# name -> (minimum world size, case). nheads 12 / 24 are divisible by every world size 1-4; cases with
# 8 heads need world 4 (or run in a 2-rank subgroup).
CASES = {
    "zigzag_causal_mha": (1, _case("zigzag", True, 12, 12)),
    "zigzag_causal_gqa": (1, _case("zigzag", True, 24, _twice_world)),
    "contiguous_causal_gqa": (1, _case("contiguous", True, 12, _per_world)),
    "zigzag_full_gqa": (1, _case("zigzag", False, 24, _twice_world, scale=0.3)),
    "contiguous_full_mha": (1, _case("contiguous", False, 12, 12)),
    "zigzag_causal_replicated_mqa": (1, _case("zigzag", True, 12, 1)),
    "contiguous_full_replicated_mqa": (1, _case("contiguous", False, 12, 1)),
    "zigzag_causal_replicated_gqa2": (4, _case("zigzag", True, 8, 2)),
    "zigzag_causal_window": (1, _case("zigzag", True, 12, _per_world, window=(5, 0))),
    "contiguous_full_window": (1, _case("contiguous", False, 12, 12, window=(3, 2))),
    "zigzag_full_window_replicated": (1, _case("zigzag", False, 12, 1, window=(3, 2))),
    "zigzag_causal_softcap": (1, _case("zigzag", True, 12, _per_world, softcap=2.0)),
    "zigzag_causal_fp16": (1, _case("zigzag", True, 12, _per_world, dtype=torch.float16)),
    "contiguous_causal_bf16": (1, _case("contiguous", True, 12, 1, dtype=torch.bfloat16)),
    "subgroup_zigzag_causal": (3, _case("zigzag", True, 4, 2, group_ranks=[1, 2])),
    "grad_zigzag_causal_gqa": (1, _grad("zigzag", True, 24, _twice_world)),
    "grad_contiguous_full_mha": (1, _grad("contiguous", False, 12, 12)),
    "grad_zigzag_causal_replicated_lse": (1, _grad("zigzag", True, 12, 1, with_lse=True)),
    "grad_contiguous_window_softcap": (1, _grad("contiguous", False, 12, _per_world, softcap=2.0,
                                                     window=(3, 2))),
    "grad_zigzag_causal_window_replicated": (4, _grad("zigzag", True, 8, 2, window=(5, 0))),
    "grad_zigzag_causal_fp16": (1, _grad("zigzag", True, 12, _per_world, dtype=torch.float16)),
    "grad_lse_only": (1, _lse_only_grad),
    "heads_not_divisible_every_rank_raises": (2, _expect(ShapeError, _heads_not_divisible,
                                                         words=("nheads", "world size"), causal=True)),
    "kv_heads_unfit_every_rank_raises": (3, _expect(ShapeError, _kv_heads_unfit, words=("nheads_k",))),
    "other_window_every_rank_raises": (2, _expect(ArgumentError, good(12), words=("window",),
                                                  window_size=by_rank((5, 0), (4, 0)), causal=True)),
    "wrong_shape_every_rank_raises": (2, _expect(ShapeError, last_rank_longer(12), causal=True)),
    "grad_mismatch_every_rank_raises": (2, _expect(ArgumentError, last_rank_grad(12), words=("autograd",))),
}
