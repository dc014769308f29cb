"""Packed sequences (varlen) through longattn.attention against the float64
oracle, sequence by sequence: every twin that can run here, forward and
backward, sparse methods per sequence, and bad input named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, DTypeError, LongAttnError, ShapeError
from longattn.kernels.dense.varlen import DENSE_VARLEN_BACKENDS, DenseVarlenCall
from longattn.reference import attention_ref_varlen
from longattn.sparse import HiP, Streaming
from tests.tolerance import assert_close_to_oracle

TWINS = ["auto", "cpp", "triton", "eager"]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lens_q, lens_k, nheads_k=2, group=2, headdim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), nheads_k * group, headdim, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), nheads_k, headdim, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), nheads_k, headdim, generator=g).to(dtype)
    return q, k, v, _cu(lens_q), _cu(lens_k)


def _usable(backend, q, k, v, cu_q, cu_k):
    if backend == "auto":
        return None
    call = DenseVarlenCall(q, k, v, cu_q, cu_k, 1, 1, 1.0, (-1, -1), 0.0)
    twin = DENSE_VARLEN_BACKENDS.backends[DENSE_VARLEN_BACKENDS.names.index(backend)]
    why = twin.reasons(call)
    return "; ".join(why) if why else None


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 4))
    same = draw(st.booleans())
    lens_q = [draw(st.integers(0, 40)) for _ in range(batch)]
    lens_k = lens_q if same else [draw(st.integers(0, 40)) for _ in range(batch)]
    causal = draw(st.booleans())
    left = draw(st.sampled_from([-1, -1, 0, 3, 17]))
    right = 0 if causal else draw(st.sampled_from([-1, -1, 0, 5]))
    return dict(lens_q=lens_q, lens_k=lens_k, causal=causal, window=(left, right),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.5])), group=draw(st.sampled_from([1, 2, 4])),
                headdim=draw(st.sampled_from([16, 24, 64])), dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", TWINS)
@given(c=cases())
@example(c=dict(lens_q=[1, 0, 3], lens_k=[5, 4, 0], causal=True, window=(-1, 0), softcap=0.0, group=2, headdim=16,
                dtype=torch.float32, seed=1))  # an empty q sequence and an empty k sequence (rows see nothing)
@example(c=dict(lens_q=[9, 2], lens_k=[3, 6], causal=True, window=(2, 0), softcap=0.0, group=1, headdim=16,
                dtype=torch.float32, seed=2))  # seqlen_q > seqlen_k: the first rows are empty
def test_matches_the_oracle_per_sequence(backend, c):
    q, k, v, cu_q, cu_k = _packed(c["lens_q"], c["lens_k"], group=c["group"], headdim=c["headdim"],
                                  dtype=c["dtype"], seed=c["seed"])
    if (why := _usable(backend, q, k, v, cu_q, cu_k)) is not None:
        pytest.skip(f"{backend} cannot run packed sequences here: {why}")
    options = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"])
    out, lse = longattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend, return_lse=True,
                                  **options)
    ref_out, ref_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, **options)
    base_out, base_lse = longattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="eager",
                                            return_lse=True, **options)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (q.shape[1], q.shape[0])
    assert_close_to_oracle(out, ref_out, base_out)
    assert_close_to_oracle(lse, ref_lse, base_lse, name="lse")


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_gradients_match_the_oracle(backend):
    q, k, v, cu_q, cu_k = _packed([7, 0, 13, 4], [9, 2, 13, 11], seed=3)
    if (why := _usable(backend, q, k, v, cu_q, cu_k)) is not None:
        pytest.skip(f"{backend} cannot run packed sequences here: {why}")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = longattn.attention(*leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, window_size=(5, 0),
                                  backend=backend, return_lse=True)
    g = torch.Generator().manual_seed(4)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    ((out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = attention_ref_varlen(*ref, cu_q, cu_k, causal=True, window_size=(5, 0))
    ((r_out * dout.double()).sum() + (r_lse.nan_to_num(neginf=0.0) * dlse.double()).sum()).backward()
    for mine, theirs in zip(leaves, ref):
        assert_close_to_oracle(mine.grad, theirs.grad, theirs.grad.float(), name="grad")


@pytest.mark.parametrize("sparse", [Streaming(sink_size=2, recent_size=5), HiP(topk=8, block_q=4, block_k=2,
                                                                               sink_size=2, recent_size=4)])
def test_sparse_methods_select_per_sequence(sparse):
    q, k, v, cu_q, cu_k = _packed([30, 0, 17], [30, 5, 21], seed=5)
    with torch.no_grad():
        out, lse = longattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, sparse=sparse,
                                      return_lse=True)
        for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
            if q1 == q0:
                continue
            alone, alone_lse = longattn.attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True,
                                                  sparse=sparse, return_lse=True)
            assert torch.equal(out[q0:q1], alone[0]) and torch.equal(lse[:, q0:q1], alone_lse[0])


def test_bad_packed_input_is_named():
    q, k, v, cu_q, cu_k = _packed([3, 4], [3, 4])
    with pytest.raises(ArgumentError, match="cu_seqlens_k"):
        longattn.attention(q, k, v, cu_seqlens_q=cu_q)
    with pytest.raises(ArgumentError, match="max_seqlen"):
        longattn.attention(q[None], k[None], v[None], max_seqlen_q=3)
    with pytest.raises(ShapeError, match="q must have 3 dimensions"):
        longattn.attention(q[None], k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ArgumentError, match="cu_seqlens_q must start at 0, never decrease"):
        longattn.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32),
                           cu_seqlens_k=cu_k)
    with pytest.raises(ArgumentError, match="end at 7"):
        longattn.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32), cu_seqlens_k=cu_k)
    with pytest.raises(ShapeError, match="sequences"):
        longattn.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 7], dtype=torch.int32), cu_seqlens_k=cu_k)
    with pytest.raises(DTypeError, match="cu_seqlens_q"):
        longattn.attention(q, k, v, cu_seqlens_q=cu_q.float(), cu_seqlens_k=cu_k)
    with pytest.raises(ArgumentError, match="max_seqlen_q"):
        longattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2)
    with pytest.raises(LongAttnError):
        longattn.attention(q, k[:, :1], v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@st.composite
def seqused_cases(draw):
    c = draw(cases())
    c["used"] = [draw(st.integers(0, n)) for n in c["lens_k"]]
    return c


@pytest.mark.parametrize("backend", ["auto", "eager"])
@given(c=seqused_cases())
@example(c=dict(lens_q=[4, 3, 5], lens_k=[9, 0, 7], used=[2, 0, 7], causal=True, window=(-1, 0), softcap=0.0,
                group=2, headdim=16, dtype=torch.float32, seed=3))  # fewer used keys than queries: empty rows
def test_seqused_k_uses_only_each_sequences_first_keys(backend, c):
    q, k, v, cu_q, cu_k = _packed(c["lens_q"], c["lens_k"], group=c["group"], headdim=c["headdim"],
                                  dtype=c["dtype"], seed=c["seed"])
    used = torch.tensor(c["used"], dtype=torch.int32)
    options = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"])
    out, lse = longattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used, backend=backend,
                                  return_lse=True, **options)
    ref_out, ref_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, seqused_k=used, **options)
    base_out, base_lse = longattn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used,
                                            backend="eager", return_lse=True, **options)
    assert_close_to_oracle(out, ref_out, base_out)
    assert_close_to_oracle(lse, ref_lse, base_lse, name="lse")
    # the unused keys are never read: garbage there changes nothing
    keep = torch.zeros(k.shape[0], dtype=torch.bool)
    for s, n in zip(cu_k[:-1].tolist(), c["used"]):
        keep[s:s + n] = True
    k2 = torch.where(keep[:, None, None], k, torch.full_like(k, float("nan")))
    again = longattn.attention(q, k2, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used, backend=backend,
                               **options)
    assert torch.equal(again, out)


def test_seqused_k_gradients_are_zero_on_unused_keys():
    q, k, v, cu_q, cu_k = _packed([5, 6], [8, 10], seed=6)
    used = torch.tensor([3, 10], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = longattn.attention(*leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used, causal=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * dout).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, _ = attention_ref_varlen(*ref, cu_q, cu_k, seqused_k=used, causal=True)
    (r_out * dout.double()).sum().backward()
    for mine, theirs in zip(leaves, ref):
        assert_close_to_oracle(mine.grad, theirs.grad, theirs.grad.float(), name="grad")
    assert torch.equal(leaves[1].grad[3:8], torch.zeros_like(leaves[1].grad[3:8]))


def test_bad_seqused_k_is_named():
    q, k, v, cu_q, cu_k = _packed([3, 4], [3, 4])
    packed = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ArgumentError, match=r"seqused_k\[1\] = 5 must be in 0..4"):
        longattn.attention(q, k, v, seqused_k=torch.tensor([1, 5], dtype=torch.int32), **packed)
    with pytest.raises(ShapeError, match="seqused_k must have shape"):
        longattn.attention(q, k, v, seqused_k=torch.tensor([1], dtype=torch.int32), **packed)
    with pytest.raises(DTypeError, match="seqused_k"):
        longattn.attention(q, k, v, seqused_k=torch.tensor([1.0, 2.0]), **packed)
    with pytest.raises(ArgumentError, match="seqused_k"):
        longattn.attention(q[None], k[None], v[None], seqused_k=torch.tensor([1], dtype=torch.int32))
