"""A non-default ``softmax_scale`` through every front door, each against the
float64 oracle run with the same scale (and the method's own mask).

A twin that ignored the scale (used ``headdim ** -0.5``) or applied it twice
fails here: the scales below are far from the default, so the softmax is
visibly sharper or flatter.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.errors import BackendUnavailableError
from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.dense.triton import triton_import_error
from longattn.reference import attention_ref
from longattn.sparse import Duo, DuoCache, HeadPattern, HiP, Streaming, StreamingCache, hip_select_blocks
from longattn.sparse.streaming import lambda_mask
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import triton_skip_reason

_TRITON_SKIP = triton_skip_reason(triton_import_error())
TRITON = pytest.param("triton", marks=pytest.mark.skipif(_TRITON_SKIP is not None, reason=str(_TRITON_SKIP)))
HEADDIM = 32
SCALES = [0.41, 0.03]  # default is 32 ** -0.5 = 0.177: sharper (logits ~2.3x) and much flatter


def _qkv(seqlen_q, seqlen_k, nheads=4, nheads_k=2, dtype=torch.float32, seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, HEADDIM, generator=gen).to(dtype)
    k = torch.randn(batch, seqlen_k, nheads_k, HEADDIM, generator=gen).to(dtype)
    v = torch.randn(batch, seqlen_k, nheads_k, HEADDIM, generator=gen).to(dtype)
    return q, k, v


def _check(out, lse, ref_out, ref_lse, eager=None):
    """The rule, with the eager twin's result as baseline where there is one."""
    base_out, base_lse = eager if eager is not None else (ref_out, ref_lse)
    assert_close_to_oracle(out, ref_out, base_out)
    if lse is not None:
        assert_close_to_oracle(lse, ref_lse, base_lse, name="lse")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", ["auto", "cpp", "sdpa", "eager", TRITON])
