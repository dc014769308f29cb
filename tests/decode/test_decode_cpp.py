"""The C++ CPU stream-K decode twin against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.decode import plan_decode
from longattn.kernels.decode.cache import check_cache
from longattn.kernels.decode.cpp import cpu_unavailable_reason, decode_forward_cpu
from longattn.kernels.decode.eager import decode_forward_eager
from longattn.masking import effective_window
from tests.decode.decode_cases import DecodeCase, decode_cases
from tests.tolerance import assert_close_to_oracle

pytestmark = pytest.mark.skipif(
    cpu_unavailable_reason() is not None, reason=f"C++ kernel unavailable: {cpu_unavailable_reason()}"
)


def _run(case: DecodeCase, plan_args: dict | None, build_flags: tuple[str, ...] = ()):
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    view = check_cache(q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs.get("block_table"),
                       kwargs.get("k_new"), kwargs.get("v_new"))
    args = (q, view.k_cache, view.v_cache, view.seqlens, view.block_table)
    params = {"scale": case.headdim ** -0.5, "window": effective_window(case.causal, case.window_size),
              "softcap": case.softcap}
    plan = None if plan_args is None else plan_decode(view.seqlens, nheads_k=case.nheads_k, **plan_args)
    out, lse = decode_forward_cpu(*args, **params, plan=plan, build_flags=build_flags)
    eager_out, eager_lse = decode_forward_eager(*args, **params)
    ref_out, ref_lse = case.oracle(q, logical_k, logical_v)
    return (out, lse), (eager_out, eager_lse), (ref_out, ref_lse), (args, params, plan)


@given(decode_cases(max_len=120), st.data())
def test_matches_oracle_for_any_schedule(case, data):
    plan_args = data.draw(st.sampled_from([
        None,  # the default CPU plan: one worker per thread, all heads in one tile
        {"num_workers": 1, "block_n": 16},
        {"num_workers": 3, "block_n": 7},
        {"num_workers": 50, "block_n": 4},  # more workers than LeanTiles
        {"num_workers": 4, "block_n": 32, "heads_per_tile": case.nheads_k},
    ]))
    (out, lse), (eager_out, eager_lse), (ref_out, ref_lse), _ = _run(case, plan_args)
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


def test_bitwise_deterministic_for_a_fixed_plan():
    case = DecodeCase((700, 33, 0, 258), 1, 4, 2, 4, 128, torch.bfloat16, 16, True, (-1, -1), 0.0, seed=5)
    (out, lse), _, _, (args, params, plan) = _run(case, {"num_workers": 5, "block_n": 64})
    again = decode_forward_cpu(*args, **params, plan=plan)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_long_context_gqa_8(dtype):
    case = DecodeCase((5000,), 1, 1, 1, 8, 128, dtype, None, True, (-1, -1), 0.0, seed=6)
    (out, lse), (eager_out, eager_lse), (ref_out, ref_lse), _ = _run(case, None)
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


# The kernel has a vector path per instruction set; the build's ISA level picks one,
# so on an AVX-512 machine the others are built with features switched off.
VECTOR_PATHS = {
    "native": (),
    "avx512-without-bf16-dot": ("-mno-avx512bf16",),
    "avx2": ("-mno-avx512f",),
    "portable": ("-mno-avx512f", "-mno-avx2", "-mno-fma"),
}


@pytest.mark.parametrize("path", list(VECTOR_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("headdim,window,softcap", [(128, (-1, -1), 0.0), (40, (37, 0), 5.0), (36, (20, 0), 0.0)])
def test_every_vector_path_matches_oracle(path, dtype, headdim, window, softcap):
    # Two sequences over several chunks and LeanTiles, seqlen_q 3, GQA 4; the
    # second case has a tail of headdim (40 = 32 + 8: AVX-512's 8-key path,
    # AVX2's lane-per-key path with 5 vectors per row), a window and softcap;
    # the third a head dim no vector width divides (36: the 8-key path on
    # AVX2 builds too) and a shorter window.
    case = DecodeCase((300, 77), 2, 3, 2, 4, headdim, dtype, 16, True, window, softcap, seed=11)
    (out, lse), (eager_out, eager_lse), (ref_out, ref_lse), _ = _run(
        case, {"num_workers": 3, "block_n": 32, "heads_per_tile": 2}, VECTOR_PATHS[path])
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


def test_auto_picks_the_cpu_kernel():
    from longattn.kernels.decode import DECODE_BACKENDS, DecodeCall

    case = DecodeCase((10,), 0, 1, 1, 1, 16, torch.float32, None, True, (-1, -1), 0.0, seed=7)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    view = check_cache(q, k_cache, v_cache, kwargs["cache_seqlens"], None, None, None)
    call = DecodeCall(q, view, 0.25, (-1, 0), 0.0, None)
    assert DECODE_BACKENDS.select(call, "auto").name == "cpp"
    out = longattn.decode_attention(q, k_cache, v_cache, **kwargs)
    assert out.shape == q.shape
