"""decode_attention traces with torch.compile(fullgraph=True) when the plan is
reused: the data-dependent work is inside the longattn::decode_step custom ops."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.decode import plan_decode
from longattn.decode_api import decode_step_append_op, decode_step_op
from longattn.errors import ArgumentError
from tests.decode.decode_cases import DecodeCase
from tests.tolerance import assert_close_to_oracle


def _case(page_size):
    # Two sequences (7 and 4 cached tokens), one new token each, GQA 4.
    return DecodeCase((7, 4), 1, 1, 2, 4, 32, torch.float32, page_size, True, (-1, -1), 0.0, seed=21)


def _step(q, k_cache, v_cache, lens, k_new, v_new, plan, block_table=None):
    return longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, block_table=block_table, k_new=k_new,
                                     v_new=v_new, plan=plan, return_lse=True)


@pytest.mark.parametrize("page_size", [None, 3])
def test_fullgraph_with_a_reused_plan_matches_eager_and_oracle(page_size):
    case = _case(page_size)
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    plan = plan_decode(case.seqlens, nheads_k=case.nheads_k, num_workers=3, block_n=4, heads_per_tile=None)
    args = (q, kwargs["cache_seqlens"], kwargs["k_new"], kwargs["v_new"], plan, kwargs.get("block_table"))
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    eager_out, eager_lse = _step(args[0], eager_k, eager_v, *args[1:])

    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend="eager")
    out, lse = compiled(args[0], k_cache, v_cache, *args[1:])
    # Same op, same inputs: the same bits, and the same cache after the in-place append.
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    assert torch.equal(k_cache.nan_to_num(), eager_k.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), eager_v.nan_to_num())
    ref_out, ref_lse = case.oracle(q, logical_k, logical_v)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")
    # Data checks still run inside the op (CPU default): a wrong plan raises, and nothing is written.
    before = k_cache.clone()
    wrong = plan_decode([n + 1 for n in case.seqlens], nheads_k=case.nheads_k, num_workers=3, block_n=4)
    with pytest.raises(ArgumentError, match="plan was made for seqlens"):
        compiled(args[0], k_cache, v_cache, args[1], args[2], args[3], wrong, args[5])
    assert torch.equal(before.nan_to_num(), k_cache.nan_to_num())


def test_opcheck_decode_step_ops():
    case = _case(None)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    spec = [case.nheads_k, 4, 2, 1, *case.seqlens]
    common = (case.headdim ** -0.5, -1, 0, 0.0, spec, "auto", -1)
    torch.library.opcheck(
        decode_step_append_op,
        (q, k_cache, v_cache, kwargs["cache_seqlens"], None, kwargs["k_new"], kwargs["v_new"], *common),
    )
    # After the append the cache holds L_b tokens: the read-only op over them.
    torch.library.opcheck(decode_step_op, (q, k_cache, v_cache, kwargs["cache_seqlens"] + 1, None, *common))
