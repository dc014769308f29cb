"""A rank that dies or raises in the middle of ring attention: every other rank raises, in bounded time.

Each table here runs in its own group (a dead rank ends its group), launched by
:mod:`tests.parallel.test_failures`:

- ``DIES_BEFORE``: the last rank exits before the call; the others are in the
  metadata all_gather, which fails when the peer's connection closes.
- ``DIES_MID_RING``: the last rank exits when it should post its last ring
  exchange (``check=False``: no gather first); the others are waiting on
  that exchange, which fails naming the rank and step.
- ``DIES_BEFORE_POST``: the last rank exits at its first ring exchange; the
  others post theirs only a second later, when gloo already knows the peer
  is gone and fails the post itself (not only the wait): that error too
  must name the step.
- ``RAISES_MID_RING``: the last rank raises a Python error instead of posting
  its last exchange and goes on living; the others wait on a subgroup with a 3 s timeout
  and must raise by then (not hang), naming the step; the default group is
  still usable afterwards.

A survivor's case passes when it raised RuntimeError mentioning the step, in
less than ``LIMIT_S``.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

import longattn.parallel.ring as ring_module
from longattn.parallel import ring_attention

LIMIT_S = 20.0
SHORT_TIMEOUT = datetime.timedelta(seconds=3)


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, 8, 2, 8, generator=gen) for _ in range(3))


def _fail_at_last_exchange(how, world):
    """Patch the ring's exchange on THIS rank to die / raise instead of posting
    its last one (``world - 1`` exchanges in a forward)."""
    real, calls = ring_module.post_ring_exchange, []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == world - 1:
            if how == "die":
                print("DYING RANK", flush=True)
                os._exit(3)
            raise ValueError("injected failure on the last rank")
        return real(*args, **kwargs)

    ring_module.post_ring_exchange = patched
    return lambda: setattr(ring_module, "post_ring_exchange", real)


def _survivor_raises(call, needle):
    start = time.perf_counter()
    try:
        call()
    except RuntimeError as exc:
        elapsed = time.perf_counter() - start
        assert elapsed < LIMIT_S, f"raised only after {elapsed:.1f} s"
        assert needle in str(exc), f"the error does not say {needle!r}: {exc}"
        return
    raise AssertionError("a survivor finished the call although a peer failed")


def _dies_before(rank, world):
    q, k, v = _inputs()
    if rank == world - 1:
        print("DYING RANK", flush=True)
        os._exit(3)
    _survivor_raises(lambda: ring_attention(q, k, v, causal=True), "")


def _dies_mid_ring(rank, world):
    q, k, v = _inputs()
    if rank == world - 1:
        _fail_at_last_exchange("die", world)
    _survivor_raises(lambda: ring_attention(q, k, v, causal=True, check=False), "step")


def _dies_before_survivor_posts(rank, world):
    q, k, v = _inputs()
    if rank == world - 1:
        def die(*args, **kwargs):
            print("DYING RANK", flush=True)
            os._exit(3)
        ring_module.post_ring_exchange = die
    else:
        real = ring_module.post_ring_exchange

        def late(*args, **kwargs):
            time.sleep(1.0)  # the peer's connection has closed by now
            return real(*args, **kwargs)
        ring_module.post_ring_exchange = late
    _survivor_raises(lambda: ring_attention(q, k, v, causal=True, check=False), "step")


def _raises_mid_ring(rank, world):
    group = dist.new_group(list(range(world)), timeout=SHORT_TIMEOUT)
    q, k, v = _inputs()
    if rank == world - 1:
        restore = _fail_at_last_exchange("raise", world)
        try:
            ring_attention(q, k, v, causal=True, check=False, process_group=group)
        except ValueError:
            pass
        else:
            raise AssertionError("the injected failure did not raise")
        finally:
            restore()
    else:
        _survivor_raises(lambda: ring_attention(q, k, v, causal=True, check=False, process_group=group), "step")
    # the default group still works for everyone
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == world


DIES_BEFORE = {"dies_before_the_call": (2, _dies_before)}
DIES_MID_RING = {"dies_mid_ring": (2, _dies_mid_ring)}
DIES_BEFORE_POST = {"dies_before_survivor_posts": (2, _dies_before_survivor_posts)}
RAISES_MID_RING = {"raises_mid_ring": (2, _raises_mid_ring)}
