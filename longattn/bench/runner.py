"""Run a benchmark group: build, time, check and record every case.

Per case: make the inputs, build every method (compiles happen here, timed
separately and reported as ``setup_s``), time the methods interleaved, then
compare each method's first output with the scenario's reference. The result
is a JSON-ready dict, written to ``out_dir`` with a plot by :mod:`.report`.
"""

from __future__ import annotations

import datetime
import gc
import os
import time
from collections.abc import Sequence
from typing import Any

from longattn.bench.machine import machine_info, measure_fma_peak, measure_read_bandwidth, measure_stream_bandwidth
from longattn.bench.progress import Progress
from longattn.bench.report import PLOT_NAME, write_outputs
from longattn.bench.scenarios import Scenario, get_group, max_abs_error
from longattn.bench.timing import describe_exception, paired_ratios, summarize, time_interleaved
from longattn.errors import ArgumentError

WARMUP_ROUNDS = 1
QUICK_SKIP_REASON = "slow setup (torch.compile takes tens of seconds); skipped by --quick"


# Size of the read-bandwidth probes (GiB): the largest full-size decode case
# reads 1 GiB of cache (128k x 8 heads x 128 x fp32, K and V); --quick runs less.
READ_PROBE_GIB = 1.0
READ_PROBE_GIB_QUICK = 0.25

def default_out_dir(group: str) -> str:
    """``./longattn-results/<group>-<timestamp>/``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("longattn-results", f"{group}-{stamp}")


NOT_SELECTED_REASON = "not selected (--methods)"


def run_group(
    group: str,
    *,
    sizes: Sequence[int] | None = None,
    repeats: int | None = None,
    quick: bool = False,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    methods: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Benchmark every scenario of ``group``; write JSON and a plot to ``out_dir``.

    Args:
        group: a registered group name (``longattn.bench.scenarios.group_names()``).
        sizes: the sizes to run (default: the group's, or its quick sizes).
        repeats: timed rounds per case, after one warmup. Default: the
            group's, shortened for a method whose repeats would pass the
            group's time budget; an explicit value is run in full.
        quick: tiny sizes, and methods with a slow setup (compiles) skipped.
        seed: seed of every case's inputs.
        out_dir: results folder (default ``./longattn-results/<group>-<timestamp>/``).
        quiet: no live progress bar, only one line per finished case.
        methods: run only the methods whose names contain one of these
            substrings (the others are table rows marked not selected; a
            ratio or target whose baseline was not run is reported as not
            measured). None runs every method.

    Returns:
        The results dict also written to ``out_dir/results.json``.
    """
    spec = get_group(group)
    budget_s = spec.method_budget_s if repeats is None else None
    repeats = spec.default_repeats if repeats is None else repeats
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ArgumentError(f"repeats must be a positive integer, got {repeats!r}")
    if methods is not None:
        methods = tuple(methods)
        if not methods or any(not isinstance(m, str) or not m for m in methods):
            raise ArgumentError(f"methods must be non-empty name substrings, got {methods!r}")
    if sizes is None:
        sizes = spec.quick_sizes if quick else spec.sizes
    sizes = list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ArgumentError(f"sizes must be positive integers, got {sizes!r}")

    scenarios = spec.scenarios(sizes)
    if methods is not None:
        names = {name for s in scenarios for name in s.methods}
        if not any(m in name for m in methods for name in names):
            raise ArgumentError(f"no method of group {group!r} matches {list(methods)}; its methods: {sorted(names)}")
    progress = Progress(len(scenarios), quiet=quiet)
    started = time.perf_counter()
    machine = machine_info()
    bandwidth = None
    if any(s.bytes_read for s in scenarios):
        # Two probes in the same run: one torch.sum (single pass, the figure
        # MACHINE.md quotes) and the C++ multi-threaded streaming read, the
        # fair limit ("% of bw" divides by it; by torch.sum only when the C++
        # probe cannot be built). Sized like the largest full-size case's
        # cache (decode: 1 GiB), well past the last-level cache.
        progress.status("measuring memory read bandwidth")
        gib = READ_PROBE_GIB_QUICK if quick else READ_PROBE_GIB
        machine["read_bandwidth_torch_sum_gbps"] = measure_read_bandwidth(gib)
        stream = measure_stream_bandwidth(gib)
        machine["read_bandwidth_stream"] = stream
        if stream.get("gbps"):
            bandwidth, machine["read_bandwidth_probe"] = stream["gbps"], "stream"
        else:
            bandwidth, machine["read_bandwidth_probe"] = machine["read_bandwidth_torch_sum_gbps"], "torch.sum"
        machine["read_bandwidth_gbps"] = bandwidth
    peak = None
    if any(s.flops for s in scenarios):
        progress.status("measuring the FMA peak")
        peak = measure_fma_peak()
        machine["fma_peak"] = peak
    peak_gflops = None if peak is None else peak.get("gflops")
    cases = [
        run_case(s, repeats=repeats, budget_s=budget_s, quick=quick, seed=seed, progress=progress,
                 bandwidth_gbps=bandwidth, methods=methods, peak_gflops=peak_gflops)
        for s in scenarios
    ]
    results: dict[str, Any] = {
        "group": spec.name,
        "description": spec.description,
        "size_name": spec.size_name,
        "settings": {
            "sizes": sizes, "repeats": repeats, "method_budget_s": budget_s,
            "warmup_rounds": WARMUP_ROUNDS,
            "quick": quick, "seed": seed, "methods": None if methods is None else list(methods),
        },
        "machine": machine,
        "wall_s": time.perf_counter() - started,
        "cases": cases,
    }
    if spec.cross_checks is not None:
        results["checks"] = spec.cross_checks(cases)
    write_outputs(results, out_dir if out_dir is not None else default_out_dir(spec.name), plot_name=PLOT_NAME if spec.plot else "")
    return results


