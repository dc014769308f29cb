"""Decode test cases: logical per-sequence keys, laid into a contiguous or
paged cache (pages shuffled), and the oracle computed from the logical keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from longattn.reference import attention_ref


@dataclass(frozen=True)
class DecodeCase:
    cache_seqlens: tuple[int, ...]
    seqlen_new: int  # tokens appended through k_new/v_new (0: none)
    seqlen_q: int
    nheads_k: int
    group: int
    headdim: int
    dtype: torch.dtype
    page_size: int | None  # None: contiguous cache
    causal: bool
    window_size: tuple[int, int]
    softcap: float
    seed: int

    @property
    def batch(self) -> int:
        return len(self.cache_seqlens)

    @property
    def seqlens(self) -> list[int]:
        return [n + self.seqlen_new for n in self.cache_seqlens]

    def kwargs(self) -> dict:
        return {"causal": self.causal, "window_size": self.window_size, "softcap": self.softcap}

    def build(self):
        """``(q, k_cache, v_cache, decode kwargs, logical_k, logical_v)``; the cache
        holds the first ``cache_seqlens[b]`` tokens, k_new/v_new the rest."""
        gen = torch.Generator().manual_seed(self.seed)
        longest = max(self.seqlens, default=0)
        shape = (self.batch, longest, self.nheads_k, self.headdim)
        logical_k = torch.randn(shape, generator=gen).to(self.dtype)
        logical_v = torch.randn(shape, generator=gen).to(self.dtype)
        q = torch.randn(self.batch, self.seqlen_q, self.nheads_k * self.group, self.headdim, generator=gen).to(self.dtype)
        capacity = longest + 3  # a little slack, as a real cache has
        kwargs: dict = {"cache_seqlens": torch.tensor(self.cache_seqlens, dtype=torch.int32)}
        if self.page_size is None:
            k_cache = torch.zeros(self.batch, capacity, self.nheads_k, self.headdim, dtype=self.dtype)
            v_cache = torch.zeros_like(k_cache)
            for b, n in enumerate(self.cache_seqlens):
                k_cache[b, :n] = logical_k[b, :n]
                v_cache[b, :n] = logical_v[b, :n]
        else:
            max_pages = -(-capacity // self.page_size)
            num_pages = self.batch * max_pages + 2
            order = torch.randperm(num_pages, generator=gen)  # pages out of order
            block_table = order[: self.batch * max_pages].reshape(self.batch, max_pages).to(torch.int32)
            # Fill with NaN: a kernel that reads a slot it should not will show it.
            k_cache = torch.full((num_pages, self.page_size, self.nheads_k, self.headdim), float("nan"), dtype=self.dtype)
            v_cache = k_cache.clone()
            for b, n in enumerate(self.cache_seqlens):
                for p in range(n):
                    page, off = int(block_table[b, p // self.page_size]), p % self.page_size
                    k_cache[page, off] = logical_k[b, p]
                    v_cache[page, off] = logical_v[b, p]
            kwargs["block_table"] = block_table
        if self.seqlen_new:
            kwargs["k_new"] = torch.stack([logical_k[b, n : n + self.seqlen_new] for b, n in enumerate(self.cache_seqlens)])
            kwargs["v_new"] = torch.stack([logical_v[b, n : n + self.seqlen_new] for b, n in enumerate(self.cache_seqlens)])
        return q, k_cache, v_cache, kwargs, logical_k, logical_v

    def oracle(self, q, logical_k, logical_v):
        """float64 ``(out, lse)``, one sequence at a time from the logical keys."""
        outs, lses = [], []
        for b, n in enumerate(self.seqlens):
            o, l = attention_ref(q[b : b + 1], logical_k[b : b + 1, :n], logical_v[b : b + 1, :n], **self.kwargs())
            outs.append(o)
            lses.append(l)
        return torch.cat(outs), torch.cat(lses)


@st.composite
def decode_cases(draw, *, dtypes=(torch.float32, torch.float16, torch.bfloat16), max_len: int = 80) -> DecodeCase:
    causal = draw(st.booleans())
    window = (-1, -1)
    if draw(st.booleans()):
        window = (draw(st.integers(-1, 20)), draw(st.sampled_from([-1, 0])) if causal else draw(st.integers(-1, 5)))
    batch = draw(st.integers(1, 4))
    return DecodeCase(
        cache_seqlens=tuple(draw(st.lists(st.integers(0, max_len), min_size=batch, max_size=batch))),
        seqlen_new=draw(st.sampled_from([0, 0, 1, 3])),
        seqlen_q=draw(st.sampled_from([1, 1, 2, 5, 8])),
        nheads_k=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 4, 8])),
        headdim=draw(st.sampled_from([16, 40, 64, 128])),
        dtype=draw(st.sampled_from(dtypes)),
        page_size=draw(st.sampled_from([None, None, 1, 3, 16])),
        causal=causal,
        window_size=window,
        softcap=draw(st.sampled_from([0.0, 0.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
