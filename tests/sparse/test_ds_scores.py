"""Double Sparsity's group-max scores: the C++ kernel on every vector path this
CPU can run and the PyTorch twin against the float64 definition; the kernel
bitwise the same across paths and thread counts; the state's selection the
same through either twin."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.errors import ArgumentError, ShapeError
from longattn.sparse import DoubleSparsity, DoubleSparsityState
from longattn.sparse import ds_scores
from longattn.sparse.ds_scores import (
    cpp_unavailable_reason,
    group_max_scores,
    group_max_scores_cpu,
    group_max_scores_torch,
)
from tests.tolerance import assert_close_to_oracle

CPP_REASON = cpp_unavailable_reason()
requires_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"C++ kernel unavailable: {CPP_REASON}")

# One build per vector path: on an AVX-512 machine the lower paths are built with
# features switched off (a path above this CPU's level builds as its own level).
VECTOR_PATHS = {
    "native": (),
    "avx2": ("-mno-avx512f",),
    "portable": ("-mno-avx512f", "-mno-avx2", "-mno-fma"),
}


def make(batch, hk, group, r, capacity, seed, magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    q_sel = torch.randn(batch, hk, group, r, generator=gen) * magnitude
    label = torch.randn(batch, hk, r, capacity, generator=gen) * magnitude
    return q_sel, label


def oracle(q_sel, label, n):
    """``(batch, hk, n)`` float64 from the definition: max over the group of the channel sums."""
    return (q_sel.double()[..., None] * label[:, :, None, :, :n].double()).sum(3).amax(2)


@given(st.integers(1, 2), st.integers(1, 3), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 3, 16, 17]),
       st.integers(0, 1100), st.sampled_from([0.1, 1.0, 30.0]), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_torch_twin_and_kernel_match_the_definition(batch, hk, group, r, n, magnitude, seed):
    # n spans the kernel's full 4-vector steps, masked tails and several 512-position tiles.
    q_sel, label = make(batch, hk, group, r, n + 5, seed, magnitude)
    want = oracle(q_sel, label, n)
    twin = group_max_scores_torch(q_sel, label, n)
    assert twin.shape == (batch, hk, n) and twin.dtype == torch.float32
    assert_close_to_oracle(twin, want, want, name="torch twin scores")
    if CPP_REASON is None:
        assert_close_to_oracle(group_max_scores_cpu(q_sel, label, n), want, twin, name="kernel scores")


@requires_cpp
@pytest.mark.parametrize("shape", [(1, 8, 4, 16, 5000), (2, 3, 1, 5, 77), (1, 2, 8, 33, 1030)])
def test_every_vector_path_and_thread_count_is_bitwise_the_same(shape):
    batch, hk, group, r, n = shape
    q_sel, label = make(batch, hk, group, r, n + 3, seed=sum(shape))
    want = oracle(q_sel, label, n)
    twin = group_max_scores_torch(q_sel, label, n)
    previous = torch.get_num_threads()
    results = {}
    try:
        for path, flags in VECTOR_PATHS.items():
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[path, threads] = group_max_scores_cpu(q_sel, label, n, build_flags=flags)
    finally:
        torch.set_num_threads(previous)
    first = results["native", 1]
    assert_close_to_oracle(first, want, twin, name="kernel scores")
    for key, got in results.items():
        assert torch.equal(got, first), f"{key} differs from the native 1-thread result"


@requires_cpp
@pytest.mark.parametrize("path", list(VECTOR_PATHS))
def test_nan_products_are_passed_over_alike_by_both_twins(path):
    """NaN in one query head's channels and in one label entry: every twin
    passes the NaN products over (the kernel's max had kept or dropped them by
    operand order, the matmul's amax spread them), so the scores, and the
    tokens they select, agree; a position whose every product is NaN scores -inf."""
    q_sel, label = make(1, 2, 4, 16, 203, seed=9)
    q_sel[0, 0, 1, 2] = float("nan")  # head 0's member 1: NaN at every position
    label[0, 1, 3, 50] = float("nan")  # head 1, position 50: NaN for every member
    n = 200
    twin = group_max_scores_torch(q_sel, label, n)
    got = group_max_scores_cpu(q_sel, label, n, build_flags=VECTOR_PATHS[path])
    assert not twin.isnan().any() and not got.isnan().any()
    assert twin[0, 1, 50] == float("-inf") and got[0, 1, 50] == float("-inf")
    finite = torch.isfinite(twin)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.allclose(got[finite], twin[finite], rtol=1e-5, atol=1e-5)


@requires_cpp
def test_kernel_reads_only_the_first_n_positions_of_a_strided_cache():
    # The state's cache has capacity > n; positions past n hold NaN and must not leak in.
    q_sel, label = make(1, 2, 4, 16, 300, seed=5)
    label[..., 200:] = float("nan")
    got = group_max_scores_cpu(q_sel, label, 200)
    assert not got.isnan().any()
    assert_close_to_oracle(got, oracle(q_sel, label, 200), group_max_scores_torch(q_sel, label, 200))


def test_bad_arguments_name_what_was_given():
    q_sel, label = make(1, 2, 4, 3, 10, seed=1)
    for fn in (group_max_scores_torch, group_max_scores):
        with pytest.raises(ShapeError, match=r"label must be \(batch, nheads_k, r, capacity\)"):
            fn(q_sel, label[:, :1], 5)
        with pytest.raises(ShapeError, match="q_sel must be"):
            fn(q_sel[0], label, 5)
        with pytest.raises(ArgumentError, match="must be float32, got torch.float16"):
            fn(q_sel.half(), label, 5)
        with pytest.raises(ArgumentError, match=r"n must be in 0 .. capacity = 10, got 11"):
            fn(q_sel, label, 11)


def _selection_through(monkeypatch, twin, state, q):
    monkeypatch.setattr("longattn.sparse.double_sparsity.group_max_scores", twin)
    return state.select(q)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_selects_the_same_tokens_through_either_twin(monkeypatch, dtype):
    """Random continuous scores (no ties within rounding at this seed): the kernel
    and the PyTorch twin pick the same sets, also with sequences of different lengths."""
    gen = torch.Generator().manual_seed(7)
    hk, group, d, cap = 2, 4, 32, 3000
    keys = torch.randn(2, cap, hk, d, generator=gen).to(dtype)
    channels = torch.stack([torch.randperm(d, generator=gen)[:6] for _ in range(hk)])
    cfg = DoubleSparsity(channels, token_budget=100)
    for lengths in ([3000, 3000], [2999, 1234]):
        state = DoubleSparsityState(cfg).prefill(keys, torch.tensor(lengths, dtype=torch.int32))
        assert state.label.dtype == torch.float32 and state.dtype == dtype
        q = torch.randn(2, hk * group, d, generator=gen)
        fast = _selection_through(monkeypatch, ds_scores.group_max_scores_cpu, state, q)
        slow = _selection_through(monkeypatch, ds_scores.group_max_scores_torch, state, q)
        assert torch.equal(fast, slow)
        for b, n in enumerate(lengths):
            assert bool(((fast[b] >= 0) & (fast[b] < n)).sum(-1).eq(min(100, n)).all())
