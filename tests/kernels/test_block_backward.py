"""block_backward against autograd of the float64 oracle.

Every test splits the attention matrix into block pairs the way a sequence-
parallel backward does, runs :func:`block_backward` on each pair with the
FINAL (out, lse) of the rows, adds the pieces up, and compares the sums with
the oracle's gradients (tolerance rule: baseline = autograd through the eager
dense twin in the same dtype). The partition tests run every twin; the
Triton twin runs under the interpreter (tests/conftest.py), tiny shapes.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from longattn.api import attention
from longattn.errors import ArgumentError, ShapeError
from longattn.kernels.block_backward import BLOCK_BACKWARD_BACKENDS, block_backward
from longattn.kernels.block_backward.sdpa import op_available
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import HAS_CUDA, assert_compiles_for_gpu, triton_skip_reason


def _triton_skip() -> str | None:
    from longattn.kernels.support.triton_support import import_triton

    return triton_skip_reason(import_triton()[2])


requires_triton = pytest.mark.skipif(_triton_skip() is not None, reason=str(_triton_skip()))
# Every twin, each test forcing it by name (auto never picks the interpreter).
BACKENDS = ["eager", pytest.param("triton", marks=requires_triton)]


def _inputs(seqlen_q, seqlen_k, nheads, nheads_k, seed, dtype=torch.float32, headdim=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen_q, nheads, headdim, generator=gen).to(dtype)
    k = torch.randn(2, seqlen_k, nheads_k, headdim, generator=gen).to(dtype)
    v = torch.randn(2, seqlen_k, nheads_k, headdim, generator=gen).to(dtype)
    dout = torch.randn(2, seqlen_q, nheads, headdim, generator=gen).to(dtype)
    return q, k, v, dout


def _grads(fn, q, k, v, dout, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    return out.detach(), lse.detach(), torch.autograd.grad(out, leaves, dout.to(out.dtype))


def _oracle_and_baseline(q, k, v, dout, **opts):
    _, _, ref = _grads(lambda a, b, c: attention_ref(a, b, c, **opts), q, k, v, dout, torch.float64)
    out, lse, base = _grads(lambda a, b, c: attention(a, b, c, backend="eager", return_lse=True, **opts),
                            q, k, v, dout)
    return out, lse, ref, base


def _check(sums, ref, base):
    for name, got, want, baseline in zip(("dq", "dk", "dv"), sums, ref, base):
        assert got.dtype == torch.float32
        assert_close_to_oracle(got, want, baseline, name=name)


def _split(n, cuts):
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("nheads,nheads_k", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_partition_full_attention(nheads, nheads_k, softcap, backend):
    """Not causal: every query row against uneven key blocks."""
    q, k, v, dout = _inputs(7, 13, nheads, nheads_k, seed=nheads * 10 + nheads_k)
    scale = 0.4
    out, lse, ref, base = _oracle_and_baseline(q, k, v, dout, softmax_scale=scale, softcap=softcap)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    for lo, hi in _split(13, [1, 6, 10]):
        a, b, c = block_backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, scale=scale, causal=False,
                                 softcap=softcap, backend=backend)
        dq += a
        dk[:, lo:hi] += b
        dv[:, lo:hi] += c
    _check((dq, dk, dv), ref, base)


@pytest.mark.parametrize("nheads,nheads_k", [(2, 2), (4, 1)])
@pytest.mark.parametrize("cuts", [[4], [2, 5, 9]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_square_grid(nheads, nheads_k, cuts, backend):
    """Causal over one sequence cut into blocks on both axes, as a contiguous
    ring cuts it: diagonal pairs causal, pairs below it unmasked, above skipped."""
    n = 11
    q, k, v, dout = _inputs(n, n, nheads, nheads_k, seed=len(cuts) + nheads)
    scale = 16 ** -0.5
    out, lse, ref, base = _oracle_and_baseline(q, k, v, dout, causal=True)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    blocks = _split(n, cuts)
    for i, (q0, q1) in enumerate(blocks):
        for j, (k0, k1) in enumerate(blocks):
            if j > i:
                continue
            a, b, c = block_backward(dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1],
                                     lse[:, :, q0:q1], scale=scale, causal=(i == j), backend=backend)
            dq[:, q0:q1] += a
            dk[:, k0:k1] += b
            dv[:, k0:k1] += c
    _check((dq, dk, dv), ref, base)


@pytest.mark.parametrize("causal,window", [(True, (3, 0)), (False, (2, 4)), (False, (-1, 1)), (True, (0, 0))])
def test_sliding_window_grid(causal, window):
    """A sliding window over one sequence cut into uneven blocks on both axes:
    each pair gets the bottom-right window that reproduces the global one
    (longattn.parallel.pieces.band_piece, as the ring uses it); the sums equal
    the windowed gradient. The Triton twin has no window: auto serves it eagerly."""
    from longattn.parallel.pieces import band_piece

    n = 12
    q, k, v, dout = _inputs(n, n, 4, 2, seed=31 + window[0])
    scale = 16 ** -0.5
    out, lse, ref, base = _oracle_and_baseline(q, k, v, dout, causal=causal, window_size=window)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    for q0, q1 in _split(n, [3, 8]):
        for k0, k1 in _split(n, [2, 5, 9]):
            piece = band_piece(q0, q0, q1 - q0, k0, k0, k1 - k0, (window[0], 0 if causal else window[1]))
            if piece is None:
                continue
            rows, keys, w = piece
            a, b, c = block_backward(dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows],
                                     lse[:, :, rows], scale=scale, causal=False, window_size=w)
            dq[:, rows] += a
            dk[:, keys] += b
            dv[:, keys] += c
    _check((dq, dk, dv), ref, base)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 12), (9, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_bottom_right_one_block(seqlen_q, seqlen_k, backend):
    """One block holding every key: bottom-right causal with unequal lengths.
    With seqlen_q > seqlen_k the top rows see no key (lse = -inf): zero gradient."""
    q, k, v, dout = _inputs(seqlen_q, seqlen_k, 4, 2, seed=seqlen_q)
    out, lse, ref, base = _oracle_and_baseline(q, k, v, dout, causal=True)
    got = block_backward(dout, q, k, v, out, lse, scale=0.25, causal=True, backend=backend)
    _check(got, [torch.nan_to_num(r) for r in ref], base)
    if seqlen_q > seqlen_k:
        empty = seqlen_q - seqlen_k
        assert torch.isneginf(lse[:, :, :empty]).all()
        assert torch.equal(got[0][:, :empty], torch.zeros_like(got[0][:, :empty]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_prefix_then_diagonal_fp16(backend):
    """seqlen_q < seqlen_k causal: the keys before the diagonal square are seen
    by every row (unmasked block), the square is causal; fp16 inputs."""
    q, k, v, dout = _inputs(6, 14, 2, 1, seed=3, dtype=torch.float16)
    out, lse, ref, base = _oracle_and_baseline(q, k, v, dout, causal=True)
    pieces = [block_backward(dout, q, k[:, :8], v[:, :8], out, lse, scale=0.25, causal=False, backend=backend),
              block_backward(dout, q, k[:, 8:], v[:, 8:], out, lse, scale=0.25, causal=True, backend=backend)]
    dq = pieces[0][0] + pieces[1][0]
    dk = torch.cat([pieces[0][1], pieces[1][1]], 1)
    dv = torch.cat([pieces[0][2], pieces[1][2]], 1)
    _check((dq, dk, dv), ref, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dlse_enters_as_p_times_dlse(backend):
    """A gradient into lse as well as out: compare with the oracle's autograd of both."""
    q, k, v, dout = _inputs(5, 9, 2, 2, seed=11)
    dlse = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(1))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rl = attention_ref(*leaves, softmax_scale=0.3)
    ref = torch.autograd.grad((ro * dout.double()).sum() + (rl * dlse.double()).sum(), leaves)
    out, lse = attention(q, k, v, softmax_scale=0.3, return_lse=True, backend="eager")
    got = [torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)]
    for lo, hi in _split(9, [4]):
        a, b, c = block_backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, scale=0.3, causal=False, dlse=dlse,
                                 backend=backend)
        got[0] += a
        got[1][:, lo:hi] += b
        got[2][:, lo:hi] += c
    for g, r, name in zip(got, ref, ("dq", "dk", "dv")):
        assert_close_to_oracle(g, r, r, name=name)  # no baseline twin takes dlse here: the floor alone


