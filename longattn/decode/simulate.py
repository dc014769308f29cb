"""A small analytic model of decode attention on a GPU: FA2 vs split-K vs stream-K.

For one decode step (one query token per sequence; the GQA query group folded
into its kv head) it predicts the kernel time (*makespan*, microseconds) and
the *utilisation* = useful time / (num_sms x makespan), i.e. the fraction of
peak HBM bandwidth spent streaming K and V, of three schedules:

- ``fa2``: one CTA per output tile ``(batch, kv_head)`` over its whole context
  (FlashAttention-2 without splits);
- ``split_k``: flash-decoding: each output tile cut into ``s`` splits chosen by
  flash-attn's heuristic (:func:`split_k_num_splits`), one CTA per split, then
  a second kernel that combines the splits;
- ``stream_k``: LeanAttention: ``min(G, W)`` workers (``G = num_sms x
  workers_per_sm``, ``W`` LeanTiles), each taking an equal contiguous share of
  all LeanTiles exactly as :func:`longattn.decode.plan_decode` assigns them; a
  tile's partials are merged, split into headdim column slices, by its last
  contributors in the same kernel (or, with ``separate_merge``, by a second
  kernel as the Triton twin does).

Assumptions (also printed by ``longattn simulate lean``):

1. Memory-bound: streaming a key costs the time to move its K and V rows
   (``bytes_per_key``, 512 B at headdim 128 in fp16) from HBM; compute and Q
   loads hide under it; equal keys cost equal time. Partial states (fp32 out
   and lse of the query group) are written to and read from L2, where they
   stay between producer and merger.
2. Each SM moves bytes at a fixed rate, its ``1 / num_sms`` share of the HBM
   (or L2) bandwidth, whether or not other SMs are busy: an idle SM's
   bandwidth is not lent to busy ones. This favours stream-K when few SMs are
   busy (a lone SM can pull more than its share on real parts), one reason
   this model's batch-1 speedups over FA2 exceed the paper's.
3. Each CTA is a *latency* part (prologue, per-segment init and finalise,
   per-LeanTile loop overhead, waiting for a merge's first partial) plus a
   *streaming* part (bytes at the SM's rate). An SM holds ``resident`` CTAs
   at once (``workers_per_sm`` for stream-K, ``ctas_per_sm`` for FA2 and
   split-K); they share its bandwidth, and one CTA's latency overlaps the
   others' streaming perfectly. So an SM is busy for
   ``max(sum of its streaming, longest chain of one resident slot)``: that is
   why LeanAttention runs two workers per SM, and why a lone CTA on an SM
   pays its latencies in full.
4. CTAs are dispatched in launch order to the SM that frees first (greedy list
   scheduling), into its emptier slot. Stream-K launches ``min(G, W)``
   workers, all resident, worker ``c`` on SM ``c % num_sms``: with fewer
   LeanTiles than ``G`` a launcher plans for ``W`` workers (one LeanTile each,
   one per SM) rather than launching ``G`` of which ``plan_decode`` would
   leave all but every ``G / W``-th idle, putting two busy ones on one SM.
   A stream-K tile's merge is split, as the Triton twin's merge kernel does,
   into ``ceil(headdim / merge_block_d)`` column programs on distinct SMs;
   each pays ``merge_us`` and reads every partial's lse and its columns of
   every partial's out. In the one-kernel variant the programs are the tile's
   last-arriving contributors on distinct SMs, latest first (cycling if there
   are fewer SMs than programs), each waiting for the tile's last partial;
   with ``separate_merge`` they are CTAs of the second kernel. Split-K's
   combine (flash-attn's) reads all of a tile's partials in one CTA. A second
   kernel starts after ``kernel_gap_us``; the first launch's latency is the
   same for all schedules and is left out (kernel times, as a profiler
   reports them).
5. LeanTile size: FA2 and split-K use ``block_n`` keys (256). Stream-K takes,
   of 256, 128, 64, 32 and 16, the size this model predicts fastest for the
   shape, as a planner or autotuner would: small tiles balance short contexts
   better but cost more iterations and more partials to merge.

The latencies are rough guesses, not measurements: the results show shapes
and ratios under these assumptions. Nothing here runs a kernel.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from longattn.kernels.decode.plan import plan_decode
from longattn.errors import ArgumentError
from longattn.validation import check_int

SCHEDULES = ("fa2", "split_k", "stream_k")  # keys of a row's "schedules"
STREAM_K_BLOCK_NS = (256, 128, 64, 32, 16)
UTILISATION_TARGET = 0.95

BATCHES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 19, 1 << 20)
KV_HEADS = (1, 8, 32)
QUICK_BATCHES = (1, 4, 16, 64)
QUICK_CONTEXTS = (1 << 10, 1 << 14, 1 << 18, 1 << 20)


@dataclass(frozen=True)
class GpuModel:
    """The machine and kernel costs of the model. Times in microseconds, bandwidths
    in GB/s (1e9 B/s) for the whole GPU, split evenly over the SMs.

    Derived: ``key_us`` (one SM streams one key of one kv head, ~0.020 us on an
    H100, so a 256-key LeanTile is ~5.2 us) and ``partial_us`` (one SM writes or
    reads one partial state in L2).
    """

    name: str
    num_sms: int = 132
    workers_per_sm: int = 2  # stream-K workers resident per SM (G = num_sms * workers_per_sm)
    ctas_per_sm: int = 2  # FA2 / split-K CTAs resident per SM (flash-attn's decode kernel occupancy)
    hbm_bandwidth_gbs: float = 3350.0
    l2_bandwidth_gbs: float = 7000.0
    headdim: int = 128
    kv_bytes: int = 2  # bytes per K/V element (fp16)
    group_size: int = 8  # query heads per kv head, folded into one output tile (GQA)
    block_n: int = 256  # keys per LeanTile of FA2 and split-K; stream-K's largest
    merge_block_d: int = 32  # headdim columns per stream-K merge program (decode_triton.MERGE_BLOCK_D)
    cta_prologue_us: float = 0.3  # CTA start: indices, pointers, first loads in flight
    segment_us: float = 0.3  # per output tile a CTA touches: init state, finalise, bump a counter
    iteration_us: float = 0.02  # per LeanTile: loop, sync and rescale not hidden under loads
    merge_us: float = 0.5  # per merge (one tile): latency to its partials' first bytes
    kernel_gap_us: float = 2.0  # drain of a kernel + start of the next (split-K's combine)

    def __post_init__(self) -> None:
        for name in ("num_sms", "workers_per_sm", "ctas_per_sm", "headdim", "kv_bytes", "group_size", "block_n",
                     "merge_block_d"):
            check_int(name, getattr(self, name))
        for name in ("hbm_bandwidth_gbs", "l2_bandwidth_gbs"):
            if not getattr(self, name) > 0:
                raise ArgumentError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("cta_prologue_us", "segment_us", "iteration_us", "merge_us", "kernel_gap_us"):
            if not getattr(self, name) >= 0:
                raise ArgumentError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def bytes_per_key(self) -> int:
        """K and V rows of one key of one kv head."""
        return 2 * self.headdim * self.kv_bytes

    @property
    def partial_bytes(self) -> int:
        """One partial state of one output tile: fp32 out and lse of each query head of the group."""
        return self.group_size * (self.headdim + 1) * 4

    @property
    def merge_programs(self) -> int:
        """Column programs a stream-K tile's merge is split into."""
        return -(-self.headdim // self.merge_block_d)

    def merge_read_us(self, partials: int, columns: int) -> float:
        """One SM reads ``partials`` partials' lse and ``columns`` of their out from L2."""
        return partials * self.group_size * (columns + 1) * 4 * self.num_sms / (self.l2_bandwidth_gbs * 1e3)

    @property
    def key_us(self) -> float:
        return self.bytes_per_key * self.num_sms / (self.hbm_bandwidth_gbs * 1e3)

    @property
    def partial_us(self) -> float:
        return self.partial_bytes * self.num_sms / (self.l2_bandwidth_gbs * 1e3)

    @property
    def num_workers(self) -> int:
        """Stream-K's ``G``."""
        return self.num_sms * self.workers_per_sm


GPU_PRESETS = {
    "h100": GpuModel("H100 SXM", hbm_bandwidth_gbs=3350.0),
    "h200": GpuModel("H200 SXM", hbm_bandwidth_gbs=4800.0),  # same die as H100, faster HBM
}


def get_gpu(name: str, **overrides: Any) -> GpuModel:
    """A preset (``"h100"``, ``"h200"``) with ``overrides`` (GpuModel fields; None = keep)."""
    if name not in GPU_PRESETS:
        raise ArgumentError(f"gpu must be one of {sorted(GPU_PRESETS)}, got {name!r}")
    return replace(GPU_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Shape:
    """One decode step: ``seqlens`` keys per batch entry, ``nheads_k`` kv heads.
    ``context`` is the nominal length (ragged batches draw lengths up to it)."""

    seqlens: tuple[int, ...]
    nheads_k: int
    context: int
    ragged: bool = False

    @property
    def batch(self) -> int:
        return len(self.seqlens)

    @property
    def total_keys(self) -> int:
        """Keys over all output tiles: the useful work."""
        return sum(self.seqlens) * self.nheads_k

    @property
    def label(self) -> str:
        kind = "ragged" if self.ragged else "uniform"
        return f"b{self.batch} h{self.nheads_k} {format_context(self.context)} {kind}"


@dataclass
class ScheduleResult:
    makespan_us: float
    utilisation: float
    ctas: int  # CTAs of the main kernel
    params: dict[str, int] = field(default_factory=dict)  # block_n, splits, workers, fan_in


def format_context(keys: int) -> str:
    return f"{keys >> 20}M" if keys >= 1 << 20 and keys % (1 << 20) == 0 else f"{keys >> 10}k"


def split_k_num_splits(tiles: int, num_sms: int, n_blocks: int, max_splits: int = 128) -> int:
    """flash-decoding's split count: 1 if ``tiles >= 0.8 * num_sms``; otherwise the
    smallest ``s`` in ``1..min(max_splits, num_sms, n_blocks)`` whose wave
    efficiency ``waves / ceil(waves)`` (``waves = tiles * s / num_sms``) reaches
    85% of the best. (flash-attn also skips an ``s`` that leaves the blocks per
    split unchanged; the design note's version, used here, does not.)"""
    if tiles >= 0.8 * num_sms:
        return 1
    limit = min(max_splits, num_sms, n_blocks)
    if limit < 1:
        return 1
    efficiency = [(tiles * s / num_sms) / math.ceil(tiles * s / num_sms) for s in range(1, limit + 1)]
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, start=1) if e >= 0.85 * best)


