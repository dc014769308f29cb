"""decode_attention at logits ~1e4 on every twin: out and lse finite (exp of
1e4 overflows float32 without the running max) and equal to the oracle by
the tolerance rule."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.kernels.decode.cpp import cpu_unavailable_reason
from longattn.kernels.decode.triton import triton_import_error
from tests.decode.decode_cases import DecodeCase
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import triton_skip_reason

_TRITON_SKIP = triton_skip_reason(triton_import_error())
BACKENDS = [
    "eager",
    pytest.param("cpp", marks=pytest.mark.skipif(cpu_unavailable_reason() is not None,
                                                 reason=f"C++ decode kernel: {cpu_unavailable_reason()}")),
    pytest.param("triton", marks=pytest.mark.skipif(_TRITON_SKIP is not None, reason=str(_TRITON_SKIP))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_large_logits(backend, dtype, page_size, softcap):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    # Headdim 64 (scale 1/8, a power of two); q and k are integers ~100, so
    # every score is exact in float32 whatever the summation order and all
    # twins see the same logits (~1e4): the rule compares their softmax alone.
    case = DecodeCase((37, 0, 21), 1, 2, 2, 2, 64, torch.float32, page_size, True, (-1, -1), softcap, seed=3)
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    q, k_cache, logical_k = ((t * 100).round().to(dtype) for t in (q, k_cache, logical_k))
    kwargs["k_new"] = (kwargs["k_new"] * 100).round().to(dtype)
    kwargs["v_new"] = kwargs["v_new"].to(dtype)
    v_cache, logical_v = v_cache.to(dtype), logical_v.to(dtype)
    ref_out, ref_lse = case.oracle(q, logical_k, logical_v)
    if softcap == 0:
        assert float(ref_lse.abs().max()) > 5e3  # the logits really are ~1e4
    eager_out, eager_lse = longattn.decode_attention(q, k_cache.clone(), v_cache.clone(), **kwargs,
                                                     **case.kwargs(), backend="eager", return_lse=True)
    out, lse = longattn.decode_attention(q, k_cache, v_cache, **kwargs, **case.kwargs(), backend=backend,
                                         return_lse=True)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    assert_close_to_oracle(eager_lse, ref_lse, ref_lse, name="eager lse")
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")