def test_bad_input_names_the_argument():
    q, k, v, dout = _inputs(4, 4, 2, 2, seed=0)
    out, lse = attention(q, k, v, return_lse=True)
    with pytest.raises(ShapeError, match="lse"):
        block_backward(dout, q, k, v, out, lse[:, :, :3], scale=0.25, causal=False)
    with pytest.raises(ShapeError, match="dout"):
        block_backward(dout[:, :3], q, k, v, out, lse, scale=0.25, causal=False)
    with pytest.raises(ArgumentError, match="scale"):
        block_backward(dout, q, k, v, out, lse, scale=None, causal=False)
    with pytest.raises(ArgumentError, match="causal"):
        block_backward(dout, q, k, v, out, lse, scale=0.25, causal=1)
    assert BLOCK_BACKWARD_BACKENDS.names == ["triton", "sdpa", "eager"]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_strided_padded_headdim_deterministic(dtype, causal):
    """Triton twin on non-contiguous views, headdim 24 (padded to 32 with masks),
    GQA 2, seqlen_q != seqlen_k spanning several 16-row tiles: matches the oracle,
    equals bitwise the contiguous call, and repeats bitwise (no atomics)."""
    gen = torch.Generator().manual_seed(5)
    seqlen_q, seqlen_k, nheads, nheads_k, headdim = 19, 35, 4, 2, 24
    # Head-major storage, viewed as (batch, seqlen, heads, headdim): odd strides.
    q, dout = (torch.randn(2, nheads, seqlen_q, headdim, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(2, nheads_k, seqlen_k, headdim, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    out, lse, ref, base = _oracle_and_baseline(q, k, v, dout, causal=causal, softmax_scale=0.3)
    got = block_backward(dout, q, k, v, out, lse, scale=0.3, causal=causal, backend="triton")
    _check(got, ref, base)
    again = block_backward(dout, q, k, v, out, lse, scale=0.3, causal=causal, backend="triton")
    contiguous = block_backward(*(t.contiguous() for t in (dout, q, k, v, out, lse)), scale=0.3, causal=causal,
                                backend="triton")
    for a, b, c in zip(got, again, contiguous):
        assert a.is_contiguous()
        assert torch.equal(a, b) and torch.equal(a, c)


@requires_triton
def test_triton_empty_block_and_selection():
    """No keys in the block: zeros. On CPU auto walks past the interpreter to
    eager; bfloat16 (which the interpreter lacks) is refused by name."""
    q, k, v, dout = _inputs(4, 6, 2, 1, seed=2)
    out, lse = attention(q, k, v, return_lse=True, backend="eager")
    dq, dk, dv = block_backward(dout, q, k[:, :0], v[:, :0], out, lse, scale=0.25, causal=False, backend="triton")
    assert torch.equal(dq, torch.zeros(q.shape)) and dk.shape == (2, 0, 1, 16) and dv.shape == (2, 0, 1, 16)
    from longattn.kernels.block_backward import BlockBackwardCall

    call = BlockBackwardCall(dout, q, k, v, out, lse, None, 0.25, False, 0.0)
    if not HAS_CUDA:  # float32 on a CPU: the fused backward when this torch has it
        assert BLOCK_BACKWARD_BACKENDS.select(call, "auto").name == ("sdpa" if op_available() else "eager")
    bf = [t.to(torch.bfloat16) for t in (dout, q, k, v, out)]
    bcall = BlockBackwardCall(*bf, lse, None, 0.25, False, 0.0)
    triton_twin = next(b for b in BLOCK_BACKWARD_BACKENDS.backends if b.name == "triton")
    if not HAS_CUDA:
        assert any("bfloat16" in r for r in triton_twin.reasons(bcall))


_AOT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from longattn.kernels.block_backward import triton as bb

    # One config per kernel keeps this test short (each compile costs seconds).
    def compile_one(fn, arch, dt, headdim):
        block_m, block_n, num_warps = bb._launch_config(headdim)
        consts = dict(CAUSAL=True, HAS_SOFTCAP=True, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_D=max(16, triton.next_power_of_2(headdim)))
        ptrs = dict(Q="*" + dt, K="*" + dt, V="*" + dt, DO="*" + dt, Lse="*fp32", Delta="*fp32",
                    DK="*fp32", DV="*fp32", DQ="*fp32")
        sig = {n: ptrs.get(n) or ("constexpr" if n in consts else "fp32" if n in ("scale", "softcap")
                                   else "i32") for n in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 1})
        assert k.asm["cubin"], (fn, arch, dt, headdim)

    each_config(((bb._bwd_dkdv_kernel, 80, "fp16", 256), (bb._bwd_dq_kernel, 90, "bf16", 128)), compile_one)
    print("compiled")
""")


@requires_triton
def test_triton_kernels_compile_for_gpu_targets():
    """Ahead-of-time compile both kernels to cubin (sm_80 / sm_90; causal + softcap):
    what the interpreter accepts the compiler must too."""
    assert_compiles_for_gpu(_AOT)


# --- the sdpa twin: PyTorch's fused CPU backward, where it serves ------------------------------------------

requires_fused = pytest.mark.skipif(not op_available(), reason="this torch has no fused CPU flash-attention backward")


@requires_fused
@pytest.mark.parametrize("nheads,nheads_k", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_twin_square_grid(nheads, nheads_k, causal):
    """The rings' pieces without a window: a square grid of blocks, diagonal
    pairs causal (square), pairs below it unmasked (above skipped when causal),
    float32; the sums equal the oracle's gradients, and auto picks the twin."""
    from longattn.kernels.block_backward import BlockBackwardCall

    n = 12
    q, k, v, dout = _inputs(n, n, nheads, nheads_k, seed=7 * nheads + nheads_k + causal)
    scale = 16 ** -0.5
    out, lse, ref, base = _oracle_and_baseline(q, k, v, dout, causal=causal)
    dq = torch.zeros(q.shape)
    dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
    blocks = _split(n, [4, 8])
    for i, (q0, q1) in enumerate(blocks):
        for j, (k0, k1) in enumerate(blocks):
            if causal and j > i:
                continue
            pair_causal = causal and i == j
            call = BlockBackwardCall(dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1],
                                     lse[:, :, q0:q1], None, scale, pair_causal, 0.0)
            assert BLOCK_BACKWARD_BACKENDS.select(call, "auto").name == "sdpa"
            a, b, c = block_backward(dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1],
                                     lse[:, :, q0:q1], scale=scale, causal=pair_causal, backend="sdpa")
            dq[:, q0:q1] += a
            dk[:, k0:k1] += b
            dv[:, k0:k1] += c
    _check((dq, dk, dv), ref, base)


