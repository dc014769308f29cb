"""Smoke test of examples/: each script runs at ``--tiny`` sizes and reports success.

The scripts check their own results (against the float64 oracle or SDPA) and
exit non-zero on a mismatch, so exit code 0 plus their "OK:" line is the
correctness assertion; timings they print are not asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("flash_attn_drop_in.py", "OK: flash-attn code matches the float64 oracle"),
    ("packed_batch.py", "OK: packed and padded results match"),
    ("microbenchmark.py", "OK: all cases match SDPA"),
    ("transformers_model.py", "OK: longattn and longattn_duo generate sdpa's tokens"),
    ("sequence_parallel.py", "OK: ring and Ulysses match single-process attention"),
    ("offload_decode.py", "OK: tiered decode matches in-memory decode, also after reopening"),
]


@pytest.mark.parametrize("script, expected", CASES, ids=[name for name, _ in CASES])
def test_example_runs_tiny(script: str, expected: str) -> None:
    # the scripts run their CPU paths; the interpreter flag set by conftest is not needed there
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--tiny"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert expected in result.stdout, result.stdout
