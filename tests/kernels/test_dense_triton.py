"""The Triton dense forward twin against the float64 oracle.

Errors are bounded by the tolerance rule (2x the eager twin's error in the
same dtype, plus a rounding floor). Without CUDA the kernel runs under the
Triton interpreter (conftest sets TRITON_INTERPRET=1), which is slow and has
no bfloat16, so shapes stay tiny and bfloat16 is tested only on a GPU.
"""

from __future__ import annotations


import textwrap

import pytest
import torch
from hypothesis import example, given, strategies as st

from longattn.errors import UnsupportedFeatureError
from longattn.kernels.dense.eager import dense_forward_eager
from longattn.kernels.dense import triton as dense_triton
from longattn.kernels.dense.triton import dense_forward_triton, triton_import_error
from longattn.masking import effective_window
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import HAS_CUDA, assert_compiles_for_gpu, load_without_triton, triton_skip_reason



def _skip_reason() -> str | None:
    return triton_skip_reason(triton_import_error())


# Every test but the import-guard one runs the kernel.
requires_triton = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def make_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    return (
        randn(batch, seqlen_q, nheads, headdim),
        randn(batch, seqlen_k, nheads_k, headdim),
        randn(batch, seqlen_k, nheads_k, headdim),
    )


def check_against_oracle(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0):
    """Run the Triton twin, the eager twin and the oracle; apply the tolerance rule."""
    scale = q.shape[-1] ** -0.5
    window = effective_window(causal, window_size)
    out, lse = dense_forward_triton(q, k, v, scale=scale, window=window, softcap=softcap)
    out_eager, lse_eager = dense_forward_eager(q, k, v, scale=scale, window=window, softcap=softcap)
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal, window_size=window_size, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert_close_to_oracle(out, out_ref, out_eager, name="out")
    assert_close_to_oracle(lse, lse_ref, lse_eager, name="lse")
    empty = torch.isinf(lse_ref).permute(0, 2, 1)  # (batch, seqlen_q, nheads)
    assert torch.all(out[empty] == 0), "empty rows must be exactly 0"
    return out, lse


@st.composite
def cases(draw):
    causal = draw(st.booleans())
    # The oracle rejects a causal window with right > 0; right is -1 or 0 there.
    windows = [(-1, -1), (3, 0), (0, 0), (4, -1)]
    if not causal:
        windows += [(5, 2), (-1, 2), (0, 3)]
    nheads_k = draw(st.sampled_from([1, 2]))
    return dict(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(1, 40)),
        seqlen_k=draw(st.integers(1, 40)),
        nheads_k=nheads_k,
        nheads=nheads_k * draw(st.sampled_from([1, 2, 4])),
        headdim=draw(st.sampled_from([16, 24, 40, 64])),
        causal=causal,
        window_size=draw(st.sampled_from(windows)),
        softcap=draw(st.sampled_from([0.0, 3.0])),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _case(**kw):
    base = dict(batch=1, seqlen_q=1, seqlen_k=1, nheads=1, nheads_k=1, headdim=16, causal=False,
                window_size=(-1, -1), softcap=0.0, dtype=torch.float32, seed=0)
    return {**base, **kw}


@requires_triton
@given(case=cases())
# Empty rows (seqlen_q > seqlen_k, causal), a decode step, a zero-width window.
@example(case=_case(batch=2, seqlen_q=37, seqlen_k=20, nheads=4, nheads_k=2, headdim=40, causal=True))
@example(case=_case(seqlen_q=1, seqlen_k=33, nheads=4, headdim=24, causal=True, window_size=(5, 0),
                    dtype=torch.float16, softcap=3.0))
@example(case=_case(seqlen_q=17, seqlen_k=35, nheads=2, headdim=64, window_size=(0, 0), dtype=torch.float16))
def test_matches_oracle(case):
    c = dict(case)
    q, k, v = make_qkv(c.pop("batch"), c.pop("seqlen_q"), c.pop("seqlen_k"), c.pop("nheads"),
                       c.pop("nheads_k"), c.pop("headdim"), c.pop("dtype"), c.pop("seed"))
    check_against_oracle(q, k, v, **c)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_large_logits(dtype, softcap):
    # q, k scaled by 30: scores of order 1e3, so exp would overflow without the
    # running max. Rounded to integers so every q.k is exact in fp32 whatever
    # the summation order: otherwise, where the softcap is not saturated, one
    # matmul's rounding (cancellation in a sum of terms ~1e3) decides whether
    # the Triton or the eager twin is closer, and the tolerance rule is a coin flip.
    q, k, v = make_qkv(1, 23, 31, 2, 1, 32, dtype, seed=1)
    q, k = (q.float() * 30).round().to(dtype), (k.float() * 30).round().to(dtype)
    out, lse = check_against_oracle(q, k, v, causal=True, softcap=softcap)
    assert torch.isfinite(out).all()


