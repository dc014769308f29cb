"""The Triton dense forward twin on packed sequences (flash-attn's varlen layout).

Each sequence of the pack is checked against the float64 oracle run on that
sequence alone (batch 1), with the tolerance rule's baseline the eager twin on
the same sequence; exact properties pin the rest: a sequence's result is
bitwise the fixed-length kernel's on that sequence, a pack of equal lengths is
bitwise the fixed-length batch, and no sequence reads another's keys. Without
CUDA the kernel runs under the Triton interpreter (slow, no bfloat16): tiny shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, strategies as st

from longattn.errors import UnsupportedFeatureError
from longattn.kernels.dense import triton as dense_triton
from longattn.kernels.dense.eager import dense_forward_eager
from longattn.kernels.dense.triton import dense_forward_triton, dense_varlen_forward_triton, triton_import_error
from longattn.masking import effective_window
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import HAS_CUDA, load_without_triton, triton_skip_reason

_SKIP = triton_skip_reason(triton_import_error())
requires_triton = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    """``(batch + 1,)`` int32 prefix sums of ``lengths``, starting at 0."""
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(device=DEVICE, dtype=torch.int32)


def make_packed(lengths_q, lengths_k, nheads, nheads_k, headdim, dtype, seed):
    """Packed q ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k, headdim)`` and the cu_seqlens."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q, k, v = randn(total_q, nheads, headdim), randn(total_k, nheads_k, headdim), randn(total_k, nheads_k, headdim)
    return q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k)


def run_varlen(q, k, v, cu_q, cu_k, *, scale=None, window=(-1, -1), softcap=0.0):
    lengths_q, lengths_k = cu_q.diff().tolist(), cu_k.diff().tolist()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return dense_varlen_forward_triton(q, k, v, cu_q, cu_k, max(lengths_q, default=0), max(lengths_k, default=0),
                                       scale=scale, window=window, softcap=softcap)


def sequences(q, k, v, cu_q, cu_k):
    """Per sequence: ``(rows, q_b, k_b, v_b)``, the tensors unsqueezed to batch 1."""
    for b in range(cu_q.numel() - 1):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys = slice(int(cu_k[b]), int(cu_k[b + 1]))
        yield rows, q[rows][None], k[keys][None], v[keys][None]


def check_against_oracle(q, k, v, cu_q, cu_k, *, causal=False, window_size=(-1, -1), softcap=0.0):
    """Run the varlen Triton twin on the pack; each sequence against the oracle on it alone."""
    scale = q.shape[-1] ** -0.5
    window = effective_window(causal, window_size)
    out, lse = run_varlen(q, k, v, cu_q, cu_k, scale=scale, window=window, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    for rows, qb, kb, vb in sequences(q, k, v, cu_q, cu_k):
        if qb.shape[1] == 0:
            continue
        out_ref, lse_ref = attention_ref(qb, kb, vb, causal=causal, window_size=window_size, softcap=softcap)
        out_eager, lse_eager = dense_forward_eager(qb, kb, vb, scale=scale, window=window, softcap=softcap)
        out_b, lse_b = out[rows][None], lse[:, rows][None]
        assert_close_to_oracle(out_b, out_ref, out_eager, name=f"out of sequence rows {rows}")
        assert_close_to_oracle(lse_b, lse_ref, lse_eager, name=f"lse of sequence rows {rows}")
        empty = torch.isinf(lse_ref).permute(0, 2, 1)  # (1, seqlen_q_b, nheads)
        assert torch.all(out_b[empty] == 0), "empty rows must be exactly 0"
    return out, lse


@st.composite
def cases(draw):
    causal = draw(st.booleans())
    # The oracle rejects a causal window with right > 0; right is -1 or 0 there.
    windows = [(-1, -1), (3, 0), (0, 0), (4, -1)]
    if not causal:
        windows += [(5, 2), (-1, 2), (0, 3)]
    batch = draw(st.integers(1, 3))
    nheads_k = draw(st.sampled_from([1, 2]))
    return dict(
        lengths_q=draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch)),
        lengths_k=draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch)),
        nheads_k=nheads_k,
        nheads=nheads_k * draw(st.sampled_from([1, 2, 4])),
        headdim=draw(st.sampled_from([16, 24, 32])),
        causal=causal,
        window_size=draw(st.sampled_from(windows)),
        softcap=draw(st.sampled_from([0.0, 3.0])),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _case(**kw):
    base = dict(lengths_q=[1], lengths_k=[1], nheads=1, nheads_k=1, headdim=16, causal=False,
                window_size=(-1, -1), softcap=0.0, dtype=torch.float32, seed=0)
    return {**base, **kw}


