"""``longattn bench parallel``: sequence-parallel attention on real gloo process groups.

Causal prefill, batch 1, fp32, ``T`` tokens (default 32k), H=8, D=128, one
thread per rank, world sizes 2 and 4 (4 ranks share the 2 cores of the
reference machine: say so next to every world-4 figure). Methods, each on the
shards it is made for: ``ring`` (contiguous ring), ``zigzag`` (zigzag ring),
``token_ring`` (zigzag), ``ulysses`` (zigzag), ``apb`` (contiguous, anchor =
block/4, passing = block/8, scorer ``last_queries``).

Per rank and method (median over ``repeats`` calls, each started after a
barrier; :mod:`longattn.parallel.stats` inside the call):

- ``wall``: the call on this rank; the method's step time is the slowest rank's;
- ``compute`` / ``compute cpu``: wall and this thread's CPU time inside local
  attention work (CPU time is what the rank would take on a core of its own);
- ``wait``: time blocked on peers; ``bytes`` sent, measured (what the
  implementation posted) and analytical (:func:`longattn.parallel.cost_model.bytes_sent`);
- ``overlap``: the share of the estimated transfer time that did not show up
  as waiting, ``1 - wait / (bytes / link speed)``, clipped to [0, 1], with the
  link speed measured in the same group (a bare exchange of one K/V block, no
  compute) just before the methods run.

Checks and targets (issue 13): every exact method's output equals zigzag's
(max abs difference reported); zigzag's per-rank compute CPU time balanced
within 10%; APB >= 1.1x faster than zigzag at world 2 (slowest rank's wall)
and >= 1.6x at world 4 (slowest rank's compute CPU time: 4 ranks on 2 cores
make wall times a measure of the scheduler); APB's relative output error vs
exact on the structured workload of the HiP bench (:func:`longattn.bench.hip.make_hip_inputs`),
over all rows and over the last host's rows. With ``--profile FILE`` (from
``longattn simulate parallel --fit``) each method's predicted time is shown
next to the measured one.

Launching: :func:`run` (the CLI) starts ``world`` processes of ``python -m
longattn.parallel.bench`` with torchrun's environment variables set
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), so
``torchrun --nproc-per-node N -m longattn.parallel.bench`` runs exactly the
same code (:func:`rank_main`). Rank 0 writes ``world<N>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from longattn.errors import ArgumentError

METHODS = ("ring", "zigzag", "token_ring", "ulysses", "apb")
LAYOUT = {"ring": "contiguous", "zigzag": "zigzag", "token_ring": "zigzag", "ulysses": "zigzag", "apb": "contiguous"}
DEFAULT_TOKENS, QUICK_TOKENS = 32768, 4096
DEFAULT_WORLDS = (2, 4)
NHEADS, HEADDIM = 8, 128
GROUP_TIMEOUT = datetime.timedelta(minutes=20)
TARGET_APB = {2: (1.1, "wall"), 4: (1.6, "compute_cpu")}  # world -> (speed-up over zigzag, measured by)
BALANCE_TARGET = 0.10
PREDICTION_TARGET = 0.25  # |predicted - measured| / measured step time, every method
METRICS = ("wall", "compute", "compute_cpu", "wait", "bytes", "messages")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m longattn.parallel.bench",
                                description="one rank of longattn's sequence-parallel benchmark (run by torchrun "
                                            "or `longattn bench parallel`)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="sequence length T (default: 32768)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per method, median reported (default: 1)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="folder for world<N>.json (rank 0 writes it)")
    return p


def check_methods(methods: list[str]) -> tuple[str, ...]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ArgumentError(f"--methods must name some of {', '.join(METHODS)}, got {','.join(methods)!r}")
    return tuple(m for m in METHODS if m in methods)


def check_tokens(tokens: int, worlds) -> None:
    for n in worlds:
        if tokens <= 0 or tokens % (2 * n):
            raise ArgumentError(f"tokens must be a positive multiple of 2 x world size ({2 * n}) for the zigzag "
                                f"layout, got {tokens}")


# --- one rank -------------------------------------------------------------------------------------------------

def _call(method: str, q, k, v, anchor: int, passing: int):
    from longattn import parallel

    if method in ("ring", "zigzag"):
        return parallel.ring_attention(q, k, v, causal=True, layout=LAYOUT[method])
    if method == "token_ring":
        return parallel.token_ring_attention(q, k, v, causal=True, layout="zigzag")
    if method == "ulysses":
        return parallel.ulysses_attention(q, k, v, causal=True, layout="zigzag")
    return parallel.apb_attention(q, k, v, anchor_len=anchor, passing_len=passing)


def _link_speed(q_local: torch.Tensor) -> float:
    """Bytes per second of one bare ring exchange of a K/V block (no compute),
    median of 3: the link speed the overlap estimate divides by."""
    import torch.distributed as dist

    from longattn.parallel.comm import group_facts, post_ring_exchange, wait_all

    facts = group_facts(None)
    block = torch.zeros(2, *q_local.shape, dtype=q_local.dtype)
    incoming = torch.empty_like(block)
    times = []
    for _ in range(4):
        dist.barrier()
        start = time.perf_counter()
        wait_all(post_ring_exchange(facts, block, incoming))
        times.append(time.perf_counter() - start)
    return block.numel() * block.element_size() / statistics.median(times[1:])


def rank_main(argv: list[str] | None = None) -> int:
    """One rank: torchrun's environment -> a gloo group; every method timed;
    rank 0 writes ``world<N>.json``."""
    import torch.distributed as dist

    from longattn.bench.hip import make_hip_inputs
    from longattn.bench.machine import cpu_description
    from longattn.parallel import local_positions, shard, unshard
    from longattn.parallel.stats import record

    args = _parser().parse_args(argv)
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    check_tokens(args.tokens, [world])
    block = args.tokens // world
    anchor, passing = block // 4, block // 8  # the sizes (APB's reference: block/4, block/8)
    gen = torch.Generator().manual_seed(args.seed)
    full = [torch.randn(1, args.tokens, NHEADS, HEADDIM, generator=gen) for _ in range(3)]
    shards = {lay: [shard(t, lay) for t in full] for lay in ("zigzag", "contiguous")}
    del full

    # warm-up: every method once on tiny shards (kernel loading, first allocations)
    tiny = [torch.randn(1, 64, NHEADS, HEADDIM, generator=torch.Generator().manual_seed(1)) for _ in range(3)]
    for method in methods:
        _call(method, *tiny, 8, 4)
    link = _link_speed(shards["zigzag"][0]) if world > 1 else float("nan")  # one rank sends nothing

    rows: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}
    for method in methods:
        per_call = []
        for _ in range(args.repeats):
            dist.barrier()
            with record() as st:
                out = _call(method, *shards[LAYOUT[method]], anchor, passing)
            per_call.append([st.wall_s, st.compute_s, st.compute_cpu_s, st.wait_s, st.bytes_sent, st.messages])
        outputs[method] = out
        rows[method] = {name: statistics.median(c[i] for c in per_call) for i, name in enumerate(METRICS)}

    # exactness vs zigzag, in global positions (outside the timing)
    pos = {lay: local_positions(args.tokens, lay, rank, world) for lay in ("zigzag", "contiguous")}
    diffs = {}
    if "zigzag" in outputs:
        exact = unshard(outputs["zigzag"], "zigzag")  # every row, on every rank
        for method, out in outputs.items():
            if method != "apb":
                diffs[method] = float((out - exact[:, pos[LAYOUT[method]]]).abs().max())

    # APB's error on the HiP bench's structured workload: exact rows computed locally (not timed)
    apb_error = None
    if "apb" in methods:
        from longattn.api import attention

        hip = make_hip_inputs(args.tokens, seed=args.seed, nheads=NHEADS, nheads_k=NHEADS)
        mine = pos["contiguous"]
        ql, kl, vl = (t[:, mine].contiguous() for t in (hip.q, hip.k, hip.v))
        approx = _call("apb", ql, kl, vl, anchor, passing)
        no_passing = _call("apb", ql, kl, vl, anchor, 0)  # anchor + own block only: what passing blocks add
        end = int(mine[-1]) + 1
        exact_rows = attention(ql, hip.k[:, :end], hip.v[:, :end], causal=True)
        apb_error = [float((approx - exact_rows).norm() ** 2), float((no_passing - exact_rows).norm() ** 2),
                     float(exact_rows.norm() ** 2)]

    table = _gather_table(rows, methods, diffs, apb_error, link, world)
    if rank == 0:
        result = {
            "world": world, "tokens": args.tokens, "nheads": NHEADS, "headdim": HEADDIM, "dtype": "float32",
            "repeats": args.repeats, "anchor": anchor, "passing": passing, "threads_per_rank": 1,
            "cores": os.cpu_count(), "cpu": cpu_description(), **table,
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"world{world}.json").write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    return 0


def _gather_table(rows, methods, diffs, apb_error, link, world) -> dict:
    """Every rank's numbers on every rank (one all_gather of a float64 vector)."""
    import torch.distributed as dist

    mine = [rows[m][name] for m in methods for name in METRICS]
    mine += [diffs.get(m, float("nan")) for m in methods]
    mine += apb_error if apb_error is not None else [float("nan")] * 3
    mine.append(link)
    vec = torch.tensor(mine, dtype=torch.float64)
    table = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(table, vec)
    per_rank = torch.stack(table)
    out = {"methods": {}, "link_bytes_per_s": [float(x) for x in per_rank[:, -1]]}
    for i, m in enumerate(methods):
        block = per_rank[:, i * len(METRICS):(i + 1) * len(METRICS)]
        out["methods"][m] = {name: [float(x) for x in block[:, j]] for j, name in enumerate(METRICS)}
        diff = per_rank[:, len(methods) * len(METRICS) + i]
        out["methods"][m]["max_abs_diff_vs_zigzag"] = None if diff.isnan().all() else float(diff.max())
    err = per_rank[:, len(methods) * (len(METRICS) + 1):len(methods) * (len(METRICS) + 1) + 3]
    if not err.isnan().any():
        out["apb_rel_error"] = float((err[:, 0].sum() / err[:, 2].sum()).sqrt())
        out["apb_rel_error_last_host"] = float((err[-1, 0] / err[-1, 2]).sqrt())
        out["apb_rel_error_no_passing"] = float((err[:, 1].sum() / err[:, 2].sum()).sqrt())
    return out


