"""`longattn bench varlen --quick` runs and reports both targets (no timing assertions)."""

from __future__ import annotations

import json

from longattn.cli import main


def test_quick_varlen_bench_reports_its_targets(tmp_path, capsys):
    assert main(["bench", "varlen", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (case,) = results["cases"]
    methods = case["methods"]
    assert set(methods) == {"longattn varlen", "one dense call (same work)", "sdpa padded"}
    assert methods["one dense call (same work)"]["max_error"] is None  # a yardstick, not compared
    assert methods["longattn varlen"]["max_error"] < 1e-4 and methods["sdpa padded"]["max_error"] < 1e-4
    assert len(case["targets"]) == 2