@requires_triton
@given(case=cases())
# Empty sequences (no queries; no keys) between others, a sequence with more
# queries than keys (causal: empty rows), sequences spanning several blocks.
@example(case=_case(lengths_q=[5, 0, 37, 3], lengths_k=[9, 4, 20, 0], nheads=4, nheads_k=2, headdim=24,
                    causal=True))
# Decode-like steps of different cache lengths, windowed, fp16 with softcap.
@example(case=_case(lengths_q=[1, 1, 1], lengths_k=[33, 1, 18], nheads=4, causal=True, window_size=(5, 0),
                    dtype=torch.float16, softcap=3.0))
# A zero-width window over sequences of unequal lengths.
@example(case=_case(lengths_q=[17, 23], lengths_k=[35, 6], nheads=2, headdim=32, window_size=(0, 0),
                    dtype=torch.float16))
def test_matches_oracle(case):
    c = dict(case)
    q, k, v, cu_q, cu_k = make_packed(c.pop("lengths_q"), c.pop("lengths_k"), c.pop("nheads"), c.pop("nheads_k"),
                                      c.pop("headdim"), c.pop("dtype"), c.pop("seed"))
    check_against_oracle(q, k, v, cu_q, cu_k, **c)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (4, 1)], ids=["full", "causal", "window"])
def test_each_sequence_is_bitwise_the_fixed_length_kernel(dtype, window):
    # Same kernel, same tiles (query blocks start at each sequence's first row):
    # packing must not change a single bit of any sequence's result.
    q, k, v, cu_q, cu_k = make_packed([19, 3, 0, 33], [26, 3, 5, 20], 4, 2, 24, dtype, seed=1)
    out, lse = run_varlen(q, k, v, cu_q, cu_k, window=window, softcap=3.0)
    for rows, qb, kb, vb in sequences(q, k, v, cu_q, cu_k):
        out_b, lse_b = dense_forward_triton(qb, kb, vb, scale=24 ** -0.5, window=window, softcap=3.0)
        assert torch.equal(out[rows], out_b[0]) and torch.equal(lse[:, rows], lse_b[0])


@requires_triton
def test_equal_lengths_are_bitwise_the_fixed_length_batch():
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = 3, 21, 30, 4, 1, 16
    q, k, v, cu_q, cu_k = make_packed([seqlen_q] * batch, [seqlen_k] * batch, nheads, nheads_k, headdim,
                                      torch.float16, seed=2)
    kwargs = dict(scale=0.25, window=(7, 0), softcap=0.0)
    out, lse = dense_varlen_forward_triton(q, k, v, cu_q, cu_k, seqlen_q, seqlen_k, **kwargs)
    out_fixed, lse_fixed = dense_forward_triton(q.view(batch, seqlen_q, nheads, headdim),
                                                k.view(batch, seqlen_k, nheads_k, headdim),
                                                v.view(batch, seqlen_k, nheads_k, headdim), **kwargs)
    assert torch.equal(out, out_fixed.view(q.shape))
    assert torch.equal(lse, lse_fixed.permute(1, 0, 2).reshape(nheads, batch * seqlen_q))


@requires_triton
def test_sequences_read_only_their_own_keys():
    # NaN keys and values in sequences 0 and 2 must not reach sequence 1, whose
    # key blocks (of the packed tensor) overlap both neighbours' rows.
    q, k, v, cu_q, cu_k = make_packed([7, 11, 5], [13, 22, 9], 2, 1, 16, torch.float32, seed=3)
    out_ok, lse_ok = run_varlen(q, k, v, cu_q, cu_k, window=(-1, 0))
    k_bad, v_bad = k.clone(), v.clone()
    for keys in (slice(0, 13), slice(35, 44)):
        k_bad[keys], v_bad[keys] = float("nan"), float("nan")
    out, lse = run_varlen(q, k_bad, v_bad, cu_q, cu_k, window=(-1, 0))
    rows = slice(7, 18)
    assert torch.equal(out[rows], out_ok[rows]) and torch.equal(lse[:, rows], lse_ok[:, rows])