def run_case(
    scenario: Scenario,
    *,
    repeats: int,
    budget_s: float | None,
    quick: bool,
    seed: int,
    progress: Progress,
    bandwidth_gbps: float | None = None,
    methods: Sequence[str] | None = None,
    peak_gflops: float | None = None,
) -> dict[str, Any]:
    """Build, time and check one scenario's methods (those matching ``methods``, see :func:`run_group`)."""
    rounds = WARMUP_ROUNDS + repeats
    progress.start_case(scenario.name, steps=len(scenario.methods) * (rounds + 1))
    started = time.perf_counter()
    inputs = scenario.make_inputs(seed)
    records: dict[str, dict[str, Any]] = {name: _empty_record() for name in scenario.methods}
    calls = {}
    for name, method in scenario.methods.items():
        # The case's bandwidth or FMA limit runs whatever --methods selects: a yardstick, not a contender.
        yardstick = name in (scenario.bandwidth_method, scenario.peak_method)
        if methods is not None and not yardstick and not any(m in name for m in methods):
            records[name]["skipped"] = NOT_SELECTED_REASON
            progress.step(count=rounds + 1)
            continue
        if quick and method.slow_setup:
            records[name]["skipped"] = QUICK_SKIP_REASON
            progress.step(count=rounds + 1)
            continue
        progress.status(f"{'compiling' if method.slow_setup else 'preparing'} {name}")
        t0 = time.perf_counter()
        try:
            fn = method.build(inputs)
        except Exception as exc:  # an unavailable method is a table row, not a crash
            records[name]["skipped"] = describe_exception(exc)
            progress.step(count=rounds + 1)
            continue
        records[name]["setup_s"] = time.perf_counter() - t0
        records[name]["note"] = getattr(fn, "note", None)  # e.g. which engine a method runs
        calls[name] = (lambda fn=fn: fn(inputs))
        progress.step(f"built {name}")

    gc.collect()  # garbage from building must not be collected inside a timed call
    timings = time_interleaved(
        calls,
        warmup=WARMUP_ROUNDS,
        repeats=repeats,
        budget_s=budget_s,
        on_call=lambda name, rnd: progress.step(f"{name} round {rnd + 1}/{rounds}"),
    )
    for name, reason in timings.failed.items():
        records[name]["skipped"] = f"failed while running: {reason}"
    for name, seconds in timings.seconds.items():
        records[name].update(times_s=seconds, steal_fractions=timings.steal.get(name, []), **summarize(seconds))

    progress.status("checking against the reference")
    try:
        reference, reference_name = scenario.reference(inputs, dict(timings.first_output))
    except Exception as exc:  # e.g. out of memory: report times without errors
        reference, reference_name = None, f"none (reference failed: {describe_exception(exc)})"
    if reference is not None:
        for name, out in timings.first_output.items():
            if scenario.methods[name].compare:
                records[name]["max_error"] = max_abs_error(out, reference)
    first_outputs = dict(timings.first_output)
    del reference, timings

    measurements = {}
    if scenario.measure is not None:
        progress.status("measuring")
        try:
            measurements = scenario.measure(inputs, dict(first_outputs))
        except Exception as exc:  # a failed measurement is reported, not a crash
            measurements = {"failed": describe_exception(exc)}
    del first_outputs

    bytes_read = scenario.bytes_read(inputs) if scenario.bytes_read else None
    flops = scenario.flops(inputs) if scenario.flops else None
    base = records[scenario.baseline].get("median_ms")
    for name, record in records.items():
        if base and record.get("median_ms") is not None:
            record["ratio"] = record["median_ms"] / base
        if name != scenario.baseline:
            record["round_ratios"] = paired_ratios(record["times_s"], records[scenario.baseline]["times_s"])
        if bytes_read and record.get("median_ms"):
            record["gbps"] = bytes_read / (record["median_ms"] * 1e-3) / 1e9
    limit = _bandwidth_limit(scenario, records, bandwidth_gbps)
    for record in records.values():
        if limit is not None and record.get("gbps") is not None:
            record["bandwidth_fraction"] = record["gbps"] / limit["gbps"]
        if flops and record.get("median_ms"):
            record["gflops"] = flops / (record["median_ms"] * 1e-3) / 1e9
    peak = _peak_limit(scenario, records, peak_gflops)
    for record in records.values():
        if peak is not None and record.get("gflops") is not None:
            record["peak_fraction"] = record["gflops"] / peak["gflops"]

    case = {
        "scenario": scenario.name,
        "size": scenario.size,
        "params": scenario.params,
        "baseline": scenario.baseline,
        "error_reference": reference_name,
        "bytes_read": bytes_read,
        "flops": flops,
        "bandwidth_limit": limit,
        "peak_limit": peak,
        "methods": records,
        "targets": [_target_verdict(scenario, t, records) for t in scenario.targets],
        "measurements": measurements,
        "wall_s": time.perf_counter() - started,
    }
    progress.finish_case(_case_summary(case))
    return case


