"""The oracle itself, checked against a row-by-row softmax written independently."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given

from longattn.errors import DTypeError, ShapeError
from longattn.reference import attention_ref
from tests.strategies import cases
from tests.tolerance import assert_close_to_oracle


def _row_by_row(q, k, v, *, causal, window_size, softcap, softmax_scale=None):
    """Plain loops over (batch, head, query): an independent restatement of the contract."""
    batch, seqlen_q, nheads, dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0
    out = torch.zeros(batch, seqlen_q, nheads, dim, dtype=torch.float64)
    lse = torch.full((batch, nheads, seqlen_q), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(nheads):
            hk = h // (nheads // nheads_k)
            for i in range(seqlen_q):
                pos = i + seqlen_k - seqlen_q
                keys = [
                    j for j in range(seqlen_k)
                    if (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)
                ]
                if not keys:
                    continue
                s = (k[b, keys, hk].double() @ q[b, i, h].double()) * scale
                if softcap > 0:
                    s = softcap * torch.tanh(s / softcap)
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, i, h] = torch.softmax(s, 0) @ v[b, keys, hk].double()
    return out, lse


@given(cases(max_seqlen=12, headdims=[8, 13], dtypes=[torch.float32]))
def test_oracle_matches_row_by_row_softmax(case):
    q, k, v = case.tensors()
    out, lse = attention_ref(q, k, v, **case.kwargs())
    want_out, want_lse = _row_by_row(q, k, v, **case.kwargs())
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    # float64 against float64: the rule's float64 floor (1e-12 of max(1, |value|)); -inf must line up.
    assert_close_to_oracle(out, want_out, want_out)
    assert_close_to_oracle(lse, want_lse, want_lse, name="lse")


def test_empty_rows_are_zero_with_minus_inf_lse_and_finite_gradients():
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = attention_ref(q, k, v, causal=True)  # rows 0, 1 see nothing
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert torch.isneginf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :2], torch.zeros_like(q.grad[:, :2]))


def test_explicit_mask_is_anded_with_causal():
    q, k, v = (torch.randn(1, 4, 1, 8) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, 0] = False
    out, lse = attention_ref(q, k, v, causal=True, mask=mask)
    assert torch.isneginf(lse[0, 0, 0])  # row 0 saw only key 0, which the mask removed
    ref_out, _ = attention_ref(q[:, 1:], k[:, 1:], v[:, 1:], causal=True)
    assert_close_to_oracle(out[:, 1:], ref_out, ref_out)


def test_bad_mask_is_a_clear_error():
    q, k, v = (torch.randn(1, 4, 1, 8) for _ in range(3))
    with pytest.raises(DTypeError, match="mask"):
        attention_ref(q, k, v, mask=torch.ones(4, 4))
    with pytest.raises(ShapeError, match="mask"):
        attention_ref(q, k, v, mask=torch.ones(3, 4, dtype=torch.bool))
