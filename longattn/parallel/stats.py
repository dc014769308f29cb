"""Per-rank accounting of a sequence-parallel call: compute time, communication wait, bytes sent.

The parallel functions report what they do through three calls, which cost
one global lookup when nobody is recording:

- ``with compute():`` around local attention work (wall and this thread's CPU
  time are both kept: with more ranks than cores, CPU time is what one rank
  would take alone);
- ``with waiting():`` around every wait for a peer (the communication that
  compute did not hide);
- ``sent(nbytes)`` for every message this rank posts (point-to-point payload,
  or this rank's share of a collective, as documented at the call).

A benchmark wraps the call in :func:`record`::

    with record() as s:
        ring_attention(q, k, v, causal=True)
    s.compute_s, s.compute_cpu_s, s.wait_s, s.bytes_sent, s.messages

Recording is per process (one rank per process); nested records are refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from longattn.errors import ArgumentError


@dataclass
class CallStats:
    """What one rank did during a :func:`record` block (seconds, bytes)."""

    compute_s: float = 0.0  # wall time inside compute()
    compute_cpu_s: float = 0.0  # this thread's CPU time inside compute()
    wait_s: float = 0.0  # wall time inside waiting()
    bytes_sent: int = 0
    messages: int = 0
    wall_s: float = 0.0  # the whole record block


_current: CallStats | None = None


@contextmanager
def record() -> Iterator[CallStats]:
    """Collect :class:`CallStats` for the parallel calls made inside the block."""
    global _current
    if _current is not None:
        raise ArgumentError("longattn.parallel.stats.record: already recording (records do not nest)")
    stats = CallStats()
    _current = stats
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.wall_s = time.perf_counter() - start
        _current = None


@contextmanager
def compute() -> Iterator[None]:
    """Time local attention work (no-op unless recording)."""
    stats = _current
    if stats is None:
        yield
        return
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        stats.compute_s += time.perf_counter() - wall
        stats.compute_cpu_s += time.thread_time() - cpu


@contextmanager
def waiting() -> Iterator[None]:
    """Time a wait for peers (no-op unless recording)."""
    stats = _current
    if stats is None:
        yield
        return
    wall = time.perf_counter()
    try:
        yield
    finally:
        stats.wait_s += time.perf_counter() - wall


def sent(nbytes: int, messages: int = 1) -> None:
    """Count ``nbytes`` posted by this rank in ``messages`` messages (no-op unless recording)."""
    stats = _current
    if stats is not None:
        stats.bytes_sent += int(nbytes)
        stats.messages += messages