def _bandwidth_limit(scenario: Scenario, records: dict[str, dict[str, Any]],
                     run_gbps: float | None) -> dict[str, Any] | None:
    """What this case's "% of bw" divides by: its ``bandwidth_method``'s GB/s
    when that ran (same bytes, same rounds), else the run-level probe; None
    when neither was measured."""
    return _limit_from_row(scenario.bandwidth_method, records, "gbps", run_gbps)


def _peak_limit(scenario: Scenario, records: dict[str, dict[str, Any]],
                run_gflops: float | None) -> dict[str, Any] | None:
    """What this case's "% of peak" divides by: its ``peak_method``'s GFLOP/s
    when that ran (the case's flops, same rounds), else the run-level probe;
    None when neither was measured."""
    return _limit_from_row(scenario.peak_method, records, "gflops", run_gflops)


def _limit_from_row(method: str | None, records: dict[str, dict[str, Any]], field: str,
                    run_value: float | None) -> dict[str, Any] | None:
    """``{"source": method, field: its value}`` when the yardstick row ran,
    else ``{"source": "run probe", field: run_value}``, else None."""
    value = records.get(method, {}).get(field) if method else None
    if value:
        return {"source": method, field: value}
    return {"source": "run probe", field: run_value} if run_value else None


def _empty_record() -> dict[str, Any]:
    return {
        "skipped": None, "setup_s": None, "times_s": [], "steal_fractions": [], "median_ms": None,
        "min_ms": None, "ratio": None, "round_ratios": [], "max_error": None, "gbps": None, "bandwidth_fraction": None,
        "gflops": None, "peak_fraction": None, "note": None,
    }


def _target_verdict(scenario: Scenario, target, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    record = records.get(target.method, {})
    baseline = target.baseline or scenario.baseline
    fraction = record.get("bandwidth_fraction")
    mine, theirs = record.get("median_ms"), records.get(baseline, {}).get("median_ms")
    ratio = mine / theirs if mine is not None and theirs else None
    rounds = paired_ratios(record.get("times_s", []), records.get(baseline, {}).get("times_s", []))
    checks = []
    if target.max_ratio is not None:
        checks.append(None if ratio is None else ratio <= target.max_ratio)
    if target.min_bandwidth_fraction is not None:
        checks.append(None if fraction is None else fraction >= target.min_bandwidth_fraction)
    peak = record.get("peak_fraction")
    if target.min_peak_fraction is not None:
        checks.append(None if peak is None else peak >= target.min_peak_fraction)
    return {
        "method": target.method,
        "baseline": baseline,
        "max_ratio": target.max_ratio,
        "ratio": ratio,
        "round_ratios": rounds,
        "min_bandwidth_fraction": target.min_bandwidth_fraction,
        "bandwidth_fraction": fraction,
        "round_bandwidth_fractions": _round_fractions(record, records, scenario.bandwidth_method),
        "min_peak_fraction": target.min_peak_fraction,
        "peak_fraction": peak,
        "round_peak_fractions": _round_fractions(record, records, scenario.peak_method),
        "met": None if None in checks else all(checks),
        "note": target.note,
    }


def _round_fractions(record: dict[str, Any], records: dict[str, dict[str, Any]],
                     limit_method: str | None) -> list[float]:
    """Per round, the fraction of a yardstick row (same bytes or flops, same
    rounds) the method reached: the row's time / the method's time in that
    round. Empty when the row did not run (the run-level probe is one number)."""
    limit_times = records.get(limit_method, {}).get("times_s", []) if limit_method else []
    return [1.0 / r for r in paired_ratios(record.get("times_s", []), limit_times)]


def _case_summary(case: dict[str, Any]) -> str:
    parts = []
    for name, rec in case["methods"].items():
        if rec["median_ms"] is None:
            parts.append(f"{name} skipped")
        else:
            parts.append(f"{name} {rec['median_ms']:.1f} ms")
    return f"{case['scenario']}: " + ", ".join(parts)