@requires_triton
def test_non_contiguous_inputs_give_identical_results():
    g = torch.Generator().manual_seed(2)
    batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim = 2, 19, 26, 4, 2, 24
    # q stored heads-major, with every other headdim element (headdim stride 2).
    q = torch.randn(batch, nheads, seqlen_q, 2 * headdim, generator=g).to(DEVICE).transpose(1, 2)[..., ::2]
    # k and v interleaved in one packed tensor, as from a fused kv projection.
    kv = torch.randn(batch, seqlen_k, 2, nheads_k, headdim, generator=g).to(DEVICE)
    k, v = kv[:, :, 0], kv[:, :, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = check_against_oracle(q, k, v, window_size=(6, 1))
    kwargs = dict(scale=headdim ** -0.5, window=(6, 1), softcap=0.0)
    out_c, lse_c = dense_forward_triton(q.contiguous(), k.contiguous(), v.contiguous(), **kwargs)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


@requires_triton
def test_headdim_256():
    q, k, v = make_qkv(1, 5, 9, 2, 1, 256, torch.float32, seed=3)
    check_against_oracle(q, k, v, causal=True)


@requires_triton
def test_long_causal():
    q, k, v = make_qkv(1, 200, 200, 1, 1, 32, torch.float16, seed=4)
    check_against_oracle(q, k, v, causal=True)


@requires_triton
def test_only_visible_key_blocks_are_read():
    # A decode query with window (3, 0) sees keys 196..199. NaN in keys 0..127
    # (blocks the kernel must skip for any BLOCK_N <= 64) would poison the output.
    q, k, v = make_qkv(1, 1, 200, 2, 1, 16, torch.float32, seed=5)
    k_ok, v_ok = k.clone(), v.clone()
    k[:, :128] = float("nan")
    v[:, :128] = float("nan")
    kwargs = dict(scale=0.25, window=(3, 0), softcap=0.0)
    out, lse = dense_forward_triton(q, k, v, **kwargs)
    out_ok, lse_ok = dense_forward_triton(q, k_ok, v_ok, **kwargs)
    assert torch.equal(out, out_ok) and torch.equal(lse, lse_ok)


@requires_triton
@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 4), (2, 4, 0)], ids=["batch0", "seqlen_q0", "seqlen_k0"])
def test_empty_inputs(shape):
    batch, seqlen_q, seqlen_k = shape
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, 2, 1, 16, torch.float16, seed=6)
    out, lse = dense_forward_triton(q, k, v, scale=0.25, window=(-1, 0), softcap=0.0)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.all(out == 0)
    assert lse.shape == (batch, 2, seqlen_q) and torch.all(lse == float("-inf"))


def test_imports_without_triton(monkeypatch):
    module = load_without_triton(dense_triton, monkeypatch)
    reason = module.triton_import_error()
    assert reason is not None and "triton" in reason and "\n" not in reason
    q = torch.zeros(1, 1, 1, 16)
    with pytest.raises(RuntimeError, match="needs triton"):
        module.dense_forward_triton(q, q, q, scale=0.25, window=(-1, -1), softcap=0.0)


@requires_triton
def test_rejects_headdim_above_256():
    q = torch.zeros(1, 1, 1, 257, device=DEVICE)
    with pytest.raises(UnsupportedFeatureError, match="headdim <= 256, got 257"):
        dense_forward_triton(q, q, q, scale=0.0625, window=(-1, -1), softcap=0.0)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_front_door_with_gradients(dtype):
    """attention(backend="triton"): the kernel forward plus the shared recomputing backward."""
    import longattn

    q, k, v = make_qkv(1, 19, 26, 4, 2, 24, dtype, seed=11)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = longattn.attention(q, k, v, causal=True, softcap=3.0, backend="triton", return_lse=True)
    eager_out, eager_lse = longattn.attention(q, k, v, causal=True, softcap=3.0, backend="eager", return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_ref(q64, k64, v64, causal=True, softcap=3.0)
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    eager_grads = torch.autograd.grad(eager_out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    for name, g, e, r in zip("qkv", grads, eager_grads, ref_grads):
        assert_close_to_oracle(g, r, e, name=f"d{name}")


_AOT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from longattn.kernels.dense import triton as dense

    fn = dense._dense_fwd_kernel
    # Shared memory per block each architecture offers (opt-in maximum), bytes.
    limit = {80: 163 * 1024, 90: 227 * 1024}
    # The fixed-length kernel (cu_seqlens None: constexpr, as a launch passes them) and
    # the varlen one (cu_seqlens int32 pointers, per-sequence lengths loaded in-kernel).
    # A launch specializes int arguments equal to 1 as constexprs: max_seqlen_q 1 (varlen
    # decode) makes seqlen_q one, which the varlen branch rebinds to the sequence's length.
    configs = ((80, "bf16", 128, False, {}), (90, "fp16", 64, False, {}), (80, "fp32", 256, False, {}),
               (90, "fp32", 128, False, {}), (80, "fp16", 128, True, dict(seqlen_q=1)), (90, "bf16", 256, True, {}))
    def compile_one(arch, dt, headdim, varlen, ones):
        block_m, block_n, num_warps, stages = dense._launch_config(headdim, False)
        ptrs = dict(Q="*" + dt, K="*" + dt, V="*" + dt, Out="*" + dt, Lse="*fp32")
        consts = dict(IS_VARLEN=varlen, HAS_LEFT=True, HAS_RIGHT=True, HAS_SOFTCAP=True, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(headdim)))
        if varlen:
            ptrs.update(Cu_q="*i32", Cu_k="*i32")
        else:
            consts.update(Cu_q=None, Cu_k=None)
        consts.update(ones)
        sig = {name: ptrs.get(name) or ("constexpr" if name in consts else "fp32" if name in ("scale", "softcap")
                                        else "i32") for name in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": stages})
        assert k.asm["cubin"], (arch, dt, headdim, varlen)
        assert k.metadata.shared <= limit[arch], (arch, dt, headdim, varlen, k.metadata.shared)

    each_config(configs, compile_one)
    print("compiled")
""")


def test_kernel_compiles_for_gpu_targets():
    """Ahead-of-time compile to cubin for sm_80 and sm_90 (the 64-bit offsets, the
    shared tile step and the varlen variant's early exit included): what the
    interpreter accepts the compiler must too."""
    assert_compiles_for_gpu(_AOT)
