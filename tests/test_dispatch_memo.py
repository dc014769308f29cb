"""Small calls cost little: the memoised twin selection, the fast validation
paths and the data-driven ``auto`` rule behave exactly like the slow paths.

No timing here (benchmarks are not tests): ``longattn bench overhead`` and
``longattn bench auto`` measure what these paths buy.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import longattn
from longattn.errors import ArgumentError, BackendUnavailableError, DTypeError, ShapeError
from longattn.kernels import dense
from longattn.kernels.dense import AUTO_PREFER_SDPA, DENSE_BACKENDS, DenseCall, call_signature
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle


def _calls():
    """A grid over everything a dense twin's reasons read (shapes via empty
    tensors: selection reads only shapes, dtypes and devices)."""
    for dtype, (sq, sk), window, softcap, need_lse in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16),
        ((1, 1), (1, 4), (1, 4096), (4, 4), (4, 1), (16, 16), (64, 64), (65, 65), (96, 96), (97, 2000),
         (128, 128), (5000, 4000), (0, 3), (3, 0)),
        ((-1, -1), (-1, 0), (8, 0)),
        (0.0, 5.0),
        (False, True),
    ):
        q = torch.empty(1, sq, 4, 16, dtype=dtype)
        k = torch.empty(1, sk, 2, 16, dtype=dtype)
        yield DenseCall(q, k, k, 0.25, window, softcap, need_lse)


def _select(call, backend, cached):
    select = DENSE_BACKENDS.select if cached else DENSE_BACKENDS.select_uncached
    try:
        return select(call, backend).name
    except BackendUnavailableError as exc:
        return f"error: {exc}"


@pytest.mark.parametrize("backend", ["auto", "cpp", "sdpa", "triton", "eager"])
def test_memoised_selection_equals_a_fresh_walk(backend):
    DENSE_BACKENDS.clear_memo()
    calls = list(_calls())
    for _ in range(2):  # the second pass is served from the memo
        for call in calls:
            assert _select(call, backend, cached=True) == _select(call, backend, cached=False), call_signature(call)


def test_signature_from_facts_equals_signature_from_the_call():
    for call in _calls():
        q, k = call.q, call.k
        assert dense.signature_of(q.shape, k.shape, q.dtype, q.device, call.window, call.softcap,
                                  call.need_lse) == call_signature(call)


def test_the_memo_is_bounded():
    DENSE_BACKENDS.clear_memo()
    for sq in range(1, DENSE_BACKENDS.max_memo + 50):
        q = torch.empty(1, sq, 2, 16)
        DENSE_BACKENDS.select(DenseCall(q, q, q, 0.25, (-1, 0), 0.0, False), "auto")
    assert 0 < len(DENSE_BACKENDS._memo) <= DENSE_BACKENDS.max_memo


def test_errors_are_never_memoised():
    q = torch.empty(1, 4, 2, 16)
    capped = DenseCall(q, q, q, 0.25, (-1, 0), 5.0, False)
    for _ in range(2):
        with pytest.raises(BackendUnavailableError, match="softcap is not supported by SDPA"):
            DENSE_BACKENDS.select(capped, "sdpa")


def test_a_bad_backend_name_is_an_error_even_when_unhashable():
    q = torch.randn(1, 4, 2, 16)
    for bad in (["auto"], "fastest", None):
        with pytest.raises(ArgumentError, match="backend must be"):
            longattn.attention(q, q, q, backend=bad)


def test_auto_reason_names_the_rule_and_its_measurement():
    q = torch.empty(1, 4, 2, 16)  # 4 float32 queries: the fp32-short row
    reasons = dense._cpp_auto_reasons(DenseCall(q, q, q, 0.25, (-1, 0), 0.0, False))
    assert len(reasons) == 1 and "fp32-short" in reasons[0] and "measured" in reasons[0]
    long_q = torch.empty(1, 1024, 2, 16)
    assert dense._cpp_auto_reasons(DenseCall(long_q, long_q, long_q, 0.25, (-1, 0), 0.0, False)) == []
    # a call SDPA cannot serve keeps the C++ kernel however short
    assert dense._cpp_auto_reasons(DenseCall(q, q, q, 0.25, (-1, 0), 5.0, False)) == []


@pytest.mark.parametrize(
    "flags, dtype, seqlen, expected",
    [
        (frozenset({"amx_bf16", "amx_tile", "avx512_bf16"}), torch.bfloat16, 4096, "sdpa"),  # Xeon with AMX
        (frozenset({"amx_bf16", "amx_tile", "avx512_bf16"}), torch.bfloat16, 1024, "sdpa"),
        (frozenset({"amx_bf16", "amx_tile", "avx512_bf16"}), torch.float32, 2048, "cpp"),
        (frozenset({"amx_bf16", "amx_tile", "avx512_bf16"}), torch.float32, 4096, "sdpa"),  # fp32-amx-xeon-long
        (frozenset({"avx512_bf16", "avx512f"}), torch.float32, 4096, "cpp"),  # Zen 4
        (frozenset({"avx512_bf16", "avx512f"}), torch.bfloat16, 4096, "cpp"),  # Zen 4: bf16 dot engine
        (frozenset({"avx512_fp16", "amx_bf16"}), torch.float16, 4096, "sdpa"),
        (frozenset({"avx512_fp16", "amx_bf16"}), torch.float16, 1024, "cpp"),  # the kernel ahead at 1k
        (frozenset({"avx2"}), torch.float16, 4096, "cpp"),
        (frozenset({"avx2"}), torch.float16, 4, "sdpa"),  # fp16-tiny
        # bfloat16 short runs: the threshold follows the kernel's bf16 engine
        (frozenset({"avx512f", "avx512_bf16"}), torch.bfloat16, 32, "cpp"),  # bf16 dot: wins from 32 queries
        (frozenset({"avx512f", "avx512_bf16"}), torch.bfloat16, 16, "sdpa"),
        (frozenset({"avx2"}), torch.bfloat16, 32, "sdpa"),  # float32 math: SDPA up to 96 queries
        (frozenset({"avx2"}), torch.bfloat16, 128, "cpp"),
    ],
)
def test_auto_prefill_twin_follows_the_cpu_features(monkeypatch, flags, dtype, seqlen, expected):
    from longattn.kernels.dense.cpp import flash_unavailable_reason

    if flash_unavailable_reason() is not None:
        pytest.skip(f"the C++ kernel does not build here: {flash_unavailable_reason()}")
    monkeypatch.setattr(dense, "cpu_flags", lambda: flags)
    DENSE_BACKENDS.clear_memo()
    try:
        q = torch.empty(1, seqlen, 8, 128, dtype=dtype)
        assert DENSE_BACKENDS.select(DenseCall(q, q, q, 0.1, (-1, 0), 0.0, False), "auto").name == expected
    finally:
        DENSE_BACKENDS.clear_memo()  # selections made under the fake flags must not outlive the test


def test_rules_are_well_formed():
    names = [r.name for r in AUTO_PREFER_SDPA]
    assert len(names) == len(set(names))
    for rule in AUTO_PREFER_SDPA:
        assert rule.dtypes and set(rule.dtypes) <= {torch.float32, torch.float16, torch.bfloat16}
        assert rule.why and (rule.max_seqlen_q is None or rule.min_seqlen_q <= rule.max_seqlen_q)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"causal": 1}, ArgumentError, "causal must be a bool"),
        ({"return_lse": 0}, ArgumentError, "return_lse must be a bool"),
        ({"window_size": (-1.0, -1)}, ArgumentError, "window_size must be a pair of ints"),
        ({"window_size": [-1, -1, -1]}, ArgumentError, "window_size must be a pair of ints"),
        ({"window_size": (True, -1)}, ArgumentError, "window_size must be a pair of ints"),
        ({"window_size": (-2, 0)}, ArgumentError, "window_size entries must be >= -1"),
        ({"window_size": (-1, 3), "causal": True}, ArgumentError, "right edge must be -1 or 0"),
        ({"softcap": float("nan")}, ArgumentError, "softcap must be a finite number"),
        ({"softcap": -1}, ArgumentError, "softcap must be a finite number"),
        ({"softcap": True}, ArgumentError, "softcap must be a finite number"),
        ({"softmax_scale": True}, ArgumentError, "softmax_scale must be None or a finite number"),
        ({"softmax_scale": float("inf")}, ArgumentError, "softmax_scale must be None or a finite number"),
    ],
)
def test_fast_option_checks_reject_what_the_full_checks_reject(kwargs, error, match):
    q = torch.randn(1, 3, 2, 16)
    with pytest.raises(error, match=match):
        longattn.attention(q, q, q, **kwargs)


def test_fast_qkv_checks_reject_what_the_full_checks_reject():
    q = torch.randn(1, 3, 4, 16)
    k = torch.randn(1, 5, 2, 16)
    with pytest.raises(ShapeError, match="v has seqlen_k"):
        longattn.attention(q, k, k[:, :4])
    with pytest.raises(DTypeError, match="k has dtype"):
        longattn.attention(q, k.half(), k)
    with pytest.raises(ShapeError, match="not a multiple"):
        longattn.attention(torch.randn(1, 3, 3, 16), k, k)
    with pytest.raises(DTypeError, match="must be a torch.Tensor"):
        longattn.attention(q.numpy(), k, k)


@pytest.mark.parametrize(
    "options", [{"softmax_scale": 0.3}, {"softmax_scale": 1}, {"softcap": 2}, {"window_size": [4, 0]}]
)
def test_options_of_other_accepted_types_still_compute_the_right_answer(options):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 4, 16, generator=gen)
    k, v = (torch.randn(1, 9, 2, 16, generator=gen) for _ in range(2))
    out = longattn.attention(q, k, v, causal=True, **options)
    ref, _ = attention_ref(q, k, v, causal=True, **options)
    eager = longattn.attention(q, k, v, causal=True, backend="eager", **options)
    assert_close_to_oracle(out, ref, eager)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 7), (3, 7), (7, 3), (1, 1), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_query_runs_on_sdpa_match_the_oracle(seqlen_q, seqlen_k, dtype):
    # the short calls auto now sends to SDPA, including its bottom-right mask shortcuts
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, seqlen_q, 4, 32, generator=gen).to(dtype)
    k, v = (torch.randn(1, seqlen_k, 2, 32, generator=gen).to(dtype) for _ in range(2))
    ref, _ = attention_ref(q, k, v, causal=True)
    eager = longattn.attention(q, k, v, causal=True, backend="eager")
    for backend in ("auto", "sdpa"):
        out = longattn.attention(q, k, v, causal=True, backend=backend)
        assert out.dtype == dtype and out.shape == q.shape
        assert_close_to_oracle(out, ref, eager)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 7), (3, 7), (7, 3), (5, 5)])
def test_sdpa_lse_with_the_mask_shortcuts_matches_the_oracle(seqlen_q, seqlen_k):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, seqlen_q, 4, 32, generator=gen)
    k, v = (torch.randn(1, seqlen_k, 2, 32, generator=gen) for _ in range(2))
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    eager_out, eager_lse = longattn.attention(q, k, v, causal=True, backend="eager", return_lse=True)
    out, lse = longattn.attention(q, k, v, causal=True, backend="sdpa", return_lse=True)
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")  # -inf rows (seqlen_q > seqlen_k) included
