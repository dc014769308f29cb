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
        assert set(methods) == {f"{impl} {what}" for impl in ("sdpa", "longattn", "longattn_hip", "longattn_streaming",
                                                               "longattn_duo")
                                for what in ("prefill", "decode 16 tokens")}
        assert all(m["skipped"] is None and m["median_ms"] is not None for m in methods.values())
        # prefill logits: longattn within float32 rounding of SDPA (the reference is SDPA's own output)
        assert methods["sdpa prefill"]["max_error"] == 0.0
        assert methods["longattn prefill"]["max_error"] < 1e-4
        # decode outputs are (new_tokens, vocab): not compared by the runner, but in the measurements
        assert methods["longattn decode 16 tokens"]["max_error"] is None
        measured = case["measurements"]
        assert measured["longattn decode max logit error vs sdpa decode"] < 1e-4
        assert measured["longattn decode greedy tokens equal sdpa's"] == 1.0
        # the sparse rows differ from dense attention by their approximation only (tiny prompts: small)
        assert all(methods[f"{impl} prefill"]["max_error"] is not None
                   for impl in ("longattn_hip", "longattn_streaming", "longattn_duo"))
        assert case["targets"] == []  # the issue's targets name 16k (prefill) and 32k (decode)


def test_targets_sit_at_the_contexts_the_issue_names():
    from longattn.bench.model import _targets

    assert [t.method for t in _targets(16384)] == ["longattn prefill"]
    assert [(t.method, t.baseline) for t in _targets(32768)] == [("longattn decode 16 tokens", "sdpa decode 16 tokens")]
    assert _targets(4096) == ()


def test_methods_filter_runs_only_the_named_rows(tmp_path):
    assert main(["bench", "model", "--quick", "--sizes", "64", "--methods", "longattn decode,sdpa decode", "--out",
                 str(tmp_path), "--quiet"]) == 0
    (case,) = json.loads((tmp_path / "results.json").read_text())["cases"]
    ran = {name for name, m in case["methods"].items() if m["skipped"] is None}
    assert ran == {"sdpa decode 16 tokens", "longattn decode 16 tokens"}
    assert case["methods"]["sdpa prefill"]["skipped"] == "not selected (--methods)"
    assert case["measurements"]["longattn decode greedy tokens equal sdpa's"] == 1.0


def test_methods_filter_that_matches_nothing_is_named(capsys):
    assert main(["bench", "model", "--quick", "--methods", "nothing-like-this"]) != 0
    assert "no method of group 'model' matches ['nothing-like-this']" in capsys.readouterr().err
