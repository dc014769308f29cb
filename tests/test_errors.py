"""Bad input raises a LongAttnError subclass that names the argument, the
expectation and what was given."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.errors import (
    ArgumentError,
    BackendUnavailableError,
    DeviceError,
    DTypeError,
    LongAttnError,
    ShapeError,
    UnsupportedFeatureError,
)

Q = torch.randn(1, 8, 4, 64)
K = torch.randn(1, 8, 2, 64)
V = torch.randn(1, 8, 2, 64)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"q": torch.randn(8, 4, 64)}, ShapeError, r"q must have 4 dimensions .* got 3"),
        ({"k": torch.randn(1, 8, 2, 32)}, ShapeError, "k has headdim 32 but q has 64"),
        ({"v": torch.randn(1, 8, 2, 32)}, ShapeError, "v has headdim 32 but q has 64"),
        ({"k": torch.randn(1, 8, 3, 64), "v": torch.randn(1, 8, 3, 64)}, ShapeError, "not a multiple of k's nheads_k 3"),
        ({"k": torch.randn(2, 8, 2, 64), "v": torch.randn(2, 8, 2, 64)}, ShapeError, "k has batch 2 but q has 1"),
        ({"v": torch.randn(1, 9, 2, 64)}, ShapeError, "v has seqlen_k 9 but k has 8"),
        ({"k": K.half()}, DTypeError, "k has dtype torch.float16 but q has torch.float32"),
        ({"q": Q.long(), "k": K.long(), "v": V.long()}, DTypeError, "q must be one of float32, float16, bfloat16, got torch.int64"),
        ({"q": Q.numpy()}, DTypeError, "q must be a torch.Tensor"),
        ({"k": K.to("meta")}, DeviceError, "k is on meta but q is on cpu"),
        ({"window_size": (4,)}, ArgumentError, "window_size must be a pair"),
        ({"window_size": (-2, 0)}, ArgumentError, "window_size entries must be >= -1"),
        ({"window_size": (4, 2), "causal": True}, ArgumentError, "right edge must be -1 or 0 when causal=True, got 2"),
        ({"softcap": -1.0}, ArgumentError, "softcap must be a finite number >= 0"),
        ({"softmax_scale": float("nan")}, ArgumentError, "softmax_scale must be None or a finite number"),
        ({"causal": 1}, ArgumentError, "causal must be a bool"),
        ({"backend": "cuda-magic"}, ArgumentError, r"backend must be 'auto' or one of \['cpp', 'sdpa', 'triton', 'eager'\]"),
        ({"sparse": "hip"}, UnsupportedFeatureError, "sparse='hip'"),
    ],
)
def test_bad_input(kwargs, error, pattern):
    args = {"q": Q, "k": K, "v": V, **kwargs}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=pattern) as info:
        longattn.attention(q, k, v, **args)
    assert isinstance(info.value, LongAttnError)


def test_builtin_exception_types_still_catch():
    with pytest.raises(ValueError):
        longattn.attention(Q, torch.randn(1, 8, 2, 32), V)
    with pytest.raises(TypeError):
        longattn.attention(Q, K.half(), V)


def test_forced_backend_lists_every_backend_and_reason():
    with pytest.raises(BackendUnavailableError) as info:
        longattn.attention(Q, K, V, softcap=3.0, backend="sdpa")
    message = str(info.value)
    assert "sdpa: softcap is not supported" in message
    assert "eager: can serve" in message
    assert "triton:" in message and "cpp:" in message
    assert set(info.value.reasons) == {"cpp", "sdpa", "triton", "eager"}


def test_forced_triton_rejects_unsupported_headdim():
    q = torch.randn(1, 4, 2, 320)
    with pytest.raises(BackendUnavailableError, match="headdim 320 > 256"):
        longattn.attention(q, q, q, backend="triton")
    # The eager twin has no headdim limit.
    assert longattn.attention(q, q, q, backend="eager").shape == q.shape


@pytest.mark.parametrize("make_sparse", ["hip", "streaming", "duo"])
def test_sparse_methods_refuse_inputs_that_require_grad(make_sparse):
    from longattn.sparse import HiP, Duo, HeadPattern, Streaming

    sparse = {"hip": lambda: HiP(), "streaming": lambda: Streaming(4, 16),
              "duo": lambda: Duo(HeadPattern(((True, False),)), 0)}[make_sparse]()
    q = torch.randn(1, 40, 2, 16, requires_grad=True)
    k = torch.randn(1, 40, 2, 16)
    with pytest.raises(UnsupportedFeatureError, match="forward-only"):
        longattn.attention(q, k, k, causal=True, sparse=sparse)
    with torch.no_grad():  # inference is what they are for
        assert longattn.attention(q, k, k, causal=True, sparse=sparse).shape == q.shape