@requires_fused
def test_sdpa_twin_rows_that_see_nothing_get_zero():
    """lse = -inf rows (no key anywhere) contribute exactly zero, as in the eager twin."""
    q, k, v, dout = _inputs(6, 6, 2, 2, seed=5)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend="eager")
    lse = lse.clone()
    lse[:, :, :2] = float("-inf")
    out = out.clone()
    out[:, :2] = 0
    got = block_backward(dout, q, k, v, out, lse, scale=0.25, causal=True, backend="sdpa")
    want = block_backward(dout, q, k, v, out, lse, scale=0.25, causal=True, backend="eager")
    assert all(torch.isfinite(g).all() for g in got)
    assert torch.equal(got[0][:, :2], torch.zeros_like(got[0][:, :2]))
    for g, w, name in zip(got, want, ("dq", "dk", "dv")):
        assert_close_to_oracle(g, w.double(), w, name=name)


@pytest.mark.parametrize("case", ["fp16", "softcap", "window", "dlse", "rectangular causal"])
def test_auto_leaves_what_the_sdpa_twin_cannot_express_to_eager(case):
    from longattn.kernels.block_backward import BlockBackwardCall

    lq = 4 if case == "rectangular causal" else 6
    q, k, v, dout = _inputs(lq, 6, 2, 2, seed=2, dtype=torch.float16 if case == "fp16" else torch.float32)
    out, lse = attention(q, k, v, causal=True, return_lse=True, backend="eager")
    dlse = torch.zeros_like(lse) if case == "dlse" else None
    call = BlockBackwardCall(dout, q, k, v, out, lse, dlse, 0.25, True, 2.0 if case == "softcap" else 0.0,
                             (3, 0) if case == "window" else (-1, -1))
    assert BLOCK_BACKWARD_BACKENDS.select(call, "auto").name == "eager"