class _Machine:
    """SMs with ``slots`` resident CTAs each (assumption 3): per SM the streaming
    time of all its CTAs, per slot the chain of latency + streaming of its CTAs."""

    def __init__(self, num_sms: int, slots: int):
        self.streaming = [0.0] * num_sms
        self.chains = [[0.0] * slots for _ in range(num_sms)]

    def place(self, sm: int, slot: int, latency_us: float, streaming_us: float) -> None:
        self.streaming[sm] += streaming_us
        self.chains[sm][slot] += latency_us + streaming_us

    def busy_us(self, sm: int) -> float:
        return max(self.streaming[sm], max(self.chains[sm]))

    def makespan_us(self) -> float:
        return max(self.busy_us(sm) for sm in range(len(self.streaming)))


def _list_schedule(ctas: Sequence[tuple[float, float]], num_sms: int, slots: int) -> float:
    """Makespan of ``(latency_us, streaming_us)`` CTAs, each dispatched in order to
    the SM that frees first (ties: lowest SM), into its emptier slot."""
    machine = _Machine(num_sms, slots)
    free_at = [(0.0, sm) for sm in range(num_sms)]
    for latency, streaming in ctas:
        _, sm = heapq.heappop(free_at)
        chains = machine.chains[sm]
        machine.place(sm, chains.index(min(chains)), latency, streaming)
        heapq.heappush(free_at, (machine.busy_us(sm), sm))
    return machine.makespan_us()


