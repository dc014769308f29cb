"""The ``duo`` benchmark group: DuoAttention with half the kv heads retrieval heads.

fp32, batch 1, H=8, D=128; the pattern makes kv heads 4-7 retrieval heads
(full attention) and 0-3 streaming heads (64 sinks + 256-token window).
Cases (``longattn bench duo``):

1. prefill at 32k: ``attention(..., sparse=Duo(pattern, 0))`` vs dense causal SDPA
   (the target's baseline) and longattn's own dense attention (the C++
   kernel on a CPU: against it, half the heads dense bounds Duo at 2x);
2. decode at 128k: one step through the two-part :class:`~longattn.sparse.DuoCache`
   vs longattn's dense decode (the C++ stream-K kernel) and SDPA decode.

Measured per case: the cache's K/V bytes against the design note's formula
``2 * B * d * bytes * (H_full * T + H_stream * (sink + window))`` (per layer)
and against a dense cache. Errors are against dense attention (for Duo: its
approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.scenarios import Group, Method, Scenario, Target, Timed, no_setup, register_group
from longattn.sparse import Duo, DuoCache, HeadPattern

NHEADS, HEADDIM, SINK, WINDOW = 8, 128, 64, 256
PATTERN = HeadPattern.from_gates(torch.arange(NHEADS, dtype=torch.float32)[None], sparsity=0.5,
                                 sink_size=SINK, recent_size=WINDOW)
DUO = Duo(PATTERN, 0)
PREFILL_SPEEDUP, DECODE_SPEEDUP = 1.8, 1.8  # the targets (ideal 2x)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "prefill" or "decode"
    length: int


FULL = [Case("duo prefill 32k", "prefill", 32768), Case("duo decode 128k", "decode", 131072)]
QUICK = [Case("duo prefill 2k", "prefill", 2048), Case("duo decode 4k", "decode", 4096)]
QUICK_OFFSET = 100


@dataclass(frozen=True)
class DuoInputs:
    q: torch.Tensor  # prefill: (1, T, H, D); decode: (1, 1, H, D), the query at position T
    k: torch.Tensor  # (1, T + 1 for decode, H, D)
    v: torch.Tensor


def make_inputs(case: Case, seed: int) -> DuoInputs:
    gen = torch.Generator().manual_seed(seed)
    n = case.length + (1 if case.kind == "decode" else 0)
    q, k, v = (torch.randn(1, n, NHEADS, HEADDIM, generator=gen) for _ in range(3))
    if case.kind == "decode":
        q = q[:, -1:].contiguous()
    return DuoInputs(q, k, v)


def run_duo_prefill(inputs: DuoInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True, sparse=DUO)


def run_dense_prefill(inputs: DuoInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True)


def run_sdpa_prefill(inputs: DuoInputs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(inputs.q.transpose(1, 2), inputs.k.transpose(1, 2),
                                         inputs.v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def _filled_cache(inputs: DuoInputs) -> DuoCache:
    context = inputs.k.shape[1] - 1
    cache = DuoCache(DUO, 1, context + 64, NHEADS, HEADDIM)
    cache.append(inputs.k[:, :context], inputs.v[:, :context])
    return cache


def build_duo_step(inputs: DuoInputs) -> Timed:
    cache = _filled_cache(inputs)  # not timed
    context = cache.length

    def run(inputs: DuoInputs) -> torch.Tensor:
        cache.length = context  # every timed step is the same step (the full part is overwritten in place)
        if cache.stream is not None:
            cache.stream.length = context
        return cache.step(inputs.q, inputs.k[:, -1:], inputs.v[:, -1:])
    return run


def run_dense_decode(inputs: DuoInputs) -> torch.Tensor:
    n = torch.tensor([inputs.k.shape[1]], dtype=torch.int32)
    return longattn.decode_attention(inputs.q, inputs.k, inputs.v, cache_seqlens=n)


def run_sdpa_decode(inputs: DuoInputs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(inputs.q.transpose(1, 2), inputs.k.transpose(1, 2),
                                         inputs.v.transpose(1, 2))
    return out.transpose(1, 2)


def reference(inputs: DuoInputs, outputs: dict) -> tuple[torch.Tensor, str]:
    if "sdpa" in outputs:
        return outputs["sdpa"], "dense SDPA"
    run = run_sdpa_prefill if inputs.q.shape[1] > 1 else run_sdpa_decode
    return run(inputs), "dense SDPA"


def measure_memory(inputs: DuoInputs, outputs: dict) -> dict[str, float]:
    """The two-part cache's K/V bytes for the case's length vs the formula and a dense cache."""
    length = inputs.k.shape[1] - (1 if inputs.q.shape[1] == 1 else 0)
    cache = DuoCache(DUO, 1, length, NHEADS, HEADDIM)  # capacity = length: allocated = needed when full
    cache.length = length
    n_full = int(PATTERN.layer(0).sum())
    formula = 2 * 1 * HEADDIM * 4 * (n_full * length + (NHEADS - n_full) * (SINK + WINDOW))
    dense = 2 * 1 * HEADDIM * 4 * NHEADS * length
    return {"cache MiB": cache.allocated_bytes / 2**20, "allocated / formula": cache.allocated_bytes / formula,
            "dense cache / duo cache": dense / cache.allocated_bytes}


def duo_scenario(index: int) -> Scenario:
    case = QUICK[index - QUICK_OFFSET - 1] if index > QUICK_OFFSET else FULL[index - 1]
    if case.kind == "prefill":
        methods = [Method("longattn duo", no_setup(run_duo_prefill)),
                   Method("longattn dense", no_setup(run_dense_prefill)), Method("sdpa", no_setup(run_sdpa_prefill))]
        baseline, x = "sdpa", PREFILL_SPEEDUP
        note = f"issue target: Duo with 50% retrieval heads >= {x:g}x faster than SDPA at 32k"
    else:
        methods = [Method("longattn duo", build_duo_step), Method("longattn dense", no_setup(run_dense_decode)),
                   Method("sdpa", no_setup(run_sdpa_decode))]
        baseline, x = "longattn dense", DECODE_SPEEDUP
        note = f"issue target: >= {x:g}x faster than dense decode at 128k"
    return Scenario(
        name=case.name,
        group="duo",
        size=index,
        params={"kind": case.kind, "length": case.length, "nheads": NHEADS, "headdim": HEADDIM, "dtype": "float32",
                "retrieval_kv_heads": int(PATTERN.layer(0).sum()), "sink_size": SINK, "recent_size": WINDOW},
        make_inputs=lambda seed: make_inputs(case, seed),
        methods={m.name: m for m in methods},
        baseline=baseline,
        reference=reference,
        targets=() if index > QUICK_OFFSET else (Target("longattn duo", 1 / x, note),),
        measure=measure_memory,
    )


DUO_GROUP = register_group(
    Group(
        name="duo",
        description=f"DuoAttention, 50% retrieval kv heads (sink {SINK}, window {WINDOW}), fp32, batch 1, "
                    f"H={NHEADS}, D={HEADDIM}",
        size_name="case",
        sizes=tuple(range(1, len(FULL) + 1)),
        quick_sizes=tuple(range(QUICK_OFFSET + 1, QUICK_OFFSET + len(QUICK) + 1)),
        make_scenario=duo_scenario,
        # 45 s per method and case: three rounds of the 13 s SDPA baseline at 32k
        # rather than one, so that one noisy round on a shared VM does not decide
        # a target that sits within 10% of the measured ratio.
        method_budget_s=45.0,
        plot=False,
    )
)
