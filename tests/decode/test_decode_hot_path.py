"""The hot path reads no tensor data on the host when told not to check.

On a GPU every such read (``.tolist()``, ``.item()``, ``int(t)``, ``bool(t)``)
is a sync; a CPU run cannot observe syncs, but it can observe the reads: with
``check=False`` and a reused plan, a step (append included) must make none.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.decode import plan_decode
from tests.decode.decode_cases import DecodeCase


class HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise HostRead(f"Tensor.{name} on the hot path")
        return raiser

    def arm():
        for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return arm


@pytest.mark.parametrize("page_size", [None, 4])
def test_reused_plan_without_checks_reads_nothing(page_size, no_host_reads):
    case = DecodeCase((9, 30), 1, 1, 2, 4, 32, torch.float32, page_size, True, (-1, -1), 0.0, seed=31)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    plan = plan_decode(case.seqlens, nheads_k=2, num_workers=2, block_n=8, heads_per_tile=None)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = longattn.decode_attention(q, expected_k, expected_v, **kwargs, plan=plan)
    plan.as_tensors("cpu")  # built once per plan (outside the step in a real loop)
    no_host_reads()
    out = longattn.decode_attention(q, k_cache, v_cache, **kwargs, plan=plan, check=False)
    assert torch.equal(out, expected)
    assert torch.equal(k_cache.nan_to_num(), expected_k.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), expected_v.nan_to_num())


def test_the_check_reads_are_what_the_fixture_catches(no_host_reads):
    """The default on a CPU checks, which reads cache_seqlens: the fixture sees it."""
    case = DecodeCase((9,), 1, 1, 1, 1, 16, torch.float32, None, True, (-1, -1), 0.0, seed=32)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    plan = plan_decode(case.seqlens, nheads_k=1, num_workers=1)
    plan.as_tensors("cpu")
    no_host_reads()
    with pytest.raises(HostRead):
        longattn.decode_attention(q, k_cache, v_cache, **kwargs, plan=plan)
