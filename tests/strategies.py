"""Hypothesis strategies and seeded data shared by the attention tests.

Structural sizes are drawn by hypothesis; tensor data comes from a seeded
torch.Generator so a failing example replays exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

HEADDIMS = [16, 24, 59, 64, 111, 128, 256]  # awkward, non-powers of two included
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads_k: int
    group: int
    headdim: int
    dtype: torch.dtype
    causal: bool
    window_size: tuple[int, int]
    softcap: float
    seed: int
    softmax_scale: float | None = None  # None: headdim ** -0.5


    @property
    def nheads(self) -> int:
        return self.nheads_k * self.group

    def tensors(self, *, scale: float = 1.0, requires_grad: bool = False):
        """Seeded ``q, k, v`` in the case's dtype (q and k multiplied by ``scale``)."""
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.batch, self.seqlen_q, self.nheads, self.headdim, generator=gen) * scale
        k = torch.randn(self.batch, self.seqlen_k, self.nheads_k, self.headdim, generator=gen) * scale
        v = torch.randn(self.batch, self.seqlen_k, self.nheads_k, self.headdim, generator=gen)
        out = [t.to(self.dtype) for t in (q, k, v)]
        if requires_grad:
            out = [t.requires_grad_() for t in out]
        return out

    def kwargs(self) -> dict:
        return {"causal": self.causal, "window_size": self.window_size, "softcap": self.softcap,
                "softmax_scale": self.softmax_scale}


@st.composite
def cases(
    draw,
    *,
    max_seqlen: int = 70,
    dtypes=DTYPES,
    headdims=HEADDIMS,
    windows: bool = True,
    softcaps: bool = True,
    scales: bool = True,
    max_batch: int = 2,
    max_nheads_k: int = 2,
    groups=(1, 2, 4, 8),
) -> Case:
    causal = draw(st.booleans())
    window = (-1, -1)
    if windows and draw(st.booleans()):
        left = draw(st.integers(-1, 12))
        right = draw(st.sampled_from([-1, 0])) if causal else draw(st.integers(-1, 12))
        window = (left, right)
    headdim = draw(st.sampled_from(headdims))
    # Mostly the default scale; sometimes a flatter or a sharper softmax. Relative
    # to the default so the logits stay where float32 keeps the floor (a scale of
    # 1 at headdim 111 gives logits ~10 and float32 errors of ~6e-6 even eager).
    factor = draw(st.sampled_from([None, None, 0.3, 1.6])) if scales else None
    return Case(
        batch=draw(st.integers(1, max_batch)),
        seqlen_q=draw(st.integers(1, max_seqlen)),
        seqlen_k=draw(st.integers(1, max_seqlen)),
        nheads_k=draw(st.integers(1, max_nheads_k)),
        group=draw(st.sampled_from(list(groups))),
        headdim=headdim,
        dtype=draw(st.sampled_from(dtypes)),
        causal=causal,
        window_size=window,
        softcap=draw(st.sampled_from([0.0, 0.0, 2.5])) if softcaps else 0.0,
        seed=draw(st.integers(0, 2**31 - 1)),
        softmax_scale=None if factor is None else factor * headdim**-0.5,
    )
