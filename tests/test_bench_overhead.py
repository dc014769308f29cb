"""`longattn bench overhead` and `longattn bench auto` run and report (tiny settings, no timing assertions)."""

from __future__ import annotations

import json

from longattn.cli import main


def test_overhead_bench_quick_runs_and_checks_every_case(tmp_path, capsys):
    assert main(["bench", "overhead", "--quick", "--repeats", "1", "--out", tmp_path, "--quiet"]) == 0
    assert "decode 1 query, 16 cached" in capsys.readouterr().out
    cases = json.loads((tmp_path / "results.json").read_text())["cases"]
    kinds = {(c["params"]["kind"], c["params"]["tokens"], c["params"]["dtype"]) for c in cases}
    assert kinds == {(kind, n, dt) for kind, sizes in (("decode", (16, 256, 1024)), ("dense", (1, 16, 64)))
                     for n in sizes for dt in ("float32", "bfloat16")}
    for case in cases:
        for name in ("longattn", "sdpa"):
            rec = case["methods"][name]
            assert rec["skipped"] is None and rec["median_ms"] > 0 and rec["ratio"] is not None
            # against the float64 oracle: within bf16/fp32 rounding of a 128-dim softmax average
            assert rec["max_error"] <= (5e-2 if case["params"]["dtype"] == "bfloat16" else 1e-4)


def test_overhead_bench_full_case_has_the_target(tmp_path):
    # case 4 is dense at 1 token in float32: the cheapest full-size case
    assert main(["bench", "overhead", "--sizes", "4", "--repeats", "1", "--out", tmp_path, "--quiet"]) == 0
    case = json.loads((tmp_path / "results.json").read_text())["cases"][0]
    assert case["params"] == {**case["params"], "kind": "dense", "tokens": 1, "dtype": "float32"}
    (target,) = case["targets"]
    assert target["method"] == "longattn" and target["baseline"] == "sdpa" and target["max_ratio"] == 1.2
    assert target["ratio"] is not None and target["met"] in (True, False)


def test_auto_bench_quick_reports_auto_against_every_twin(tmp_path, capsys):
    assert main(["bench", "auto", "--quick", "--repeats", "1", "--out", tmp_path, "--quiet"]) == 0
    assert "auto causal bfloat16" in capsys.readouterr().out
    cases = json.loads((tmp_path / "results.json").read_text())["cases"]
    assert sorted({c["params"]["dtype"] for c in cases}) == ["bfloat16", "float16", "float32"]
    for case in cases:
        methods = case["methods"]
        assert set(methods) == {"auto", "cpp", "sdpa", "eager"}
        assert methods["auto"]["median_ms"] > 0 and methods["auto"]["max_error"] is not None
        assert {t["baseline"] for t in case["targets"]} == {"cpp", "sdpa", "eager"}
        assert all(t["method"] == "auto" and t["max_ratio"] == 1.05 for t in case["targets"])
