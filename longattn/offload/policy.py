"""Placement policy of :class:`longattn.offload.cache.TieredKVCache`, on page counts alone.

Every (layer, sequence) pair ("pair") holds ``n`` pages in position order;
its pages sit in three contiguous ranges by position::

    disk [0, disk)   host [disk, disk + host)   device [disk + host, n)

so a pair is described by its counts ``[disk, host, device]`` and the most
recent pages are always in the highest tier (the invariant the cache's
causal alignment and reopen logic rely on). The *age* of a page is the number
of pages after it in its pair (the last page has age 0). The byte budgets of
the device and host tiers are counted over every layer and sequence together,
in pages: ``budget_bytes // page_bytes``.

- :func:`demote`: after an append, while the device tier holds more pages
  than it may, the oldest device page (the pair with the most device pages)
  moves to the host; then, while the host holds too many, the oldest host
  page (the pair with the most host + device pages) moves to disk. Ties go
  to the pair being appended to, then to the lowest (layer, seq_id): the
  result is deterministic.
- :func:`initial_split`: the same policy from scratch (reopen): the youngest
  pages over all pairs (age 0 of every pair, then age 1, ...; pairs in
  (layer, seq_id) order within one age) fill the device, then the host, the
  rest stay on disk.

Pages are never promoted by :func:`demote` (a page's tier only goes down),
except what the cache itself moves up: the partial last page of a pair being
appended to joins the new pages (see the cache's docstring).
"""

from __future__ import annotations

from collections.abc import Hashable

DISK, HOST, DEVICE = 0, 1, 2


def demote(counts: dict[Hashable, list[int]], cap_device: int, cap_host: int | None,
           current: Hashable | None = None) -> None:
    """Move pages down until the device holds at most ``cap_device`` pages and
    the host at most ``cap_host`` (None: unlimited, no disk tier checks it
    itself). ``counts`` maps a pair key (sortable, e.g. ``(layer, seq_id)``) to
    its ``[disk, host, device]`` counts and is changed in place."""
    total_device = sum(c[DEVICE] for c in counts.values())
    if total_device > cap_device:
        _move(counts, total_device - cap_device, DEVICE, lambda c: c[DEVICE], current)
    if cap_host is not None:
        total_host = sum(c[HOST] for c in counts.values())
        if total_host > cap_host:
            _move(counts, total_host - cap_host, HOST, lambda c: c[HOST] + c[DEVICE], current)


def _move(counts: dict[Hashable, list[int]], excess: int, tier: int, age_of_oldest, current) -> None:
    """Move ``excess`` pages from ``tier`` to ``tier - 1``, oldest first."""
    # Candidates sorted once: the tie-break order (current pair first, then
    # ascending keys) never changes, only the counts do.
    order = sorted(counts, key=lambda key: (key != current, key))
    while excess > 0:
        best, best_age = None, -1
        for key in order:
            c = counts[key]
            if c[tier] > 0 and age_of_oldest(c) > best_age:
                best, best_age = key, age_of_oldest(c)
        c = counts[best]
        # Move several pages at once while this pair stays the oldest: down to
        # one page above the runner-up's oldest age (then the loop re-picks).
        runner_up = max((age_of_oldest(counts[k]) for k in order if k != best and counts[k][tier] > 0), default=-1)
        n = min(excess, c[tier], max(1, best_age - runner_up))
        c[tier] -= n
        c[tier - 1] += n
        excess -= n


def initial_split(npages: dict[Hashable, int], cap_device: int, cap_host: int) -> dict[Hashable, list[int]]:
    """``[disk, host, device]`` per pair for pairs of ``npages`` pages each,
    the youngest pages over all pairs filling the device, then the host."""
    keys = sorted(npages)
    counts = {key: [0, 0, 0] for key in keys}
    room = [cap_device, cap_host]
    age = 0
    while any(npages[key] > age for key in keys) and (room[0] > 0 or room[1] > 0):
        for key in keys:
            if npages[key] > age:
                if room[0] > 0:
                    counts[key][DEVICE] += 1
                    room[0] -= 1
                elif room[1] > 0:
                    counts[key][HOST] += 1
                    room[1] -= 1
        age += 1
    for key in keys:
        counts[key][DISK] = npages[key] - counts[key][HOST] - counts[key][DEVICE]
    return counts
