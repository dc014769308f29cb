"""Ring attention and shard/unshard cases, run on every rank by :mod:`tests.parallel.worker`.

Each case is ``run(rank, world)`` in an initialised gloo group; it raises on
failure. Cases that expect an error check that THIS rank raised the named
class (every rank must). Every collective comes before every assertion, so a
rank that fails an assertion never leaves its peers waiting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.api import attention
from longattn.errors import ArgumentError, ShapeError
from longattn.parallel import local_positions, ring_attention, shard, unshard
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle

def _full_qkv(world, nheads, nheads_k, seed, dtype=torch.float32):
    """The same full (batch=2, seqlen=6*world, ., headdim=16) q, k, v on every rank."""
    gen = torch.Generator().manual_seed(seed)
    seqlen = 2 * world * 3  # divisible by 2N (zigzag) and N (contiguous); 3 tokens per zigzag chunk
    q = torch.randn(2, seqlen, nheads, 16, generator=gen).to(dtype)
    k = torch.randn(2, seqlen, nheads_k, 16, generator=gen).to(dtype)
    v = torch.randn(2, seqlen, nheads_k, 16, generator=gen).to(dtype)
    return q, k, v


def _ring_case(layout, causal, nheads, nheads_k, softcap=0.0, scale=None, group_ranks=None, dtype=torch.float32,
               window=(-1, -1)):
    def run(rank, world):
        group, grank, gworld = None, rank, world
        if group_ranks is not None:  # every rank must take part in new_group, members or not
            group = dist.new_group(group_ranks)
            if rank not in group_ranks:
                return
            grank, gworld = dist.get_rank(group), dist.get_world_size(group)
        q, k, v = _full_qkv(gworld, nheads, nheads_k, seed=1000 + 7 * gworld + nheads_k, dtype=dtype)
        # every collective first, every assertion after: a rank that fails an
        # assertion must not leave its peers waiting in a collective it skipped
        ql, kl, vl = (shard(t, layout, group=group) for t in (q, k, v))
        out, lse = ring_attention(ql, kl, vl, causal=causal, softcap=softcap, softmax_scale=scale, layout=layout,
                                  process_group=group, return_lse=True, window_size=window)
        again = ring_attention(ql, kl, vl, causal=causal, softcap=softcap, softmax_scale=scale, layout=layout,
                               process_group=group, check=False, window_size=window)  # no metadata gather: same bits
        full = unshard(out, layout, group=group)
        pos = local_positions(q.shape[1], layout, grank, gworld)
        assert torch.equal(ql, q[:, pos]), "shard is not the layout's slice"
        ref_out, ref_lse = attention_ref(q, k, v, causal=causal, softcap=softcap, softmax_scale=scale,
                                         window_size=window)
        base_out, base_lse = attention(q, k, v, causal=causal, softcap=softcap, softmax_scale=scale,
                                       backend="eager", return_lse=True, window_size=window)
        assert out.dtype == q.dtype and lse.dtype == torch.float32
        assert_close_to_oracle(out, ref_out[:, pos], base_out[:, pos], name="out")
        assert_close_to_oracle(lse, ref_lse[:, :, pos], base_lse[:, :, pos], name="lse")
        assert torch.equal(again, out), "return_lse or check=False changed the output"
        assert_close_to_oracle(full, ref_out, base_out, name="unsharded out")
    return run


def _grad_case(layout, causal, nheads, nheads_k, softcap=0.0, with_lse=False, dtype=torch.float32, window=(-1, -1)):
    """dq, dk, dv of this rank's shard equal the slices of the oracle's gradients
    (autograd through attention_ref on the full sequence, same random dout;
    with ``with_lse`` a random gradient flows into lse too)."""
    def run(rank, world):
        q, k, v = _full_qkv(world, nheads, nheads_k, seed=2000 + 7 * world + nheads_k, dtype=dtype)
        gen = torch.Generator().manual_seed(77 + world)
        dout = torch.randn(q.shape, generator=gen).to(dtype)
        dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen)
        pos = local_positions(q.shape[1], layout, rank, world)
        leaves = [shard(t, layout).requires_grad_() for t in (q, k, v)]
        out, lse = ring_attention(*leaves, causal=causal, softcap=softcap, layout=layout, return_lse=True,
                                  window_size=window)
        loss = (out.float() * dout[:, pos].float()).sum()
        if with_lse:
            loss = loss + (lse * dlse[:, :, pos]).sum()
        loss.backward()  # collective: every rank runs it before any assertion
        def full_grads(fn, dt):
            full = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
            o, l = fn(*full)
            total = (o * dout.to(o.dtype)).sum() + ((l * dlse.to(l.dtype)).sum() if with_lse else 0)
            return torch.autograd.grad(total, full)
        opts = dict(causal=causal, softcap=softcap, window_size=window)
        ref = full_grads(lambda a, b, c: attention_ref(a, b, c, **opts), torch.float64)
        base = full_grads(lambda a, b, c: attention(a, b, c, backend="eager", return_lse=True, **opts), dtype)
        for name, leaf, r, b in zip(("dq", "dk", "dv"), leaves, ref, base):
            assert leaf.grad is not None and leaf.grad.dtype == dtype, f"{name}: {leaf.grad!r}"
            assert_close_to_oracle(leaf.grad, r[:, pos], b[:, pos], name=name)
    return run


def _roundtrip(layout):
    def run(rank, world):
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4 * world, 3, 5, generator=gen)
        lse = torch.randn(2, 3, 4 * world, generator=gen)
        local = shard(x, layout)  # collectives first (see _ring_case)
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


def _expect(error, make_inputs, **options):
    """Every rank must raise ``error`` (not hang) when ``make_inputs(rank, world)`` is fed."""
    def run(rank, world):
        q, k, v = make_inputs(rank, world)
        mine = {key: (val.on(rank, world) if isinstance(val, _by_rank) else val) for key, val in options.items()}
        try:
            ring_attention(q, k, v, **mine)
        except error:
            pass
        else:
            raise AssertionError(f"rank {rank} did not raise {error.__name__}")
        # the group is still usable afterwards: a collective completes
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == world
    return run


def _good(rank, world):
    return torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)


def _last_rank_longer(rank, world):
    n = 6 if rank == world - 1 else 4
    return torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8)


def _last_rank_3d(rank, world):
    q, k, v = _good(rank, world)
    return (q[0] if rank == world - 1 else q), k, v


class _by_rank:
    """An option whose value differs on the last rank (resolved by _expect)."""

    def __init__(self, value, last_rank_value):
        self.value, self.last = value, last_rank_value

    def on(self, rank, world):
        return self.last if rank == world - 1 else self.value


# name -> (minimum world size, case)
CASES = {
    "roundtrip_zigzag": (1, _roundtrip("zigzag")),
    "roundtrip_contiguous": (1, _roundtrip("contiguous")),
    "zigzag_causal_mha": (1, _ring_case("zigzag", True, 4, 4)),
    "zigzag_causal_gqa": (1, _ring_case("zigzag", True, 4, 2)),
    "zigzag_full_gqa": (1, _ring_case("zigzag", False, 4, 1, scale=0.3)),
    "contiguous_causal_gqa": (1, _ring_case("contiguous", True, 4, 2)),
    "contiguous_full_mha": (1, _ring_case("contiguous", False, 2, 2)),
    "zigzag_causal_softcap": (1, _ring_case("zigzag", True, 2, 1, softcap=2.0)),
    "zigzag_causal_fp16": (1, _ring_case("zigzag", True, 4, 2, dtype=torch.float16)),
    "contiguous_causal_bf16": (1, _ring_case("contiguous", True, 2, 2, dtype=torch.bfloat16)),
    "subgroup_zigzag_causal": (3, _ring_case("zigzag", True, 4, 2, group_ranks=[1, 2])),
    "wrong_shape_every_rank_raises": (2, _expect(ShapeError, _last_rank_longer, causal=True)),
    "wrong_ndim_every_rank_raises": (1, _expect(ShapeError, _last_rank_3d, causal=True)),
    "grad_zigzag_causal_gqa": (1, _grad_case("zigzag", True, 4, 2)),
    "grad_zigzag_full_mha": (1, _grad_case("zigzag", False, 2, 2)),
    "grad_contiguous_causal_gqa": (1, _grad_case("contiguous", True, 4, 1)),
    "grad_contiguous_full_gqa": (1, _grad_case("contiguous", False, 4, 2)),
    "grad_zigzag_causal_softcap_lse": (1, _grad_case("zigzag", True, 2, 1, softcap=2.0, with_lse=True)),
    "grad_contiguous_causal_fp16": (1, _grad_case("contiguous", True, 2, 2, dtype=torch.float16)),
    # windows: 3 tokens per zigzag chunk, 6 per rank: (4, 0) reaches one or two chunks back, (7, 5) both ways
    "zigzag_causal_window": (1, _ring_case("zigzag", True, 4, 2, window=(4, 0))),
    "contiguous_causal_window_early_stop": (1, _ring_case("contiguous", True, 4, 2, window=(5, 0))),
    "contiguous_causal_window_one_block": (1, _ring_case("contiguous", True, 2, 1, window=(0, 0))),
    "zigzag_full_window": (1, _ring_case("zigzag", False, 4, 2, window=(7, 5))),
    "contiguous_full_window_right_only": (1, _ring_case("contiguous", False, 2, 2, window=(-1, 2))),
    "grad_zigzag_causal_window": (1, _grad_case("zigzag", True, 4, 2, window=(4, 0))),
    "grad_contiguous_causal_window": (1, _grad_case("contiguous", True, 2, 1, window=(5, 0), with_lse=True)),
    "grad_zigzag_full_window_softcap": (1, _grad_case("zigzag", False, 2, 2, softcap=2.0, window=(3, 8))),
    "causal_right_window_refused": (1, _expect(ArgumentError, _good, window_size=(2, 1), causal=True)),
    "ranks_disagree_on_window": (2, _expect(ArgumentError, _good, window_size=_by_rank((2, 0), (3, 0)),
                                            causal=True)),
}