@requires_triton
def test_non_contiguous_inputs_give_identical_results():
    g = torch.Generator().manual_seed(4)
    lengths_q, lengths_k, nheads, nheads_k, headdim = [9, 14], [12, 20], 4, 2, 24
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    # q stored heads-major with every other headdim element; k and v interleaved
    # in one packed tensor, as from a fused kv projection.
    q = torch.randn(nheads, total_q, 2 * headdim, generator=g).to(DEVICE).transpose(0, 1)[..., ::2]
    kv = torch.randn(total_k, 2, nheads_k, headdim, generator=g).to(DEVICE)
    k, v = kv[:, 0], kv[:, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    out, lse = check_against_oracle(q, k, v, cu_q, cu_k, window_size=(6, 1))
    out_c, lse_c = run_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, window=(6, 1))
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


@requires_triton
def test_large_logits():
    # Scores of order 1e3 (q, k scaled by 30 and rounded so every q.k is exact):
    # exp would overflow without the running max.
    q, k, v, cu_q, cu_k = make_packed([23, 4], [31, 4], 2, 1, 32, torch.float16, seed=5)
    q, k = (q.float() * 30).round().half(), (k.float() * 30).round().half()
    out, _ = check_against_oracle(q, k, v, cu_q, cu_k, causal=True)
    assert torch.isfinite(out).all()


@requires_triton
@pytest.mark.parametrize("lengths", [([], []), ([0, 0], [3, 5]), ([2, 4], [0, 0]), ([0, 3], [4, 0])],
                         ids=["batch0", "no_queries", "no_keys", "empty_each"])
def test_empty_inputs(lengths):
    lengths_q, lengths_k = lengths
    q, k, v, cu_q, cu_k = make_packed(lengths_q, lengths_k, 2, 1, 16, torch.float16, seed=6)
    out, lse = run_varlen(q, k, v, cu_q, cu_k, window=(-1, 0))
    assert out.shape == q.shape and out.dtype == q.dtype and torch.all(out == 0)
    assert lse.shape == (2, sum(lengths_q)) and torch.all(lse == float("-inf"))


def test_imports_without_triton(monkeypatch):
    module = load_without_triton(dense_triton, monkeypatch)
    q = torch.zeros(1, 1, 16)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dense_varlen_forward_triton needs triton"):
        module.dense_varlen_forward_triton(q, q, q, cu, cu, 1, 1, scale=0.25, window=(-1, -1), softcap=0.0)


@requires_triton
def test_rejects_headdim_above_256():
    q = torch.zeros(1, 1, 257, device=DEVICE)
    cu = cu_seqlens([1])
    with pytest.raises(UnsupportedFeatureError, match="headdim <= 256, got 257"):
        dense_varlen_forward_triton(q, q, q, cu, cu, 1, 1, scale=0.0625, window=(-1, -1), softcap=0.0)


@requires_triton
@pytest.mark.parametrize("causal", [False, True])
def test_window_of_int_max_is_unbounded(causal):
    # The wrapper clamps windows to the packed lengths so the kernel's int32 position
    # sums (row + offset + right) cannot wrap: bitwise the unbounded window's result.
    big = 2**31 - 1
    q, k, v, cu_q, cu_k = make_packed([20, 6], [33, 2], 2, 1, 16, torch.float32, seed=7)
    out, lse = run_varlen(q, k, v, cu_q, cu_k, window=(big, 0 if causal else big))
    out_u, lse_u = run_varlen(q, k, v, cu_q, cu_k, window=(-1, 0 if causal else -1))
    assert torch.equal(out, out_u) and torch.equal(lse, lse_u)
    check_against_oracle(q, k, v, cu_q, cu_k, causal=causal)
