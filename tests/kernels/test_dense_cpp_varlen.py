"""The C++ CPU flash kernel on packed sequences (flash-attn's varlen layout).

``flash_varlen_forward_cpu`` runs the dense kernel's work items over the
sequences of a packed batch (no padding, no Python loop). Checked here:

- every sequence against the float64 oracle run on that sequence alone
  (batch of one, the same mask rule), under the tolerance rule with the eager
  twin run per sequence as the baseline; both vector builds;
- exact properties: each sequence's rows are bitwise the dense kernel's on
  that sequence alone (a batch of one included), whatever the thread count,
  the strides of the inputs (qkv-packed views) or the head-major K/V copy;
- empty sequences (either side), a batch with no keys at all, prefix sums
  the kernel refuses (an error, not an out-of-bounds read);
- 64-bit row offsets (slow, deselected by default): a packed K/V whose last
  sequence starts past element 2**31, and query rows 2**27 elements apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.kernels.dense.cpp import flash_forward_cpu, flash_unavailable_reason, flash_varlen_forward_cpu
from longattn.kernels.dense.eager import dense_forward_eager
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle

# The AVX-512 build (where the CPU has it) and the AVX2 build.
BUILDS = [(), ("-mno-avx512f",)]
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _skip_if_unavailable(flags: tuple[str, ...] = ()) -> None:
    reason = flash_unavailable_reason(flags)
    if reason is not None:
        pytest.skip(f"the flash kernel cannot run with build flags {flags}: {reason}")


def _cu(lengths: list[int]) -> torch.Tensor:
    """int32 prefix sums ``(len(lengths) + 1,)`` starting at 0."""
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)


def _packed(lens_q, lens_k, nheads, nheads_k, headdim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), nheads, headdim, generator=gen).to(dtype)
    k = torch.randn(sum(lens_k), nheads_k, headdim, generator=gen).to(dtype)
    v = torch.randn(sum(lens_k), nheads_k, headdim, generator=gen).to(dtype)
    return q, k, v


def _run(q, k, v, lens_q, lens_k, **kwargs):
    return flash_varlen_forward_cpu(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q, default=0),
                                    max(lens_k, default=0), **kwargs)


def _sequences(lens_q, lens_k):
    """``(b, q rows slice, k rows slice)`` of each sequence."""
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    return [(b, slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(lens_q))]


@st.composite
def varlen_cases(draw, max_len: int = 200):
    batch = draw(st.integers(1, 5))
    lens_q = draw(st.lists(st.integers(0, max_len), min_size=batch, max_size=batch))
    same = draw(st.booleans())  # q and k lengths equal (self-attention), or independent
    lens_k = lens_q if same else draw(st.lists(st.integers(0, max_len), min_size=batch, max_size=batch))
    causal = draw(st.booleans())
    window = (-1, 0) if causal else (-1, -1)
    if draw(st.booleans()):
        left = draw(st.integers(-1, 60))
        window = (left, 0) if causal else (left, draw(st.integers(-1, 60)))
    return dict(
        lens_q=lens_q, lens_k=lens_k, nheads_k=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 2, 4])),
        headdim=draw(st.sampled_from([16, 59, 128])), window=window, softcap=draw(st.sampled_from([0.0, 5.0])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("flags", BUILDS)
@settings(max_examples=40, deadline=None)
@given(varlen_cases())
def test_every_sequence_matches_the_oracle(flags, case):
    """Window (left, right) is the effective one (causal folded in as right = 0);
    the oracle gets it as a plain window on each sequence alone, bottom-right aligned."""
    _skip_if_unavailable(flags)
    lens_q, lens_k, window, softcap = case["lens_q"], case["lens_k"], case["window"], case["softcap"]
    nheads_k, headdim = case["nheads_k"], case["headdim"]
    nheads = nheads_k * case["group"]
    scale = headdim ** -0.5
    q, k, v = _packed(lens_q, lens_k, nheads, nheads_k, headdim, case["dtype"], case["seed"])
    out, lse = _run(q, k, v, lens_q, lens_k, scale=scale, window=window, softcap=softcap, build_flags=flags)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (nheads, q.shape[0]) and lse.dtype == torch.float32
    for _, rows, keys in _sequences(lens_q, lens_k):
        out_b, lse_b = out[rows][None], lse[:, rows][None]
        if out_b.shape[1] == 0:
            continue
        if keys.stop == keys.start:  # no keys: every row is empty
            assert torch.equal(out_b, torch.zeros_like(out_b)) and bool((lse_b == float("-inf")).all())
            continue
        qb, kb, vb = q[rows][None], k[keys][None], v[keys][None]
        ref_out, ref_lse = attention_ref(qb, kb, vb, softmax_scale=scale, window_size=window, softcap=softcap)
        eager_out, eager_lse = dense_forward_eager(qb, kb, vb, scale=scale, window=window, softcap=softcap)
        assert_close_to_oracle(out_b, ref_out, eager_out)
        assert_close_to_oracle(lse_b, ref_lse, eager_lse, name="lse")


def _assert_rows_equal_dense(q, k, v, lens_q, lens_k, out, lse, **kwargs):
    """Each sequence's rows of ``(out, lse)`` are bitwise flash_forward_cpu on that sequence alone."""
    for b, rows, keys in _sequences(lens_q, lens_k):
        if rows.stop == rows.start:
            continue
        ref_out, ref_lse = flash_forward_cpu(q[rows][None], k[keys][None], v[keys][None], **kwargs)
        assert torch.equal(out[rows], ref_out[0]), f"sequence {b}: out differs from the dense kernel's"
        assert torch.equal(lse[:, rows], ref_lse[0]), f"sequence {b}: lse differs from the dense kernel's"


