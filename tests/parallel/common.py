"""Case builders shared by the sequence-parallel methods' cases modules.

Every builder returns ``run(rank, world)`` for a cases table (see
:mod:`tests.parallel.launch`). ``fn`` is the method under test, called as
``fn(q, k, v, causal=..., layout=..., process_group=..., return_lse=...,
check=..., **options)``. Every collective comes before every assertion, so a
rank that fails an assertion never leaves its peers waiting. Outputs, lse and
gradients are compared with the float64 oracle's slice; the tolerance
baseline is eager dense attention of the full sequence, sliced.

A head count may be an int or a function of the (group) world size, for
methods whose head rules depend on it (Ulysses).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.api import attention
from longattn.parallel import local_positions, shard, unshard
from longattn.parallel.stats import record
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle


def heads(spec, world: int) -> int:
    """A head count given as an int or as a function of the world size."""
    return spec(world) if callable(spec) else spec


def full_qkv(world, nheads, nheads_k, seed, dtype=torch.float32):
    """The same full (batch=2, seqlen=6*world, ., headdim=16) q, k, v on every rank."""
    gen = torch.Generator().manual_seed(seed)
    seqlen = 2 * world * 3  # divisible by 2N (zigzag) and N (contiguous); 3 tokens per zigzag chunk
    q = torch.randn(2, seqlen, nheads, 16, generator=gen).to(dtype)
    k = torch.randn(2, seqlen, nheads_k, 16, generator=gen).to(dtype)
    v = torch.randn(2, seqlen, nheads_k, 16, generator=gen).to(dtype)
    return q, k, v


def forward_case(fn, layout, causal, nheads, nheads_k, *, softcap=0.0, scale=None, window=(-1, -1),
                 dtype=torch.float32, group_ranks=None, seed=1000, check_stats=None):
    """out and lse of every rank equal the oracle's slice; ``check=False`` and
    no lse give the same bits; unshard gives the full output.
    ``check_stats(stats, q_full, q_local, nheads_k, rank, world)`` checks the
    call's :mod:`longattn.parallel.stats` record (bytes, messages)."""
    def run(rank, world):
        group, grank, gworld = None, rank, world
        if group_ranks is not None:  # every rank must take part in new_group, members or not
            group = dist.new_group(group_ranks)
            if rank not in group_ranks:
                return
            grank, gworld = dist.get_rank(group), dist.get_world_size(group)
        h, hk = heads(nheads, gworld), heads(nheads_k, gworld)
        q, k, v = full_qkv(gworld, h, hk, seed=seed + 7 * gworld + hk, dtype=dtype)
        opts = dict(causal=causal, softcap=softcap, softmax_scale=scale, window_size=window)
        ql, kl, vl = (shard(t, layout, group=group) for t in (q, k, v))
        with record() as stats:
            out, lse = fn(ql, kl, vl, layout=layout, process_group=group, return_lse=True, **opts)
        again = fn(ql, kl, vl, layout=layout, process_group=group, check=False, **opts)
        full = unshard(out, layout, group=group)
        pos = local_positions(q.shape[1], layout, grank, gworld)
        assert torch.equal(ql, q[:, pos]), "shard is not the layout's slice"
        ref_out, ref_lse = attention_ref(q, k, v, **opts)
        base_out, base_lse = attention(q, k, v, backend="eager", return_lse=True, **opts)
        assert out.shape == ql.shape and out.dtype == q.dtype, (out.shape, out.dtype)
        assert lse.shape == (q.shape[0], h, ql.shape[1]) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
        assert_close_to_oracle(out, ref_out[:, pos], base_out[:, pos], name="out")
        assert_close_to_oracle(lse, ref_lse[:, :, pos], base_lse[:, :, pos], name="lse")
        assert torch.equal(again, out), "return_lse or check=False changed the output bits"
        assert_close_to_oracle(full, ref_out, base_out, name="unsharded out")
        if check_stats is not None:
            check_stats(stats, q, ql, hk, grank, gworld)
    return run


