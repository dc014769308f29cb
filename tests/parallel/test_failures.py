"""Never hangs: a rank that dies or raises makes the other ranks raise within bounded time.

Each scenario of :mod:`tests.parallel.cases_failures` runs in its own group
(world 2 and 3); the dead rank reports nothing, every survivor must report ok.
"""

from __future__ import annotations

import pytest

from tests.parallel.launch import assert_every_rank_ok, launch

# (table, case, the failing rank dies, world): world 3 has a survivor that is not the failed rank's neighbour
SCENARIOS = [
    ("DIES_BEFORE", "dies_before_the_call", True, 3),
    ("DIES_MID_RING", "dies_mid_ring", True, 2),
    ("DIES_MID_RING", "dies_mid_ring", True, 3),
    ("DIES_BEFORE_POST", "dies_before_survivor_posts", True, 2),
    ("RAISES_MID_RING", "raises_mid_ring", False, 3),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("table,case,dies,world", SCENARIOS, ids=[f"{s[1]}-world{s[3]}" for s in SCENARIOS])
def test_every_survivor_raises(table, case, dies, world):
    spec = f"tests.parallel.cases_failures:{table}"
    results = launch(spec, world, timeout=90)
    assert_every_rank_ok(results, world, f"{spec} {case}", ranks=world - 1 if dies else world)
