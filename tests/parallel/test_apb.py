"""APB attention (longattn.parallel.apb) on real gloo process groups, plus its pure helpers.

For each world size (1-4) one group of spawned processes runs every case of
:mod:`tests.parallel.cases_apb` (see :mod:`tests.parallel.launch`); a case
passes when every rank reported it ok. Each rank compares its output and lse
with its rows of the float64 oracle under the APB mask.
"""

from __future__ import annotations

import pytest
import torch

from longattn.errors import ArgumentError, ShapeError
from longattn.parallel.apb import apb_mask, apb_selection
from tests.parallel.cases_apb import CASES
from tests.parallel.launch import TEST_TIMEOUT, assert_every_rank_ok, case_params, world_runner

run_world = world_runner("tests.parallel.cases_apb")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("world,case", case_params(CASES))
def test_case_on_every_rank(run_world, world, case):
    assert_every_rank_ok(run_world(world), world, case)


def test_mask_by_hand():
    """seqlen 6 over 3 hosts (L = 2), anchor 1, host 0 passes position 1, host 1 position 2 (one head)."""
    sels = [torch.tensor([[[1]]]), torch.tensor([[[2]]])]
    mask = apb_mask(6, 3, 1, sels, 1)[0, 0].int()
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],  # host 0: plain causal
        [1, 1, 1, 0, 0, 0],  # host 1: anchor {0}, host 0's passing {1}, own block causal
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 1, 0],  # host 2: anchor {0}, passing {1} and {2}, not 3
        [1, 1, 1, 0, 1, 1],
    ])
    assert torch.equal(mask, want)


def test_selection_positions_and_errors():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 2, 4, generator=gen), torch.randn(1, 6, 1, 4, generator=gen)
    sel = apb_selection(q, k, host=0, passing_len=10, anchor_len=2, scorer="key_norm")
    assert torch.equal(sel, torch.arange(2, 6).expand(1, 1, 4))  # min(passing, L - anchor) past the anchor
    sel = apb_selection(q, k, host=3, passing_len=2, anchor_len=2, scorer="key_norm")
    norms = k[0, :, 0].norm(dim=-1)
    assert torch.equal(sel[0, 0], torch.sort(norms.topk(2).indices).values + 18)  # global = local + host*L
    with pytest.raises(ArgumentError, match="anchor_len"):
        apb_selection(q, k, host=0, passing_len=1, anchor_len=6)
    with pytest.raises(ArgumentError, match="passing_len"):
        apb_selection(q, k, host=0, passing_len=-1, anchor_len=0)
    with pytest.raises(ShapeError, match="scorer"):
        apb_selection(q, k, host=1, passing_len=1, anchor_len=0, scorer=lambda a, b: torch.zeros(1, 6))
    with pytest.raises(ArgumentError, match="selections"):
        apb_mask(6, 3, 1, [torch.tensor([[[0]]]), torch.tensor([[[2]]])], 1)  # host 0 cannot pass the anchor


def test_last_queries_scores_match_float64_softmax():
    """The default scorer keeps the keys with the largest causal softmax mass from the block's last 64
    queries (L = 70 > 64), summed over each kv head's q heads, computed here in float64 by hand."""
    gen = torch.Generator().manual_seed(1)
    block, nheads, nheads_k, window = 70, 4, 2, 64
    q, k = torch.randn(2, block, nheads, 8, generator=gen), torch.randn(2, block, nheads_k, 8, generator=gen)
    scale, softcap = 0.5, 3.0
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(2, dim=2)) * scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(torch.ones(block, block, dtype=torch.bool).tril().logical_not(), float("-inf"))
    mass = torch.softmax(s, dim=-1)[:, :, block - window:].sum(dim=2)  # (batch, nheads, L)
    mass = mass.reshape(2, nheads_k, 2, block).sum(dim=2)
    want = torch.sort(mass.topk(5, dim=-1).indices, dim=-1).values + block  # host 1
    got = apb_selection(q, k, host=1, passing_len=5, anchor_len=3, softmax_scale=scale, softcap=softcap)
    assert torch.equal(got, want)
