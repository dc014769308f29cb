"""Present a group's results: a text table, ``results.json`` and ``times.png``.

The JSON holds everything (machine, settings, every timed repeat) so a run
can be compared with another later; the table and plot are views of it.
matplotlib is optional (the ``bench`` extra): without it the plot is skipped
and the output says so.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from typing import Any

JSON_NAME = "results.json"
PLOT_NAME = "times.png"


def write_outputs(
    results: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    plot: Callable[[dict[str, Any], str], None] | None = None,
    plot_name: str = PLOT_NAME,
) -> dict[str, Any]:
    """Write the plot (``plot(results, path)``, default :func:`write_plot`;
    skipped when ``plot_name`` is empty) and the JSON into ``out_dir``.

    Adds ``results["files"]`` (paths; ``plot`` is None when skipped) and
    ``results["notes"]`` (why something was skipped), then returns ``results``.
    Shared by ``longattn bench`` and ``longattn simulate``.
    """
    os.makedirs(out_dir, exist_ok=True)
    notes = results.setdefault("notes", [])
    plot_path = os.path.join(out_dir, plot_name) if plot_name else None
    try:
        if plot_path is not None:
            (plot or write_plot)(results, plot_path)
    except ImportError:
        plot_path = None
        notes.append("plot skipped: matplotlib is not installed (pip install 'longattn[bench]')")
    json_path = os.path.join(out_dir, JSON_NAME)
    results["files"] = {"json": json_path, "plot": plot_path}
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=2)
        f.write("\n")
    return results


def write_plot(results: dict[str, Any], path: str) -> None:
    """Median time vs size per method, log-log. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method in _method_names(results):
        points = [
            (case["size"], case["methods"][method]["median_ms"])
            for case in results["cases"]
            if case["methods"].get(method, {}).get("median_ms") is not None
        ]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=method)
    ax.set_xscale("log", base=2)
    sizes = sorted({case["size"] for case in results["cases"]})
    ax.set_xticks(sizes, [str(size) for size in sizes])  # 1024, not 2^10
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel(results["size_name"])
    ax.set_ylabel("median time (ms)")
    machine = results["machine"]
    ax.set_title(
        f"longattn bench {results['group']}: {results['description']}\n"
        f"{machine['cpu_model']}, {machine['torch_threads']} threads, torch {machine['torch']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def format_table(results: dict[str, Any]) -> str:
    """The results as an aligned text table, then targets and files."""
    memory_bound = any(case.get("bytes_read") for case in results["cases"])
    compute_bound = any(case.get("flops") for case in results["cases"])
    stolen = any(any(rec.get("steal_fractions") or []) for case in results["cases"]
                 for rec in case["methods"].values())
    header = ["scenario", "method", "median ms", "min ms", "runs", "ratio", "per round"]
    header += ["VM steal"] if stolen else []
    header += ["GB/s", "% of bw"] if memory_bound else []
    header += ["GFLOP/s", "% of peak"] if compute_bound else []
    header += ["max error", "error vs", "note"]
    rows = []
    for case in results["cases"]:
        first = True
        for name, rec in case["methods"].items():
            row = [
                case["scenario"] if first else "",
                name,
                _num(rec["median_ms"]),
                _num(rec["min_ms"]),
                str(len(rec["times_s"])) if rec["times_s"] else "",
                "" if rec["ratio"] is None else f"{rec['ratio']:.2f}x",
                _round_range(rec.get("round_ratios") or []),
            ]
            if stolen:
                row.append(_steal_range(rec.get("steal_fractions") or []))
            if memory_bound:
                row += [
                    "" if rec.get("gbps") is None else f"{rec['gbps']:.1f}",
                    "" if rec.get("bandwidth_fraction") is None else f"{100 * rec['bandwidth_fraction']:.0f}%",
                ]
            if compute_bound:
                row += [
                    "" if rec.get("gflops") is None else f"{rec['gflops']:.0f}",
                    "" if rec.get("peak_fraction") is None else f"{100 * rec['peak_fraction']:.0f}%",
                ]
            row += [
                "" if rec["max_error"] is None else f"{rec['max_error']:.1e}",
                case["error_reference"] if rec["max_error"] is not None else "",
                _note(name, rec, case),
            ]
            rows.append(row)
            first = False
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = set(range(2, len(header) - 2))

    def line(cells: list[str]) -> str:
        return "  ".join(
            (c.rjust(w) if i in numeric else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    machine = results["machine"]
    settings = results["settings"]
    out = [
        f"longattn bench {results['group']}: {results['description']}",
        f"{machine['cpu_model']}, torch {machine['torch']}, {machine['torch_threads']} threads; "
        f"{_rounds(settings)}; ratio = median / baseline's median; "
        "per round = the lowest and highest of time / baseline's time in the same round",
    ]
    if stolen:
        out.append("VM steal = the lowest and highest share of the CPUs' time the hypervisor took "
                   "during the method's timed calls (/proc/stat): rounds it took much from ran slow for it")
    peak = machine.get("fma_peak")
    if peak:
        out += _peak_lines(peak, results)
    if machine.get("read_bandwidth_gbps"):
        out += _bandwidth_lines(machine, results)
    out += [
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
        "",
    ]
    for case in results["cases"]:
        if case.get("measurements"):
            figures = ", ".join(f"{k} {_figure(v)}" for k, v in case["measurements"].items())
            out.append(f"measured at {case['scenario']}: {figures}")
    out += [_target_line(case, t) for case in results["cases"] for t in case.get("targets", [])]
    out += [_check_line(c) for c in results.get("checks", [])]
    out += [f"note: {n}" for n in results.get("notes", [])]
    files = results.get("files", {})
    if files.get("json"):
        out.append(f"results: {files['json']}")
    if files.get("plot"):
        out.append(f"plot:    {files['plot']}")
    return "\n".join(out)


def _peak_lines(peak: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The FMA peak probes of the run and which one "% of peak" divides by."""
    if not peak.get("gflops"):
        return [f"fp32 FMA peak not measured: {peak.get('reason')}"]
    lines = [f"fp32 FMA peak measured in this run (register-only loop, {peak.get('threads')} threads, "
             f"{peak.get('isa')}, best of 3 at the start): {peak['gflops']:.0f} GFLOP/s; "
             f"GFLOP/s = 4 x D x visible pairs x heads / median time"]
    sources = sorted({(c.get("peak_limit") or {}).get("source") for c in results["cases"]} - {None, "run probe"})
    if sources:
        lines.append(f"% of peak = GFLOP/s / the same case's {' / '.join(sources)} row (the register-only loop "
                     f"run for the case's flops, timed in the same rounds)")
    return lines


def _bandwidth_lines(machine: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The read-bandwidth probes of the run and which one "% of bw" divides by."""
    stream = machine.get("read_bandwidth_stream") or {}
    torch_sum = machine.get("read_bandwidth_torch_sum_gbps")
    if "read_bandwidth_probe" not in machine:  # results from before the C++ probe: torch.sum only
        return [f"memory read bandwidth measured in this run (torch.sum over 1 GiB): "
                f"{machine['read_bandwidth_gbps']:.1f} GB/s; GB/s = cache bytes read / median time"]
    lines = []
    if stream.get("gbps"):
        lines.append(
            f"memory read bandwidth measured in this run: C++ streaming read ({stream.get('threads')} threads, "
            f"{stream.get('gib'):g} GiB, {stream.get('isa')}, best of 5 passes) {stream['gbps']:.1f} GB/s; "
            f"torch.sum over the same size {torch_sum:.1f} GB/s"
        )
    else:
        lines.append(f"memory read bandwidth measured in this run: torch.sum {torch_sum:.1f} GB/s "
                     f"(C++ streaming read unavailable: {stream.get('reason')})")
    sources = sorted({(c.get("bandwidth_limit") or {}).get("source") for c in results["cases"]} - {None, "run probe"})
    if sources:
        limit = f"the same case's {' / '.join(sources)} row (the same bytes, timed in the same rounds)"
    else:
        limit = f"the {machine['read_bandwidth_probe']} figure"
    lines.append(f"% of bw = GB/s / {limit}; GB/s = cache bytes read / median time")
    return lines


def _check_line(check: dict[str, Any]) -> str:
    if check.get("met") is None:
        return f"target: {check['what']}: not measured"
    verdict = "MET" if check["met"] else "NOT MET"
    rounds = check.get("rounds") or []
    spread = _per_round(rounds, lambda r: r <= check["limit"])
    return (f"target: {check['what']}: {check['value']:.3g} (limit {check['limit']:g}{', ' + spread if spread else ''})"
            f" -> {verdict}  ({check['note']})")


def _rounds(settings: dict[str, Any]) -> str:
    text = f"median of {settings['repeats']} interleaved rounds after {settings['warmup_rounds']} warmup"
    if settings.get("method_budget_s"):
        text += f" (fewer, see runs, past {settings['method_budget_s']:g} s per method and case)"
    return text


def _method_names(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for case in results["cases"]:
        names += [n for n in case["methods"] if n not in names]
    return names


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _note(name: str, rec: dict[str, Any], case: dict[str, Any]) -> str:
    if rec["skipped"]:
        return f"skipped: {rec['skipped']}"
    notes = []
    if name == case["baseline"]:
        notes.append("baseline")
    if rec["setup_s"] is not None and rec["setup_s"] >= 0.05:  # compiles; not instant builds
        notes.append(f"setup/compile {rec['setup_s']:.1f} s, not timed")
    if rec.get("note"):
        notes.append(rec["note"])
    return "; ".join(notes)


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _round_range(ratios: list[float]) -> str:
    """"lo-hi" of a method's per-round ratios to the baseline ("" under two rounds)."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) >= 2 else ""


def _steal_range(fractions: list[float | None]) -> str:
    """A method's lowest and highest steal share over its timed calls, in
    percent ("" where no call was given one)."""
    fractions = [f for f in fractions if f is not None]
    if not fractions:
        return ""
    lo, hi = (round(100 * f) for f in (min(fractions), max(fractions)))
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def _per_round(values: list[float], ok: Callable[[float], bool], percent: bool = False) -> str:
    """"per round lo-hi, median m: k of n within" for a target's per-round
    values, k of them ok ("" under two rounds)."""
    if len(values) < 2:
        return ""
    show = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:.2f}")
    return (f"per round {show(min(values))}-{show(max(values))}, median {show(statistics.median(values))}: "
            f"{sum(map(ok, values))} of {len(values)} within")


def _parenthesised(text: str) -> str:
    return f" ({text})" if text else ""


def _target_line(case: dict[str, Any], t: dict[str, Any]) -> str:
    wants = []
    if t["max_ratio"] is not None:
        wants.append(f"<= {t['max_ratio']:g}x {t['baseline']}")
    if t.get("min_bandwidth_fraction") is not None:
        wants.append(f">= {100 * t['min_bandwidth_fraction']:.0f}% of read bandwidth")
    if t.get("min_peak_fraction") is not None:
        wants.append(f">= {100 * t['min_peak_fraction']:.0f}% of the FMA peak")
    where = f"{t['method']} {' and '.join(wants)} at {case['scenario']}"
    if t["met"] is None:
        return f"target: {where}: not measured ({t['method']} or {t['baseline']} skipped)"
    got = []
    if t["ratio"] is not None and t["max_ratio"] is not None:
        rounds = t.get("round_ratios") or []
        got.append(f"{t['ratio']:.3g}x" + _parenthesised(_per_round(rounds, lambda r: r <= t["max_ratio"])))
    if t.get("bandwidth_fraction") is not None and t.get("min_bandwidth_fraction") is not None:
        rounds = t.get("round_bandwidth_fractions") or []
        got.append(f"{100 * t['bandwidth_fraction']:.0f}% of bandwidth"
                   + _parenthesised(_per_round(rounds, lambda f: f >= t["min_bandwidth_fraction"], percent=True)))
    if t.get("peak_fraction") is not None and t.get("min_peak_fraction") is not None:
        rounds = t.get("round_peak_fractions") or []
        got.append(f"{100 * t['peak_fraction']:.0f}% of the FMA peak"
                   + _parenthesised(_per_round(rounds, lambda f: f >= t["min_peak_fraction"], percent=True)))
    verdict = "MET" if t["met"] else "NOT MET"
    return f"target: {where}: {', '.join(got)} -> {verdict}  ({t['note']})"


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"): JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
