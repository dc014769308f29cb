"""``longattn simulate parallel``: sweep the cost model over ranks x tokens; a table and a winners plot.

:func:`run_sweep` predicts (:func:`longattn.parallel.cost_model.predict`)
every method's forward step time for ``N`` = 2..1024 ranks (powers of 2) and
``T`` = 128k..10M tokens and picks the winner of each cell; for a profile of
a CPU it also predicts the benchmark's own setup (``longattn bench
parallel``: 32k tokens, H = 8, D = 128, fp32, world 2 and 4 on this
machine). :func:`format_report` and :func:`write_plot` are views of that
dict; the CLI writes it as ``results.json`` and the plot as ``winners.png``
with the bench's writer (``longattn.bench.report.write_outputs``: the bench
layer sits above this one, so this module does not import it).
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import asdict
from typing import Any

from longattn.errors import ArgumentError
from longattn.parallel.cost_model import METHOD_TITLES, METHODS, Profile, predict, profile_summary

PLOT_NAME = "winners.png"
RANKS = tuple(2**i for i in range(1, 11))  # 2 .. 1024
TOKENS = (131072, 262144, 1048576, 4194304, 10_000_000)
QUICK_RANKS = (2, 4, 8, 16)
QUICK_TOKENS = (131072, 1048576)
BENCH_TOKENS, BENCH_WORLDS = 32768, (2, 4)  # longattn bench parallel's setup
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def default_out_dir() -> str:
    """``./longattn-results/simulate-parallel-<timestamp>/``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("longattn-results", f"simulate-parallel-{stamp}")


def format_tokens(t: float) -> str:
    if t >= 1_000_000 and t % 1_000_000 == 0 and t % 1048576:
        return f"{t / 1e6:g}M"
    if t >= 1048576:
        return f"{t / 1048576:g}M"
    return f"{t / 1024:g}k"