# --- the launcher ---------------------------------------------------------------------------------------------

def launch_world(world: int, tokens: int, repeats: int, methods: tuple[str, ...], seed: int, out_dir: Path,
                 timeout: float = 3600.0) -> dict:
    """Start ``world`` ranks of ``python -m longattn.parallel.bench`` as torchrun
    would; return rank 0's results. Any rank failing kills the others."""
    from longattn.parallel.comm import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "longattn.parallel.bench", "--tokens", str(tokens), "--repeats", str(repeats),
           "--methods", ",".join(methods), "--seed", str(seed), "--out", str(out_dir)]
    procs = []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    try:
        errors = []
        for r, p in enumerate(procs):
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                errors.append(f"rank {r} exited with {p.returncode}:\n{err[-2000:]}")
        if errors:
            raise RuntimeError(f"longattn bench parallel, world {world}: " + "\n".join(errors))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return json.loads((out_dir / f"world{world}.json").read_text())


def default_out_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("longattn-results") / f"parallel-{stamp}"


def run(*, worlds=DEFAULT_WORLDS, tokens: int | None = None, quick: bool = False, repeats: int | None = None,
        methods: list[str] | None = None, seed: int = 0, out_dir: str | None = None,
        profile: str | None = None) -> str:
    """Run every world size; write ``summary.json`` and return the report text."""
    tokens = (QUICK_TOKENS if quick else DEFAULT_TOKENS) if tokens is None else tokens
    chosen = check_methods(list(methods) if methods else list(METHODS))
    worlds = tuple(worlds)
    if not worlds or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in worlds):
        raise ArgumentError(f"world sizes must be positive integers, got {worlds!r}")
    check_tokens(tokens, worlds)
    repeats = 1 if repeats is None else repeats
    if repeats < 1:
        raise ArgumentError(f"--repeats must be >= 1, got {repeats}")
    prof = None
    if profile is not None:
        from longattn.parallel.cost_model import load_profile

        prof = load_profile(profile)
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for world in worlds:
        print(f"world {world}: {tokens} tokens, {', '.join(chosen)} ...", file=sys.stderr, flush=True)
        res = launch_world(world, tokens, repeats, chosen, seed, out)
        _add_analysis(res, prof)
        results.append(res)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    return format_report(results, out)