def _column_slices(gpu: GpuModel) -> list[int]:
    """Headdim columns of each stream-K merge program (the last may be narrower)."""
    return [min(gpu.merge_block_d, gpu.headdim - i * gpu.merge_block_d) for i in range(gpu.merge_programs)]


def _combine_kernel_us(gpu: GpuModel, partials_per_tile: Sequence[int], *, column_split: bool = False) -> float:
    """A second kernel reading each tile's partials: one CTA per tile (split-K's
    combine), or with ``column_split`` one per column slice of a tile (stream-K's
    merge kernel), launched tile by tile so a tile's slices land on distinct SMs."""
    slices = _column_slices(gpu) if column_split else [gpu.headdim]
    ctas = [(gpu.cta_prologue_us + gpu.merge_us, gpu.merge_read_us(n, cols))
            for n in partials_per_tile if n > 1 for cols in slices]
    return gpu.kernel_gap_us + _list_schedule(ctas, gpu.num_sms, gpu.ctas_per_sm) if ctas else 0.0


def _result(shape: Shape, gpu: GpuModel, makespan_us: float, ctas: int, **params: int) -> ScheduleResult:
    useful_us = shape.total_keys * gpu.key_us
    utilisation = useful_us / (gpu.num_sms * makespan_us) if makespan_us > 0 else 0.0
    return ScheduleResult(makespan_us, utilisation, ctas, params)


