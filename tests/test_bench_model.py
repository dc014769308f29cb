"""`longattn bench model --quick` runs the tiny Llama end to end (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from longattn.cli import main

pytest.importorskip("transformers", minversion="4.51", reason="the model group needs transformers>=4.51")


def test_quick_model_bench_reports_prefill_decode_and_targets(tmp_path):
    assert main(["bench", "model", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [case["size"] for case in results["cases"]] == [64, 128]
    for case in results["cases"]:
        methods = case["methods"]
        assert set(methods) == {"sdpa prefill", "longattn prefill", "sdpa decode 16 tokens",
                                "longattn decode 16 tokens"}
        assert all(m["skipped"] is None and m["median_ms"] is not None for m in methods.values())
        # prefill logits: longattn within float32 rounding of SDPA (the reference is SDPA's own output)
        assert methods["sdpa prefill"]["max_error"] == 0.0
        assert methods["longattn prefill"]["max_error"] < 1e-4
        # decode outputs are (new_tokens, vocab): not compared by the runner, but in the measurements
        assert methods["longattn decode 16 tokens"]["max_error"] is None
        measured = case["measurements"]
        assert measured["longattn decode max logit error vs sdpa decode"] < 1e-4
        assert measured["longattn decode greedy tokens equal sdpa's"] == 1.0
        assert [t["baseline"] for t in case["targets"]] == ["sdpa prefill", "sdpa decode 16 tokens"]
        assert all(t["ratio"] is not None for t in case["targets"])