def _add_analysis(res: dict, profile) -> None:
    """Step times, balance, speed-ups, analytical bytes, overlap, predictions, targets."""
    from longattn.parallel.cost_model import bytes_sent, predict

    n, tokens = res["world"], res["tokens"]
    link = statistics.median(res["link_bytes_per_s"])  # NaN at world 1, where nothing is sent
    for m, row in res["methods"].items():
        row["step_wall_s"] = max(row["wall"])
        row["max_compute_cpu_s"] = max(row["compute_cpu"])
        row["bytes_analytical"] = [
            bytes_sent(m, tokens, NHEADS, NHEADS, HEADDIM, n, 4, res["anchor"], res["passing"], rank=r,
                       layout=LAYOUT[m]) for r in range(n)]
        row["overlap"] = [
            None if b == 0 else max(0.0, min(1.0, 1.0 - w / (b / link))) for w, b in zip(row["wait"], row["bytes"])]
        cpu = row["compute_cpu"]
        row["compute_imbalance"] = (max(cpu) - min(cpu)) / max(cpu) if max(cpu) > 0 else 0.0
        if profile is not None:
            p = predict(profile, m, tokens, n, nheads=NHEADS, nheads_k=NHEADS, headdim=HEADDIM, dtype_bytes=4,
                        anchor=res["anchor"], passing=res["passing"])
            row["predicted_s"] = p.time_s
            row["predicted_compute_cpu_s"] = p.compute_cpu_s
            row["prediction_error"] = None if p.time_s is None else (p.time_s - row["step_wall_s"]) / row["step_wall_s"]
    targets = []
    zz, apb = res["methods"].get("zigzag"), res["methods"].get("apb")
    if zz is not None:
        targets.append({"what": f"zigzag per-rank compute CPU time balanced within {BALANCE_TARGET:.0%}",
                        "value": zz["compute_imbalance"], "met": zz["compute_imbalance"] <= BALANCE_TARGET})
    if zz is not None and apb is not None and n in TARGET_APB:
        want, by = TARGET_APB[n]
        if by == "wall":
            ratio = zz["step_wall_s"] / apb["step_wall_s"]
            how = "slowest rank's wall time"
        else:
            ratio = zz["max_compute_cpu_s"] / apb["max_compute_cpu_s"]
            how = "slowest rank's compute CPU time (4 ranks share 2 cores here)" if n > (os.cpu_count() or 1) \
                else "slowest rank's compute CPU time"
        targets.append({"what": f"APB >= {want}x faster than zigzag at world {n} ({how})", "value": ratio,
                        "met": ratio >= want})
    errors = {m: row["prediction_error"] for m, row in res["methods"].items() if row.get("prediction_error") is not None}
    if errors:
        worst = max(errors, key=lambda m: abs(errors[m]))
        targets.append({"what": f"simulator within {PREDICTION_TARGET:.0%} of the measured step time, every method "
                                f"(worst: {worst}, {errors[worst]:+.1%})",
                        "value": abs(errors[worst]), "met": abs(errors[worst]) <= PREDICTION_TARGET})
    res["targets"] = targets


