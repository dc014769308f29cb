"""The ``overhead`` benchmark group: what a small call costs, against SDPA.

A model calls attention once per layer per token, so a 32-layer model pays
every microsecond of per-call overhead (checks, twin selection, layout
views) 32 times per token. Shapes: batch 1, Hq=32, Hkv=8 (GQA 4), D=128.
Cases (case numbers; float32 and bfloat16 each):

- decode: one query over 16, 256 and 1024 cached tokens of a contiguous cache
  with room for more (``longattn.decode_attention(cache_seqlens=n)``) vs
  ``F.scaled_dot_product_attention(enable_gqa=True)`` over the visible cache
  slice ``k_cache[:, :n]`` (views; what a model would pass it);
- dense: ``longattn.attention(causal=True)`` at 1, 16 and 64 tokens
  (seqlen_q == seqlen_k, prefill of a short prompt or a chunk) vs SDPA with
  ``is_causal=True, enable_gqa=True`` on transposed views (top-left causal
  equals bottom-right here because the lengths are equal).

One timing is ``calls`` back-to-back calls (the case name says how many),
so the table's times are per ``calls`` calls and the ratio is per call;
both methods of a case make the same number of calls. Target: each ratio
<= 1.2 (the issue's "small calls cost little").

Calls this small are at the mercy of the scheduler: on a machine busy with
other work, every parallel region of a multi-threaded call can wait a
scheduler tick (~4 ms) for its second core, which swamps what is measured
here. Run it on an idle machine, or single-threaded
(``torch.set_num_threads(1)`` then :func:`longattn.bench.run_group`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.scenarios import Group, Method, Scenario, Target, no_setup, register_group
from longattn.reference import attention_ref

NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
MAX_RATIO = 1.2
# Cache capacity beyond the visible tokens: decode reads a prefix of a larger buffer.
CACHE_SLACK = 64


@dataclass(frozen=True)
class OverheadSpec:
    kind: str  # "decode" or "dense"
    tokens: int  # cached tokens (decode) or seqlen (dense)
    dtype: torch.dtype
    calls: int  # calls per timing

    @property
    def name(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        if self.kind == "decode":
            what = f"decode 1 query, {self.tokens} cached"
        else:
            what = f"dense causal {self.tokens} tokens"
        return f"{what} {dt} (x{self.calls} calls)"


def _specs(calls: dict[tuple[str, int], int]) -> list[OverheadSpec]:
    return [
        OverheadSpec(kind, tokens, dtype, n)
        for dtype in (torch.float32, torch.bfloat16)
        for (kind, tokens), n in calls.items()
    ]


# Calls per timing: enough that one timing takes milliseconds (timer
# resolution and loop overhead vanish), few enough for a ~1 minute group.
FULL = _specs({("decode", 16): 400, ("decode", 256): 200, ("decode", 1024): 100,
               ("dense", 1): 400, ("dense", 16): 50, ("dense", 64): 20})
QUICK = _specs({("decode", 16): 3, ("decode", 256): 3, ("decode", 1024): 2,
                ("dense", 1): 3, ("dense", 16): 2, ("dense", 64): 2})
QUICK_OFFSET = 100  # case numbers 1.. are FULL's cases, 101.. QUICK's


@dataclass(frozen=True)
class OverheadInputs:
    q: torch.Tensor  # (1, seqlen_q, NHEADS, HEADDIM)
    k: torch.Tensor  # dense: (1, seqlen, NHEADS_K, HEADDIM); decode: the cache (1, capacity, ...)
    v: torch.Tensor
    cache_seqlens: torch.Tensor | None  # decode: (1,) int32
    visible: int  # decode: the cached tokens as a Python int (a model knows it without reading the tensor)
    calls: int


def make_overhead_inputs(spec: OverheadSpec, seed: int) -> OverheadInputs:
    gen = torch.Generator().manual_seed(seed)
    seqlen_q = 1 if spec.kind == "decode" else spec.tokens
    seqlen_k = spec.tokens + CACHE_SLACK if spec.kind == "decode" else spec.tokens
    q = torch.randn(1, seqlen_q, NHEADS, HEADDIM, generator=gen).to(spec.dtype)
    k = torch.randn(1, seqlen_k, NHEADS_K, HEADDIM, generator=gen).to(spec.dtype)
    v = torch.randn(1, seqlen_k, NHEADS_K, HEADDIM, generator=gen).to(spec.dtype)
    lens = torch.tensor([spec.tokens], dtype=torch.int32) if spec.kind == "decode" else None
    return OverheadInputs(q, k, v, lens, spec.tokens, spec.calls)


def _repeat(one_call):
    """A timed callable making ``inputs.calls`` calls; returns the last output."""

    def run(inputs: OverheadInputs) -> torch.Tensor:
        with torch.no_grad():  # inference, as in a model's forward
            for _ in range(inputs.calls - 1):
                one_call(inputs)
            return one_call(inputs)

    return run


def _decode_longattn(inputs: OverheadInputs) -> torch.Tensor:
    return longattn.decode_attention(inputs.q, inputs.k, inputs.v, cache_seqlens=inputs.cache_seqlens)


def _decode_sdpa(inputs: OverheadInputs) -> torch.Tensor:
    n = inputs.visible
    out = F.scaled_dot_product_attention(
        inputs.q.transpose(1, 2), inputs.k[:, :n].transpose(1, 2), inputs.v[:, :n].transpose(1, 2), enable_gqa=True
    )
    return out.transpose(1, 2)


def _dense_longattn(inputs: OverheadInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True)


def _dense_sdpa(inputs: OverheadInputs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        inputs.q.transpose(1, 2), inputs.k.transpose(1, 2), inputs.v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


def overhead_reference(inputs: OverheadInputs, outputs: dict) -> tuple[torch.Tensor, str]:
    k, v = inputs.k, inputs.v
    if inputs.cache_seqlens is not None:
        k, v = k[:, : inputs.visible], v[:, : inputs.visible]
    out, _ = attention_ref(inputs.q, k, v, causal=True)
    return out, "oracle (float64)"


def overhead_scenario(index: int) -> Scenario:
    """Case number ``index`` (1-based) of :data:`FULL`, or of :data:`QUICK` from ``QUICK_OFFSET + 1`` on."""
    spec = QUICK[index - QUICK_OFFSET - 1] if index > QUICK_OFFSET else FULL[index - 1]
    one = (_decode_longattn, _decode_sdpa) if spec.kind == "decode" else (_dense_longattn, _dense_sdpa)
    methods = [Method("longattn", no_setup(_repeat(one[0]))), Method("sdpa", no_setup(_repeat(one[1])))]
    return Scenario(
        name=spec.name,
        group="overhead",
        size=index,
        params={"kind": spec.kind, "tokens": spec.tokens, "dtype": str(spec.dtype).removeprefix("torch."),
                "calls_per_timing": spec.calls, "batch": 1, "nheads": NHEADS, "nheads_k": NHEADS_K,
                "headdim": HEADDIM, "causal": True},
        make_inputs=lambda seed: make_overhead_inputs(spec, seed),
        methods={m.name: m for m in methods},
        baseline="sdpa",
        reference=overhead_reference,
        # --quick makes a handful of calls: too few for a per-call ratio to mean anything
        targets=() if index > QUICK_OFFSET else (Target(
            "longattn", MAX_RATIO,
            f"issue target: per-call time within {MAX_RATIO}x of SDPA's (small calls cost little)",
        ),),
    )


OVERHEAD = register_group(
    Group(
        name="overhead",
        description=f"per-call cost of small calls (decode 16-1024 cached, dense 1-64 tokens), "
        f"Hq={NHEADS}, Hkv={NHEADS_K}, D={HEADDIM}; baseline SDPA",
        size_name="case",
        sizes=tuple(range(1, len(FULL) + 1)),
        quick_sizes=tuple(range(QUICK_OFFSET + 1, QUICK_OFFSET + len(QUICK) + 1)),
        make_scenario=overhead_scenario,
        default_repeats=15,
        method_budget_s=4.0,
        plot=False,
    )
)