def _piece(gpu: GpuModel, keys: int, iterations: int) -> tuple[float, float]:
    """``(latency_us, streaming_us)`` of a CTA covering one piece of one output tile."""
    return gpu.cta_prologue_us + gpu.segment_us + iterations * gpu.iteration_us, keys * gpu.key_us


def simulate_fa2(shape: Shape, gpu: GpuModel) -> ScheduleResult:
    """One CTA per (batch, kv_head) over its whole context, launched batch-fastest
    then head, as flash-attn's grid orders them."""
    bn = gpu.block_n
    ctas = [_piece(gpu, length, -(-length // bn)) for _ in range(shape.nheads_k) for length in shape.seqlens]
    return _result(shape, gpu, _list_schedule(ctas, gpu.num_sms, gpu.ctas_per_sm), len(ctas), block_n=bn)


def simulate_split_k(shape: Shape, gpu: GpuModel) -> ScheduleResult:
    """flash-decoding: ``s`` from :func:`split_k_num_splits` (``n_blocks`` of the
    longest sequence); each sequence cut into ``s`` runs of ``ceil(its blocks /
    s)`` LeanTiles (flash-attn does this per actual length, so late runs of
    short sequences are empty); if ``s > 1``,
    each writes a partial and a combine kernel merges them."""
    bn = gpu.block_n
    tiles = shape.batch * shape.nheads_k
    splits = split_k_num_splits(tiles, gpu.num_sms, -(-max(shape.seqlens, default=0) // bn))
    partial_write = gpu.partial_us if splits > 1 else 0.0
    ctas = []
    for length in shape.seqlens:  # flash-attn's split grid: splits fastest, then head, then batch
        for _ in range(shape.nheads_k):
            n_blocks = -(-length // bn)
            per_split = -(-n_blocks // splits)
            for i in range(splits):
                first, last = min(i * per_split, n_blocks), min((i + 1) * per_split, n_blocks)
                latency, streaming = _piece(gpu, max(0, min(last * bn, length) - first * bn), last - first)
                ctas.append((latency, streaming + partial_write))
    makespan = _list_schedule(ctas, gpu.num_sms, gpu.ctas_per_sm)
    makespan += _combine_kernel_us(gpu, [splits] * tiles)
    return _result(shape, gpu, makespan, len(ctas), block_n=bn, splits=splits)


def simulate_stream_k(
    shape: Shape, gpu: GpuModel, block_n: int | None = None, *, separate_merge: bool = False,
) -> ScheduleResult:
    """Stream-K with the assignment of :func:`longattn.decode.plan_decode` for
    ``G = gpu.num_workers``. ``block_n=None`` takes, of :data:`STREAM_K_BLOCK_NS`
    up to ``gpu.block_n``, the one this model predicts fastest (larger on ties).
    ``separate_merge``: partials merged by a second kernel (the Triton twin's
    two launches) instead of by each tile's last contributor."""
    if block_n is not None:
        return _stream_k(shape, gpu, block_n, separate_merge)
    candidates = [bn for bn in STREAM_K_BLOCK_NS if bn <= gpu.block_n] or [gpu.block_n]
    results = [_stream_k(shape, gpu, bn, separate_merge) for bn in candidates]
    return min(results, key=lambda r: r.makespan_us)  # min keeps the first (largest) of equals


def _stream_k(shape: Shape, gpu: GpuModel, bn: int, separate_merge: bool) -> ScheduleResult:
    # Launch no more workers than LeanTiles (assumption 4): plan_decode given G > W
    # spreads the W LeanTiles to every (G / W)-th worker, two busy ones per SM.
    lean_tiles = sum(-(-n // bn) for n in shape.seqlens) * shape.nheads_k
    g = max(1, min(gpu.num_workers, lean_tiles))
    plan = plan_decode(shape.seqlens, nheads_k=shape.nheads_k, num_workers=g, block_n=bn)
    latency = [gpu.cta_prologue_us] * g  # every launched worker starts, even one with no work
    streaming = [0.0] * g
    # tile -> [(end of a part, its worker)]; ends on each worker's own chain,
    # as its SM's co-resident worker slows both alike.
    part_ends: dict[int, list[tuple[float, int]]] = {}
    for seg in plan.segments:
        c = seg.worker
        latency[c] += gpu.segment_us + (seg.last - seg.first) * gpu.iteration_us
        streaming[c] += (min(seg.last * bn, shape.seqlens[seg.batch]) - seg.first * bn) * gpu.key_us
        if not seg.whole_tile:
            streaming[c] += gpu.partial_us  # writes its (out, lse)
            part_ends.setdefault(seg.tile, []).append((latency[c] + streaming[c], c))
    partials = {tile: len(parts) for tile, parts in part_ends.items()}
    if not separate_merge:
        # Each column slice of a tile's merge goes to one of its last arrivers, on
        # distinct SMs, latest first. A merger that finished its own work before the
        # tile's last partial landed waits for it (once: its merges come after all of
        # its own work). Otherwise where in its timeline a merge happens does not
        # change its totals, which is all the makespan needs.
        own_end = [latency[c] + streaming[c] for c in range(g)]
        wait = [0.0] * g
        for parts in part_ends.values():
            mergers: list[int] = []
            sms: set[int] = set()
            for _, c in sorted(parts, reverse=True):
                if c % gpu.num_sms not in sms:
                    mergers.append(c)
                    sms.add(c % gpu.num_sms)
            last = max(parts)[0]
            for i, cols in enumerate(_column_slices(gpu)):
                c = mergers[i % len(mergers)]
                latency[c] += gpu.merge_us
                streaming[c] += gpu.merge_read_us(len(parts), cols)
                wait[c] = max(wait[c], last - own_end[c])
        for c in range(g):
            latency[c] += wait[c]
    machine = _Machine(gpu.num_sms, gpu.workers_per_sm)
    for c in range(g):
        machine.place(c % gpu.num_sms, c // gpu.num_sms, latency[c], streaming[c])
    makespan = machine.makespan_us()
    if separate_merge:
        makespan += _combine_kernel_us(gpu, list(partials.values()), column_split=True)
    fan_in = max(partials.values(), default=1)  # most contributors of one tile
    return _result(shape, gpu, makespan, g, block_n=bn, workers=g, fan_in=fan_in,
                   merge_programs=gpu.merge_programs)


def simulate_shape(shape: Shape, gpu: GpuModel, *, separate_merge: bool = False) -> dict[str, Any]:
    """All three schedules on one shape, and stream-K's speedups (ratios of makespans)."""
    results = {
        "fa2": simulate_fa2(shape, gpu),
        "split_k": simulate_split_k(shape, gpu),
        "stream_k": simulate_stream_k(shape, gpu, separate_merge=separate_merge),
    }
    sk = results["stream_k"].makespan_us
    return {
        "label": shape.label, "batch": shape.batch, "context": shape.context,
        "nheads_k": shape.nheads_k, "ragged": shape.ragged, "seqlens": list(shape.seqlens),
        "total_keys": shape.total_keys, "kv_mib": shape.total_keys * gpu.bytes_per_key / 2**20,
        "schedules": {name: asdict(r) for name, r in results.items()},
        "speedup_vs_fa2": results["fa2"].makespan_us / sk,
        "speedup_vs_split_k": results["split_k"].makespan_us / sk,
    }


def sweep_shapes(quick: bool = False, seed: int = 0) -> list[Shape]:
    """Uniform shapes over batch x context x kv heads, then ragged ones (batch >= 2)
    with lengths uniform in ``[context / 4, context]`` from a seeded RNG per shape."""
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if quick else (BATCHES, CONTEXTS)
    shapes = []
    for ragged in (False, True):
        for batch in batches:
            if ragged and batch == 1:
                continue  # a single random length says nothing a uniform shape does not
            for context in contexts:
                for heads in KV_HEADS:
                    if ragged:
                        rng = random.Random(f"{seed}:{batch}:{context}:{heads}")
                        lengths = tuple(rng.randint(context // 4, context) for _ in range(batch))
                    else:
                        lengths = (context,) * batch
                    shapes.append(Shape(lengths, heads, context, ragged))
    return shapes


def run_sweep(gpu: GpuModel, *, quick: bool = False, seed: int = 0, separate_merge: bool = False) -> dict[str, Any]:
    """Simulate every shape of :func:`sweep_shapes`: a JSON-ready dict with a summary."""
    start = time.perf_counter()
    rows = [simulate_shape(s, gpu, separate_merge=separate_merge) for s in sweep_shapes(quick, seed)]
    return {
        "command": "longattn simulate lean",
        "gpu": {**asdict(gpu), "key_us": gpu.key_us, "partial_us": gpu.partial_us, "num_workers": gpu.num_workers},
        "settings": {"quick": quick, "seed": seed, "separate_merge": separate_merge},
        "assumptions": assumptions(gpu, separate_merge=separate_merge),
        "shapes": rows,
        "summary": summarize(rows),
        "runtime_s": time.perf_counter() - start,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and max speedups, batch-1 speedups by context, and how the claims fare."""
    def top(key: str) -> dict[str, Any]:
        best = max(rows, key=lambda r: r[key])
        return {"speedup": best[key], "at": best["label"]}

    util = [r["schedules"]["stream_k"]["utilisation"] for r in rows]
    below = [(r, u) for r, u in zip(rows, util) if u < UTILISATION_TARGET]
    slower = [r for r in rows if r["speedup_vs_split_k"] < 1.0]
    batch1: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        if r["batch"] == 1 and not r["ragged"]:
            per = batch1.setdefault(format_context(r["context"]), {"vs_fa2": {}, "vs_split_k": {}})
            per["vs_fa2"][f"h{r['nheads_k']}"] = r["speedup_vs_fa2"]
            per["vs_split_k"][f"h{r['nheads_k']}"] = r["speedup_vs_split_k"]
    return {
        "shapes": len(rows),
        "mean_speedup_vs_fa2": sum(r["speedup_vs_fa2"] for r in rows) / len(rows),
        "mean_speedup_vs_split_k": sum(r["speedup_vs_split_k"] for r in rows) / len(rows),
        "max_speedup_vs_fa2": top("speedup_vs_fa2"),
        "max_speedup_vs_split_k": top("speedup_vs_split_k"),
        "batch1_by_context": batch1,
        "stream_k_slower_than_split_k": [
            {"at": r["label"], "speedup": r["speedup_vs_split_k"]} for r in slower
        ],
        "utilisation_target": UTILISATION_TARGET,
        "stream_k_min_utilisation": min(util),
        "stream_k_below_target": [{"at": r["label"], "utilisation": u} for r, u in below],
        # Every shape with more KV than this reaches the target.
        "target_holds_above_kv_mib": max((r["kv_mib"] for r, _ in below), default=0.0),
    }


def assumptions(gpu: GpuModel, *, separate_merge: bool = False) -> list[str]:
    """The model's assumptions with this GPU's numbers, one line each."""
    merge = ("CTAs of a second kernel (the Triton twin)" if separate_merge
             else "the tile's last-arriving contributors on distinct SMs, each waiting for the last partial")
    return [
        f"memory-bound: a key costs moving its K and V ({gpu.bytes_per_key} B per kv head) at the SM's "
        f"1/{gpu.num_sms} share of {gpu.hbm_bandwidth_gbs:g} GB/s HBM = {gpu.key_us * 1e3:.1f} ns; "
        "compute and Q loads hidden; no L2 reuse of K/V",
        f"partials (fp32 out + lse of {gpu.group_size} query heads, {gpu.partial_bytes} B) go through L2 at "
        f"the SM's share of {gpu.l2_bandwidth_gbs:g} GB/s",
        "an idle SM's bandwidth is not lent to busy SMs (favours stream-K when few SMs are busy)",
        f"resident CTAs per SM: stream-K {gpu.workers_per_sm}, FA2/split-K {gpu.ctas_per_sm}; they share the "
        "SM's bandwidth and one CTA's latencies overlap the others' streaming perfectly",
        f"latencies (guesses, not measured): CTA prologue {gpu.cta_prologue_us:g} us, per segment "
        f"{gpu.segment_us:g} us, per LeanTile {gpu.iteration_us:g} us, per merge {gpu.merge_us:g} us, "
        f"gap before a second kernel {gpu.kernel_gap_us:g} us; the first launch is left out",
        "CTAs dispatched in launch order to the SM that frees first; stream-K launches min(G, W) workers "
        f"(G = {gpu.num_workers}, W = LeanTiles; a launcher plans for W workers when W < G, one per SM), "
        f"all resident, worker c on SM c % {gpu.num_sms}",
        f"stream-K merges a tile in ceil({gpu.headdim} / {gpu.merge_block_d}) = {gpu.merge_programs} headdim "
        f"column programs (as the Triton twin's merge kernel), each reading every partial's lse and its columns "
        f"of their out: {merge}; split-K's combine reads a tile's partials in one CTA",
        f"LeanTile: {gpu.block_n} keys for FA2 and split-K; stream-K takes whichever of "
        f"{'/'.join(map(str, STREAM_K_BLOCK_NS))} keys the model predicts fastest per shape",
        "utilisation = useful K/V streaming time / (SMs x makespan) = fraction of peak HBM bandwidth",
    ]
