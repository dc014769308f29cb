"""``longattn.attention`` (dense) against the float64 oracle, every CPU twin.

The tolerance rule: error vs the oracle <= 2x the eager twin's error in the
same dtype + a rounding floor (tests/tolerance.py). The eager twin itself is
held to the floor alone.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn
from longattn.errors import BackendUnavailableError
from longattn.reference import attention_ref
from tests.strategies import Case, cases
from tests.tolerance import assert_close_to_oracle

CPU_BACKENDS = ["auto", "cpp", "sdpa", "eager"]
# Forced twins that may decline a call: sdpa (semantics it cannot express),
# cpp (no compiler or no AVX2 on this machine).
MAY_DECLINE = ("sdpa", "cpp")


def _run(case: Case, backend: str, q, k, v, return_lse: bool = True):
    """``(out, lse)`` (lse None when not requested), or None if a forced sdpa declines."""
    try:
        result = longattn.attention(q, k, v, **case.kwargs(), backend=backend, return_lse=return_lse)
        return result if return_lse else (result, None)
    except BackendUnavailableError as exc:
        assert backend in MAY_DECLINE, f"only a forced {MAY_DECLINE} may decline, got: {exc}"
        return None


@given(cases(), st.sampled_from(CPU_BACKENDS))
def test_forward_matches_oracle(case, backend):
    q, k, v = case.tensors()
    ref_out, ref_lse = attention_ref(q, k, v, **case.kwargs())
    eager_out, eager_lse = longattn.attention(q, k, v, **case.kwargs(), backend="eager", return_lse=True)
    assert_close_to_oracle(eager_out, ref_out, ref_out, name="eager out")
    assert_close_to_oracle(eager_lse, ref_lse, ref_lse, name="eager lse")
    result = _run(case, backend, q, k, v)
    if result is None:
        return
    out, lse = result
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (case.batch, case.nheads, case.seqlen_q) and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, eager_out, name=f"{backend} out")
    assert_close_to_oracle(lse, ref_lse, eager_lse, name=f"{backend} lse")


@settings(max_examples=15)
@given(cases(max_seqlen=40, dtypes=[torch.float32], headdims=[16, 24, 59]), st.sampled_from(CPU_BACKENDS), st.booleans())
def test_gradients_match_oracle(case, backend, through_lse):
    q, k, v = case.tensors(requires_grad=True)
    gen = torch.Generator().manual_seed(case.seed + 1)
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(case.batch, case.nheads, case.seqlen_q, generator=gen)

    def loss(out, lse):
        total = (out.double() * dout.double()).sum()
        if through_lse:  # d/d lse is 0 at empty rows (lse is the constant -inf there)
            total = total + (lse.double().masked_fill(torch.isinf(lse), 0.0) * dlse.double()).sum()
        return total

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(loss(*attention_ref(q64, k64, v64, **case.kwargs())), (q64, k64, v64))
    eager_grads = torch.autograd.grad(
        loss(*longattn.attention(q, k, v, **case.kwargs(), backend="eager", return_lse=True)), (q, k, v)
    )
    # Without lse, SDPA's own backward runs; with it, the shared recomputing one.
    result = _run(case, backend, q, k, v, return_lse=through_lse)
    if result is None:
        return
    grads = torch.autograd.grad(loss(*result), (q, k, v))
    for name, g, e, r in zip("qkv", grads, eager_grads, ref_grads):
        assert_close_to_oracle(e, r, r, name=f"eager d{name}")
        assert_close_to_oracle(g, r, e, name=f"{backend} d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_do_not_overflow(backend, dtype):
    case = Case(1, 33, 47, 2, 4, 64, dtype, True, (-1, -1), 0.0, seed=7)
    q, k, v = case.tensors(scale=30.0)  # scores ~ 30*30*sqrt(64)/8 ~ 900: exp would overflow fp32
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    eager_out, eager_lse = longattn.attention(q, k, v, causal=True, backend="eager", return_lse=True)
    out = longattn.attention(q, k, v, causal=True, backend=backend)
    assert torch.isfinite(out).all()
    assert_close_to_oracle(out, ref_out, eager_out, name="out")
    assert_close_to_oracle(eager_lse, ref_lse, ref_lse, name="eager lse")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_awkward_shapes_from_flash_attn(backend):
    # Shapes flash-attn's tests use on purpose: 113x203, 1x147, 1023x1024; headdim 111.
    for seqlen_q, seqlen_k in [(113, 203), (1, 147), (203, 113), (1023, 1024)]:
        case = Case(1, seqlen_q, seqlen_k, 1, 2, 111, torch.float32, True, (-1, -1), 0.0, seed=seqlen_q)
        q, k, v = case.tensors()
        ref_out, ref_lse = attention_ref(q, k, v, causal=True)
        out, lse = longattn.attention(q, k, v, causal=True, backend=backend, return_lse=True)
        assert_close_to_oracle(out, ref_out, ref_out)
        assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_non_contiguous_inputs():
    base = torch.randn(2, 8, 40, 64)
    q = base[:, :4].transpose(1, 2)  # (2, 40, 4, 64), strided
    k = base[:, 4:6].transpose(1, 2)[:, :33]
    v = base[:, 6:8].transpose(1, 2)[:, :33]
    ref_out, _ = attention_ref(q, k, v, causal=True)
    for backend in CPU_BACKENDS:
        out = longattn.attention(q, k, v, causal=True, backend=backend)
        assert_close_to_oracle(out, ref_out, ref_out)


def test_zero_length_sequences():
    q = torch.randn(1, 5, 2, 16)
    empty_kv = torch.randn(1, 0, 2, 16)
    out, lse = longattn.attention(q, empty_kv, empty_kv, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    out = longattn.attention(q[:, :0], q, q)
    assert out.shape == (1, 0, 2, 16)


@pytest.mark.parametrize("window_size", [(-1, -1), (50, 0)])
def test_deterministic_bitwise(window_size):
    case = Case(2, 300, 300, 2, 4, 64, torch.float32, True, window_size, 0.0, seed=3)
    q, k, v = case.tensors()
    for backend in CPU_BACKENDS if window_size == (-1, -1) else ["auto", "eager"]:
        first = longattn.attention(q, k, v, **case.kwargs(), backend=backend, return_lse=True)
        second = longattn.attention(q, k, v, **case.kwargs(), backend=backend, return_lse=True)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_auto_prefers_cpp_then_sdpa_where_it_serves_and_eager_otherwise():
    from longattn.kernels.dense import DENSE_BACKENDS, DenseCall
    from longattn.kernels.dense.cpp import flash_unavailable_reason

    q = torch.randn(1, 16, 2, 32)
    plain = DenseCall(q, q, q, 0.1, (-1, 0), 0.0, need_lse=False)
    capped = DenseCall(q, q, q, 0.1, (-1, 0), 5.0, need_lse=False)
    if flash_unavailable_reason() is None:
        assert DENSE_BACKENDS.select(plain, "auto").name == "cpp"
        assert DENSE_BACKENDS.select(capped, "auto").name == "cpp"
        # a few queries: SDPA where it serves, else still the C++ kernel (not eager)
        short = q[:, :4]
        assert DENSE_BACKENDS.select(DenseCall(short, q, q, 0.1, (-1, 0), 0.0, need_lse=False), "auto").name == "sdpa"
        assert DENSE_BACKENDS.select(DenseCall(short, q, q, 0.1, (-1, 0), 5.0, need_lse=False), "auto").name == "cpp"
    else:
        assert DENSE_BACKENDS.select(plain, "auto").name == "sdpa"
        assert DENSE_BACKENDS.select(capped, "auto").name == "eager"
