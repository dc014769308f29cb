"""Launch a gloo group of spawned ranks that run cases modules; collect each rank's results.

A test file names its cases module (``tests.parallel.cases_<method>``, whose
``CASES`` maps a name to ``(minimum world size, run(rank, world))``) and gets
its cases' results. Process start-up dominates (seconds per rank on 2 busy
cores), so ONE group per world size runs the cases of every module in
:data:`SHARED_MODULES` (started by the first test that needs that world
size, cached for the session)::

    from tests.parallel.launch import case_params, world_runner
    run_world = world_runner("tests.parallel.cases_ring")
    CASE_PARAMS = case_params(CASES)

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("world,case", CASE_PARAMS)
    def test_case_on_every_rank(run_world, world, case):
        assert_every_rank_ok(run_world(world), world, case)

Every wait is bounded: the group's timeout (30 s, :mod:`tests.parallel.worker`)
inside, the subprocess timeout here, pytest-timeout on each test
(:data:`TEST_TIMEOUT`: the first test of a world size waits for the whole
launch); the processes are killed on any failure, so none are left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longattn.parallel.comm import free_port

ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZES = (1, 2, 3, 4)
LAUNCH_TIMEOUT = 240  # seconds for one whole group (start-up + every case of every shared module)
TEST_TIMEOUT = LAUNCH_TIMEOUT + 60
SHARED_MODULES = (
    "tests.parallel.cases_ring",
    "tests.parallel.cases_token_ring",
    "tests.parallel.cases_ulysses",
    "tests.parallel.cases_apb",
)


def launch(specs: str | tuple[str, ...], world: int, timeout: float = LAUNCH_TIMEOUT) -> dict[str, list[str]]:
    """Run the cases of ``specs`` (``"module[:TABLE]"``, one or several) on one
    group of ``world`` ranks; return ``"SPEC NAME"`` -> each reporting rank's
    result (``"ok"`` or a traceback), rank order. A rank
    that ended without reporting (the dying-rank case) is left out; a rank that
    reports nothing in other runs fails the launch with its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    port = free_port()
    joined = specs if isinstance(specs, str) else ",".join(specs)
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.parallel.worker", joined, str(r), str(world), str(port)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:  # on a timeout or any error: leave no process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    results: dict[str, list[str]] = {}
    for rank, (out, err) in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
        if not lines and "DYING RANK" in out:
            continue
        assert lines, f"rank {rank} of world {world} reported nothing (exit {procs[rank].returncode}):\n{err[-3000:]}"
        for name, result in json.loads(lines[-1][len("RESULTS "):]).items():
            results.setdefault(name, []).append(result)
    return results


_SHARED_RUNS: dict[int, dict[str, list[str]]] = {}


def world_runner(module: str):
    """A pytest fixture ``run_world(world)`` -> case name -> each rank's result
    for ``module`` (one of :data:`SHARED_MODULES`), from the shared launch of
    that world size."""
    assert module in SHARED_MODULES, f"{module} is not in SHARED_MODULES"

    @pytest.fixture
    def run_world():
        def get(world: int) -> dict[str, list[str]]:
            if world not in _SHARED_RUNS:
                _SHARED_RUNS[world] = launch(SHARED_MODULES, world)
            prefix = module + " "
            return {key[len(prefix):]: res for key, res in _SHARED_RUNS[world].items() if key.startswith(prefix)}
        return get

    return run_world


def case_params(cases: dict, world_sizes=WORLD_SIZES) -> list:
    """``pytest.param(world, name)`` for every case and every world size it needs."""
    return [
        pytest.param(world, name, id=f"world{world}-{name}")
        for world in world_sizes
        for name, (min_world, _) in cases.items()
        if world >= min_world
    ]


def assert_every_rank_ok(results: dict[str, list[str]], world: int, case: str, ranks: int | None = None) -> None:
    """Every rank (or ``ranks`` of them, for a case where some rank dies) reported ``"ok"`` for ``case``."""
    got = results.get(case)
    want = world if ranks is None else ranks
    assert got is not None and len(got) == want, f"{case}: {want} ranks expected to report, got {got!r}"
    failures = [f"rank {r}:\n{res}" for r, res in enumerate(got) if res != "ok"]
    assert not failures, "\n".join(failures)
