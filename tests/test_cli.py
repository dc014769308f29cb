"""``longattn doctor`` and ``longattn bench`` through the CLI entry point."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from longattn.cli import main


def test_doctor_json_lists_backends_and_reasons(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    dense = info["registries"]["dense attention"]["backends"]
    assert list(dense) == ["cpp", "sdpa", "triton", "eager"]
    assert dense["eager"]["usable"] is True and dense["eager"]["reasons"] == []
    for backend in dense.values():  # unusable always comes with a reason
        assert backend["usable"] == (not backend["reasons"])
    assert info["torch"] and info["python"]
    import torch.distributed as dist
    assert ("gloo" in info["distributed_backends"]) == (dist.is_available() and dist.is_gloo_available())


def test_doctor_text_report(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "dense attention backends" in out and "eager" in out and "usable" in out
    # every primitive's registry, and every C++ library with its instruction-set build
    for primitive in ("decode attention", "block-sparse attention", "HiP branch scoring"):
        assert f"{primitive} backends" in out
    assert "flash_cpu.cpp" in out and "hip_score.cpp" in out and "decode_streamk.cpp" in out
    from longattn.kernels.dense.cpp import choose_math, flash_unavailable_reason

    if flash_unavailable_reason() is None:  # which arithmetic each dtype runs
        assert f"bfloat16 -> {choose_math(torch.bfloat16)}" in out and "float32 -> fp32" in out
    from longattn.kernels.hip_score.cpp import bf16_search_arithmetic, score_unavailable_reason

    if score_unavailable_reason() is None:  # and how HiP's search scores bfloat16
        assert f"hip_score.cpp arithmetic for bfloat16: {bf16_search_arithmetic()}\n" in out


def test_quick_bench_writes_checked_results(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", tmp_path, "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "longattn.attention" in table and "sdpa" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["group"] == "dense"
    assert results["cases"], "no cases ran"
    from longattn.bench.machine import FMA_PEAK

    timed = 0
    for case in results["cases"]:
        assert case["error_reference"] == "oracle (float64)"
        # "% of peak" divides by the case's own FMA loop row (the case's flops,
        # same rounds) when it ran, else by the start-of-run probe
        yardstick = case["methods"][FMA_PEAK]
        if yardstick["skipped"]:
            assert case["peak_limit"] == {"source": "run probe", "gflops": results["machine"]["fma_peak"]["gflops"]}
        else:
            assert case["peak_limit"] == {"source": FMA_PEAK, "gflops": yardstick["gflops"]}
            assert yardstick["peak_fraction"] == pytest.approx(1.0) and yardstick["max_error"] is None
            assert "% of peak = GFLOP/s / the same case's fma peak row" in table
        for name, record in case["methods"].items():
            if record["skipped"]:
                continue
            timed += name != FMA_PEAK
            assert record["times_s"] and all(t > 0 for t in record["times_s"]), name
            if name != FMA_PEAK:
                assert math.isfinite(record["max_error"]) and record["max_error"] <= 1e-4, (name, record["max_error"])
            # GFLOP/s is exactly the causal FLOP count over the median time, and a fraction of the case's peak
            seqlen, d, h = case["params"]["seqlen_q"], case["params"]["headdim"], case["params"]["nheads"]
            assert case["flops"] == 4.0 * d * h * seqlen * (seqlen + 1) / 2
            assert record["gflops"] == pytest.approx(case["flops"] / (record["median_ms"] * 1e-3) / 1e9)
            if case["peak_limit"]:
                assert record["peak_fraction"] == pytest.approx(record["gflops"] / case["peak_limit"]["gflops"])
    assert timed >= 3 * len(results["cases"])  # longattn, eager twin, sdpa at least
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "times.png").stat().st_size > 0


def test_without_the_fma_loop_the_peak_is_the_runs_probe(monkeypatch):
    from longattn.bench import machine, runner
    from longattn.bench.scenarios import MethodUnavailable
    from longattn.kernels.support import cpp_build, probes

    def unavailable(flops, threads=None):
        raise cpp_build.BuildError("no C++ compiler on PATH (test)")

    monkeypatch.setattr(probes, "fma_run", unavailable)
    with pytest.raises(MethodUnavailable, match=re.escape("C++ FMA loop unavailable: no C++ compiler on PATH")):
        machine.fma_peak_method(lambda inputs: 1e6).build(None)
    # the row skipped (no GFLOP/s): "% of peak" divides by the run's probe, or by nothing
    from longattn.bench.dense import dense_scenario

    scenario = dense_scenario(64)
    records = {machine.FMA_PEAK: {"gflops": None}, "sdpa": {"gflops": 50.0}}
    assert runner._peak_limit(scenario, records, 200.0) == {"source": "run probe", "gflops": 200.0}
    assert runner._peak_limit(scenario, records, None) is None
    records[machine.FMA_PEAK]["gflops"] = 150.0
    assert runner._peak_limit(scenario, records, 200.0) == {"source": machine.FMA_PEAK, "gflops": 150.0}


def test_quick_bf16_bench_names_the_engine_and_keeps_targets_to_their_sizes(tmp_path, capsys):
    from longattn.kernels.dense.cpp import choose_math, flash_unavailable_reason

    assert main(["bench", "dense-bf16", "--quick", "--out", tmp_path, "--quiet"]) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["group"] == "dense-bf16" and results["cases"]
    for case in results["cases"]:
        assert case["params"]["dtype"] == "bfloat16"
        assert case["targets"] == []  # the targets are for 8k and 32k only
        cpp = case["methods"]["longattn cpp"]
        if flash_unavailable_reason() is None:
            engine = f"engine: {choose_math(torch.bfloat16)}"
            assert cpp["note"] == engine and engine in table
            # against SDPA's bf16 output: both round the output to bf16 once
            assert cpp["max_error"] <= 0.05
        else:
            assert cpp["skipped"]
        # "% of peak" divides by the bf16 loop's row: the case's flops on this machine's fastest bf16 arithmetic
        from longattn.bench.machine import BF16_PEAK
        from longattn.kernels.support.probes import bf16_arithmetic

        yardstick = case["methods"][BF16_PEAK]
        assert case["peak_limit"] == {"source": BF16_PEAK, "gflops": yardstick["gflops"]}
        assert yardstick["peak_fraction"] == pytest.approx(1.0) and yardstick["max_error"] is None
        loop = {"amx": "AMX tile (TDPBF16PS)", "avx512bf16": "AVX512-BF16 dot-product (VDPBF16PS)",
                None: "fp32 FMA (bf16 runs in fp32 in this build)"}[bf16_arithmetic()]
        assert yardstick["note"] == f"the limit: register-only {loop} loop of the case's flops, same rounds"
        for name, record in case["methods"].items():
            if not record["skipped"]:
                assert record["peak_fraction"] == pytest.approx(record["gflops"] / yardstick["gflops"]), name
    assert "% of peak = GFLOP/s / the same case's bf16 peak row" in table


def test_unknown_group_is_a_clear_error(capsys):
    assert main(["bench", "nosuchgroup"]) == 2
    err = capsys.readouterr().err
    assert "group must be one of [" in err and "'dense'" in err and "'decode'" in err and "'nosuchgroup'" in err


def test_bad_sizes_are_a_clear_error(capsys):
    assert main(["bench", "--sizes", "12,abc"]) == 2
    assert "--sizes must be comma-separated positive integers" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    run = subprocess.run(
        [sys.executable, "-m", "longattn", "doctor", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "dense attention" in json.loads(run.stdout)["registries"]


def test_simulate_parallel_quick_preset(tmp_path, capsys):
    assert main(["simulate", "parallel", "--quick", "--preset", "h100-nvlink", "--out", tmp_path]) == 0
    out = capsys.readouterr().out
    assert "profile 'h100-nvlink'" in out and "published figures" in out and "winner" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["ranks"] == [2, 4, 8, 16] and len(results["cells"]) == 8
    for cell in results["cells"]:
        times = {m: v["time_s"] for m, v in cell["methods"].items() if v["time_s"] is not None}
        assert cell["winner"] == min(times, key=times.get)
    plot = results["files"]["plot"]
    assert plot is not None or any("matplotlib" in n for n in results["notes"])


def test_simulate_parallel_bad_profile_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"format": "longattn-parallel-profile", "version": 1}))
    assert main(["simulate", "parallel", "--profile", bad, "--out", tmp_path]) == 2
    assert "error: profile field 'attention' must be a JSON object" in capsys.readouterr().err
    assert main(["simulate", "parallel", "--preset", "tpu"]) == 2
    assert "preset must be one of" in capsys.readouterr().err


def test_peak_fraction_targets_are_judged_and_printed():
    """A Target with min_peak_fraction is met exactly when the method's
    GFLOP/s reach that fraction of the FMA peak measured in the run."""
    from longattn.bench.dense import PEAK_TARGET, dense_scenario
    from longattn.bench.report import _target_line
    from longattn.bench.runner import _target_verdict

    scenario = dense_scenario(8192)
    assert PEAK_TARGET in scenario.targets
    for fraction, met in ((0.71, True), (0.69, False), (None, None)):
        records = {"longattn.attention": {"median_ms": 1.0, "peak_fraction": fraction}, "sdpa": {"median_ms": 1.0}}
        verdict = _target_verdict(scenario, PEAK_TARGET, records)
        assert verdict["met"] is met
        line = _target_line({"scenario": scenario.name}, verdict)
        assert ">= 70% of the FMA peak" in line
        if met is not None:
            assert f"{100 * fraction:.0f}% of the FMA peak" in line and ("NOT MET" in line) == (not met)


def test_ratio_targets_report_their_rounds():
    """Beside the ratio of medians, a ratio target counts the rounds whose own
    time / the baseline's time in that round is within the limit, and the
    table shows each method's lowest and highest per-round ratio."""
    from longattn.bench.dense import dense_scenario
    from longattn.bench.report import _round_range, _target_line
    from longattn.bench.runner import _target_verdict
    from longattn.bench.scenarios import Target

    scenario = dense_scenario(8192)
    target = Target("longattn.attention", max_ratio=1.1, note="n")
    records = {"longattn.attention": {"median_ms": 1.2e3, "times_s": [1.0, 1.2, 1.5, 1.1]},
               "sdpa": {"median_ms": 1.0e3, "times_s": [1.0, 1.0, 1.0, 1.0, 1.0]}}
    verdict = _target_verdict(scenario, target, records)
    assert verdict["round_ratios"] == [1.0, 1.2, 1.5, 1.1] and verdict["met"] is False
    line = _target_line({"scenario": scenario.name}, verdict)
    assert "1.2x (per round 1.00-1.50, median 1.15: 2 of 4 within) -> NOT MET" in line
    assert _round_range([0.9]) == "" and _round_range([1.25, 0.875]) == "0.88-1.25"