def test_attention(backend, scale):
    q, k, v = _qkv(21, 30, dtype=torch.float16, seed=1)
    kwargs = dict(causal=True, softmax_scale=scale)
    ref = attention_ref(q, k, v, **kwargs)
    eager = longattn.attention(q, k, v, **kwargs, backend="eager", return_lse=True)
    assert_close_to_oracle(eager[0], ref[0], ref[0])
    try:
        out, lse = longattn.attention(q, k, v, **kwargs, backend=backend, return_lse=True)
    except BackendUnavailableError:  # sdpa: lse of fp16 -- the output alone then
        assert backend == "sdpa"
        out, lse = longattn.attention(q, k, v, **kwargs, backend=backend), None
    _check(out, lse, *ref, eager)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", ["auto", "cpp", "eager", TRITON])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_attention(backend, scale, paged):
    gen = torch.Generator().manual_seed(2)
    lengths, nheads_k = [19, 0, 33], 2
    logical_k, logical_v = (torch.randn(3, 34, nheads_k, HEADDIM, generator=gen) for _ in range(2))
    q = torch.randn(3, 2, 8, HEADDIM, generator=gen)
    if paged:  # pages of 4, in reverse order
        table = torch.arange(3 * 9).flip(0).reshape(3, 9).to(torch.int32)
        k_cache, v_cache = (torch.zeros(27, 4, nheads_k, HEADDIM) for _ in range(2))
        for b, n in enumerate(lengths):
            for p in range(n):
                k_cache[table[b, p // 4], p % 4] = logical_k[b, p]
                v_cache[table[b, p // 4], p % 4] = logical_v[b, p]
        kwargs = dict(block_table=table)
    else:
        k_cache, v_cache, kwargs = logical_k.clone(), logical_v.clone(), {}
    kwargs.update(cache_seqlens=torch.tensor(lengths, dtype=torch.int32), causal=True, softmax_scale=scale,
                  return_lse=True)
    refs = [attention_ref(q[b : b + 1], logical_k[b : b + 1, :n], logical_v[b : b + 1, :n], causal=True,
                          softmax_scale=scale) for b, n in enumerate(lengths)]
    ref_out, ref_lse = torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs])
    eager = longattn.decode_attention(q, k_cache, v_cache, **kwargs, backend="eager")
    _check(*eager, ref_out, ref_lse)
    _check(*longattn.decode_attention(q, k_cache, v_cache, **kwargs, backend=backend), ref_out, ref_lse, eager)


SPARSE_BACKENDS = ["auto", "cpp", "sdpa", "eager", TRITON]


def _sparse(method, q, k, v, scale, backend):
    try:
        return longattn.attention(q, k, v, causal=True, sparse=method, softmax_scale=scale, backend=backend,
                                  return_lse=True)
    except BackendUnavailableError:
        assert backend in ("cpp", "sdpa"), backend
        pytest.skip(f"{backend} cannot serve this sparse call here")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_hip(backend, scale):
    q, k, v = _qkv(40, 48, seed=3)
    cfg = HiP(topk=8, block_q=8, block_k=2, sink_size=2, recent_size=6)
    out, lse = _sparse(cfg, q, k, v, scale, backend)
    # A uniform scale does not change which blocks score highest.
    layout = BlockSparseLayout(40, 48, cfg.block_q, cfg.block_k, cfg.sink_size, cfg.recent_size, True)
    mask = layout.dense_mask(hip_select_blocks(q, k, cfg, causal=True))
    _check(out, lse, *attention_ref(q, k, v, softmax_scale=scale, mask=mask))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_streaming(backend, scale):
    q, k, v = _qkv(37, 45, seed=4)
    out, lse = _sparse(Streaming(3, 7), q, k, v, scale, backend)
    _check(out, lse, *attention_ref(q, k, v, softmax_scale=scale, mask=lambda_mask(37, 45, 3, 7)))


def _duo_mask(retrieval, group, seqlen_q, seqlen_k, sink, window):
    full = torch.tensor(retrieval).repeat_interleave(group)  # per query head
    causal = lambda_mask(seqlen_q, seqlen_k, 0, seqlen_q + seqlen_k + 1)
    return torch.where(full[:, None, None], causal, lambda_mask(seqlen_q, seqlen_k, sink, window))[None]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_duo(backend, scale):
    q, k, v = _qkv(33, 41, nheads=6, nheads_k=3, seed=5)
    retrieval = (True, False, True)
    out, lse = _sparse(Duo(HeadPattern((retrieval,), 2, 5), 0), q, k, v, scale, backend)
    _check(out, lse, *attention_ref(q, k, v, softmax_scale=scale, mask=_duo_mask(retrieval, 2, 33, 41, 2, 5)))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("steps", [[1, 1, 1, 1], [3, 5, 1]], ids=["decode-steps", "chunks"])
def test_streaming_cache_step(scale, steps):
    """Both paths of ``step``: one token (the decode kernel over the ring) and a chunk."""
    sink, window, prompt = 2, 5, 9
    total = prompt + sum(steps)
    q, k, v = _qkv(total, total, seed=6, batch=2)
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=scale, mask=lambda_mask(total, total, sink, window))
    cache = StreamingCache(Streaming(sink, window), 2, 2, HEADDIM)
    cache.append(k[:, :prompt], v[:, :prompt])
    at = prompt
    for n in steps:
        out, lse = cache.step(q[:, at : at + n], k[:, at : at + n], v[:, at : at + n], softmax_scale=scale,
                              return_lse=True)
        _check(out, lse, ref_out[:, at : at + n], ref_lse[:, :, at : at + n])
        at += n


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("steps", [[1, 1, 1], [4, 1, 6]], ids=["decode-steps", "chunks"])
def test_duo_cache_step(scale, steps):
    sink, window, prompt, retrieval = 2, 5, 8, (False, True, False)
    total = prompt + sum(steps)
    q, k, v = _qkv(total, total, nheads=6, nheads_k=3, seed=7)
    ref_out, _ = attention_ref(q, k, v, softmax_scale=scale, mask=_duo_mask(retrieval, 2, total, total, sink, window))
    cache = DuoCache(Duo(HeadPattern((retrieval,), sink, window), 0), 1, total, 3, HEADDIM)
    cache.append(k[:, :prompt], v[:, :prompt])
    at = prompt
    for n in steps:
        out = cache.step(q[:, at : at + n], k[:, at : at + n], v[:, at : at + n], softmax_scale=scale)
        assert_close_to_oracle(out, ref_out[:, at : at + n], ref_out[:, at : at + n])
        at += n
