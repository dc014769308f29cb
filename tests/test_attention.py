"""``longattn.attention`` (dense) against the float64 oracle, every twin.

The tolerance rule: error vs the oracle <= 2x the eager twin's error in the
same dtype + a rounding floor (tests/tolerance.py). The eager twin itself is
held to the floor alone. Each twin gets its own hypothesis run (the ``ci``
profile's examples per twin, not shared between them); the Triton twin runs
under the interpreter on tiny shapes, without bfloat16 (the interpreter has none).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import longattn
import longattn.kernels.dense.cpp
from longattn.errors import BackendUnavailableError
from longattn.kernels.dense.triton import triton_import_error
from longattn.reference import attention_ref
from tests.strategies import Case, cases
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import triton_skip_reason

CPU_BACKENDS = ["auto", "cpp", "sdpa", "eager"]
# Forced twins that may decline a call: sdpa (semantics it cannot express),
# cpp (no compiler or no AVX2 on this machine).
MAY_DECLINE = ("sdpa", "cpp")

_TRITON_SKIP = triton_skip_reason(triton_import_error())
requires_triton = pytest.mark.skipif(_TRITON_SKIP is not None, reason=str(_TRITON_SKIP))
# Tiny cases for the interpreted Triton twin (~0.1-1 s a call): no bfloat16.
TRITON_CASES = dict(max_seqlen=24, dtypes=[torch.float32, torch.float16], headdims=[16, 24, 40, 59], groups=(1, 2, 4))
ALL_BACKENDS = CPU_BACKENDS + [pytest.param("triton", marks=requires_triton)]


def _run(kwargs: dict, backend: str, q, k, v, return_lse: bool = True):
    """``(out, lse)`` (lse None when not requested), or None if a forced sdpa/cpp declines."""
    try:
        result = longattn.attention(q, k, v, **kwargs, backend=backend, return_lse=return_lse)
        return result if return_lse else (result, None)
    except BackendUnavailableError as exc:
        assert backend in MAY_DECLINE, f"only a forced {MAY_DECLINE} may decline, got: {exc}"
        return None


def _check_forward(case: Case, backend: str) -> None:
    q, k, v = case.tensors()
    # The oracle sees the same (bf16/fp16-rounded) inputs, so the floor is the output rounding alone.
    ref_out, ref_lse = attention_ref(q, k, v, **case.kwargs())
    eager_out, eager_lse = longattn.attention(q, k, v, **case.kwargs(), backend="eager", return_lse=True)
    assert_close_to_oracle(eager_out, ref_out, ref_out, name="eager out")
    assert_close_to_oracle(eager_lse, ref_lse, ref_lse, name="eager lse")
    result = _run(case.kwargs(), backend, q, k, v)
    if result is None:
        return
    out, lse = result
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (case.batch, case.nheads, case.seqlen_q) and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, eager_out, name=f"{backend} out")
    assert_close_to_oracle(lse, ref_lse, eager_lse, name=f"{backend} lse")
    empty = torch.isinf(ref_lse).permute(0, 2, 1)  # (batch, seqlen_q, nheads)
    assert torch.all(out[empty] == 0), "rows that see no key must be exactly 0"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=25)
@given(case=cases())
# Corners pinned for every twin: one query (decode-like) with GQA 4 in fp16; more
# queries than keys, causal (the first rows see nothing) with a window and softcap
# in bf16; head dim 256 in bf16 (the C++ twin's widest padding-free tile); a
# non-default softmax_scale with GQA 8 and a two-sided window.
@example(case=Case(2, 1, 77, 2, 4, 64, torch.float16, True, (-1, -1), 0.0, seed=1))
@example(case=Case(2, 41, 9, 2, 2, 59, torch.bfloat16, True, (4, 0), 2.5, seed=2))
@example(case=Case(1, 50, 13, 1, 1, 24, torch.float32, True, (-1, -1), 0.0, seed=3))
@example(case=Case(1, 37, 53, 1, 2, 256, torch.bfloat16, True, (-1, -1), 0.0, seed=4))
@example(case=Case(1, 29, 31, 1, 8, 40, torch.float32, False, (5, 3), 0.0, seed=5, softmax_scale=0.37))
def test_forward_matches_oracle(backend, case):
    _check_forward(case, backend)


@requires_triton
@settings(max_examples=20)
@given(case=cases(**TRITON_CASES))
@example(case=Case(1, 1, 23, 2, 4, 16, torch.float16, True, (-1, -1), 0.0, seed=1))
@example(case=Case(2, 19, 6, 1, 2, 24, torch.float32, True, (2, 0), 2.5, seed=2))
@example(case=Case(1, 13, 17, 2, 1, 40, torch.float16, False, (3, 2), 0.0, seed=3, softmax_scale=0.37))
def test_triton_forward_matches_oracle(case):
    _check_forward(case, "triton")


def _check_gradients(case: Case, backend: str, through_lse: bool) -> None:
    q, k, v = case.tensors(requires_grad=True)
    gen = torch.Generator().manual_seed(case.seed + 1)
    dout = torch.randn(q.shape, generator=gen).to(q.dtype)
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
    result = _run(case.kwargs(), backend, q, k, v, return_lse=through_lse)
    if result is None:
        return
    grads = torch.autograd.grad(loss(*result), (q, k, v))
    for name, g, e, r in zip("qkv", grads, eager_grads, ref_grads):
        assert g.dtype == e.dtype == q.dtype
        if q.dtype == torch.float32:  # in half precision the eager twin is the baseline only
            assert_close_to_oracle(e, r, r, name=f"eager d{name}")
        assert_close_to_oracle(g, r, e, name=f"{backend} d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=12)
@given(case=cases(max_seqlen=40, headdims=[16, 24, 59]), through_lse=st.booleans())
def test_gradients_match_oracle(backend, case, through_lse):
    _check_gradients(case, backend, through_lse)


@requires_triton
@settings(max_examples=10)
@given(case=cases(**{**TRITON_CASES, "max_seqlen": 16}), through_lse=st.booleans())
def test_triton_gradients_match_oracle(case, through_lse):
    _check_gradients(case, "triton", through_lse)


@pytest.mark.parametrize("backend", ["eager", "cpp", "sdpa", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_reproduces_the_forward_probabilities(backend, dtype, causal):
    """One visible key per row: the forward's weight is exactly 1 (out = v), so
    dV must equal dout bit for bit (flash-attn's tests expect this: seqlen_k 1,
    headdim 160). The shared backward recomputes P from lse; it must give the
    forward's probabilities whatever order the twin rounded its scores in.
    Causal with seqlen_q 3 > seqlen_k 1: only the last query sees the key."""
    gen = torch.Generator().manual_seed(11)
    seqlen_q = 3 if causal else 1
    q = (torch.randn(2, seqlen_q, 4, 160, generator=gen) * 3).to(dtype).requires_grad_()
    k = (torch.randn(2, 1, 4, 160, generator=gen) * 3).to(dtype).requires_grad_()
    v = torch.randn(2, 1, 4, 160, generator=gen).to(dtype).requires_grad_()
    if backend == "sdpa" and dtype != torch.float32:
        pytest.skip("sdpa returns lse (and so uses the shared backward) for float32 only")
    try:
        out, lse = longattn.attention(q, k, v, causal=causal, backend=backend, return_lse=True)
    except BackendUnavailableError as exc:
        assert backend in MAY_DECLINE
        pytest.skip(f"{backend} cannot serve here: {exc}")
    seen = slice(seqlen_q - 1, seqlen_q)  # the one row that sees the key
    assert torch.equal(out[:, seen], v)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    dv = grads[2]
    assert torch.equal(dv, dout[:, seen]), f"dV differs from dout by {(dv - dout[:, seen]).abs().max().item()}"
    # dq, dk (0 in exact arithmetic: dS = P (dP - delta) with dP = delta) by the rule.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, _ = attention_ref(q64, k64, v64, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    eager_out = longattn.attention(q, k, v, causal=causal, backend="eager")
    eager_grads = torch.autograd.grad(eager_out, (q, k, v), dout)
    for name, g, e, r in zip("qk", grads, eager_grads, ref_grads):
        assert_close_to_oracle(g, r, e, name=f"d{name}")


def _large_logit_inputs(dtype, seqlen_q=19, seqlen_k=27, nheads=4, nheads_k=2, headdim=64, seed=7):
    """q, k with scores ~1e4 (integers * 100, rounded: every q.k is exact in
    float32 whatever the summation order, and scale 1/8 is a power of two, so
    all twins see the same scores; otherwise a rounding of ~1e-3 in a score of
    1e4 decides which twin is closer and the rule becomes a coin flip)."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, seqlen_q, nheads, headdim, generator=gen) * 100).round()
    k = (torch.randn(1, seqlen_k, nheads_k, headdim, generator=gen) * 100).round()
    v = torch.randn(1, seqlen_k, nheads_k, headdim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_large_logits_do_not_overflow(backend, dtype, softcap):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    q, k, v = _large_logit_inputs(dtype)
    kwargs = dict(causal=True, softcap=softcap)
    ref_out, ref_lse = attention_ref(q, k, v, **kwargs)
    if softcap == 0:
        assert float(ref_lse.abs().max()) > 5e3  # scores really are ~1e4: exp would overflow float32
    eager_out, eager_lse = longattn.attention(q, k, v, **kwargs, backend="eager", return_lse=True)
    assert_close_to_oracle(eager_lse, ref_lse, ref_lse, name="eager lse")
    result = _run(kwargs, backend, q, k, v)
    if result is None:
        return
    out, lse = result
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close_to_oracle(out, ref_out, eager_out, name="out")
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


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

    q = torch.randn(1, 128, 2, 32)  # past every short-query row of AUTO_PREFER_SDPA
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


@pytest.mark.parametrize("backend", ["cpp", "eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_key_reaches_exactly_the_rows_that_see_it_bottom_right(backend, dtype):
    """A NaN in k (an fp16 overflow upstream) makes NaN exactly the oracle's
    rows: with seqlen_q < seqlen_k the causal rule is bottom-right, which SDPA
    gets as an additive mask (NaN + -inf is NaN: a hidden NaN key reached
    rows before it), and the C++ kernel's exp used to drop the key."""
    if backend == "cpp" and longattn.kernels.dense.cpp.flash_unavailable_reason() is not None:
        pytest.skip(f"the C++ kernel does not build here: {longattn.kernels.dense.cpp.flash_unavailable_reason()}")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, 32, generator=gen) for n, h in ((200, 4), (300, 2), (300, 2)))
    k[0, 150, 1, 5] = float("nan")  # seen by query rows 50 on of kv head 1's heads
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = longattn.attention(q, k, v, causal=True, backend=backend)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    assert torch.equal(out.float().isnan().any(-1), ref_out.isnan().any(-1))
    assert ref_out.isnan().any() and not ref_out.isnan().all()
    if dtype == torch.float32:  # with lse (the sdpa twin serves it for float32)
        out, lse = longattn.attention(q, k, v, causal=True, backend=backend, return_lse=True)
        assert torch.equal(out.isnan().any(-1), ref_out.isnan().any(-1))
        assert torch.equal(lse.isnan(), ref_lse.isnan())
