"""`longattn bench decode`: both run-level read-bandwidth probes, the
per-case limit (a streaming read of the same bytes in the same rounds), the
75% target and the paged-vs-contiguous check (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from longattn.bench import decode as decode_bench
from longattn.bench import runner
from longattn.bench.report import format_table
from longattn.cli import main


def test_full_size_cases_target_75_percent_of_the_streaming_read():
    assert decode_bench.MIN_BANDWIDTH == 0.75
    for index in range(1, len(decode_bench.FULL) + 1):
        scenario = decode_bench.decode_scenario(index)  # inputs are built lazily: nothing allocated here
        (target,) = scenario.targets
        assert target.method == "longattn cpp" and target.min_bandwidth_fraction == 0.75
    assert decode_bench.decode_scenario(decode_bench.QUICK_OFFSET + 1).targets == ()


def _case(name: str, size: int, cpp_ms: float | None, twin_ms: float | None = None) -> dict:
    methods = {"longattn cpp": {"median_ms": cpp_ms}}
    if twin_ms is not None:
        methods[decode_bench.CONTIGUOUS_TWIN] = {"median_ms": twin_ms}
    return {"scenario": name, "size": size, "methods": methods}


def test_every_case_times_its_own_limit_and_paged_cases_their_contiguous_twin():
    for index in [*range(1, len(decode_bench.FULL) + 1), decode_bench.QUICK_OFFSET + 1]:
        scenario = decode_bench.decode_scenario(index)
        assert scenario.bandwidth_method == decode_bench.STREAM_READ
        assert not scenario.methods[decode_bench.STREAM_READ].compare  # a yardstick, not attention
        assert (decode_bench.CONTIGUOUS_TWIN in scenario.methods) == scenario.name.endswith(" paged")


def test_paged_checks_prefer_the_contiguous_twin_timed_in_the_same_rounds():
    cases = [
        _case("b=1 128k float32 contiguous", 1, 50.0),  # minutes apart: not used when the twin ran
        _case("b=1 128k float32 paged", 2, 104.0, twin_ms=100.0),
    ]
    (check,) = decode_bench.paged_checks(cases)
    assert check["value"] == pytest.approx(1.04) and check["met"] is True
    assert "same rounds" in check["note"]


def test_paged_checks_count_the_rounds_timed_beside_the_contiguous_twin():
    """Each round's paged time / its contiguous twin's in that round; the
    check line says how many rounds were within the limit."""
    case = _case("b=1 128k float32 paged", 2, 104.0, twin_ms=100.0)
    case["methods"]["longattn cpp"]["times_s"] = [0.10, 0.11, 0.20]
    case["methods"][decode_bench.CONTIGUOUS_TWIN]["times_s"] = [0.10, 0.10, 0.10, 0.10]
    (check,) = decode_bench.paged_checks([case])
    assert check["rounds"] == pytest.approx([1.0, 1.1, 2.0])
    text = format_table({
        "group": "decode", "description": "d", "cases": [],
        "machine": {"cpu_model": "cpu", "torch": "t", "torch_threads": 2},
        "settings": {"repeats": 3, "warmup_rounds": 1}, "checks": [check],
    })
    assert "1.04 (limit 1.05, per round 1.00-2.00, median 1.10: 1 of 3 within) -> MET" in text
    twinless = decode_bench.paged_checks([_case("b=1 128k float32 contiguous", 1, 50.0),
                                          _case("b=1 128k float32 paged", 2, 52.0)])
    assert twinless[0]["rounds"] == []  # cases minutes apart: no rounds to pair


def test_paged_checks_compare_each_paged_case_with_its_contiguous_twin():
    cases = [
        _case("b=1 128k float32 contiguous", 1, 100.0),
        _case("b=1 128k float32 paged", 2, 104.0),  # 1.04x: met
        _case("b=1 128k bfloat16 contiguous", 3, 50.0),
        _case("b=1 128k bfloat16 paged", 4, 60.0),  # 1.2x: not met
        _case("b=8 ragged ~16k float32 contiguous", 5, None),  # skipped: not measured
        _case("b=8 ragged ~16k float32 paged", 6, 10.0),
        _case("b=1 4k float32 contiguous", 101, 1.0),  # --quick cases: no check
        _case("b=1 4k float32 paged", 102, 9.0),
    ]
    checks = decode_bench.paged_checks(cases)
    assert [c["met"] for c in checks] == [True, False, None]
    assert checks[0]["value"] == pytest.approx(1.04) and checks[1]["value"] == pytest.approx(1.2)
    assert checks[2]["value"] is None
    assert all(c["limit"] == 1.05 for c in checks)
    text = format_table({
        "group": "decode", "description": "d", "cases": [],
        "machine": {"cpu_model": "cpu", "torch": "t", "torch_threads": 2},
        "settings": {"repeats": 1, "warmup_rounds": 1}, "checks": checks,
    })
    assert "1.04 (limit 1.05) -> MET" in text and "1.2 (limit 1.05) -> NOT MET" in text
    assert "16k float32: not measured" in text


def test_quick_decode_bench_reports_both_probes(tmp_path, capsys):
    argv = ["bench", "decode", "--quick", "--sizes", "101,102", "--methods", "longattn cpp",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    machine = results["machine"]
    assert machine["read_bandwidth_torch_sum_gbps"] > 0
    stream = machine["read_bandwidth_stream"]
    if stream["gbps"] is None:  # no compiler: the fallback, said in the header
        assert machine["read_bandwidth_probe"] == "torch.sum" and "unavailable" in out
    else:
        assert machine["read_bandwidth_probe"] == "stream"
        assert machine["read_bandwidth_gbps"] == stream["gbps"] and stream["gib"] == runner.READ_PROBE_GIB_QUICK
        assert "C++ streaming read" in out and "torch.sum over the same size" in out
    for case in results["cases"]:
        rec = case["methods"]["longattn cpp"]
        limit = case["methods"][decode_bench.STREAM_READ]  # runs whatever --methods selects
        if stream["gbps"] is None:  # no C++ probe: the stream read row is skipped, the run's figure is the limit
            assert limit["skipped"] and case["bandwidth_limit"]["source"] == "run probe"
            assert rec["bandwidth_fraction"] == pytest.approx(rec["gbps"] / machine["read_bandwidth_gbps"])
        else:  # the same bytes, timed in the same rounds
            assert case["bandwidth_limit"] == {"source": decode_bench.STREAM_READ, "gbps": limit["gbps"]}
            assert limit["gbps"] == pytest.approx(case["bytes_read"] / (limit["median_ms"] * 1e-3) / 1e9)
            assert rec["bandwidth_fraction"] == pytest.approx(rec["gbps"] / limit["gbps"])
            assert limit["bandwidth_fraction"] == pytest.approx(1.0) and limit["max_error"] is None
        assert case["targets"] == []  # --quick cases are too small to be memory-bound
    if stream["gbps"] is not None:
        assert "% of bw = GB/s / the same case's stream read row" in out
    assert results["checks"] == []  # and are not compared paged vs contiguous


def test_without_the_cpp_probe_the_bench_falls_back_to_torch_sum(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "measure_stream_bandwidth", lambda gib: {"gbps": None, "reason": "no compiler here"})
    argv = ["bench", "decode", "--quick", "--sizes", "101", "--methods", "longattn cpp",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    machine = json.loads((tmp_path / "results.json").read_text())["machine"]
    assert machine["read_bandwidth_probe"] == "torch.sum"
    assert machine["read_bandwidth_gbps"] == machine["read_bandwidth_torch_sum_gbps"]
    assert "C++ streaming read unavailable: no compiler here" in out


def test_without_the_cpp_probe_every_limit_is_the_torch_sum_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "measure_stream_bandwidth", lambda gib: {"gbps": None, "reason": "no compiler here"})

    def unavailable(inputs):
        raise decode_bench.MethodUnavailable("C++ streaming read unavailable: no compiler here")

    monkeypatch.setattr(decode_bench, "build_stream_read", unavailable)
    argv = ["bench", "decode", "--quick", "--sizes", "101", "--methods", "longattn cpp",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    (case,) = results["cases"]
    assert case["bandwidth_limit"] == {"source": "run probe", "gbps": results["machine"]["read_bandwidth_gbps"]}
    assert "% of bw = GB/s / the torch.sum figure" in out
