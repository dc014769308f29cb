"""APB attention cases, run on every rank by :mod:`tests.parallel.worker`.

Each case is ``run(rank, world)`` in an initialised gloo group; it raises on
failure. Every rank builds the same full q, k, v, takes its contiguous block,
runs :func:`apb_attention`, and then (after every collective) checks against
the oracle: it recomputes every host's passing block with
:func:`apb_selection` from the full tensors, builds :func:`apb_mask`, and
compares its rows with ``attention_ref(q, k, v, mask=...)``. The tolerance
baseline is eager dense attention over the same key list, built here by
indexing the full k, v (not from what travelled).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.api import attention
from longattn.errors import ArgumentError, ShapeError, UnsupportedFeatureError
from longattn.parallel import shard
from longattn.parallel.apb import apb_attention, apb_mask, apb_selection
from longattn.parallel.stats import record
from longattn.reference import attention_ref
from tests.parallel.common import by_rank, expect, good
from tests.tolerance import assert_close_to_oracle

HEADDIM = 16


def _full_qkv(world, block, nheads, nheads_k, seed, dtype=torch.float32):
    """The same full (batch=2, world*block, ., HEADDIM) q, k, v on every rank."""
    gen = torch.Generator().manual_seed(seed)
    seqlen = world * block
    q = torch.randn(2, seqlen, nheads, HEADDIM, generator=gen).to(dtype)
    k = torch.randn(2, seqlen, nheads_k, HEADDIM, generator=gen).to(dtype)
    v = torch.randn(2, seqlen, nheads_k, HEADDIM, generator=gen).to(dtype)
    return q, k, v


def _selections(q, k, world, anchor, passing, scorer, scale=None, softcap=0.0):
    block = q.shape[1] // world
    return [
        apb_selection(q[:, g * block:(g + 1) * block].contiguous(), k[:, g * block:(g + 1) * block].contiguous(),
                      host=g, passing_len=passing, anchor_len=anchor, scorer=scorer, softmax_scale=scale,
                      softcap=softcap)
        for g in range(world)
    ]


def _baseline(q, k, v, rank, world, anchor, sels, scale, softcap):
    """Eager attention of block ``rank``'s queries over [anchor, passing 0..rank-1, own block] gathered from
    the full k, v: the same keys APB uses, in the tolerance rule's low-precision baseline."""
    block = q.shape[1] // world
    batch, nheads_k = k.shape[0], k.shape[2]
    own = torch.arange(rank * block, (rank + 1) * block).expand(batch, nheads_k, block)
    parts = [] if rank == 0 else [torch.arange(anchor).expand(batch, nheads_k, anchor)] + list(sels[:rank])
    index = torch.cat(parts + [own], dim=2).transpose(1, 2)[..., None].expand(-1, -1, -1, k.shape[3])
    keys, values = torch.gather(k, 1, index), torch.gather(v, 1, index)
    return attention(q[:, rank * block:(rank + 1) * block], keys, values, causal=True, softmax_scale=scale,
                     softcap=softcap, backend="eager", return_lse=True)


def _apb_case(block, anchor, passing, nheads, nheads_k, scorer="last_queries", softcap=0.0, scale=None,
              dtype=torch.float32, exact=False, seed=0):
    def run(rank, world):
        q, k, v = _full_qkv(world, block, nheads, nheads_k, seed=3000 + 11 * world + seed, dtype=dtype)
        opts = dict(anchor_len=anchor, passing_len=passing, scorer=scorer, softcap=softcap, softmax_scale=scale)
        # every collective first, every assertion after (a failing rank must not leave peers waiting)
        ql, kl, vl = (shard(t, "contiguous") for t in (q, k, v))
        with record() as stats:
            out, lse, received = apb_attention(ql, kl, vl, return_lse=True, return_selection=True, **opts)
        again = apb_attention(ql, kl, vl, check=False, **opts)  # no metadata gather: same bits
        rows = slice(rank * block, (rank + 1) * block)
        sels = _selections(q, k, world, anchor, passing, scorer, scale, softcap)
        assert len(received) == world - 1
        for g, (got, want) in enumerate(zip(received, sels)):
            assert got.dtype == torch.int64 and torch.equal(got, want), f"host {g}'s passing block: {got} != {want}"
            eligible = block - anchor if g == 0 else block
            assert got.shape[2] == min(passing, eligible)
        mask = apb_mask(q.shape[1], world, anchor, sels, nheads)
        ref_out, ref_lse = attention_ref(q, k, v, causal=True, mask=mask, softcap=softcap, softmax_scale=scale)
        base_out, base_lse = _baseline(q, k, v, rank, world, anchor, sels, scale, softcap)
        assert out.dtype == q.dtype and out.shape == ql.shape
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], nheads, block)
        assert_close_to_oracle(out, ref_out[:, rows], base_out, name="out")
        assert_close_to_oracle(lse, ref_lse[:, :, rows], base_lse, name="lse")
        assert torch.equal(again, out), "check=False or return_lse changed the output"
        slots = min(anchor + passing, block) if world > 1 else 0  # the documented message size
        want_bytes = q.shape[0] * nheads_k * slots * (4 + 2 * HEADDIM * q.element_size())
        assert stats.bytes_sent == want_bytes and stats.messages == (1 if want_bytes else 0), stats
        if exact:  # passing covers every block: APB is exact causal attention
            assert mask.equal(torch.ones_like(mask).tril()), "the APB mask is not causal"
            exact_out, exact_lse = attention_ref(q, k, v, causal=True, softcap=softcap, softmax_scale=scale)
            assert_close_to_oracle(out, exact_out[:, rows], base_out, name="out vs exact")
            assert_close_to_oracle(lse, exact_lse[:, :, rows], base_lse, name="lse vs exact")
    return run


