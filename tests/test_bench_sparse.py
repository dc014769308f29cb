"""`longattn bench hip` and `streaming`: they run, check against the primitives, and measure quality."""

from __future__ import annotations

import json
import math

import torch

from longattn.cli import main


def test_hip_bench_where_topk_covers_everything_measures_dense(tmp_path, capsys):
    # At 600 tokens HiP's default topk (512) covers every searchable range, so
    # HiP is dense attention: recall 1, every needle seen, error vs dense ~0.
    assert main(["bench", "hip", "--sizes", "600", "--repeats", "1", "--out", tmp_path, "--quiet"]) == 0
    assert "measured at hip H=8 600" in capsys.readouterr().out
    case = json.loads((tmp_path / "results.json").read_text())["cases"][0]
    methods = case["methods"]
    # the same keys as the eager twin (the reference), through the C++ kernel: fp32 rounding apart
    assert methods["longattn hip"]["max_error"] <= 1e-4
    assert methods["sdpa"]["max_error"] <= 1e-4  # dense == HiP here
    m = case["measurements"]
    assert m["recall (dense mass kept)"] > 1 - 1e-5 and m["needles seen"] == 1.0
    assert m["rel error vs dense"] < 1e-5 and m["mask search s"] > 0
    assert case["targets"] == []


def test_hip_bench_quick_runs(tmp_path, capsys):
    assert main(["bench", "hip", "--quick", "--repeats", "1", "--out", tmp_path, "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for case in results["cases"]:
        m = case["measurements"]
        assert 0 < m["recall (dense mass kept)"] <= 1 + 1e-6 and 0 <= m["needles seen"] <= 1
        assert math.isfinite(m["rel error vs dense"])
        assert case["methods"]["longattn hip"]["max_error"] <= 1e-4  # vs the eager twin, same selection
        # the bf16 row names the arithmetic its C++ search and attention run here
        from longattn.kernels.dense.cpp import choose_math, flash_unavailable_reason
        from longattn.kernels.hip_score.cpp import bf16_search_arithmetic, score_unavailable_reason

        note = case["methods"]["longattn hip bf16"]["note"] or ""
        if score_unavailable_reason() is None:
            assert f"search: {bf16_search_arithmetic()}" in note
        if flash_unavailable_reason() is None:
            assert f"attention: {choose_math(torch.bfloat16)}" in note


def test_streaming_bench_where_the_window_covers_everything_is_dense(tmp_path, capsys):
    # 600 tokens < sink 64 + window 1024: the Lambda mask is the causal mask.
    assert main(["bench", "streaming", "--sizes", "600", "--repeats", "1", "--out", tmp_path, "--quiet"]) == 0
    case = json.loads((tmp_path / "results.json").read_text())["cases"][0]
    assert case["methods"]["longattn streaming"]["max_error"] <= 1e-5
    assert case["methods"]["sdpa"]["max_error"] <= 1e-4


def test_duo_bench_quick_memory_matches_the_formula(tmp_path):
    assert main(["bench", "duo", "--quick", "--repeats", "1", "--out", tmp_path, "--quiet"]) == 0
    cases = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert [c["params"]["kind"] for c in cases] == ["prefill", "decode"]
    for case in cases:
        assert abs(case["measurements"]["allocated / formula"] - 1.0) < 0.01
        assert case["measurements"]["dense cache / duo cache"] > 1.5
    decode = cases[1]["methods"]
    assert decode["longattn dense"]["max_error"] <= 1e-4  # dense decode equals SDPA
