"""longattn.parallel on real gloo process groups: shard/unshard and ring attention (forward and backward).

For each world size (1-4) one group of spawned processes (``python -m
tests.parallel.worker``, on a free local port) runs every case of
``tests.parallel.worker.CASES``; each case below passes when every rank
reported it ok. Each rank compares its output and lse with its slice of the
float64 oracle (tolerance rule: baseline = eager dense attention of the full
sequence, sliced). Every wait is bounded: the group's timeout (30 s) inside,
the subprocess timeout here, and pytest-timeout on each test; the processes
are killed on any failure, so none are left behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.worker import CASES

ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZES = (1, 2, 3, 4)
LAUNCH_TIMEOUT = 100  # seconds for one whole group (start-up + every case)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int) -> dict[str, list[str]]:
    """Run one group of ``world`` ranks; return case -> each rank's result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.parallel.worker", str(r), str(world), str(port)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=LAUNCH_TIMEOUT))
    finally:
        for p in procs:  # on a timeout or any error: leave no process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    results: dict[str, list[str]] = {}
    for rank, (out, err) in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
        assert lines, f"rank {rank} of world {world} reported nothing (exit {procs[rank].returncode}):\n{err[-3000:]}"
        for name, result in json.loads(lines[-1][len("RESULTS "):]).items():
            results.setdefault(name, []).append(result)
    return results


_RUNS: dict[int, dict[str, list[str]]] = {}


@pytest.fixture(scope="module")
def run_world():
    def get(world: int) -> dict[str, list[str]]:
        if world not in _RUNS:
            _RUNS[world] = _launch(world)
        return _RUNS[world]
    yield get
    _RUNS.clear()


CASE_PARAMS = [
    pytest.param(world, name, id=f"world{world}-{name}")
    for world in WORLD_SIZES
    for name, (min_world, _) in CASES.items()
    if world >= min_world
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,case", CASE_PARAMS)
def test_case_on_every_rank(run_world, world, case):
    results = run_world(world).get(case)
    assert results is not None and len(results) == world, f"{case}: {world} ranks expected, got {results!r}"
    failures = [f"rank {r}:\n{res}" for r, res in enumerate(results) if res != "ok"]
    assert not failures, "\n".join(failures)