def run_sweep(profile: Profile, *, quick: bool = False, nheads: int = 32, nheads_k: int | None = 8,
              headdim: int = 128, dtype: str | None = None, ranks_per_host: int | None = None,
              ranks: tuple[int, ...] | None = None, tokens: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Every method at every (N, T) cell: a JSON-ready dict.

    ``dtype`` defaults to the profile's; ``ranks_per_host`` defaults to the
    profile's ``cores`` (one rank per core; hosts joined by the profile's
    link) so that a CPU profile does not put 1024 ranks on one machine.
    """
    dtype = profile.dtype if dtype is None else dtype
    if dtype not in DTYPE_BYTES:
        raise ArgumentError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    for name, value in (("nheads", nheads), ("headdim", headdim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    nheads_k = nheads if nheads_k is None else nheads_k
    if isinstance(nheads_k, bool) or not isinstance(nheads_k, int) or nheads_k < 1 or nheads % nheads_k:
        raise ArgumentError(f"nheads_k must be a positive integer dividing nheads={nheads}, got {nheads_k!r}")
    if ranks_per_host is not None and (isinstance(ranks_per_host, bool) or not isinstance(ranks_per_host, int)
                                       or ranks_per_host < 1):
        raise ArgumentError(f"ranks_per_host must be a positive integer, got {ranks_per_host!r}")
    start = time.perf_counter()
    per_host = ranks_per_host if ranks_per_host is not None else profile.cores
    ranks = ranks or (QUICK_RANKS if quick else RANKS)
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    e = DTYPE_BYTES[dtype]
    cells = []
    for T in tokens:
        for N in ranks:
            preds = {m: predict(profile, m, T, N, nheads=nheads, nheads_k=nheads_k, headdim=headdim, dtype_bytes=e,
                                ranks_per_host=per_host) for m in METHODS}
            cells.append(_cell(T, N, preds))
    results: dict[str, Any] = {
        "command": "longattn simulate parallel",
        "profile": profile_summary(profile),
        "profile_full": profile.to_dict(),
        "settings": {"quick": quick, "nheads": nheads, "nheads_k": nheads_k, "headdim": headdim, "dtype": dtype,
                     "dtype_bytes": e, "ranks_per_host": per_host, "ranks": list(ranks), "tokens": list(tokens),
                     "anchor": "block/4", "passing": "block/8", "batch": 1, "causal": True},
        "assumptions": assumptions(profile, per_host),
        "cells": cells,
    }
    if profile.cores is not None:
        results["bench_setup"] = [
            _cell(BENCH_TOKENS, N, {m: predict(profile, m, BENCH_TOKENS, N, nheads=8, nheads_k=8, headdim=128,
                                               dtype_bytes=4) for m in METHODS})
            for N in BENCH_WORLDS
        ]
    results["summary"] = summarize(cells)
    results["runtime_s"] = time.perf_counter() - start
    return results


def _cell(T: float, N: int, preds: dict) -> dict[str, Any]:
    times = {m: p.time_s for m, p in preds.items() if p.time_s is not None}
    winner = min(times, key=times.get)
    exact = {m: t for m, t in times.items() if m != "apb"}
    exact_winner = min(exact, key=exact.get)
    return {
        "T": T, "N": N, "winner": winner, "exact_winner": exact_winner,
        "methods": {m: asdict(p) for m, p in preds.items()},
    }


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """How many cells each method wins (all methods; exact methods only, APB left out)."""
    wins = {m: sum(c["winner"] == m for c in cells) for m in METHODS}
    exact = {m: sum(c["exact_winner"] == m for c in cells) for m in METHODS if m != "apb"}
    return {"cells": len(cells), "wins": wins, "exact_wins": exact}


def assumptions(profile: Profile, ranks_per_host: int | None) -> list[str]:
    s = profile_summary(profile)
    out = [
        "causal forward, batch 1, of T tokens over N ranks; APB anchor = block/4, passing = block/8 (approximate: "
        "it is the only method that does not compute exact attention)",
        f"compute: {s['overhead_s'] * 1e6:.1f} us per attention call + {s['pair_cost_s'] * 1e12:.3g} ps per query-key "
        f"pair at headdim {s['headdim']} ({s['pair_gflops']:.3g} GFLOP/s at 4 D FLOPs per pair), scaled by headdim; "
        "the same cost per pair for causal and full blocks",
        f"link ({s['backend']}): {s['alpha_s'] * 1e6:.1f} us + bytes / {s['bandwidth_gbs']:.3g} GB/s one way; "
        f"a simultaneous send + receive takes {s['duplex_factor']:.2f}x that",
    ]
    if profile.comm_uses_cpu:
        out.append(f"communication is CPU work (gloo): it hides behind compute only with a spare core per rank; "
                   f"otherwise it adds to each rank's time, and ranks sharing a host's {profile.cores} cores "
                   "split them (processor sharing)")
        out.append(f"the sweep puts {ranks_per_host} rank(s) on each host, hosts joined by the same link; the "
                   "benchmark setup puts every rank on this machine")
    else:
        out.append("communication runs beside compute (copy engines / NIC): ring-like methods take per step "
                   "max(compute, message); Ulysses' all-to-alls and APB's all-gather block")
    out.append("not modelled: float32 merges of partial outputs, the metadata check, layout copies, contention "
               "of many flows on one link, hierarchical (intra/inter-node) links")
    return out


def format_table(results: dict[str, Any]) -> str:
    """One row per (T, N): each method's predicted time and the winner."""
    header = ["T", "N", *(METHOD_TITLES[m] for m in METHODS), "winner", "exact winner"]
    rows = []
    for c in results["cells"]:
        rows.append([format_tokens(c["T"]), str(c["N"]),
                     *(_time(c["methods"][m]["time_s"]) for m in METHODS),
                     c["winner"], c["exact_winner"]])
    return _align(header, rows)


