"""The ``hip-decode`` benchmark group: HiP decode steps against dense decode.

One query token, batch 1, H=8, D=128, float32, HiP defaults, on the ``hip``
group's structured workload (smooth local decay, needle spans, noise) at the
given context. Methods:

- ``hip cached mask``: ``decode_attention(..., sparse=HiP(), state=state)``
  on a step that reuses the selection (7 of every 8 steps with
  ``refresh_interval=8``): sinks + window + the stored blocks;
- ``hip refresh step``: a step that searches first (1 of every 8);
- ``longattn dense``: dense ``decode_attention`` (the C++ stream-K kernel on CPU);
- ``sdpa``: dense SDPA decode, the baseline.

Errors are against the dense decode output (for HiP: its approximation).
Measured: the average step time over a refresh cycle, and the attention
mass the cached selection keeps for the decode query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.hip import CONFIG, HEADDIM, NHEADS, make_hip_inputs
from longattn.bench.scenarios import Group, Method, Scenario, Target, Timed, no_setup, register_group
from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.sparse import HiPDecodeState

SPEEDUP_VS_SDPA = {131072: 10.0}  # the target for a cached-mask step


@dataclass(frozen=True)
class HipDecodeInputs:
    q: torch.Tensor  # (1, 1, nheads, headdim): the query at position context
    k_cache: torch.Tensor  # (1, context + 1, nheads, headdim), full
    v_cache: torch.Tensor
    lengths: torch.Tensor  # (1,) int32 = context + 1 (the step's token is already in the cache)


def make_inputs(context: int, seed: int) -> HipDecodeInputs:
    full = make_hip_inputs(context + 1, seed)
    return HipDecodeInputs(full.q[:, -1:].contiguous(), full.k, full.v,
                           torch.tensor([context + 1], dtype=torch.int32))


def _hip_step(inputs: HipDecodeInputs, state: HiPDecodeState) -> torch.Tensor:
    return longattn.decode_attention(inputs.q, inputs.k_cache, inputs.v_cache, cache_seqlens=inputs.lengths,
                                     sparse=CONFIG, state=state)


def build_cached(inputs: HipDecodeInputs) -> Timed:
    state = HiPDecodeState()
    _hip_step(inputs, state)  # the refresh, not timed

    def run(inputs: HipDecodeInputs) -> torch.Tensor:
        state.steps_since_refresh = 1  # always a reuse step (the state is a documented, caller-held object)
        return _hip_step(inputs, state)
    return run


def run_refresh(inputs: HipDecodeInputs) -> torch.Tensor:
    return _hip_step(inputs, HiPDecodeState())


def run_dense(inputs: HipDecodeInputs) -> torch.Tensor:
    return longattn.decode_attention(inputs.q, inputs.k_cache, inputs.v_cache, cache_seqlens=inputs.lengths)


def run_sdpa(inputs: HipDecodeInputs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(inputs.q.transpose(1, 2), inputs.k_cache.transpose(1, 2),
                                         inputs.v_cache.transpose(1, 2))
    return out.transpose(1, 2)


def reference(inputs: HipDecodeInputs, outputs: dict) -> tuple[torch.Tensor, str]:
    return (outputs["sdpa"] if "sdpa" in outputs else run_sdpa(inputs)), "dense SDPA"


def measure(inputs: HipDecodeInputs, outputs: dict) -> dict[str, float]:
    import time

    state = HiPDecodeState()
    times = []
    for _ in range(CONFIG.refresh_interval):
        start = time.perf_counter()
        _hip_step(inputs, state)
        times.append(time.perf_counter() - start)
    n = int(inputs.lengths[0])
    layout = BlockSparseLayout(1, n, 1, CONFIG.block_k, CONFIG.sink_size, CONFIG.recent_size, True)
    seen = layout.dense_mask(state.key_blocks[0])[0, :, 0]  # (nheads, n)
    scores = torch.einsum("hd,jhd->hj", inputs.q[0, 0], inputs.k_cache[0, :n]) * HEADDIM ** -0.5
    recall = float((torch.softmax(scores, -1) * seen).sum(-1).mean())
    return {"mean step ms over a refresh cycle": 1e3 * sum(times) / len(times),
            "recall (dense mass kept)": recall}


def hip_decode_scenario(context: int) -> Scenario:
    methods = [
        Method("hip cached mask", build_cached),
        Method("hip refresh step", no_setup(run_refresh)),
        Method("longattn dense", no_setup(run_dense)),
        Method("sdpa", no_setup(run_sdpa)),
    ]
    targets = ()
    if context in SPEEDUP_VS_SDPA:
        x = SPEEDUP_VS_SDPA[context]
        targets = (Target("hip cached mask", 1 / x, f"issue target: >= {x:g}x faster than dense SDPA decode"),)
    return Scenario(
        name=f"hip decode {context // 1024}k",
        group="hip-decode",
        size=context,
        params={"context": context, "nheads": NHEADS, "headdim": HEADDIM, "dtype": "float32", "batch": 1,
                "hip": CONFIG.__dict__},
        make_inputs=lambda seed: make_inputs(context, seed),
        methods={m.name: m for m in methods},
        baseline="sdpa",
        reference=reference,
        targets=targets,
        measure=measure,
    )


HIP_DECODE = register_group(
    Group(
        name="hip-decode",
        description=f"HiP decode (topk {CONFIG.topk}, refresh every {CONFIG.refresh_interval}), one query, fp32, "
                    f"batch 1, H={NHEADS}, D={HEADDIM}; baseline SDPA",
        size_name="context",
        sizes=(32768, 131072),
        quick_sizes=(2048,),
        make_scenario=hip_decode_scenario,
    )
)
