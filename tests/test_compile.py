"""The custom ops behind attention() are sound for torch.compile."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.kernels.dense import dense_backward_op, dense_forward_op
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle


@pytest.mark.parametrize("twin", ["eager", "sdpa"])
def test_opcheck_forward_and_backward(twin):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 4, 32, generator=gen, requires_grad=True)
    k = torch.randn(1, 12, 2, 32, generator=gen, requires_grad=True)
    v = torch.randn(1, 12, 2, 32, generator=gen, requires_grad=True)
    softcap = 0.0 if twin == "sdpa" else 2.0
    torch.library.opcheck(dense_forward_op, (q, k, v, 0.2, -1, 0, softcap, twin))
    out, lse = dense_forward_op(q.detach(), k.detach(), v.detach(), 0.2, -1, 0, softcap, twin)
    dout = torch.randn(out.shape, generator=gen)
    torch.library.opcheck(
        dense_backward_op, (dout, None, q.detach(), k.detach(), v.detach(), out, lse, 0.2, -1, 0, softcap)
    )


def test_compiled_fullgraph_matches_oracle_with_gradients():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 16, 4, 32, generator=gen, requires_grad=True)
    k = torch.randn(1, 20, 2, 32, generator=gen, requires_grad=True)
    v = torch.randn(1, 20, 2, 32, generator=gen, requires_grad=True)

    def loss(q, k, v):
        out, lse = longattn.attention(q, k, v, causal=True, softcap=2.0, return_lse=True)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True)
    value = compiled(q, k, v)
    grads = torch.autograd.grad(value, (q, k, v))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_ref(q64, k64, v64, causal=True, softcap=2.0)
    ref_value = (ref_out * ref_out).sum() + ref_lse.sum()
    ref_grads = torch.autograd.grad(ref_value, (q64, k64, v64))
    # The rule, with the same loss run uncompiled as the baseline.
    assert_close_to_oracle(value.detach(), ref_value.detach(), loss(q, k, v).detach(), name="loss")
    for g, r in zip(grads, ref_grads):
        assert_close_to_oracle(g, r, r)


@pytest.mark.parametrize("dtype, seqlen", [(torch.float32, 16), (torch.bfloat16, 16), (torch.bfloat16, 200)])
def test_auto_rules_trace_without_a_graph_break_on_a_cold_memo(dtype, seqlen):
    """backend="auto" walks the CPU-flag rules inside compiled code when the
    dispatch memo is empty (as after clear_memo): reading the CPU's flags must
    not be traced (they are read once, at import)."""
    from longattn.kernels.dense import DENSE_BACKENDS

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, seqlen, 2, 32, generator=gen).to(dtype) for _ in range(3))
    DENSE_BACKENDS.clear_memo()
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: longattn.attention(q, k, v, causal=True), fullgraph=True)
    out = compiled(q, k, v)
    ref, _ = attention_ref(q, k, v, causal=True)
    assert_close_to_oracle(out, ref, ref)