def format_report(results: list[dict], out: Path) -> str:
    lines = []
    for res in results:
        n = res["world"]
        share = f"; {n} ranks share {res['cores']} cores" if n > (res["cores"] or n) else ""
        lines.append(f"world {n}: T={res['tokens']}, H={res['nheads']}, D={res['headdim']}, fp32, causal, one "
                     f"thread per rank{share}; APB anchor {res['anchor']}, passing {res['passing']}; {res['cpu']}")
        header = ["method", "step s", "max cpu s", "compute s/rank", "wait s/rank", "MB sent/rank (analytical)",
                  "overlap", "max |diff| vs zigzag", "predicted s (error)"]
        rows = []
        for m, row in res["methods"].items():
            mb = "/".join(f"{b / 2**20:.1f}" for b in row["bytes"])
            mba = "/".join(f"{b / 2**20:.1f}" for b in row["bytes_analytical"])
            ov = "/".join("-" if o is None else f"{o:.2f}" for o in row["overlap"])
            diff = row.get("max_abs_diff_vs_zigzag")
            pred, perr = row.get("predicted_s"), row.get("prediction_error")
            rows.append([m, f"{row['step_wall_s']:.2f}", f"{row['max_compute_cpu_s']:.2f}",
                         "/".join(f"{c:.2f}" for c in row["compute"]), "/".join(f"{w:.2f}" for w in row["wait"]),
                         f"{mb} ({mba})", ov, "-" if diff is None else f"{diff:.1e}",
                         "-" if pred is None else f"{pred:.2f} ({perr:+.0%})"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if "apb_rel_error" in res:
            lines.append(f"  APB relative error vs exact on the HiP bench's structured workload: "
                         f"{res['apb_rel_error']:.3e} (last host's rows: {res['apb_rel_error_last_host']:.3e}; "
                         f"without passing blocks: {res['apb_rel_error_no_passing']:.3e})")
        for t in res["targets"]:
            lines.append(f"  target: {t['what']}: {t['value']:.3f} -> {'MET' if t['met'] else 'NOT MET'}")
        lines.append("")
    lines.append(f"results: {out}")
    return "\n".join(lines)