def _needle(rank, world):
    """A key in host 0's block (past the anchor) with a large q.k for every query: "last_queries" picks it,
    every rank receives it, and host N-1 attends to it."""
    block, anchor, passing, needle = 16, 4, 2, 9
    q, k, v = _full_qkv(world, block, 4, 2, seed=77)
    q[..., 0] += 2.0  # every query leans towards the direction e_0 ...
    k[:, needle] = 0.0
    k[:, needle, :, 0] = 20.0  # ... which the needle holds strongly
    ql, kl, vl = (shard(t, "contiguous") for t in (q, k, v))
    out, lse, received = apb_attention(ql, kl, vl, anchor_len=anchor, passing_len=passing, return_lse=True,
                                       return_selection=True)
    host0 = received[0]
    assert (host0 == needle).any(dim=2).all(), f"the needle {needle} was not selected: {host0}"
    sels = _selections(q, k, world, anchor, passing, "last_queries")
    mask = apb_mask(q.shape[1], world, anchor, sels, 4)
    last = slice((world - 1) * block, world * block)
    assert mask[:, :, last, needle].all(), "host N-1 does not see the needle"
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, mask=mask)
    rows = slice(rank * block, (rank + 1) * block)
    assert_close_to_oracle(out, ref_out[:, rows], ref_out[:, rows], name="out")
    assert_close_to_oracle(lse, ref_lse[:, :, rows], ref_lse[:, :, rows], name="lse")


def _ties(rank, world):
    """A constant score: every host passes its first eligible positions (ties go to the lower position)."""
    block, anchor, passing = 8, 3, 2
    q, k, v = _full_qkv(world, block, 2, 1, seed=5)
    ql, kl, vl = (shard(t, "contiguous") for t in (q, k, v))
    _, received = apb_attention(ql, kl, vl, anchor_len=anchor, passing_len=passing, return_selection=True,
                                scorer=lambda qb, kb: torch.zeros(kb.shape[0], kb.shape[2], kb.shape[1]))
    for g, got in enumerate(received):
        start = g * block + (anchor if g == 0 else 0)
        want = torch.arange(start, start + passing).expand(2, 1, passing)
        assert torch.equal(got, want), f"host {g}: {got} != {want}"


def _expect(error, make_inputs, **options):
    return expect(apb_attention, error, make_inputs, **options)


_good = good(2, seqlen=8)


def _last_rank_longer_k(rank, world):
    q, k, v = _good(rank, world)
    if rank == world - 1:
        k, v = torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    return q, k, v


def _grad(rank, world):
    q, k, v = _good(rank, world)
    return q, k.requires_grad_(), v


def _opts(**kw):
    return dict(dict(anchor_len=2, passing_len=2), **kw)


def _bad_scorer_on_rank0(qb, kb):
    if dist.get_rank() == 0:
        return torch.zeros(kb.shape[0], kb.shape[2], kb.shape[1] + 1)  # one score too many
    return torch.zeros(kb.shape[0], kb.shape[2], kb.shape[1])


# name -> (minimum world size, case)
CASES = {
    "mha_last_queries": (1, _apb_case(8, 2, 3, 2, 2)),
    "gqa_last_queries": (1, _apb_case(8, 2, 3, 4, 2, seed=1)),
    "mqa_key_norm": (1, _apb_case(8, 3, 2, 4, 1, scorer="key_norm", seed=2)),
    "callable_scorer": (1, _apb_case(8, 2, 3, 4, 2, scorer=lambda qb, kb: kb[..., 0].float().transpose(1, 2),
                                     seed=3)),
    "window_shorter_than_block": (1, _apb_case(70, 17, 9, 2, 1, seed=4)),  # 64 observation queries of 70
    "softcap_and_scale": (1, _apb_case(8, 2, 3, 4, 2, softcap=2.0, scale=0.4, seed=5)),
    "fp16": (1, _apb_case(8, 2, 3, 4, 2, dtype=torch.float16, seed=6)),
    "no_anchor_no_passing": (1, _apb_case(8, 0, 0, 2, 1, seed=7)),
    "exact_no_anchor": (1, _apb_case(8, 0, 8, 4, 2, exact=True, seed=8)),
    "exact_with_anchor": (1, _apb_case(8, 3, 11, 2, 1, scorer="key_norm", exact=True, seed=9)),
    "needle_reaches_last_host": (2, _needle),
    "ties_go_to_lower_positions": (1, _ties),
    "anchor_too_long": (1, _expect(ArgumentError, _good, **_opts(anchor_len=8))),
    "anchor_negative": (1, _expect(ArgumentError, _good, **_opts(anchor_len=-1))),
    "passing_bool": (1, _expect(ArgumentError, _good, **_opts(passing_len=True))),
    "unknown_scorer": (1, _expect(ArgumentError, _good, **_opts(scorer="attention"))),
    "scorer_bad_shape_on_rank0": (2, _expect(ShapeError, _good, **_opts(scorer=_bad_scorer_on_rank0))),
    "last_rank_other_passing_len": (2, _expect(ArgumentError, _good, words=("passing_len",),
                                               **_opts(passing_len=by_rank(2, 3)))),
    "last_rank_longer_k": (2, _expect(ShapeError, _last_rank_longer_k, **_opts())),
    "grad_refused": (1, _expect(UnsupportedFeatureError, _grad, **_opts())),
}
