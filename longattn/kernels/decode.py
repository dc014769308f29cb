"""Decode attention: the call description and the twins' registry.

Twins (priority order for ``backend="auto"``): ``eager`` (PyTorch, serves
every call). The C++ CPU, Triton and CUDA stream-K twins register here as
they land. Every twin takes the same arguments (see
:mod:`longattn.kernels.decode_eager`) and returns ``(out, lse)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.decode.cache import CacheView
from longattn.decode.plan import DecodePlan
from longattn.dispatch import Backend, Registry
from longattn.kernels.decode_eager import decode_forward_eager


@dataclass(frozen=True)
class DecodeCall:
    """One validated decode request; ``window`` has causal folded in.
    ``plan`` is the caller's stream-K plan (None: the twin plans for itself)."""

    q: torch.Tensor
    cache: CacheView
    scale: float
    window: tuple[int, int]
    softcap: float
    plan: DecodePlan | None

    def args(self) -> tuple:
        return (self.q, self.cache.k_cache, self.cache.v_cache, self.cache.seqlens, self.cache.block_table)

    def kwargs(self) -> dict:
        return {"scale": self.scale, "window": self.window, "softcap": self.softcap}


EAGER = Backend[DecodeCall](
    name="eager",
    description="PyTorch, one piece per sequence, float32 math; serves every call",
    run=lambda call: decode_forward_eager(*call.args(), **call.kwargs(), plan=call.plan),
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
)

DECODE_BACKENDS = Registry[DecodeCall]("decode attention", [EAGER])
