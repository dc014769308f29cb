"""`longattn bench sparse-decode --quick` runs every method end to end (no timing assertions)."""

from __future__ import annotations

import json

import torch

from longattn.bench.sparse_decode import METHODS, make_workload, step_bytes
from longattn.cli import main


def test_quick_step_and_quality_cases(tmp_path):
    assert main(["bench", "sparse-decode", "--quick", "--sizes", "101,103,104", "--repeats", "1", "--out",
                 str(tmp_path), "--quiet"]) == 0
    step, tidal, quality = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert all(m["skipped"] is None and m["median_ms"] is not None for m in step["methods"].values())
    # the tidal selection layer is dense decode plus a top-k: its output is exact
    assert step["methods"]["tidal selection layer"]["max_error"] < 1e-5
    assert all(m["skipped"] is None for m in tidal["methods"].values())
    measured = quality["measurements"]
    for name in METHODS:
        for frac in (64, 16, 4):
            assert 0.0 <= measured[f"1/{frac} {name} top-k recall"] <= 1.0
            assert 0.0 < measured[f"1/{frac} {name} dense mass kept"] <= 1.0 + 1e-6
        assert f"1/16 {name} error / oracle's (target <= 2)" in measured
    # a larger budget keeps at least as much of the dense attention
    assert measured["1/4 quest dense mass kept"] >= measured["1/64 quest dense mass kept"]


def test_bytes_per_step_count_metadata_and_selected_rows():
    w = make_workload(4096, torch.float32, seed=0, budget=512)
    figures = step_bytes(w)
    kv_row = 8 * 128 * 4
    assert figures["dense MB read per step"] == 2 * 4096 * kv_row / 1e6
    assert figures["quest MB read per step (float32 min/max per page + selected K/V)"] == (
        2 * 256 * kv_row + 2 * 512 * kv_row) / 1e6
