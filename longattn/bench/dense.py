"""The ``dense`` benchmark group: causal prefill attention, SDPA as the baseline.

Shapes: batch 1, 8 heads, headdim 128, float32, causal, seqlen_q == seqlen_k
in 1k..8k. Methods:

- ``longattn.attention``: the front door, ``backend="auto"`` (on a CPU with
  a compiler and AVX2: the C++ flash kernel, ``csrc/cpu/flash_cpu.cpp``);
- ``longattn cpp``: ``backend="cpp"``, the C++ flash kernel whatever auto
  picks (on an AMX Xeon auto sends fp32 from 4096 queries to SDPA), so the
  kernel's own GFLOP/s and share of the FMA peak are in every table;
- ``longattn eager twin``: ``backend="eager"``, the readable chunked twin;
- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` on transposed
  views. Its top-left causal alignment equals longattn's bottom-right one
  only because seqlen_q == seqlen_k here;
- ``flex_attention``: compiled once per shape with a causal BlockMask; the
  compile time is reported, not timed.

Errors are measured against the float64 oracle while its score tensor is
small enough to materialise, else against SDPA's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.machine import FMA_PEAK, fma_peak_method
from longattn.bench.scenarios import Group, Method, MethodUnavailable, Scenario, Target, Timed, no_setup, register_group
from longattn.reference import attention_ref

BATCH, NHEADS, HEADDIM, DTYPE = 1, 8, 128, torch.float32

# The oracle holds several float64 copies of the (batch, nheads, seqlen_q,
# seqlen_k) scores; 64 Mi scores is ~0.5 GiB per copy, a few GiB in all.
ORACLE_MAX_SCORES = 1 << 26

TARGET = Target(
    method="longattn.attention",
    max_ratio=1.1,
    note="issue target: longattn.attention within 1.1x of SDPA at 8k causal fp32 H=8 D=128",
)
TARGET_SEQLEN = 8192
PEAK_TARGET = Target(
    method="longattn.attention",
    max_ratio=None,
    note="issue 15 target: dense fp32 prefill >= 70% of the FMA peak at 8k causal",
    min_peak_fraction=0.7,
)


@dataclass(frozen=True)
class DenseInputs:
    """``q, k, v`` of shape ``(batch, seqlen, nheads, headdim)`` (flash-attn layout)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def make_dense_inputs(seqlen: int, seed: int) -> DenseInputs:
    """Standard-normal q, k, v from a seeded generator (nothing downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, seqlen, NHEADS, HEADDIM)
    q, k, v = (torch.randn(shape, generator=gen, dtype=DTYPE) for _ in range(3))
    return DenseInputs(q, k, v)


def run_longattn(inputs: DenseInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True)


def cpp_kernel_setup(dtype: torch.dtype) -> Callable[[DenseInputs], Timed]:
    """Setup of a ``longattn cpp`` method: the C++ kernel forced
    (``backend="cpp"``), its engine for ``dtype`` named in the report's note;
    unavailable, with the reason, where the kernel cannot build."""

    def build_cpp(inputs: DenseInputs) -> Timed:
        from longattn.kernels.dense.cpp import choose_math, flash_unavailable_reason

        reason = flash_unavailable_reason()
        if reason is not None:
            raise MethodUnavailable(reason)
        engine = choose_math(dtype)

        def run_cpp(inputs: DenseInputs) -> torch.Tensor:
            return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True, backend="cpp")

        run_cpp.note = f"engine: {engine}"  # shown in the report's note column
        return run_cpp

    return build_cpp


def run_eager(inputs: DenseInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True, backend="eager")


def run_sdpa(inputs: DenseInputs) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx  # top-left == bottom-right: the scenario is square


def build_flex(inputs: DenseInputs) -> Timed:
    """Compile flex_attention for this shape and run it once (the compile).

    ``dynamic=False``: each shape gets its own static-shape kernel, as a
    serving stack that compiles per bucket would use it.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise MethodUnavailable(f"this torch has no flex_attention ({exc})") from None
    seqlen = inputs.q.shape[1]
    block_mask = create_block_mask(_causal, None, None, seqlen, seqlen, device=inputs.q.device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run_flex(inputs: DenseInputs) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
        return compiled(q, k, v, block_mask=block_mask).transpose(1, 2)

    run_flex(inputs)
    return run_flex


def dense_reference(inputs: DenseInputs, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    """The float64 oracle where it fits in memory, else SDPA's float32 output."""
    batch, seqlen, nheads, _ = inputs.q.shape
    if batch * nheads * seqlen * seqlen <= ORACLE_MAX_SCORES:
        out, _ = attention_ref(inputs.q, inputs.k, inputs.v, causal=True)
        return out, "oracle (float64)"
    out = outputs["sdpa"] if "sdpa" in outputs else run_sdpa(inputs)
    return out, "sdpa (float32)"


def dense_scenario(seqlen: int) -> Scenario:
    methods = [
        Method("longattn.attention", no_setup(run_longattn)),
        Method("longattn cpp", cpp_kernel_setup(DTYPE)),
        Method("longattn eager twin", no_setup(run_eager)),
        Method("sdpa", no_setup(run_sdpa)),
        Method("flex_attention", build_flex, slow_setup=True),
        fma_peak_method(lambda inputs: causal_flops(BATCH, NHEADS, seqlen, HEADDIM)),
    ]
    return Scenario(
        name=f"dense causal fp32 seqlen={seqlen}",
        group="dense",
        size=seqlen,
        params={
            "batch": BATCH, "seqlen_q": seqlen, "seqlen_k": seqlen, "nheads": NHEADS,
            "headdim": HEADDIM, "dtype": str(DTYPE).removeprefix("torch."), "causal": True,
        },
        make_inputs=lambda seed: make_dense_inputs(seqlen, seed),
        methods={m.name: m for m in methods},
        baseline="sdpa",
        reference=dense_reference,
        targets=(TARGET, PEAK_TARGET) if seqlen == TARGET_SEQLEN else (),
        flops=lambda inputs: causal_flops(BATCH, NHEADS, seqlen, HEADDIM),
        peak_method=FMA_PEAK,
    )


def causal_flops(batch: int, nheads: int, seqlen: int, headdim: int) -> float:
    """FLOPs of exact causal attention: per visible (query, key) pair and head,
    a ``headdim``-long dot product (QK^T) and axpy (PV), 2 FLOPs per element each."""
    pairs = seqlen * (seqlen + 1) / 2
    return 4.0 * headdim * pairs * nheads * batch


DENSE = register_group(
    Group(
        name="dense",
        description=f"causal prefill, batch {BATCH}, H={NHEADS}, D={HEADDIM}, fp32; baseline SDPA",
        size_name="seqlen",
        sizes=(1024, 2048, 4096, 8192),
        quick_sizes=(128, 256),
        make_scenario=dense_scenario,
    )
)
