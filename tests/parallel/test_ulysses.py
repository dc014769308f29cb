"""Ulysses attention on real gloo process groups (forward and backward).

For each world size (1-4) one group of spawned processes runs every case of
:mod:`tests.parallel.cases_ulysses` (see :mod:`tests.parallel.launch`); each
case passes when every rank reported it ok. Each rank compares its output,
lse and gradients with its slice of the float64 oracle (tolerance rule:
baseline = eager dense attention of the full sequence, sliced).
"""

from __future__ import annotations

import pytest

from tests.parallel.cases_ulysses import CASES
from tests.parallel.launch import TEST_TIMEOUT, assert_every_rank_ok, case_params, world_runner

run_world = world_runner("tests.parallel.cases_ulysses")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("world,case", case_params(CASES))
def test_case_on_every_rank(run_world, world, case):
    assert_every_rank_ok(run_world(world), world, case)
