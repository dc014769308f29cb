"""The pytest-benchmark suite (benchmarks/, outside the test paths) still runs.

It is not collected by the test command, so nothing else would notice it
breaking: here it runs once at a tiny size with timing disabled, every
method but flex_attention (a ~10 s compile that `longattn bench`'s own tests
cover), and must pass, which includes each method's check against the oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_suite_passes_at_a_tiny_size():
    env = {**os.environ, "LONGATTN_BENCH_SIZES": "64"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "-k", "not flex_attention"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
