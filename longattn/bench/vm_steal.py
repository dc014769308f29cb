"""CPU time the hypervisor takes from a virtual machine ("steal"), as Linux counts it.

On a shared VM a timed call can lose much of its wall time to other guests:
the host deschedules a vCPU, and a kernel whose threads meet at a barrier
waits for it. Linux counts that time per CPU in the ``steal`` column of
``/proc/stat``. The bench reads the count around each timed call and reports
the share of the machine's CPU time taken during it, so that a slow round can
be told from a slow kernel (the README's Benchmarks section has a run on
the Intel Xeon VM where one round lost 57% of the CPUs and took 3.5-4.4x
the others' time).

The count is 0 on bare metal and absent off Linux (then: None). It moves in
clock ticks (usually 10 ms), so a share is only given for a call that spans
at least MIN_TICKS ticks of all CPUs' time (0.1 s of wall time on 2 CPUs):
one tick then moves it by at most 5 points. A millisecond call gets None,
not a share of 0% or 100% decided by where the ticks fell.
"""

from __future__ import annotations

import os

STAT_PATH = "/proc/stat"
MIN_TICKS = 20  # the shortest span, in ticks of all CPUs' time, given a share


def _ticks_per_second() -> int:
    """The clock ticks /proc/stat counts in (0 where the OS has no such clock)."""
    try:
        return max(0, os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError):  # no sysconf (not a POSIX system)
        return 0


TICKS_PER_SECOND = _ticks_per_second()


def steal_seconds() -> float | None:
    """Seconds of CPU time taken from this machine's CPUs since boot, summed
    over CPUs (the 8th value of ``/proc/stat``'s ``cpu`` line); None where
    there is no such count."""
    if TICKS_PER_SECOND <= 0:
        return None
    try:
        with open(STAT_PATH) as f:
            fields = f.readline().split()
        ticks = int(fields[8]) if fields and fields[0] == "cpu" and len(fields) > 8 else None
    except (OSError, ValueError):  # no /proc, a strange line
        return None
    return None if ticks is None else ticks / TICKS_PER_SECOND


def steal_fraction(before: float | None, after: float | None, elapsed_s: float) -> float | None:
    """The share of all CPUs' time stolen over ``elapsed_s`` seconds of wall
    time between two :func:`steal_seconds` readings (0 .. 1, clamped: the
    count's ticks need not line up with the wall clock); None without both
    readings or for a span under MIN_TICKS ticks."""
    cpus = os.cpu_count() or 1
    if before is None or after is None or elapsed_s * cpus * TICKS_PER_SECOND < MIN_TICKS:
        return None
    return min(1.0, max(0.0, (after - before) / (elapsed_s * cpus)))
