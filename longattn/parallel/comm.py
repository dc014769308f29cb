"""Process-group facts and the ring's point-to-point exchange.

Every function here takes ``group=None`` (the default process group) or any
subgroup made by ``torch.distributed.new_group``; ranks are group ranks, and
point-to-point peers are translated to global ranks with
``torch.distributed.get_global_rank`` because ``P2POp`` wants global ranks.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longattn.errors import ArgumentError
from longattn.parallel.stats import waiting


@dataclass(frozen=True)
class GroupFacts:
    """This process's place in ``group``: ``rank`` and ``world_size`` are group
    ranks; ``next_global`` / ``prev_global`` are the global ranks of group ranks
    ``rank + 1`` and ``rank - 1`` (mod ``world_size``), the ring's neighbours."""

    group: object
    rank: int
    world_size: int
    next_global: int
    prev_global: int


def group_facts(group: object = None) -> GroupFacts:
    """Read rank, world size and ring neighbours of ``group`` (None = default group).

    Raises ArgumentError when torch.distributed is not initialised (running as
    if alone would silently compute attention over the local shard only) or
    when this process is not a member of ``group``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError(
            "process_group: torch.distributed is not initialised; call torch.distributed.init_process_group "
            "(torchrun does the environment part) before sequence-parallel attention"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ArgumentError(f"process_group: this process (global rank {dist.get_rank()}) is not a member of it")
    world = dist.get_world_size(group)
    resolved = dist.group.WORLD if group is None else group
    nxt = dist.get_global_rank(resolved, (rank + 1) % world)
    prv = dist.get_global_rank(resolved, (rank - 1) % world)
    return GroupFacts(resolved, rank, world, nxt, prv)


def post_ring_exchange(facts: GroupFacts, send: torch.Tensor, recv: torch.Tensor, tag: int = 0, *,
                       name: str | None = None) -> list:
    """Post ``send`` to the next rank and ``recv`` from the previous one; return the works.
    ``tag`` keeps flows posted at different steps (say K/V and gradient
    accumulators) from ever matching each other's messages; ``name``, when
    given, names a failed post (:func:`naming_peer_failures`).

    Both operations are posted together in one ``batch_isend_irecv``, so no
    rank waits for a peer before it has posted its own send: every world size,
    including 2 (where next and previous are the same peer), is deadlock free.
    The caller computes on the block in hand, then waits on the works.
    """
    ops = [
        dist.P2POp(dist.isend, send, facts.next_global, facts.group, tag),
        dist.P2POp(dist.irecv, recv, facts.prev_global, facts.group, tag),
    ]
    if name is None:
        return dist.batch_isend_irecv(ops)
    with naming_peer_failures(name):
        return dist.batch_isend_irecv(ops)


def wait_all(works: list) -> None:
    """Wait for every work; the group's ``timeout`` bounds each wait."""
    for work in works:
        work.wait()


def ring_peers(facts: GroupFacts) -> str:
    """The ring neighbours as an error message names them."""
    return f"{facts.next_global} (send) / {facts.prev_global} (receive)"


@contextmanager
def naming_peer_failures(what: str):
    """Re-raise a RuntimeError from the block (a peer died, or stalled past the
    group's timeout) as ``RuntimeError(f"{what} failed: ...")``: ``what`` names
    the operation, this rank, the step and the peers. Posting can fail as well
    as waiting (gloo raises at post time once it has seen the peer close), so
    both go through here."""
    try:
        yield
    except RuntimeError as exc:
        raise RuntimeError(f"{what} failed: {exc}") from exc


def wait_for_peers(works: list | None, what: str) -> None:
    """Wait for ``works`` (None: nothing was posted), counted as waiting in
    :mod:`longattn.parallel.stats`; a failure is named by ``what`` as in
    :func:`naming_peer_failures`."""
    if works is None:
        return
    with naming_peer_failures(what), waiting():
        wait_all(works)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a process group launched locally
    (``init_method=f"tcp://{host}:{port}"`` or ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
