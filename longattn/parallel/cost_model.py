"""An alpha-beta cost model of sequence-parallel attention: profiles, fitting, step-time formulas.

A :class:`Profile` says how fast one rank computes and how fast its links
move bytes:

- attention: ``t = overhead_s + pairs * pair_cost_s`` for one
  :func:`longattn.attention` call of ONE rank (one thread on a CPU), where
  ``pairs`` counts the query-key pair-dots the call computes (per head, summed
  over heads); fitted at the profile's ``headdim`` and scaled by
  ``headdim / profile headdim`` for other head sizes (a pair costs one
  ``D``-long dot and one ``D``-long axpy);
- links, per backend: a message of ``b`` bytes takes ``alpha_s + b *
  beta_s_per_byte`` one way (fitted from a ping-pong sweep); a simultaneous
  exchange (send to one peer while receiving from another, as a ring step
  does) takes ``duplex_factor`` times that (1 = full duplex; gloo over
  loopback on a small CPU measures ~2, since both ranks' copies are CPU
  work);
- ``cores`` of the machine (None for GPUs: every rank has its own device) and
  ``comm_uses_cpu`` (gloo: sending and receiving are CPU work, so on a busy
  CPU they do not hide behind compute).

:func:`fit_profile` measures this machine (``longattn simulate parallel
--fit``); :data:`PRESETS` are GPU profiles from published figures.
:func:`predict` gives the forward step time of each method and
:func:`bytes_sent` the bytes each rank posts (what
:func:`longattn.parallel.stats.sent` counts in the implementations).

Profiles are JSON (``json`` only, never pickle) and validated on load with
:class:`~longattn.errors.ArgumentError` naming the field.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from longattn.errors import ArgumentError

PROFILE_FORMAT = "longattn-parallel-profile"
PROFILE_VERSION = 1
METHODS = ("ring", "zigzag", "ulysses", "token_ring", "apb")
METHOD_TITLES = {
    "ring": "ring (contiguous)", "zigzag": "zigzag ring", "ulysses": "Ulysses", "token_ring": "TokenRing",
    "apb": "APB",
}
SCORER_QUERIES = 64  # APB's "last_queries" scorer: the block's last min(64, L) queries score its keys
LSE_BYTES = 4  # float32 lse per (row, head)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Link:
    """One backend's link: one-way message time ``alpha_s + bytes * beta_s_per_byte``;
    a simultaneous send + receive takes ``duplex_factor`` times as long."""

    alpha_s: float
    beta_s_per_byte: float
    duplex_factor: float = 1.0
    points: tuple = ()  # the fit's (bytes, one-way seconds, exchange seconds), least of the repeats, for the record

    def one_way(self, nbytes: float) -> float:
        return self.alpha_s + nbytes * self.beta_s_per_byte if nbytes > 0 else 0.0

    def exchange(self, nbytes: float) -> float:
        return self.duplex_factor * self.one_way(nbytes)


@dataclass(frozen=True)
class Profile:
    """How fast one rank computes attention and moves bytes (module docstring).

    ``pair_cost_s`` is seconds per query-key pair-dot at ``headdim`` in
    ``dtype``; ``overhead_s`` is the fixed cost of one attention call;
    ``cores`` None means every rank has a device of its own."""

    name: str
    source: str
    device: str
    dtype: str
    headdim: int
    overhead_s: float
    pair_cost_s: float
    links: dict[str, Link]
    cores: int | None
    comm_uses_cpu: bool
    isa: tuple[str, ...] = ()
    measured_at: str | None = None
    attention_points: tuple = ()  # the fit's (pairs, seconds) medians, for the record
    threads_per_rank: int = 1

    def link(self, backend: str | None = None) -> tuple[str, Link]:
        """``(name, Link)`` of ``backend`` (None: the profile's only / first link)."""
        if backend is None:
            backend = next(iter(self.links))
        if backend not in self.links:
            raise ArgumentError(f"backend must be one of {sorted(self.links)} (the profile's links), got {backend!r}")
        return backend, self.links[backend]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": self.name, "source": self.source,
            "measured_at": self.measured_at, "device": self.device, "isa": list(self.isa), "cores": self.cores,
            "threads_per_rank": self.threads_per_rank, "comm_uses_cpu": self.comm_uses_cpu,
            "attention": {"dtype": self.dtype, "headdim": self.headdim, "overhead_s": self.overhead_s,
                          "pair_cost_s": self.pair_cost_s, "points": [list(p) for p in self.attention_points]},
            "links": {name: {"alpha_s": l.alpha_s, "beta_s_per_byte": l.beta_s_per_byte,
                             "duplex_factor": l.duplex_factor, "points": [list(p) for p in l.points]}
                      for name, l in self.links.items()},
        }

    @classmethod
    def from_dict(cls, data: object) -> Profile:
        """Validate a decoded JSON object; :class:`ArgumentError` names the bad field."""
        d = _obj(data, "profile")
        if d.get("format") != PROFILE_FORMAT:
            raise ArgumentError(f"profile field 'format' must be {PROFILE_FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != PROFILE_VERSION:
            raise ArgumentError(f"profile field 'version' must be {PROFILE_VERSION}, got {d.get('version')!r}")
        att = _obj(d.get("attention"), "attention")
        links_in = _obj(d.get("links"), "links")
        if not links_in:
            raise ArgumentError("profile field 'links' must name at least one backend, got {}")
        links = {}
        for name, raw in links_in.items():
            ld = _obj(raw, f"links.{name}")
            links[str(name)] = Link(
                alpha_s=_num(ld, "alpha_s", f"links.{name}", minimum=0.0),
                beta_s_per_byte=_num(ld, "beta_s_per_byte", f"links.{name}", minimum=0.0, strict=True),
                duplex_factor=_num(ld, "duplex_factor", f"links.{name}", minimum=1.0, default=1.0),
                points=_points(ld, f"links.{name}"),
            )
        cores = d.get("cores")
        if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
            raise ArgumentError(f"profile field 'cores' must be a positive integer or null, got {cores!r}")
        isa = d.get("isa", [])
        if not isinstance(isa, list) or not all(isinstance(f, str) for f in isa):
            raise ArgumentError(f"profile field 'isa' must be a list of strings, got {isa!r}")
        headdim = att.get("headdim")
        if isinstance(headdim, bool) or not isinstance(headdim, int) or headdim < 1:
            raise ArgumentError(f"profile field 'attention.headdim' must be a positive integer, got {headdim!r}")
        threads = d.get("threads_per_rank", 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ArgumentError(f"profile field 'threads_per_rank' must be a positive integer, got {threads!r}")
        return cls(
            name=_str(d, "name", ""), source=_str(d, "source", ""), device=_str(d, "device", ""),
            dtype=_str(att, "dtype", "attention."), headdim=headdim,
            overhead_s=_num(att, "overhead_s", "attention", minimum=0.0),
            pair_cost_s=_num(att, "pair_cost_s", "attention", minimum=0.0, strict=True),
            links=links, cores=cores, comm_uses_cpu=_bool(d, "comm_uses_cpu"), isa=tuple(isa),
            measured_at=d.get("measured_at") if isinstance(d.get("measured_at"), str) else None,
            attention_points=_points(att, "attention"), threads_per_rank=threads,
        )


def _obj(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ArgumentError(f"profile field {where!r} must be a JSON object, got {type(value).__name__}")
    return value


def _num(d: dict, key: str, where: str, *, minimum: float, strict: bool = False, default: float | None = None) -> float:
    value = d.get(key, default)
    name = f"{where}.{key}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value <= minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ArgumentError(f"profile field {name!r} must be a finite number {bound}, got {value!r}")
    return float(value)


def _str(d: dict, key: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value:
        raise ArgumentError(f"profile field {(where + key)!r} must be a non-empty string, got {value!r}")
    return value


def _bool(d: dict, key: str) -> bool:
    value = d.get(key)
    if not isinstance(value, bool):
        raise ArgumentError(f"profile field {key!r} must be true or false, got {value!r}")
    return value


def _points(d: dict, where: str) -> tuple:
    raw = d.get("points", [])
    if not isinstance(raw, list) or not all(
            isinstance(p, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
            for p in raw):
        raise ArgumentError(f"profile field '{where}.points' must be a list of lists of numbers")
    return tuple(tuple(p) for p in raw)


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a profile JSON file (json only) and validate it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ArgumentError(f"profile {os.fspath(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ArgumentError(f"profile {os.fspath(path)!r} is not valid JSON: {exc}") from None
    return Profile.from_dict(data)


def save_profile(profile: Profile, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(profile.to_dict(), f, indent=2)
        f.write("\n")


# --- presets from published figures -------------------------------------------------------------------------

# Pair cost of an H100 SXM5: FlashAttention-2's forward reaches ~330 TFLOP/s in bf16 at headdim 128 on H100
# (Dao, "FlashAttention-2", arXiv 2307.08691, and the flash-attn README's H100 benchmark figures); a pair-dot
# of the forward is 4 * headdim FLOPs (QK^T and PV), so 512 / 330e12 s per pair.
# NVLink 4 on H100 SXM5: 900 GB/s total per GPU = 450 GB/s per direction (NVIDIA H100 datasheet); ~10 us
# per NCCL point-to-point message (latency order NCCL's own tests report). InfiniBand NDR: 400 Gb/s =
# 50 GB/s per direction per GPU's NIC (NVIDIA ConnectX-7 datasheet); ~20 us per message.
# Kernel launch + epilogue per attention call ~5 us. Both presets: full duplex links, copies on the NIC /
# copy engines (no compute time), one link type for every pair of ranks.
_H100_PAIR_COST = 4 * 128 / 330e12


def _preset(name: str, link_name: str, gbs: float, alpha_us: float, source: str) -> Profile:
    return Profile(
        name=name, source=source, device="NVIDIA H100 SXM5 (published figures)", dtype="bfloat16", headdim=128,
        overhead_s=5e-6, pair_cost_s=_H100_PAIR_COST,
        links={link_name: Link(alpha_s=alpha_us * 1e-6, beta_s_per_byte=1 / (gbs * 1e9), duplex_factor=1.0)},
        cores=None, comm_uses_cpu=False,
    )


PRESETS = {
    "h100-nvlink": _preset(
        "h100-nvlink", "nccl", 450.0, 10.0,
        "published figures: FlashAttention-2 ~330 TFLOP/s bf16 forward at headdim 128 (arXiv 2307.08691); "
        "NVLink 4 450 GB/s per direction (H100 datasheet), alpha ~10 us",
    ),
    "h100-ib": _preset(
        "h100-ib", "nccl", 50.0, 20.0,
        "published figures: FlashAttention-2 ~330 TFLOP/s bf16 forward at headdim 128 (arXiv 2307.08691); "
        "InfiniBand NDR 400 Gb/s = 50 GB/s per direction (ConnectX-7 datasheet), alpha ~20 us",
    ),
}


def get_preset(name: str) -> Profile:
    if name not in PRESETS:
        raise ArgumentError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


# --- fitting -------------------------------------------------------------------------------------------------

def fit_line(xs: Sequence[float], ys: Sequence[float], what: str = "timings") -> tuple[float, float]:
    """``(intercept, slope)`` of ``y = a + b x`` minimising the RELATIVE squared
    error ``sum(((a + b x - y) / y)^2)`` (sizes span decades: plain least
    squares would fit the largest points only). A negative intercept is
    clamped to 0 (slope refitted through the origin). Raises ArgumentError
    when fewer than 2 points, a time <= 0, or the slope is not positive."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ArgumentError(f"{what}: need at least 2 (size, time) points of equal count, got {len(xs)} and {len(ys)}")
    if any(not (y > 0) for y in ys):
        raise ArgumentError(f"{what}: every time must be > 0, got {list(ys)}")
    w = [1.0 / (y * y) for y in ys]
    sw = sum(w)
    swx = sum(wi * x for wi, x in zip(w, xs))
    swxx = sum(wi * x * x for wi, x in zip(w, xs))
    swy = sum(wi * y for wi, y in zip(w, ys))
    swxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    det = sw * swxx - swx * swx
    if det <= 0:
        raise ArgumentError(f"{what}: the sizes must not all be equal, got {list(xs)}")
    a = (swxx * swy - swx * swxy) / det
    b = (sw * swxy - swx * swy) / det
    if a < 0:
        a, b = 0.0, swxy / swxx
    if not b > 0:
        raise ArgumentError(f"{what}: times do not grow with size (fitted slope {b:g})")
    return a, b


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def link_sizes(quick: bool = False) -> list[int]:
    """Ping-pong message sizes: 4 KiB x 4^i up to 64 MiB (4 MiB with ``quick``: the
    largest must take well over the scheduling noise of the smallest)."""
    top = 1 << (22 if quick else 26)
    return [4096 << (2 * i) for i in range(12) if 4096 << (2 * i) <= top]


def _pingpong_rank(rank: int, port: int, sizes: list[int], repeats: int, queue) -> None:
    """One of the two spawned ranks: for every size, ``repeats`` ping-pongs
    (one-way = round trip / 2) and ``repeats`` simultaneous exchanges; rank 0
    puts ``[(bytes, least one-way s, least exchange s), ...]`` on ``queue``:
    the least of the repeats, since the other processes on the machine only
    ever lengthen a timing (a median of 3 on a 2-core machine once gave a
    small message a slower time than a 1 MiB one, and the fit a negative slope)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=30))
        peer = 1 - rank
        out = []
        for nbytes in sizes:
            send = torch.ones(nbytes, dtype=torch.uint8)
            recv = torch.empty_like(send)
            one_way, exchange = [], []
            for rep in range(repeats + 1):  # the first round warms the connection up and is dropped
                dist.barrier()
                start = time.perf_counter()
                if rank == 0:
                    dist.send(send, peer)
                    dist.recv(recv, peer)
                else:
                    dist.recv(recv, peer)
                    dist.send(send, peer)
                rtt = time.perf_counter() - start
                dist.barrier()
                start = time.perf_counter()
                works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)])
                for w in works:
                    w.wait()
                ex = time.perf_counter() - start
                if rep:
                    one_way.append(rtt / 2)
                    exchange.append(ex)
            out.append((nbytes, min(one_way), min(exchange)))
        if rank == 0:
            queue.put(("ok", out))
        dist.destroy_process_group()
    except Exception as exc:  # reported to the parent, which raises
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def measure_link(quick: bool = False, repeats: int | None = None,
                 timeout: float = 90.0) -> list[tuple[int, float, float]]:
    """Ping-pong sweep between 2 spawned gloo ranks on 127.0.0.1 (one thread
    each): ``[(bytes, one-way s, exchange s)]``, the least of ``repeats``."""
    import multiprocessing

    from longattn.parallel.comm import free_port

    repeats = (3 if quick else 5) if repeats is None else repeats
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    try:
        procs = [ctx.Process(target=_pingpong_rank, args=(r, port, link_sizes(quick), repeats, queue), daemon=True)
                 for r in range(2)]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    try:
        import queue as queue_mod
        try:
            status, payload = queue.get(timeout=timeout)
        except queue_mod.Empty:
            raise RuntimeError(f"measure_link: the ping-pong ranks reported nothing within {timeout:g} s") from None
        if status != "ok":
            raise RuntimeError(f"measure_link: the ping-pong failed: {payload}")
        return [tuple(p) for p in payload]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def fit_link(points: Sequence[tuple[float, float, float]]) -> Link:
    """A :class:`Link` from ``(bytes, one-way s, exchange s)`` points: alpha
    and beta by :func:`fit_line` over one-way times; ``duplex_factor`` = the
    median exchange / one-way ratio over messages of 1 MiB and more (where
    bandwidth, not latency, decides), at least 1."""
    alpha, beta = fit_line([p[0] for p in points], [p[1] for p in points], "link timings")
    big = [p[2] / p[1] for p in points if p[0] >= (1 << 20) and p[1] > 0] or [p[2] / p[1] for p in points if p[1] > 0]
    return Link(alpha_s=alpha, beta_s_per_byte=beta, duplex_factor=max(1.0, _median(big)), points=tuple(points))


def attention_shapes(quick: bool = False) -> list[tuple[int, bool]]:
    """``(seqlen, causal)`` of the attention fit's runs (H = 8, D = 128, fp32)."""
    if quick:
        return [(256, False), (512, False), (256, True), (512, True)]
    return [(1024, False), (2048, False), (4096, False), (2048, True), (4096, True), (8192, True)]


def measure_attention(quick: bool = False, repeats: int | None = None, nheads: int = 8,
                      headdim: int = 128) -> list[tuple[float, float]]:
    """``[(pairs, seconds)]`` of single-process :func:`longattn.attention` calls
    on ONE thread (fp32, batch 1): this thread's CPU time (what one rank with
    a core of its own would take, robust to other processes sharing the
    cores, though not to their cache traffic), median of ``repeats`` after
    one small warm-up call (loads the kernel library)."""
    import torch

    from longattn.api import attention

    repeats = (2 if quick else 3) if repeats is None else repeats
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        points = []
        warm = torch.randn(1, 64, nheads, headdim, generator=gen)
        attention(warm, warm, warm, causal=True, return_lse=True)
        for seqlen, causal in attention_shapes(quick):
            q, k, v = (torch.randn(1, seqlen, nheads, headdim, generator=gen) for _ in range(3))
            times = []
            for _ in range(repeats):
                start = time.thread_time()
                attention(q, k, v, causal=causal, return_lse=True)
                times.append(time.thread_time() - start)
            pairs = nheads * (seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen)
            points.append((float(pairs), _median(times)))
        return points
    finally:
        torch.set_num_threads(threads)


def cpu_facts() -> tuple[str, tuple[str, ...]]:
    """``(model name, ISA flags of interest)`` of this CPU."""
    from longattn.kernels.support.cpp_build import cpu_features, cpu_model

    flags = cpu_features()
    return cpu_model(), tuple(f for f in ISA_FLAGS if f in flags)


def fit_profile(quick: bool = False) -> Profile:
    """Measure this machine: the gloo ping-pong (2 spawned ranks) and the
    one-thread attention fit; a :class:`Profile` named ``"this-machine"``."""
    link = fit_link(measure_link(quick))
    att = measure_attention(quick)
    overhead, pair_cost = fit_line([p[0] for p in att], [p[1] for p in att], "attention timings")
    model, isa = cpu_facts()
    return Profile(
        name="this-machine", source="measured by longattn simulate parallel --fit" + (" --quick" if quick else ""),
        device=model, dtype="float32", headdim=128, overhead_s=overhead, pair_cost_s=pair_cost,
        links={"gloo": link}, cores=os.cpu_count() or 1, comm_uses_cpu=True, isa=isa,
        measured_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        attention_points=tuple(att),
    )


# --- pair counts and bytes ----------------------------------------------------------------------------------

def _tri(n: float) -> float:
    """Pairs of a causal square of ``n`` queries and keys: ``n (n + 1) / 2``."""
    return n * (n + 1) / 2


def _apb_sizes(block: float, anchor: float | None, passing: float | None) -> tuple[float, float]:
    """APB's anchor and passing lengths; defaults block/4 and block/8 (floored)."""
    a = math.floor(block / 4) if anchor is None else anchor
    p = math.floor(block / 8) if passing is None else passing
    if a < 0 or p < 0:
        raise ArgumentError(f"anchor and passing must be >= 0, got anchor={a}, passing={p}")
    return float(a), float(p)


def step_pairs(method: str, T: float, N: int, rank: int, *, causal: bool = True, anchor: float | None = None,
               passing: float | None = None) -> list[float]:
    """Query-key pairs PER HEAD that ``rank`` computes at each step (one entry
    per attention call it makes; Ulysses and APB make one), closed forms with
    ``L = T / N`` local tokens (zigzag: two chunks of ``L / 2``):

    - ring (contiguous): step ``s`` uses the block of rank ``r - s``: the
      diagonal ``L (L+1) / 2`` at step 0, a full ``L^2`` for ``s <= r``,
      nothing after (keys in the future). Rank ``N-1`` does all ``N`` blocks.
    - zigzag (and token_ring, the same pieces with q and KV swapped): step 0
      ``L (L+1) / 2`` (the local chunk pair, causal), then ``L^2 / 2`` every
      step (all local queries vs the first half of the block, or the second
      half of them vs all of it): equal on every rank.
    - ulysses: ``T (T+1) / 2`` for each of the rank's ``H/N`` heads: this
      function returns it per head of the RANK, i.e. multiply by ``H/N``.
    - apb: host ``h``: ``L (A_h + h P) + L (L+1) / 2`` (its block's queries,
      bottom-right causal, against anchor ``A_h`` (0 on host 0), the passing
      blocks of the ``h`` earlier hosts and its own block); host 0's passing
      block is ``min(P, L - A)`` tokens. The scorer is separate
      (:func:`scorer_pairs`).

    Not causal: every method does ``L^2`` per step (Ulysses ``T^2``; APB is
    causal only).
    """
    _check_method(method)
    L = T / N
    if method == "ulysses":
        return [_tri(T) if causal else T * T]
    if method == "apb":
        a, p = _apb_sizes(L, anchor, passing)
        p0, p_other = min(p, L - a), min(p, L)
        prefix = 0.0 if rank == 0 else a + p0 + (rank - 1) * p_other
        return [L * prefix + _tri(L)]
    if not causal:
        return [L * L] * N
    if method == "ring":
        return [_tri(L)] + [L * L if s <= rank else 0.0 for s in range(1, N)]
    return [_tri(L)] + [L * L / 2] * (N - 1)  # zigzag, token_ring


def scorer_pairs(T: float, N: int, rank: int) -> float:
    """APB scorer pairs per q head on ``rank``: its last ``min(64, L)`` queries
    against its ``L`` keys; the last host scores nothing (no later host reads
    its passing block)."""
    L = T / N
    return 0.0 if rank == N - 1 or N == 1 else min(SCORER_QUERIES, L) * L


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ArgumentError(f"method must be one of {list(METHODS)}, got {method!r}")


def ulysses_kv_heads(nheads: int, nheads_k: int, N: int) -> int | None:
    """kv heads one Ulysses rank receives (``Hk/N``, or 1 when replicating
    with ``Hk < N`` and ``N % Hk == 0``); None when Ulysses cannot split
    (``H % N != 0`` or another head combination: "n/a")."""
    if nheads % N:
        return None
    if nheads_k % N == 0:
        return nheads_k // N
    if nheads_k < N and N % nheads_k == 0:
        return 1
    return None


def bytes_sent(method: str, T: float, H: int, H_kv: int, D: int, N: int, dtype_bytes: int,
               anchor: float | None = None, passing: float | None = None, *, rank: int | None = None,
               causal: bool = True, layout: str = "zigzag", return_lse: bool = False) -> float:
    """Bytes ``rank`` posts in one forward (None: the most any rank posts),
    batch 1, ``L = T/N``, ``e = dtype_bytes``; what the implementations count
    with :func:`longattn.parallel.stats.sent`:

    - ring, zigzag: ``N-1`` KV blocks, ``(N-1) * 2 L H_kv D e``.
    - ulysses: ``(N-1) L (H/N + 2 hk) D e`` (q, k, v) + ``(N-1) L (H/N) (D e
      + 4 return_lse)`` (out [+ lse]); ``hk = H_kv/N`` or 1 when kv heads are
      replicated; NaN when Ulysses cannot split the heads.
    - token_ring: ``N-1`` q blocks ``L H D e``, plus the partial outputs sent
      home, ``rows * H * (D e + 4)`` each (out in q's dtype with the float32
      lse packed behind it), for the rows of non-empty pieces only: causal
      zigzag (``layout``) sends ``L`` rows to each higher owner and ``L/2``
      to each lower one, so rank 0 sends the most; causal contiguous sends
      ``L`` rows to each higher owner only.
    - apb: one ``all_gather`` message of ``H_kv S (4 + 2 D e)`` bytes, ``S =
      min(A + P, L)`` token slots (int32 positions, k, v); 0 for ``N = 1``
      or ``A = P = 0``.
    """
    _check_method(method)
    if N < 1 or T <= 0:
        raise ArgumentError(f"N must be >= 1 and T > 0, got N={N}, T={T}")
    if rank is None:
        return max(bytes_sent(method, T, H, H_kv, D, N, dtype_bytes, anchor, passing, rank=r, causal=causal,
                              layout=layout, return_lse=return_lse) for r in _distinct_ranks(method, N))
    L = T / N
    if N == 1:
        return 0.0
    if method in ("ring", "zigzag"):
        return (N - 1) * 2 * L * H_kv * D * dtype_bytes
    if method == "ulysses":
        hk = ulysses_kv_heads(H, H_kv, N)
        if hk is None:
            return math.nan
        return (N - 1) * L * (H / N + 2 * hk) * D * dtype_bytes + (N - 1) * L * (H / N) * (
            D * dtype_bytes + LSE_BYTES * return_lse)
    if method == "token_ring":
        rows = _token_ring_rows(N, rank, L, causal, layout)
        return (N - 1) * L * H * D * dtype_bytes + rows * H * (D * dtype_bytes + LSE_BYTES)
    a, p = _apb_sizes(L, anchor, passing)
    if a == 0 and p == 0:
        return 0.0
    return H_kv * min(a + p, L) * (4 + 2 * D * dtype_bytes)


def _distinct_ranks(method: str, N: int) -> list[int]:
    """Ranks whose bytes can differ (all of them only for TokenRing)."""
    return list(range(N)) if method == "token_ring" else [0]


def _token_ring_rows(N: int, rank: int, L: float, causal: bool, layout: str) -> float:
    """Partial-output rows ``rank`` sends home over steps 1..N-1 (owners ``o != rank``)."""
    higher, lower = N - 1 - rank, rank  # owners whose q come after / before this rank's KV
    if not causal:
        return (N - 1) * L
    if layout == "contiguous":
        return higher * L
    return higher * L + lower * L / 2


# --- step times ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """A predicted forward of one method (seconds, bytes). ``time_s`` is None
    when the method cannot run the shape (``reason`` says why)."""

    method: str
    T: float
    N: int
    time_s: float | None
    compute_s: float | None = None  # the critical rank's compute, wall (after core sharing)
    compute_cpu_s: float | None = None  # the same on a core of its own (what stats.compute_cpu_s measures)
    comm_s: float | None = None  # the critical rank's communication time, wall, hidden or not
    pairs: float | None = None  # query-key pairs of the critical rank, all its heads
    bytes_sent: float | None = None  # most bytes posted by one rank
    critical_rank: int | None = None
    overlap: bool = False  # communication hidden behind compute (max) or added to it
    reason: str = ""
    details: dict = field(default_factory=dict)


def predict(profile: Profile, method: str, T: float, N: int, *, nheads: int = 8, nheads_k: int | None = None,
            headdim: int = 128, dtype_bytes: int = 4, anchor: float | None = None, passing: float | None = None,
            backend: str | None = None, ranks_per_host: int | None = None, causal: bool = True) -> Prediction:
    """Predicted forward time of ``method`` on ``T`` tokens (batch 1) over ``N`` ranks.

    Per-rank compute of a call is ``overhead_s + pairs * pair_cost_s * D /
    profile.headdim`` (pairs summed over the heads the rank computes, from
    :func:`step_pairs`). A message is ``link.one_way(bytes)``; a ring step's
    simultaneous send + receive is ``link.exchange(bytes)``.

    Overlap: communication hides behind compute (per step ``max``) when the
    link does not use the CPU (GPU presets) or there is a spare core for
    every rank's copies (``cores >= 2 * ranks per host``). Then, with ``C_s``
    the critical rank's compute at step ``s`` and ``M`` a step's message:

    - ring / zigzag: ``sum_{s < N-1} max(C_s, M_kv) + C_{N-1}``; zigzag's
      ``C_s`` are equal, so ``C + (N-1) max(C, M_kv)``; ring's critical rank
      is ``N-1`` (``N`` blocks of work);
    - token_ring: ``sum_{s < N-1} max(C_s, M_q, M_out) + C_{N-1} + M_out``
      (queries one way, partial outputs the other, full duplex; the last
      partial still has to travel home);
    - ulysses: ``A2A(q, k, v) + C + A2A(out)``, ``A2A`` = ``N-1`` exchanges of
      the per-peer block (pairwise); blocking, so nothing overlaps;
    - apb: ``C_score + AG + C_attn`` of host ``N-1``, ``AG`` = ``N-1``
      exchanges of the one message (ring all-gather); blocking.

    Otherwise (gloo on a busy CPU) every rank's copies are CPU work: each
    rank's job is its compute PLUS its communication (the same terms, added),
    and the ranks of one host share its ``cores`` as a processor-sharing
    queue (each busy rank runs at ``min(1, cores / busy ranks)``; ranks that
    finish early give their share to the rest, e.g. ring's lower ranks). The
    step time is the last rank's finish. ``ranks_per_host`` None puts all
    ``N`` ranks on one host (the measured setup).

    Not modelled: the float32 merges of partial outputs (memory-bound,
    ~``L H D`` per step, <1% of a step's attention at benchmark sizes), the
    metadata check's small all_gather, and the head-layout copies of Ulysses.
    """
    _check_method(method)
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ArgumentError(f"N must be a positive integer, got {N!r}")
    if not T > 0:
        raise ArgumentError(f"T must be > 0, got {T!r}")
    nheads_k = nheads if nheads_k is None else nheads_k
    _, link = profile.link(backend)
    L = T / N
    per_pair = profile.pair_cost_s * headdim / profile.headdim
    host = N if ranks_per_host is None else max(1, min(ranks_per_host, N))
    share_one = 1.0 if profile.cores is None else min(1.0, profile.cores / host)
    overlap = (not profile.comm_uses_cpu) or (profile.cores is not None and profile.cores >= 2 * host)
    kv_bytes = 2 * L * nheads_k * headdim * dtype_bytes
    sent = bytes_sent(method, T, nheads, nheads_k, headdim, N, dtype_bytes, anchor, passing, causal=causal)

    def calls(pairs_list: list[float], heads: float) -> list[float]:
        return [profile.overhead_s + p * heads * per_pair if p > 0 else 0.0 for p in pairs_list]

    if method == "ulysses" and ulysses_kv_heads(nheads, nheads_k, N) is None:
        return Prediction(method, T, N, None, bytes_sent=None, reason=(
            f"n/a: Ulysses needs nheads % N == 0 (and nheads_k % N == 0 or N % nheads_k == 0), "
            f"got nheads={nheads}, nheads_k={nheads_k}, N={N}"))
    if method == "apb" and not causal:
        raise ArgumentError("apb is causal only: causal must be True")

    jobs, comm, steps = [], [], []  # per rank: compute seconds (one core), communication seconds; steps of rank
    for r in range(N) if method in ("ring", "apb") else [0]:
        if method == "ulysses":
            heads = nheads / N
        else:
            heads = nheads
        st = calls(step_pairs(method, T, N, r, causal=causal, anchor=anchor, passing=passing), heads)
        if method == "apb":
            st = calls([scorer_pairs(T, N, r)], nheads) + st
        steps.append(st)
        jobs.append(sum(st))
        comm.append(_comm_seconds(method, link, L, N, r, nheads, nheads_k, headdim, dtype_bytes, kv_bytes, anchor,
                                  passing, causal))
    critical = len(jobs) - 1 if method in ("ring", "apb") else 0
    pairs = sum(step_pairs(method, T, N, critical if method in ("ring", "apb") else 0, causal=causal,
                           anchor=anchor, passing=passing)) * (nheads / N if method == "ulysses" else nheads)
    details: dict[str, Any] = {}
    if overlap:
        st, c = steps[critical], comm[critical]
        if method in ("ring", "zigzag"):
            m = link.exchange(kv_bytes) if N > 1 else 0.0
            time_s = sum(max(cs, m) for cs in st[:-1]) + st[-1]
        elif method == "token_ring":
            mq = link.exchange(L * nheads * headdim * dtype_bytes) if N > 1 else 0.0
            mo = link.exchange(L * nheads * (headdim * dtype_bytes + LSE_BYTES)) if N > 1 else 0.0
            time_s = sum(max(cs, mq, mo) for cs in st[:-1]) + st[-1] + mo
        else:  # ulysses, apb: blocking collectives, nothing to hide behind
            time_s = sum(st) + c
        compute_wall = sum(st)
        comm_wall = c
    else:
        # processor sharing within each host; hosts are consecutive rank ranges
        totals = [j + c for j, c in zip(jobs, comm)]
        if len(totals) == 1:
            finish = totals[0] / share_one
            compute_wall, comm_wall = jobs[0] / share_one, comm[0] / share_one
        else:
            finish, fin_rank = 0.0, critical
            for h0 in range(0, N, host):
                f = _processor_sharing(totals[h0:h0 + host], profile.cores)
                if max(f) >= finish:
                    finish, fin_rank = max(f), h0 + max(range(len(f)), key=f.__getitem__)
            critical = fin_rank
            scale = finish / totals[critical] if totals[critical] > 0 else 1.0
            compute_wall, comm_wall = jobs[critical] * scale, comm[critical] * scale
        time_s = finish
        details["core_share"] = share_one
    return Prediction(
        method, T, N, time_s, compute_s=compute_wall, compute_cpu_s=jobs[critical if len(jobs) > 1 else 0],
        comm_s=comm_wall, pairs=pairs, bytes_sent=sent, critical_rank=critical if method in ("ring", "apb") else 0,
        overlap=overlap, details=details,
    )


def _comm_seconds(method: str, link: Link, L: float, N: int, rank: int, H: int, Hk: int, D: int, e: int,
                  kv_bytes: float, anchor, passing, causal: bool) -> float:
    """Communication seconds of ``rank`` (the terms of :func:`predict`'s docstring, summed)."""
    if N == 1:
        return 0.0
    if method in ("ring", "zigzag"):
        return (N - 1) * link.exchange(kv_bytes)
    if method == "token_ring":
        rows = _token_ring_rows(N, 0, L, causal, "zigzag")  # rank 0 sends the most partial rows
        return (N - 1) * link.exchange(L * H * D * e) + (N - 1) * link.duplex_factor * link.alpha_s \
            + rows * H * (D * e + LSE_BYTES) * link.beta_s_per_byte * link.duplex_factor
    if method == "ulysses":
        hk = ulysses_kv_heads(H, Hk, N)
        per_peer_in = L * (H / N + 2 * hk) * D * e
        per_peer_out = L * (H / N) * D * e
        return (N - 1) * (link.exchange(per_peer_in) + link.exchange(per_peer_out))
    a, p = _apb_sizes(L, anchor, passing)
    if a == 0 and p == 0:
        return 0.0
    return (N - 1) * link.exchange(Hk * min(a + p, L) * (4 + 2 * D * e))


def _processor_sharing(works: Sequence[float], cores: int | None) -> list[float]:
    """Finish time of each job when ``len(works)`` jobs share ``cores`` cores
    equally (each busy job runs at ``min(1, cores / busy)``), all starting at 0."""
    if cores is None:
        return list(works)
    order = sorted(range(len(works)), key=works.__getitem__)
    finish = [0.0] * len(works)
    t, done = 0.0, 0.0
    for i, j in enumerate(order):
        busy = len(works) - i
        rate = min(1.0, cores / busy)
        t += (works[j] - done) / rate
        done = works[j]
        finish[j] = t
    return finish


def profile_summary(profile: Profile) -> dict[str, Any]:
    """The profile's figures for a report (JSON-ready)."""
    name, link = profile.link()
    return {
        "name": profile.name, "source": profile.source, "device": profile.device, "isa": list(profile.isa),
        "cores": profile.cores, "measured_at": profile.measured_at, "dtype": profile.dtype,
        "headdim": profile.headdim, "pair_cost_s": profile.pair_cost_s, "overhead_s": profile.overhead_s,
        "pair_gflops": 4 * profile.headdim / profile.pair_cost_s / 1e9,
        "backend": name, "alpha_s": link.alpha_s, "beta_s_per_byte": link.beta_s_per_byte,
        "bandwidth_gbs": 1 / link.beta_s_per_byte / 1e9, "duplex_factor": link.duplex_factor,
        "comm_uses_cpu": profile.comm_uses_cpu,
    }


__all__ = [
    "METHODS", "PRESETS", "Link", "Prediction", "Profile", "bytes_sent", "fit_line", "fit_link", "fit_profile",
    "get_preset", "load_profile", "measure_attention", "measure_link", "predict", "save_profile", "step_pairs",
]
