"""Wall-clock timing of several methods on one case, interleaved.

Each round runs every method once; rounds repeat. Machine drift (frequency,
other processes, page cache) then lands on all methods alike, which is what
makes a ratio measured in one run trustworthy. The order rotates each round,
so each method runs first (after the previous round's last) equally often,
and after every full rotation the cycle reverses, so a method runs after each
of its two neighbours in the cycle (whose caches and allocator state it
inherits), not always after the same one (:func:`round_order`).

Thread count is left as torch sets it: the point is to measure what a user
of this machine gets. Around each call the hypervisor's steal count is read
too (:mod:`longattn.bench.vm_steal`, outside the timed interval), so a
report can say which rounds the VM took CPU time from.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from longattn.bench.vm_steal import steal_fraction, steal_seconds


@dataclass
class Timings:
    """Per method: timed seconds, the first call's output, or why it failed;
    ``steal`` the share of the CPUs' time the hypervisor took during each
    timed call, one per entry of ``seconds`` (None where it cannot be told:
    no steal count, or a call too short for its ticks)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    steal: dict[str, list[float | None]] = field(default_factory=dict)
    first_output: dict[str, object] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    budget_s: float | None = None,
    on_call: Callable[[str, int], None] | None = None,
) -> Timings:
    """Run ``warmup`` untimed then up to ``repeats`` timed rounds of every call.

    The first call's output of each method is kept (for the error check), so
    a warmup round doubles as the correctness run. A call that raises is
    recorded in ``failed`` and dropped from later rounds. With ``budget_s``,
    a method leaves the rotation once another repeat would take its timed
    total past the budget (it always gets at least one timed repeat): a
    method 10x slower than the rest then costs a few seconds, not minutes,
    and the number of repeats it got is in its ``seconds`` list.
    ``on_call(name, round)`` is invoked after each call (progress display).
    """
    result = Timings(seconds={name: [] for name in calls}, steal={name: [] for name in calls})
    names = list(calls)
    for rnd in range(warmup + repeats):
        for name in round_order(names, rnd):
            if name in result.failed or _over_budget(result.seconds[name], budget_s):
                continue
            timed = rnd >= warmup
            stolen_before = steal_seconds() if timed else None  # warmup calls keep no share
            start = time.perf_counter()
            try:
                out = calls[name]()
            except Exception as exc:  # a failing method is reported, not fatal
                result.failed[name] = describe_exception(exc)
            else:
                elapsed = time.perf_counter() - start
                if name not in result.first_output:
                    result.first_output[name] = out
                if timed:
                    result.seconds[name].append(elapsed)
                    result.steal[name].append(steal_fraction(stolen_before, steal_seconds(), elapsed))
                del out  # free before the next method allocates its own
            if on_call is not None:
                on_call(name, rnd)
    for name in result.failed:
        result.seconds.pop(name, None)
        result.steal.pop(name, None)
        result.first_output.pop(name, None)
    return result


def round_order(names: list[str], rnd: int) -> list[str]:
    """The order of round ``rnd``: ``names`` rotated by ``rnd`` places, the
    cycle reversed on every other full rotation (rounds n .. 2n-1 of n names,
    and so on)."""
    if not names:
        return []
    cycle = names if (rnd // len(names)) % 2 == 0 else names[::-1]
    shift = rnd % len(names)
    return cycle[shift:] + cycle[:shift]


def _over_budget(seconds: list[float], budget_s: float | None) -> bool:
    """Whether one more repeat (estimated by the median so far) would pass the budget."""
    if budget_s is None or not seconds:
        return False
    return sum(seconds) + statistics.median(seconds) > budget_s


def paired_ratios(seconds: list[float], baseline: list[float]) -> list[float]:
    """``seconds[i] / baseline[i]``: a method's time over the baseline's in
    the same round, for every round both were timed in.

    Both lists hold consecutive rounds from the first timed one (a method
    leaves the rotation for good, :func:`_over_budget` never turns back, and
    a failed method has no list), so index i is round i in both. The median
    of these is less moved by the machine's drift than a ratio of medians;
    their spread says how far one run's ratio can be trusted.
    """
    return [mine / base for mine, base in zip(seconds, baseline) if base > 0]


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and min in milliseconds (median: robust to a slow outlier;
    min: the best the machine did)."""
    return {
        "median_ms": statistics.median(seconds) * 1e3,
        "min_ms": min(seconds) * 1e3,
    }


def describe_exception(exc: BaseException, limit: int = 240) -> str:
    """One line: type and the first line of the message, truncated."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