def test_fraction_targets_report_their_rounds():
    """A % of peak target counts the rounds where the method reached the
    fraction of the same round's yardstick row (the row's time / its time)."""
    from longattn.bench.dense import PEAK_TARGET, dense_scenario
    from longattn.bench.report import _target_line
    from longattn.bench.runner import _target_verdict

    scenario = dense_scenario(8192)
    assert scenario.peak_method is not None
    records = {"longattn.attention": {"median_ms": 1.0e3, "peak_fraction": 0.72, "times_s": [1.0, 1.6, 1.25]},
               scenario.peak_method: {"median_ms": 0.72e3, "times_s": [0.75, 0.8, 0.9, 0.7]},
               "sdpa": {"median_ms": 1.0e3}}
    verdict = _target_verdict(scenario, PEAK_TARGET, records)
    assert verdict["round_peak_fractions"] == pytest.approx([0.75, 0.5, 0.72]) and verdict["met"] is True
    line = _target_line({"scenario": scenario.name}, verdict)
    assert "72% of the FMA peak (per round 50%-75%, median 72%: 2 of 3 within) -> MET" in line


def test_the_table_shows_vm_steal_only_where_the_hypervisor_took_time():
    """A "VM steal" column (lowest-highest share over a method's timed calls,
    passing over calls too short to tell) appears once any call lost CPU
    time to the hypervisor; on bare metal (all 0) or without the count (no
    figures) the table has no such column."""
    from longattn.bench.report import format_table

    def results(steal_a, steal_b):
        rec = {"median_ms": 1.0, "min_ms": 1.0, "times_s": [1e-3] * 3, "ratio": None, "max_error": None,
               "setup_s": None, "note": None, "skipped": None}
        return {
            "group": "g", "description": "d",
            "machine": {"cpu_model": "cpu", "torch": "t", "torch_threads": 2},
            "settings": {"repeats": 3, "warmup_rounds": 1},
            "cases": [{"scenario": "s", "error_reference": "ref", "baseline": "b", "methods": {
                "a": {**rec, "steal_fractions": steal_a}, "b": {**rec, "steal_fractions": steal_b}}}],
        }

    text = format_table(results([0.031, None, 0.27, 0.12], [0.0, 0.0, 0.0, None]))
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("scenario"))
    header, row_a, row_b = lines[at], lines[at + 2], lines[at + 3]
    assert "per round  VM steal  max error" in header and "VM steal = " in text
    assert row_a.split()[-1] == "3-27%" and row_b.split()[-2:] == ["0%", "baseline"]
    for quiet in (results([0.0] * 3, [0.0] * 3), results([None] * 3, [None] * 3), results([], [])):
        assert "steal" not in format_table(quiet)
