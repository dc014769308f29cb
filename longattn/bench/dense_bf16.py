"""The ``dense-bf16`` benchmark group: causal prefill in bfloat16, SDPA bfloat16 as the baseline.

Shapes: batch 1, 8 heads, headdim 128, bfloat16, causal, seqlen_q ==
seqlen_k at 8k and 32k (issue 15's sizes). Methods:

- ``longattn.attention``: ``backend="auto"`` (the C++ kernel where the auto
  rules prefer it for bfloat16 on this CPU, else SDPA; the report names which);
- ``longattn cpp``: ``backend="cpp"``, the C++ flash kernel forced, in its
  fastest bfloat16 engine here (AMX tiles, AVX512-BF16 dot products, or
  float32 math on widened inputs; named in the method's note);
- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` in bfloat16
  (oneDNN's bf16 GEMMs where torch has them).

Targets (issue 15): on a CPU with AMX, the kernel >= 1.5x faster than SDPA
bf16 at 8k and 32k; elsewhere at least SDPA's speed. GFLOP/s as for the
dense group; "% of peak" divides by the ``bf16 peak`` row: the register-only
loop of this machine's fastest bf16 arithmetic (AMX tiles, else AVX512-BF16
dot products, else the float32 FMA loop) run for the case's flops in the same
rounds (:func:`longattn.bench.machine.bf16_peak_method`).
Errors are against SDPA's bfloat16 output (the oracle does not fit at these sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.dense import DenseInputs, causal_flops, cpp_kernel_setup
from longattn.bench.machine import BF16_PEAK, bf16_peak_method
from longattn.bench.scenarios import Group, Method, Scenario, Target, no_setup, register_group
from longattn.kernels.dense import cpu_flags

BATCH, NHEADS, HEADDIM, DTYPE = 1, 8, 128, torch.bfloat16
TARGET_SEQLENS = (8192, 32768)
AMX_FLAGS = ("amx_bf16", "amx_tile")


def speedup_target() -> tuple[float, str]:
    """(required speedup over SDPA bf16, which machine kind it is for) on this CPU."""
    if all(flag in cpu_flags() for flag in AMX_FLAGS):
        return 1.5, "a CPU with AMX"
    return 1.0, "a CPU without AMX"


def make_inputs(seqlen: int, seed: int) -> DenseInputs:
    """Standard-normal bf16 q, k, v from a seeded generator (nothing downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, seqlen, NHEADS, HEADDIM)
    return DenseInputs(*(torch.randn(shape, generator=gen).to(DTYPE) for _ in range(3)))


def run_auto(inputs: DenseInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True)


def run_sdpa(inputs: DenseInputs) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def sdpa_reference(inputs: DenseInputs, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    return (outputs["sdpa"] if "sdpa" in outputs else run_sdpa(inputs)), "sdpa (bfloat16)"


def dense_bf16_scenario(seqlen: int) -> Scenario:
    methods = [
        Method("longattn.attention", no_setup(run_auto)),
        Method("longattn cpp", cpp_kernel_setup(DTYPE)),
        Method("sdpa", no_setup(run_sdpa)),
        bf16_peak_method(lambda inputs: causal_flops(BATCH, NHEADS, seqlen, HEADDIM)),
    ]
    speedup, machine = speedup_target()
    return Scenario(
        name=f"dense causal bf16 seqlen={seqlen}",
        group="dense-bf16",
        size=seqlen,
        params={
            "batch": BATCH, "seqlen_q": seqlen, "seqlen_k": seqlen, "nheads": NHEADS,
            "headdim": HEADDIM, "dtype": "bfloat16", "causal": True,
        },
        make_inputs=lambda seed: make_inputs(seqlen, seed),
        methods={m.name: m for m in methods},
        baseline="sdpa",
        reference=sdpa_reference,
        targets=(Target("longattn cpp", 1 / speedup,
                        f"issue target on {machine}: >= {speedup:g}x SDPA bf16's speed at 8k and 32k causal"),)
        if seqlen in TARGET_SEQLENS else (),
        flops=lambda inputs: causal_flops(BATCH, NHEADS, seqlen, HEADDIM),
        peak_method=BF16_PEAK,
    )


DENSE_BF16 = register_group(
    Group(
        name="dense-bf16",
        description=f"causal prefill, batch {BATCH}, H={NHEADS}, D={HEADDIM}, bf16; baseline SDPA bf16",
        size_name="seqlen",
        sizes=TARGET_SEQLENS,
        quick_sizes=(256, 512),
        make_scenario=dense_bf16_scenario,
        # three rounds of SDPA's ~14 s at 32k rather than one
        method_budget_s=45.0,
    )
)