@pytest.mark.parametrize("flags", BUILDS)
@settings(max_examples=25, deadline=None)
@given(varlen_cases(max_len=150))
def test_each_sequence_is_bitwise_the_dense_kernel_on_it_alone(flags, case):
    _skip_if_unavailable(flags)
    lens_q, lens_k = case["lens_q"], case["lens_k"]
    nheads = case["nheads_k"] * case["group"]
    q, k, v = _packed(lens_q, lens_k, nheads, case["nheads_k"], case["headdim"], case["dtype"], case["seed"])
    kwargs = dict(scale=0.3, window=case["window"], softcap=case["softcap"], build_flags=flags)
    out, lse = _run(q, k, v, lens_q, lens_k, **kwargs)
    _assert_rows_equal_dense(q, k, v, lens_q, lens_k, out, lse, **kwargs)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (30, 0), (20, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_one_is_bitwise_the_dense_kernel(window, dtype):
    _skip_if_unavailable()
    q, k, v = _packed([333], [301], 8, 2, 59, dtype, seed=3)
    out, lse = _run(q, k, v, [333], [301], scale=0.17, window=window, softcap=4.0)
    ref_out, ref_lse = flash_forward_cpu(q[None], k[None], v[None], scale=0.17, window=window, softcap=4.0)
    assert torch.equal(out, ref_out[0]) and torch.equal(lse, ref_lse[0])


def test_result_does_not_depend_on_the_thread_count():
    _skip_if_unavailable()
    lens_q, lens_k = [300, 0, 97, 250], [310, 40, 97, 0]
    q, k, v = _packed(lens_q, lens_k, 4, 2, 64, torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(q, k, v, lens_q, lens_k, scale=0.125, window=(-1, 0))
        torch.set_num_threads(2)
        two = _run(q, k, v, lens_q, lens_k, scale=0.125, window=(-1, 0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_strided_views_give_the_same_bits():
    """q, k, v as views of one qkv-packed ``(total, 3, nheads, headdim)`` buffer
    (token stride 3 * nheads * headdim) read in place: same bits as contiguous copies."""
    _skip_if_unavailable()
    lens = [70, 1, 130]
    qkv = torch.randn(sum(lens), 3, 4, 32, generator=torch.Generator().manual_seed(2))
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    strided = _run(q, k, v, lens, lens, scale=0.2, window=(-1, 0))
    copied = _run(q.contiguous(), k.contiguous(), v.contiguous(), lens, lens, scale=0.2, window=(-1, 0))
    assert torch.equal(strided[0], copied[0]) and torch.equal(strided[1], copied[1])


@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (40, 0)])
def test_head_major_copies_give_the_same_bits(monkeypatch, window):
    """Long key spans read K/V from head-major copies (a speed choice, decided
    on the longest sequence); the result must not change by a bit. The
    thresholds are lowered to reach it."""
    from longattn.kernels.dense import cpp as flash_cpu

    _skip_if_unavailable()
    lens_q, lens_k = [70, 20, 0], [90, 25, 11]
    q, k, v = _packed(lens_q, lens_k, 4, 2, 32, torch.float32, seed=5)
    token_major = _run(q, k, v, lens_q, lens_k, scale=0.2, window=window)
    monkeypatch.setattr(flash_cpu, "HEAD_MAJOR_MIN_KEYS", 16)
    monkeypatch.setattr(flash_cpu, "HEAD_MAJOR_MIN_ROWS", 16)
    head_major = _run(q, k, v, lens_q, lens_k, scale=0.2, window=window)
    assert torch.equal(token_major[0], head_major[0]) and torch.equal(token_major[1], head_major[1])


def test_windows_wider_than_a_c_int_are_unbounded():
    _skip_if_unavailable()
    lens_q, lens_k = [50, 80], [60, 80]
    q, k, v = _packed(lens_q, lens_k, 2, 1, 16, torch.float32, seed=6)
    wide = _run(q, k, v, lens_q, lens_k, scale=0.25, window=(2**33, 2**40))
    unbounded = _run(q, k, v, lens_q, lens_k, scale=0.25, window=(-1, -1))
    assert torch.equal(wide[0], unbounded[0]) and torch.equal(wide[1], unbounded[1])


@pytest.mark.parametrize("lens_q, lens_k", [
    ([0, 0], [5, 0]),  # no queries at all
    ([3, 4], [0, 0]),  # no keys at all: every row empty
    ([0, 17, 0], [9, 0, 4]),  # the only queries see no keys
])
def test_empty_sequences(lens_q, lens_k):
    _skip_if_unavailable()
    q, k, v = _packed(lens_q, lens_k, 2, 2, 24, torch.bfloat16, seed=7)
    out, lse = _run(q, k, v, lens_q, lens_k, scale=0.3, window=(-1, 0))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, q.shape[0])
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("cu_q", [[0, 10, 5, 12], [1, 6, 12], [0, 6, 11]])
def test_prefix_sums_the_kernel_refuses_raise(cu_q):
    """Decreasing, not starting at 0, or not ending at total_q: an error (the
    front door validates first; the kernel re-checks instead of reading out of bounds)."""
    _skip_if_unavailable()
    q = torch.randn(12, 2, 16)
    k = v = torch.randn(12, 2, 16)
    cu_k = _cu([4] * (len(cu_q) - 2) + [12 - 4 * (len(cu_q) - 2)])
    with pytest.raises(RuntimeError, match="rejected its arguments"):
        flash_varlen_forward_cpu(q, k, v, torch.tensor(cu_q, dtype=torch.int32), cu_k, 12, 12, scale=0.25)


def test_prefix_sums_of_different_batches_raise():
    from longattn.errors import ShapeError

    _skip_if_unavailable()
    q = k = v = torch.randn(12, 2, 16)
    with pytest.raises(ShapeError, match="cu_seqlens_q and cu_seqlens_k"):
        flash_varlen_forward_cpu(q, k, v, _cu([6, 6]), _cu([12]), 6, 12, scale=0.25)


# --- 64-bit row offsets (slow) -------------------------------------------------

HEADDIM, NHEADS_K, NHEADS = 128, 2, 4
# kv-packed rows are 2 * NHEADS_K * HEADDIM = 512 elements apart: key row 2**22 starts at element 2**31.
WRAP_KEY = 2**31 // (2 * NHEADS_K * HEADDIM)
WINDOW = 40


def _child(path: str) -> None:
    """In a child process (an int32 offset reads through a wrapped address and
    dies of SIGSEGV): two packed calls whose rows sit past element 2**31.

    * keys: sequence 0 has 2**22 + 1000 keys and 5 queries that see only the
      last WINDOW + 1 keys, sequence 1 starts past the wrap point (300 keys, 16
      queries, causal); K/V are views of one reserved kv-packed buffer of which
      only the rows read are written (so committed);
    * queries: 16 rows ~2**27 elements apart (a view of a 4 GiB reserved buffer) in 2 sequences.
    """
    lens_k = [WRAP_KEY + 1000, 300]
    lens_q = [5, 16]
    buf = torch.empty(sum(lens_k), 2, NHEADS_K, HEADDIM)
    gen = torch.Generator().manual_seed(1)
    first_read = lens_k[0] - lens_q[0] - WINDOW
    tail = buf[first_read:]
    tail.copy_(torch.randn(tail.shape, generator=gen))
    k, v = buf[:, 0], buf[:, 1]
    assert (sum(lens_k) - 1) * k.stride(0) >= 2**31 and lens_k[0] * k.stride(0) >= 2**31
    q = torch.randn(sum(lens_q), NHEADS, HEADDIM, generator=gen)
    out, lse = _run(q, k, v, lens_q, lens_k, scale=HEADDIM ** -0.5, window=(WINDOW, 0))
    saved = dict(q=q, k=k[first_read:].clone(), v=v[first_read:].clone(), out=out, lse=lse)

    spread = -(-(2**31) // (15 * NHEADS * HEADDIM))  # buffer rows between query rows
    qbuf = torch.empty(15 * spread + 1, NHEADS, HEADDIM)
    q2 = qbuf[::spread]
    q2.copy_(torch.randn(q2.shape, generator=gen))
    assert q2.shape[0] == 16 and 15 * q2.stride(0) >= 2**31
    k2, v2 = (torch.randn(50, NHEADS_K, HEADDIM, generator=gen) for _ in range(2))
    out2, lse2 = _run(q2, k2, v2, [7, 9], [20, 30], scale=HEADDIM ** -0.5, window=(-1, 0))
    saved.update(q2=q2.clone(), k2=k2, v2=v2, out2=out2, lse2=lse2)
    torch.save(saved, path)


@pytest.mark.slow
def test_rows_past_2_31_elements(tmp_path):
    _skip_if_unavailable()
    path = str(tmp_path / "varlen_int64.pt")
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = f"from tests.kernels.test_dense_cpp_varlen import _child; _child({path!r})"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=_ROOT, capture_output=True, text=True,
                          timeout=900)
    how = (f"was killed by {signal.Signals(-proc.returncode).name} (an out-of-bounds read?)"
           if proc.returncode < 0 else f"exited with {proc.returncode}")
    assert proc.returncode == 0, f"the child {how}:\n{proc.stderr[-4000:]}"
    r = torch.load(path)
    scale = HEADDIM ** -0.5
    # Keys: sequence 0 on the slice it sees (ending at its last key keeps the
    # bottom-right alignment), sequence 1 whole.
    n0 = 5 + WINDOW
    cases = [(r["q"][:5], r["k"][:n0], r["v"][:n0], r["out"][:5], r["lse"][:, :5], (WINDOW, 0)),
             (r["q"][5:], r["k"][n0:], r["v"][n0:], r["out"][5:], r["lse"][:, 5:], (WINDOW, 0)),
             (r["q2"][:7], r["k2"][:20], r["v2"][:20], r["out2"][:7], r["lse2"][:, :7], (-1, 0)),
             (r["q2"][7:], r["k2"][20:], r["v2"][20:], r["out2"][7:], r["lse2"][:, 7:], (-1, 0))]
    for q, k, v, out, lse, window in cases:
        ref_out, ref_lse = attention_ref(q[None], k[None], v[None], window_size=window)
        eager_out, eager_lse = dense_forward_eager(q[None], k[None], v[None], scale=scale, window=window,
                                                   softcap=0.0)
        assert_close_to_oracle(out[None], ref_out, eager_out)
        assert_close_to_oracle(lse[None], ref_lse, eager_lse, name="lse")
