"""The fast lane of longattn.attention: a call identical (shapes, dtypes,
devices, options of exactly the accepted types) to one that already passed
every check reuses that call's decisions. It must never change a result,
skip a check, or skip the calibration hook."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import api
from longattn.errors import ArgumentError, LongAttnError
from longattn.hooks import ATTENTION_HOOK
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle


def _qkv(seqlen_q=1, seqlen_k=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seqlen_q, 8, 32, generator=g).to(dtype)
    k = torch.randn(1, seqlen_k, 2, 32, generator=g).to(dtype)
    v = torch.randn(1, seqlen_k, 2, 32, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("seqlens", [(1, 1), (1, 9), (5, 5), (3, 11), (64, 64)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lane_gives_the_checked_path_result(seqlens, causal, dtype):
    api._CHECKED_CALLS.clear()
    q, k, v = _qkv(*seqlens, dtype=dtype)
    first = longattn.attention(q, k, v, causal=causal)  # full checks; fills the lane
    q2, k2, v2 = _qkv(*seqlens, seed=1, dtype=dtype)
    again = longattn.attention(q2, k2, v2, causal=causal)  # the lane
    api._CHECKED_CALLS.clear()
    fresh = longattn.attention(q2, k2, v2, causal=causal)  # full checks again
    assert torch.equal(again, fresh)
    ref, _ = attention_ref(q2, k2, v2, causal=causal)
    eager = longattn.attention(q2, k2, v2, causal=causal, backend="eager")
    assert_close_to_oracle(again, ref, eager)
    assert first.shape == q.shape


@pytest.mark.parametrize("bad", [
    dict(causal=1), dict(window_size=(True, 0)), dict(softcap=False), dict(window_size=[-1, -1]),
    dict(softmax_scale=float("nan")), dict(backend="nope"),
])
def test_look_alike_options_still_take_the_checks(bad):
    # 1 == True and (True, 0) == (1, 0) as dict keys: the lane must not accept them for a checked call.
    q, k, v = _qkv()
    longattn.attention(q, k, v, causal=True, window_size=(1, 0), softcap=0.0)
    longattn.attention(q, k, v, causal=True)
    options = dict(causal=True, **bad) if "causal" not in bad else bad
    if bad == dict(window_size=[-1, -1]):
        longattn.attention(q, k, v, **options)  # a list is accepted; it just takes the checked path
        return
    with pytest.raises((ArgumentError, LongAttnError)):
        longattn.attention(q, k, v, **options)


def test_other_shapes_and_dtypes_are_checked_again():
    q, k, v = _qkv()
    longattn.attention(q, k, v, causal=True)
    with pytest.raises(LongAttnError):
        longattn.attention(q, k.double(), v, causal=True)
    with pytest.raises(LongAttnError):
        longattn.attention(q[0], k, v, causal=True)


def test_the_calibration_hook_still_sees_lane_calls():
    q, k, v = _qkv()
    longattn.attention(q, k, v, causal=True)
    longattn.attention(q, k, v, causal=True)  # now in the lane
    seen = []

    def hook(call):
        seen.append(call)
        return torch.zeros_like(call.q)

    token = ATTENTION_HOOK.set(hook)
    try:
        out = longattn.attention(q, k, v, causal=True)
    finally:
        ATTENTION_HOOK.reset(token)
    assert len(seen) == 1 and torch.equal(out, torch.zeros_like(q))
