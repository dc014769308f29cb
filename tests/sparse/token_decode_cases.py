"""Shared fixtures of the token-selection decode tests (Quest, Double Sparsity,
TidalDecode): seeded logical keys, contiguous or paged caches (pages shuffled,
unused slots NaN so a stray read shows), ragged prompts, and the oracle
restricted to a selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle

HEADDIMS = [16, 15, 24]  # 15: an odd head dim


@dataclass
class Run:
    """One decode run: logical ``k_all, v_all (batch, capacity, nheads_k, headdim)``,
    sequence ``b`` starts with ``starts[b]`` prompt tokens, then ``steps``
    decode steps append one token each."""

    batch: int
    nheads_k: int
    group: int
    headdim: int
    starts: list[int]
    steps: int
    page_size: int | None  # the cache's page size; None = contiguous
    dtype: torch.dtype
    seed: int

    def __post_init__(self) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)
        total = max(self.starts) + self.steps
        ps = self.page_size or 8
        self.capacity = -(-max(total, 1) // ps) * ps + (ps if self.page_size else 0)  # a spare page
        shape = (self.batch, self.capacity, self.nheads_k, self.headdim)
        self.k_all = torch.randn(shape, generator=self.gen).to(self.dtype)
        self.v_all = torch.randn(shape, generator=self.gen).to(self.dtype)

    @property
    def nheads(self) -> int:
        return self.nheads_k * self.group

    def query(self) -> torch.Tensor:
        return torch.randn(self.batch, 1, self.nheads, self.headdim, generator=self.gen).to(self.dtype)

    def empty_cache(self):
        """``(k_cache, v_cache, block_table)``: NaN everywhere (nothing written yet)."""
        if self.page_size is None:
            kc = torch.full((self.batch, self.capacity, self.nheads_k, self.headdim), float("nan"), dtype=self.dtype)
            return kc, kc.clone(), None
        pages = self.capacity // self.page_size
        table = torch.randperm(self.batch * pages + 1, generator=self.gen)[: self.batch * pages]
        table = table.reshape(self.batch, pages).to(torch.int32)
        kc = torch.full((self.batch * pages + 1, self.page_size, self.nheads_k, self.headdim), float("nan"),
                        dtype=self.dtype)
        return kc, kc.clone(), table

    def write(self, cache: torch.Tensor, table, b: int, start: int, rows: torch.Tensor) -> None:
        """Put logical rows ``start ..`` of sequence ``b`` into ``cache``."""
        for i in range(rows.shape[0]):
            p = start + i
            if table is None:
                cache[b, p] = rows[i]
            else:
                cache[int(table[b, p // self.page_size]), p % self.page_size] = rows[i]

    def prompt_cache(self):
        """Caches holding each sequence's prompt; ``(k_cache, v_cache, table, lens)``."""
        kc, vc, table = self.empty_cache()
        for b, n in enumerate(self.starts):
            self.write(kc, table, b, 0, self.k_all[b, :n])
            self.write(vc, table, b, 0, self.v_all[b, :n])
        return kc, vc, table, torch.tensor(self.starts, dtype=torch.int32)

    def new_tokens(self, lens: torch.Tensor):
        """``k_new, v_new (batch, 1, nheads_k, headdim)``: each sequence's next logical token."""
        idx = lens.long()
        b = torch.arange(self.batch)
        return self.k_all[b, idx][:, None], self.v_all[b, idx][:, None]


@st.composite
def runs(draw, *, max_start: int = 70, max_steps: int = 3) -> Run:
    batch = draw(st.integers(1, 3))
    start = draw(st.integers(0, max_start))
    ragged = draw(st.booleans())
    starts = [max(0, start - (5 * b if ragged else 0)) for b in range(batch)]
    return Run(batch=batch, nheads_k=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 4, 8])),
               headdim=draw(st.sampled_from(HEADDIMS)), starts=starts, steps=draw(st.integers(1, max_steps)),
               page_size=draw(st.sampled_from([None, 1, 8])),
               dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])),
               seed=draw(st.integers(0, 2**16)))


def check_selection_shape(selection: torch.Tensor, lengths: list[int], nheads_k: int) -> list[list[set[int]]]:
    """``selection (batch, nheads_k, n)`` int32: positions in range, distinct; the
    sets per sequence and kv head."""
    assert selection.dtype == torch.int32 and selection.dim() == 3
    assert selection.shape[:2] == (len(lengths), nheads_k)
    assert bool((selection >= -1).all())
    assert_ascending_then_padding(selection)
    sets = []
    for b, n in enumerate(lengths):
        row = []
        for h in range(nheads_k):
            listed = selection[b, h][selection[b, h] >= 0].tolist()
            assert len(listed) == len(set(listed)), "a position listed twice"
            assert all(0 <= p < n for p in listed), f"positions {listed} outside 0..{n - 1}"
            row.append(set(listed))
        sets.append(row)
    return sets


def assert_restricted_oracle(out, lse, q, run: Run, lengths: list[int], sets, *, scale=None, softcap=0.0):
    """``out (batch, 1, nheads, d)``, ``lse (batch, nheads, 1)`` equal the float64
    oracle over each sequence's logical keys restricted to its selection (per kv
    head, shared by the query group)."""
    for b, n in enumerate(lengths):
        mask = torch.zeros(1, run.nheads, 1, n, dtype=torch.bool)
        for h in range(run.nheads):
            for p in sets[b][h // run.group]:
                mask[0, h, 0, p] = True
        ref_out, ref_lse = attention_ref(q[b : b + 1], run.k_all[b : b + 1, :n], run.v_all[b : b + 1, :n],
                                         mask=mask, softmax_scale=scale, softcap=softcap)
        assert_close_to_oracle(out[b : b + 1], ref_out, ref_out)
        assert_close_to_oracle(lse[b : b + 1], ref_lse, ref_lse, name="lse")


def true_scores(q: torch.Tensor, run: Run, b: int, n: int) -> torch.Tensor:
    """``(nheads_k, n)`` float64: ``q . k`` of every key, max over the query group."""
    qg = q[b, 0].double().view(run.nheads_k, run.group, run.headdim)
    keys = run.k_all[b, :n].double()  # (n, hk, d)
    return torch.einsum("hgd,nhd->hgn", qg, keys).amax(dim=1)


def assert_top(selected: set[int], scores: torch.Tensor, count: int, *, slack: float) -> None:
    """``selected`` holds ``count`` entries and is a top set of ``scores (n,)``:
    no unselected score exceeds a selected one by more than ``slack``."""
    n = scores.shape[0]
    assert len(selected) == min(count, n)
    if not selected or len(selected) == n:
        return
    inside = torch.zeros(n, dtype=torch.bool)
    inside[list(selected)] = True
    assert float(scores[~inside].max()) <= float(scores[inside].min()) + slack


def assert_ascending_then_padding(selection: torch.Tensor) -> None:
    """Every list: positions strictly ascending, then only -1 (the documented order)."""
    for row in selection.reshape(-1, selection.shape[-1]).tolist():
        valid = [p for p in row if p >= 0]
        assert row == valid + [-1] * (len(row) - len(valid))
        assert all(a < b for a, b in zip(valid, valid[1:]))
