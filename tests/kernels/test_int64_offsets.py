"""64-bit address arithmetic: kernels reading K/V (or q) past element 2**31.

A kernel that computes ``row * stride`` in int32 wraps once the offset passes
2**31 elements: K/V of 8 kv heads x 128 past 2M tokens, q of 32 heads x 128
past 512k. Each case builds such a tensor and makes a call that visits only
its last tiles, so that it runs in seconds even under the Triton interpreter:

- K/V: views of one kv-packed buffer ``(1, seqlen_k, 2, nheads_k=2, 128)``
  (row stride 512, so key 2**22 starts at element 2**31) with seqlen_k just
  past 2**22, a few query rows, bottom-right causal with a left window of 40:
  only the last few key tiles are read. Cases: the C++ dense kernel (float32,
  8 GiB reserved), the Triton dense, block-sparse (window plus one listed key
  block before it) and stream-K decode kernels (float16, 4 GiB reserved).
- q: 16 query rows ~2**27 elements apart (a strided view of a 4 GiB buffer), Triton dense.

On the CPU, ``torch.empty`` of a few GiB is reserved, not committed: only the
rows written (the ones the call may read) cost memory, and a child's resident
set stays near 300 MB. With a GPU the Triton cases run on CUDA and really
allocate their 4-5 GiB there. The rows' output is compared with the float64
oracle on the slice of keys they see, under the usual tolerance rule.

Every kernel runs in a child process: with int32 offsets it reads through a
wrapped (negative) address and dies of SIGSEGV instead of raising; the child's
exit status then fails the test.

These tests are marked ``slow`` (about 5 s each, 4-8 GiB of address space per
child) and deselected by the default run (pyproject's ``addopts`` has
``-m "not slow"``; a later ``-m`` replaces it). Run them with::

    python -m pytest -q -m slow tests/kernels/test_int64_offsets.py

The two window tests at the end are fast and run by default.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.block_sparse.eager import block_sparse_forward_eager
from longattn.kernels.dense.eager import dense_forward_eager
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import triton_skip_reason

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADDIM = 128
NHEADS_K = 2
NHEADS = 4  # GQA: two query heads per kv head
# kv-packed rows are 2 * NHEADS_K * HEADDIM = 512 elements apart: key 2**22 starts at element 2**31.
WRAP_KEY = 2**31 // (2 * NHEADS_K * HEADDIM)
SEQLEN_K = WRAP_KEY + 1357  # odd, so tiles do not line up with the wrap point
WINDOW = 40  # left window: rows see only the last few dozen keys, all past the wrap point
SEQLEN_Q = 16  # one query block of the Triton kernels under the interpreter


def _kv_packed(dtype: torch.dtype, seqlen_k: int, visible_from: int, seed: int, device: str = "cpu"):
    """``(k, v)`` views of one ``(1, seqlen_k, 2, NHEADS_K, HEADDIM)`` buffer (flash-attn's
    kvpacked layout) whose rows from ``visible_from`` on are random; on the CPU the rest
    is never written, so it is never committed to memory."""
    buf = torch.empty(1, seqlen_k, 2, NHEADS_K, HEADDIM, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    tail = buf[:, visible_from:]
    tail.copy_(torch.randn(tail.shape, generator=g).to(dtype))
    return buf[:, :, 0], buf[:, :, 1]


def _query(dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, SEQLEN_Q, NHEADS, HEADDIM, generator=g).to(device=device, dtype=dtype)


def _child(case: str, path: str) -> None:
    """Run ``case`` (in the child process) and save what the parent checks to ``path``."""
    import resource

    import longattn

    first = SEQLEN_K - SEQLEN_Q - WINDOW  # first key any row sees
    # The Triton kernels run on a GPU when there is one, else under the interpreter.
    dev = "cuda" if torch.cuda.is_available() and case != "dense_cpp" else "cpu"
    saved: dict[str, object] = {}
    if case in ("dense_cpp", "dense_triton"):
        dtype = torch.float32 if case == "dense_cpp" else torch.float16
        k, v = _kv_packed(dtype, SEQLEN_K, first, seed=1, device=dev)
        assert k.storage_offset() + (SEQLEN_K - 1) * k.stride(1) >= 2**31
        q = _query(dtype, seed=1, device=dev)
        backend = "cpp" if case == "dense_cpp" else "triton"
        out, lse = longattn.attention(q, k, v, causal=True, window_size=(WINDOW, 0), return_lse=True,
                                      backend=backend)
        saved.update(k=k[:, first:].clone(), v=v[:, first:].clone())
    elif case == "dense_triton_strided_q":
        # q rows ~2**27 elements apart (a view of a 4 GiB buffer): the last row starts past
        # element 2**31, so offs_m * stride_qm wraps in int32.
        spread = -(-(2**31) // ((SEQLEN_Q - 1) * NHEADS * HEADDIM))  # buffer rows between q rows
        qbuf = torch.empty((SEQLEN_Q - 1) * spread + 1, NHEADS, HEADDIM, dtype=torch.float16, device=dev)
        q = qbuf[::spread].unsqueeze(0)
        assert q.shape[1] == SEQLEN_Q
        q.copy_(_query(torch.float16, seed=2, device=dev))
        assert (SEQLEN_Q - 1) * q.stride(1) >= 2**31
        g = torch.Generator().manual_seed(3)
        k, v = (torch.randn(1, 37, NHEADS_K, HEADDIM, generator=g).to(device=dev, dtype=torch.float16)
                for _ in range(2))
        out, lse = longattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
        saved.update(q=q.clone(), k=k, v=v)
    elif case == "block_sparse_triton":
        from longattn.kernels.block_sparse import block_sparse_attention

        block_k = 16
        # One listed key block well before the window (tile kind 3), the window span (kind 2).
        listed = (first - 200) // block_k
        lo = listed * block_k
        k, v = _kv_packed(torch.float16, SEQLEN_K, lo, seed=4, device=dev)
        q = _query(torch.float16, seed=4, device=dev)
        key_blocks = torch.tensor([listed, -1], device=dev).expand(1, NHEADS, 1, 2)
        out, lse = block_sparse_attention(q, k, v, key_blocks, block_q=SEQLEN_Q, block_k=block_k,
                                          recent_size=WINDOW + 1, causal=True, return_lse=True,
                                          backend="triton")
        saved.update(k=k[:, lo:].clone(), v=v[:, lo:].clone(),
                     key_blocks=torch.where(key_blocks >= 0, key_blocks - listed, key_blocks),
                     block_k=block_k)
    elif case == "decode_triton":
        seqlen_q = 4  # a speculative step: 4 new queries over a 4Mi-token cache
        k, v = _kv_packed(torch.float16, SEQLEN_K, SEQLEN_K - seqlen_q - WINDOW, seed=5, device=dev)
        q = _query(torch.float16, seed=5, device=dev)[:, :seqlen_q]
        seqlens = torch.tensor([SEQLEN_K], dtype=torch.int32, device=dev)
        out, lse = longattn.decode_attention(q, k, v, cache_seqlens=seqlens,
                                             window_size=(WINDOW, 0), return_lse=True, backend="triton")
        first = SEQLEN_K - seqlen_q - WINDOW
        saved.update(k=k[:, first:].clone(), v=v[:, first:].clone())
    else:
        raise ValueError(f"unknown case {case!r}")
    saved.setdefault("q", q)
    saved = {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in saved.items()}
    maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # for a reader checking memory
    saved.update(out=out.cpu(), lse=lse.cpu(), maxrss_mib=maxrss_mib)
    torch.save(saved, path)


def _run(case: str, tmp_path) -> dict:
    path = str(tmp_path / f"{case}.pt")
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = f"from tests.kernels.test_int64_offsets import _child; _child({case!r}, {path!r})"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=_ROOT, capture_output=True, text=True,
                          timeout=900)
    how = (f"was killed by {signal.Signals(-proc.returncode).name} (an out-of-bounds read?)"
           if proc.returncode < 0 else f"exited with {proc.returncode}")
    assert proc.returncode == 0, f"{case}: the child {how}:\n{proc.stderr[-4000:]}"
    return torch.load(path)


def _check_dense(r: dict) -> None:
    """The rows' output against the oracle on the keys they see (bottom-right alignment is
    kept by the slice: it ends at the last key, so the window maps onto the same keys)."""
    q, k, v = r["q"], r["k"], r["v"]
    out_ref, lse_ref = attention_ref(q, k, v, causal=True, window_size=(WINDOW, 0))
    scale = HEADDIM ** -0.5
    out_eager, lse_eager = dense_forward_eager(q, k, v, scale=scale, window=(WINDOW, 0), softcap=0.0)
    assert_close_to_oracle(r["out"], out_ref, out_eager)
    assert_close_to_oracle(r["lse"], lse_ref, lse_eager, name="lse")


def _triton_reason() -> str | None:
    from longattn.kernels.dense.triton import triton_import_error

    return triton_skip_reason(triton_import_error())


needs_triton = pytest.mark.skipif(_triton_reason() is not None, reason=str(_triton_reason()))


@pytest.mark.slow
def test_dense_cpp_reads_keys_past_2_31_elements(tmp_path):
    from longattn.kernels.dense.cpp import flash_unavailable_reason

    if (why := flash_unavailable_reason()) is not None:
        pytest.skip(f"the C++ flash kernel is unavailable here: {why}")
    _check_dense(_run("dense_cpp", tmp_path))


@pytest.mark.slow
@needs_triton
def test_dense_triton_reads_keys_past_2_31_elements(tmp_path):
    _check_dense(_run("dense_triton", tmp_path))


@pytest.mark.slow
@needs_triton
def test_dense_triton_reads_query_rows_past_2_31_elements(tmp_path):
    r = _run("dense_triton_strided_q", tmp_path)
    q, k, v = r["q"], r["k"], r["v"]
    out_ref, lse_ref = attention_ref(q, k, v, causal=True)
    out_eager, lse_eager = dense_forward_eager(q, k, v, scale=HEADDIM ** -0.5, window=(-1, 0), softcap=0.0)
    assert_close_to_oracle(r["out"], out_ref, out_eager)
    assert_close_to_oracle(r["lse"], lse_ref, lse_eager, name="lse")


@pytest.mark.slow
@needs_triton
def test_block_sparse_triton_reads_keys_past_2_31_elements(tmp_path):
    r = _run("block_sparse_triton", tmp_path)
    q, k, v, key_blocks = r["q"], r["k"], r["v"], r["key_blocks"]
    # The slice starts on a key block boundary and ends at the last key: the same rule
    # with the listed block renumbered.
    layout = BlockSparseLayout(SEQLEN_Q, k.shape[1], SEQLEN_Q, r["block_k"], 0, WINDOW + 1, True)
    out_ref, lse_ref = attention_ref(q, k, v, mask=layout.dense_mask(key_blocks))
    out_eager, lse_eager = block_sparse_forward_eager(q, k, v, key_blocks, layout, scale=HEADDIM ** -0.5,
                                                      softcap=0.0)
    assert_close_to_oracle(r["out"], out_ref, out_eager)
    assert_close_to_oracle(r["lse"], lse_ref, lse_eager, name="lse")


@pytest.mark.slow
@needs_triton
def test_decode_triton_reads_keys_past_2_31_elements(tmp_path):
    _check_dense(_run("decode_triton", tmp_path))


# Not slow: positions, not addresses. A window of INT_MAX ("everything") must not wrap the
# kernels' int32 position sums (row + offset + right): the Triton wrappers clamp windows to
# the sequence, which changes nothing else.
BIG = 2**31 - 1


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_dense_triton_window_of_int_max_is_unbounded(causal):
    from longattn.kernels.dense.triton import dense_forward_triton

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, n, h, 16, generator=g) for n, h in ((20, 2), (33, 1), (33, 1)))
    window = (BIG, 0 if causal else BIG)
    out, lse = dense_forward_triton(q, k, v, scale=0.25, window=window, softcap=0.0)
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal, softmax_scale=0.25, window_size=window)
    out_eager, lse_eager = dense_forward_eager(q, k, v, scale=0.25, window=window, softcap=0.0)
    assert_close_to_oracle(out, out_ref, out_eager)
    assert_close_to_oracle(lse, lse_ref, lse_eager, name="lse")


@needs_triton
def test_decode_triton_window_of_int_max_is_unbounded():
    import longattn

    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 3, 2, 16, generator=g)
    k_cache, v_cache = (torch.randn(2, 40, 1, 16, generator=g) for _ in range(2))
    seqlens = torch.tensor([30, 17], dtype=torch.int32)
    out, lse = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=seqlens, causal=False,
                                         window_size=(BIG, BIG), return_lse=True, backend="triton")
    unbounded = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=seqlens, causal=False,
                                          return_lse=True, backend="triton")
    # The clamped window visits the same keys in the same order as the unbounded one.
    assert torch.equal(out, unbounded[0]) and torch.equal(lse, unbounded[1])
    for b, n in enumerate(seqlens.tolist()):  # and both match the oracle over each sequence's keys
        ref_out, ref_lse = attention_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])
        assert_close_to_oracle(out[b:b + 1], ref_out, ref_out)
        assert_close_to_oracle(lse[b:b + 1], ref_lse, ref_lse, name="lse")


@pytest.mark.parametrize("backend", ["cpp", "eager"])
@pytest.mark.parametrize("causal", [False, True])
def test_windows_wider_than_a_c_int_are_unbounded_on_the_cpu_twins(backend, causal):
    # The C++ wrappers pass windows as C ints: 2**32 would wrap to 0 there without the clamp.
    import longattn
    from longattn.kernels.dense.cpp import flash_unavailable_reason

    if backend == "cpp" and flash_unavailable_reason() is not None:
        pytest.skip(f"the C++ flash kernel cannot run here: {flash_unavailable_reason()}")
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, n, h, 16, generator=g) for n, h in ((20, 2), (33, 1), (33, 1)))
    wide = (2**32, 0 if causal else 2**32)
    out = longattn.attention(q, k, v, causal=causal, window_size=wide, backend=backend)
    unbounded = longattn.attention(q, k, v, causal=causal, backend=backend)
    assert torch.equal(out, unbounded)
    ref, _ = attention_ref(q, k, v, causal=causal)
    assert_close_to_oracle(out, ref, ref)


def test_decode_cpp_window_wider_than_a_c_int_is_unbounded():
    import longattn
    from longattn.kernels.decode.cpp import cpu_unavailable_reason

    if cpu_unavailable_reason() is not None:
        pytest.skip(f"the C++ decode kernel cannot run here: {cpu_unavailable_reason()}")
    g = torch.Generator().manual_seed(10)
    q = torch.randn(2, 3, 2, 16, generator=g)
    k_cache, v_cache = (torch.randn(2, 40, 1, 16, generator=g) for _ in range(2))
    seqlens = torch.tensor([30, 17], dtype=torch.int32)
    wide = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=seqlens, causal=False,
                                     window_size=(2**32, 2**32), backend="cpp")
    unbounded = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=seqlens, causal=False, backend="cpp")
    assert torch.equal(wide, unbounded)
