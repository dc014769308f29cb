"""The ``auto`` benchmark group: does ``backend="auto"`` pick the fastest twin?

Causal prefill, batch 1, H=8, D=128, seqlen_q == seqlen_k, in float32,
bfloat16 and float16 at 1k and 4k tokens (case numbers). Methods: the front
door with ``backend="auto"`` and with each dense twin forced (``cpp``,
``sdpa``; ``eager`` only at 1k, where it is affordable). The twins' speed
order depends on the dtype and on the CPU (SDPA's bf16/fp16 GEMMs are
native only on some CPUs), which is what the measured table
:data:`longattn.kernels.dense.AUTO_PREFER_SDPA` encodes; this group checks
it on the machine at hand. Target: auto within 1.05x of every twin timed,
i.e. of the fastest (one target line per twin).

Errors are against the float64 oracle at 1k, against the float32 SDPA
output at 4k (the oracle's scores would need GiBs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import longattn
from longattn.bench.scenarios import Group, Method, Scenario, Target, no_setup, register_group
from longattn.reference import attention_ref

BATCH, NHEADS, HEADDIM = 1, 8, 128
MAX_RATIO = 1.05
EAGER_MAX_SEQLEN = 1024  # the eager twin at 4k would take most of the group's time budget
ORACLE_MAX_SEQLEN = 1024


@dataclass(frozen=True)
class AutoSpec:
    seqlen: int
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"auto causal {str(self.dtype).removeprefix('torch.')} seqlen={self.seqlen}"


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FULL = [AutoSpec(seqlen, dtype) for dtype in DTYPES for seqlen in (1024, 4096)]
QUICK = [AutoSpec(seqlen, dtype) for dtype in DTYPES for seqlen in (64, 160)]
QUICK_OFFSET = 100  # case numbers 1.. are FULL's cases, 101.. QUICK's


@dataclass(frozen=True)
class AutoInputs:
    q: torch.Tensor  # (batch, seqlen, nheads, headdim)
    k: torch.Tensor
    v: torch.Tensor


def make_auto_inputs(spec: AutoSpec, seed: int) -> AutoInputs:
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, spec.seqlen, NHEADS, HEADDIM)
    q, k, v = (torch.randn(shape, generator=gen).to(spec.dtype) for _ in range(3))
    return AutoInputs(q, k, v)


def _front_door(backend: str):
    def run(inputs: AutoInputs) -> torch.Tensor:
        with torch.no_grad():
            return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True, backend=backend)

    return run


def auto_reference(inputs: AutoInputs, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    if inputs.q.shape[1] <= ORACLE_MAX_SEQLEN:
        out, _ = attention_ref(inputs.q, inputs.k, inputs.v, causal=True)
        return out, "oracle (float64)"
    q, k, v = (t.float() for t in (inputs.q, inputs.k, inputs.v))
    return longattn.attention(q, k, v, causal=True, backend="sdpa"), "sdpa (float32 of the inputs)"


def auto_scenario(index: int) -> Scenario:
    """Case number ``index`` (1-based) of :data:`FULL`, or of :data:`QUICK` from ``QUICK_OFFSET + 1`` on."""
    spec = QUICK[index - QUICK_OFFSET - 1] if index > QUICK_OFFSET else FULL[index - 1]
    twins = ["cpp", "sdpa"] + (["eager"] if spec.seqlen <= EAGER_MAX_SEQLEN else [])
    methods = [Method("auto", no_setup(_front_door("auto")))]
    methods += [Method(twin, no_setup(_front_door(twin))) for twin in twins]
    note = f"issue target: auto within {MAX_RATIO}x of the fastest twin"
    return Scenario(
        name=spec.name,
        group="auto",
        size=index,
        params={"batch": BATCH, "seqlen_q": spec.seqlen, "seqlen_k": spec.seqlen, "nheads": NHEADS,
                "headdim": HEADDIM, "dtype": str(spec.dtype).removeprefix("torch."), "causal": True},
        make_inputs=lambda seed: make_auto_inputs(spec, seed),
        methods={m.name: m for m in methods},
        baseline="sdpa",
        reference=auto_reference,
        targets=tuple(Target("auto", MAX_RATIO, note, baseline=twin) for twin in twins),
    )


AUTO = register_group(
    Group(
        name="auto",
        description=f"backend='auto' vs each dense twin, causal prefill fp32/bf16/fp16, H={NHEADS}, "
        f"D={HEADDIM}; targets: auto within {MAX_RATIO}x of each twin",
        size_name="case",
        sizes=tuple(range(1, len(FULL) + 1)),
        quick_sizes=tuple(range(QUICK_OFFSET + 1, QUICK_OFFSET + len(QUICK) + 1)),
        make_scenario=auto_scenario,
        default_repeats=5,
        method_budget_s=6.0,
        plot=False,
    )
)