def _align(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _time(t: float | None) -> str:
    if t is None:
        return "n/a"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    if t < 3600:
        return f"{t:.2f} s"
    return f"{t / 3600:.1f} h"


def winner_grid(results: dict[str, Any], key: str = "winner") -> str:
    """A T x N grid of winners' initials (R ring, Z zigzag, U Ulysses, T TokenRing, A APB)."""
    letters = {"ring": "R", "zigzag": "Z", "ulysses": "U", "token_ring": "T", "apb": "A"}
    ranks, tokens = results["settings"]["ranks"], results["settings"]["tokens"]
    by = {(c["T"], c["N"]): c for c in results["cells"]}
    out = ["T \\ N  " + " ".join(f"{n:>4}" for n in ranks)]
    for T in tokens:
        out.append(f"{format_tokens(T):>6} " + " ".join(f"{letters[by[(T, n)][key]]:>4}" for n in ranks))
    return "\n".join(out)


def format_report(results: dict[str, Any], *, table: bool = True) -> str:
    p, s = results["profile"], results["settings"]
    head = (f"longattn simulate parallel: profile {p['name']!r} ({p['device']}"
            + (f", {p['cores']} cores" if p["cores"] else "") + (f", ISA {'/'.join(p['isa'])}" if p["isa"] else "")
            + ")")
    out = [
        head,
        f"profile source: {p['source']}" + (f", measured {p['measured_at']}" if p["measured_at"] else ""),
        f"shape: H={s['nheads']}, H_kv={s['nheads_k']}, D={s['headdim']}, {s['dtype']}; "
        f"{len(results['cells'])} cells" + (" (--quick)" if s["quick"] else ""),
        "This is an analytic model, not a measurement: times are predicted forward step times.",
        "model assumptions:",
        *(f"  - {a}" for a in results["assumptions"]),
        "",
    ]
    if table:
        out += [format_table(results), ""]
    out += ["winner per cell, all methods (A = APB, approximate):", winner_grid(results), "",
            "winner per cell, exact methods only (R ring, Z zigzag, U Ulysses, T TokenRing):",
            winner_grid(results, "exact_winner"), ""]
    summary = results["summary"]
    out.append("cells won: " + ", ".join(f"{METHOD_TITLES[m]} {n}" for m, n in summary["wins"].items()))
    out.append("cells won among exact methods: "
               + ", ".join(f"{METHOD_TITLES[m]} {n}" for m, n in summary["exact_wins"].items()))
    if results.get("bench_setup"):
        out += ["", f"the benchmark's setup on this machine (longattn bench parallel: {format_tokens(BENCH_TOKENS)} "
                    "tokens, H=8, D=128, fp32, every rank on this machine, one thread each):"]
        header = ["world", *(METHOD_TITLES[m] for m in METHODS), "zigzag / APB"]
        rows = []
        for c in results["bench_setup"]:
            m = c["methods"]
            ratio = m["zigzag"]["time_s"] / m["apb"]["time_s"]
            rows.append([str(c["N"]), *(_time(m[k]["time_s"]) for k in METHODS), f"{ratio:.2f}x"])
        out.append(_align(header, rows))
        cpu = [f"world {c['N']}: " + ", ".join(f"{k} {c['methods'][k]['compute_cpu_s']:.2f}"
                                                for k in METHODS if c["methods"][k]["compute_cpu_s"] is not None)
               for c in results["bench_setup"]]
        out.append("per-rank compute CPU seconds of the critical rank (stats.compute_cpu_s): " + "; ".join(cpu))
    out.append("")
    out += [f"note: {n}" for n in results.get("notes", [])]
    files = results.get("files", {})
    if results.get("profile_file"):
        out.append(f"profile: {results['profile_file']}")
    if files.get("json"):
        out.append(f"results: {files['json']}")
    if files.get("plot"):
        out.append(f"plot:    {files['plot']}")
    out.append(f"simulated in {results['runtime_s']:.2f} s")
    return "\n".join(out)


COLOURS = {"ring": "#bbbbbb", "zigzag": "#4477aa", "ulysses": "#228833", "token_ring": "#ccbb44", "apb": "#ee6677"}


def write_plot(results: dict[str, Any], path: str) -> None:
    """Two panels (all methods; exact methods only): a T x N map coloured by the
    winner, each cell labelled with its speedup over the runner-up. Raises
    ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.patches import Patch

    ranks, tokens = results["settings"]["ranks"], results["settings"]["tokens"]
    by = {(c["T"], c["N"]): c for c in results["cells"]}
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    for i, (key, title) in enumerate((("winner", "all methods (APB approximate)"),
                                      ("exact_winner", "exact methods only"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for yi, T in enumerate(tokens):
            for xi, N in enumerate(ranks):
                c = by[(T, N)]
                w = c[key]
                times = sorted(v["time_s"] for m, v in c["methods"].items()
                               if v["time_s"] is not None and (key == "winner" or m != "apb"))
                ax.add_patch(_rect(xi, yi, COLOURS[w]))
                label = f"{times[1] / times[0]:.2f}x" if len(times) > 1 else ""
                ax.text(xi + 0.5, yi + 0.5, label, ha="center", va="center", fontsize=7)
        ax.set_xlim(0, len(ranks))
        ax.set_ylim(0, len(tokens))
        ax.set_xticks([x + 0.5 for x in range(len(ranks))], [str(n) for n in ranks])
        ax.set_yticks([y + 0.5 for y in range(len(tokens))], [format_tokens(t) for t in tokens])
        ax.set_xlabel("ranks N")
        ax.set_ylabel("tokens T")
        ax.set_title(f"fastest forward: {title}\n(label: speedup over the runner-up)", fontsize=9)
        used = sorted({by[k][key] for k in by}, key=METHODS.index)
        ax.legend(handles=[Patch(color=COLOURS[m], label=METHOD_TITLES[m]) for m in used], fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.0, 1.0))
    p, s = results["profile"], results["settings"]
    fig.suptitle(f"longattn simulate parallel: profile {p['name']} ({p['source'][:80]}); H={s['nheads']}, "
                 f"H_kv={s['nheads_k']}, D={s['headdim']}, {s['dtype']} -- a model, not a measurement", fontsize=9)
    fig.savefig(path, dpi=110)


def _rect(x: float, y: float, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="white")
