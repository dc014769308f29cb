"""The ``varlen`` benchmark group: packed sequences (flash-attn's varlen layout).

A batch of ``n`` sequences (the case size; default 16) with lengths drawn
from 256..8192 (seeded), causal, fp32, H=8, D=128, packed into
``(total, nheads, headdim)`` with ``cu_seqlens``. Methods:

- ``longattn varlen``: ``attention(q, k, v, cu_seqlens_q=..., cu_seqlens_k=...)``;
- ``one dense call (same work)``: ``attention`` on one sequence whose causal
  attention costs what the batch's does (length ``sqrt(sum L_b**2)``): the
  yardstick "packing costs nothing" is measured against (timed, not compared);
- ``sdpa padded``: SDPA with ``is_causal`` over the batch padded to its
  longest sequence (the padding prepared outside the timing).

Targets (issue 11): varlen within 1.15x of the one dense call, and at least
2x faster than padded SDPA. Errors are against the eager varlen twin (float32,
per sequence): the oracle's scores would need tens of GiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.scenarios import Group, Method, Scenario, Target, no_setup, register_group

NHEADS, HEADDIM = 8, 128
MIN_LEN, MAX_LEN = 256, 8192
QUICK_LENGTHS = (16, 96)  # --quick: sequences of 16..96 tokens
QUICK_OFFSET = 100  # size 100 + n: n short sequences (what --quick runs)


@dataclass(frozen=True)
class VarlenInputs:
    q: torch.Tensor  # (total, nheads, headdim)
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    lengths: tuple[int, ...]
    dense: torch.Tensor  # (1, sqrt(sum L^2), nheads, headdim): the same-work single sequence
    padded: torch.Tensor  # (batch, nheads, max_len, headdim): q, k and v of the padded batch (one tensor: all equal here)


def make_inputs(batch: int, seed: int, low: int = MIN_LEN, high: int = MAX_LEN) -> VarlenInputs:
    gen = torch.Generator().manual_seed(seed)
    lengths = tuple(int(x) for x in torch.randint(low, high + 1, (batch,), generator=gen))
    total = sum(lengths)
    q = torch.randn(total, NHEADS, HEADDIM, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    same_work = round(math.sqrt(sum(n * n for n in lengths)))
    dense = torch.randn(1, same_work, NHEADS, HEADDIM, generator=gen)
    padded = torch.zeros(batch, NHEADS, max(lengths), HEADDIM)
    for b, n in enumerate(lengths):
        padded[b, :, :n] = q[cu[b] : cu[b] + n].transpose(0, 1)
    return VarlenInputs(q, q, q, cu, lengths, dense, padded)


def run_varlen(inputs: VarlenInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, cu_seqlens_q=inputs.cu_seqlens,
                              cu_seqlens_k=inputs.cu_seqlens, causal=True)


def run_dense(inputs: VarlenInputs) -> torch.Tensor:
    return longattn.attention(inputs.dense, inputs.dense, inputs.dense, causal=True)


def run_sdpa_padded(inputs: VarlenInputs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(inputs.padded, inputs.padded, inputs.padded, is_causal=True)
    # back to the packed layout, the real rows only (what a caller would keep)
    return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(inputs.lengths)])


def reference(inputs: VarlenInputs, outputs: dict) -> tuple[torch.Tensor, str]:
    out = longattn.attention(inputs.q, inputs.k, inputs.v, cu_seqlens_q=inputs.cu_seqlens,
                             cu_seqlens_k=inputs.cu_seqlens, causal=True, backend="eager")
    return out, "eager varlen (float32)"


def varlen_scenario(batch: int) -> Scenario:
    quick = batch > QUICK_OFFSET
    n = batch - QUICK_OFFSET if quick else batch
    make = (lambda seed: make_inputs(n, seed, *QUICK_LENGTHS)) if quick else (lambda seed: make_inputs(n, seed))
    methods = [
        Method("longattn varlen", no_setup(run_varlen)),
        Method("one dense call (same work)", no_setup(run_dense), compare=False),
        Method("sdpa padded", no_setup(run_sdpa_padded)),
    ]
    lengths = f"{QUICK_LENGTHS[0]}..{QUICK_LENGTHS[1]}" if quick else f"{MIN_LEN}..{MAX_LEN}"
    return Scenario(
        name=f"varlen {n} sequences of {lengths}",
        group="varlen",
        size=batch,
        params={"batch": n, "lengths": lengths, "nheads": NHEADS, "headdim": HEADDIM, "dtype": "float32",
                "causal": True},
        make_inputs=make,
        methods={m.name: m for m in methods},
        baseline="one dense call (same work)",
        reference=reference,
        targets=(
            Target("longattn varlen", 1.15, "issue target: packed batch within 1.15x of one dense call over the same work"),
            Target("longattn varlen", 0.5, "issue target: >= 2x faster than the padded batch through SDPA",
                   baseline="sdpa padded"),
        ),
    )


VARLEN = register_group(
    Group(
        name="varlen",
        description=f"packed sequences (varlen), causal fp32, H={NHEADS}, D={HEADDIM}, lengths {MIN_LEN}..{MAX_LEN}; "
        "targets: within 1.15x of one dense call of the same work, >= 2x faster than padded SDPA",
        size_name="sequences",
        sizes=(16,),
        quick_sizes=(QUICK_OFFSET + 3,),
        make_scenario=varlen_scenario,
        default_repeats=3,
        method_budget_s=20.0,
        plot=False,
    )
)