def grad_case(fn, layout, causal, nheads, nheads_k, *, softcap=0.0, window=(-1, -1), with_lse=False,
              dtype=torch.float32, lse_rank=None, seed=2000):
    """dq, dk, dv of this rank's shard equal the slices of the oracle's
    gradients (autograd through attention_ref on the full sequence, same
    random dout; with ``with_lse`` a random gradient flows into lse too -- on
    every rank, or only into ``lse_rank``'s rows)."""
    def run(rank, world):
        h, hk = heads(nheads, world), heads(nheads_k, world)
        q, k, v = full_qkv(world, h, hk, seed=seed + 7 * world + hk, dtype=dtype)
        gen = torch.Generator().manual_seed(77 + world)
        dout = torch.randn(q.shape, generator=gen).to(dtype)
        dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen)
        if with_lse and lse_rank is not None:
            keep = torch.zeros(q.shape[1], dtype=torch.bool)
            keep[local_positions(q.shape[1], layout, lse_rank, world)] = True
            dlse = dlse * keep
        pos = local_positions(q.shape[1], layout, rank, world)
        opts = dict(causal=causal, softcap=softcap, window_size=window)
        leaves = [shard(t, layout).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, layout=layout, return_lse=True, **opts)
        loss = (out.float() * dout[:, pos].float()).sum()
        if with_lse and (lse_rank is None or lse_rank == rank):
            loss = loss + (lse * dlse[:, :, pos]).sum()
        loss.backward()  # collective: every rank runs it before any assertion

        def full_grads(f, dt):
            full = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
            o, l = f(*full)
            total = (o * dout.to(o.dtype)).sum() + ((l * dlse.to(l.dtype)).sum() if with_lse else 0)
            return torch.autograd.grad(total, full)

        ref = full_grads(lambda a, b, c: attention_ref(a, b, c, **opts), torch.float64)
        base = full_grads(lambda a, b, c: attention(a, b, c, backend="eager", return_lse=True, **opts), dtype)
        for name, leaf, r, b in zip(("dq", "dk", "dv"), leaves, ref, base):
            assert leaf.grad is not None and leaf.grad.dtype == dtype, f"{name}: {leaf.grad!r}"
            assert_close_to_oracle(leaf.grad, r[:, pos], b[:, pos], name=name)
    return run


def deterministic_grad_case(fn, nheads=4, nheads_k=2):
    """Two backward passes on the same inputs give bitwise the same gradients."""
    def run(rank, world):
        q, k, v = full_qkv(world, heads(nheads, world), heads(nheads_k, world), seed=5000 + world)
        grads = []
        for _ in range(2):
            leaves = [shard(t, "zigzag").requires_grad_() for t in (q, k, v)]
            fn(*leaves, causal=True).sum().backward()
            grads.append([t.grad for t in leaves])
        for a, b in zip(*grads):
            assert torch.equal(a, b), "two backward passes differ"
    return run


class by_rank:  # noqa: N801 (reads as an option value)
    """An option whose value differs on the last rank (resolved by :func:`expect`)."""

    def __init__(self, value, last_rank_value):
        self.value, self.last = value, last_rank_value

    def on(self, rank, world):
        return self.last if rank == world - 1 else self.value


def expect(fn, error, make_inputs, words=(), **options):
    """Every rank must raise ``error`` (not hang), with each of ``words`` in
    the message, when ``make_inputs(rank, world)`` is fed; the group is still
    usable afterwards. ``make_inputs`` returns ``(q, k, v)``."""
    def run(rank, world):
        q, k, v = make_inputs(rank, world)
        mine = {key: (val.on(rank, world) if isinstance(val, by_rank) else val) for key, val in options.items()}
        try:
            fn(q, k, v, **mine)
        except error as exc:
            for word in words:
                assert word in str(exc), f"{word!r} not in {exc}"
        else:
            raise AssertionError(f"rank {rank} did not raise {error.__name__}")
        t = torch.ones(1)  # a collective completes
        dist.all_reduce(t)
        assert t.item() == world
    return run


def good(nheads=2, seqlen=4):
    """Valid (1, seqlen, nheads, 8) shards on every rank."""
    return lambda rank, world: tuple(torch.randn(1, seqlen, nheads, 8) for _ in range(3))


def last_rank_longer(nheads=2):
    """The last rank's shards are 6 tokens long, the others' 4."""
    def make(rank, world):
        n = 6 if rank == world - 1 else 4
        return tuple(torch.randn(1, n, nheads, 8) for _ in range(3))
    return make


def last_rank_3d(nheads=2):
    """The last rank's q lost its batch dimension."""
    def make(rank, world):
        q, k, v = good(nheads)(rank, world)
        return (q[0] if rank == world - 1 else q), k, v
    return make


def last_rank_grad(nheads=2):
    """Only the last rank's q requires grad."""
    def make(rank, world):
        q, k, v = good(nheads)(rank, world)
        return q.requires_grad_(rank == world - 1), k, v
    return make
