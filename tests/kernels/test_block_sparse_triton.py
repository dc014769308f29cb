"""The Triton block-sparse twin against the float64 oracle (under the interpreter without CUDA)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_attention
from longattn.kernels.block_sparse.eager import block_sparse_forward_eager
from longattn.kernels.block_sparse.triton import triton_import_error
from longattn.reference import attention_ref
from longattn.sparse import HiP
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import HAS_CUDA, assert_compiles_for_gpu, load_without_triton, triton_skip_reason

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _skip_reason() -> str | None:
    return triton_skip_reason(triton_import_error())


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@st.composite
def cases(draw):
    layout = BlockSparseLayout(
        draw(st.integers(1, 40)), draw(st.integers(1, 60)), draw(st.integers(1, 20)),
        draw(st.sampled_from([1, 2, 3, 5])), draw(st.integers(0, 9)), draw(st.integers(0, 20)), draw(st.booleans()),
    )
    return (layout, draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 4])), draw(st.integers(0, 5)),
            draw(st.sampled_from([torch.float32, torch.float16])), draw(st.sampled_from([0.0, 4.0])),
            draw(st.integers(0, 2**16)))


# The interpreter runs every program in Python: few, tiny cases.
@settings(max_examples=12)
@given(cases())
def test_matches_oracle(case):
    layout, nheads_k, group, listed, dtype, softcap, seed = case
    gen = torch.Generator().manual_seed(seed)
    nheads, d = nheads_k * group, 16
    q = torch.randn(1, layout.seqlen_q, nheads, d, generator=gen).to(dtype)
    k = torch.randn(1, layout.seqlen_k, nheads_k, d, generator=gen).to(dtype)
    v = torch.randn(1, layout.seqlen_k, nheads_k, d, generator=gen).to(dtype)
    rows = [torch.cat([torch.randperm(layout.num_k_blocks, generator=gen)[:listed],
                       torch.full((max(0, listed - layout.num_k_blocks),), -1)])
            for _ in range(nheads * layout.num_q_blocks)]
    key_blocks = torch.stack(rows).reshape(1, nheads, layout.num_q_blocks, listed)
    kwargs = dict(block_q=layout.block_q, block_k=layout.block_k, sink_size=layout.sink_size,
                  recent_size=layout.recent_size, causal=layout.causal, softcap=softcap, return_lse=True)
    out, lse = block_sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), key_blocks.to(DEVICE),
                                      backend="triton", **kwargs)
    eager_out, eager_lse = block_sparse_forward_eager(q, k, v, key_blocks, layout, scale=d ** -0.5, softcap=softcap)
    ref_out, ref_lse = attention_ref(q, k, v, softcap=softcap, mask=layout.dense_mask(key_blocks))
    assert_close_to_oracle(out.cpu(), ref_out, eager_out)
    assert_close_to_oracle(lse.cpu(), ref_lse, eager_lse, name="lse")


def test_hip_prefill_on_the_triton_twin_matches_the_oracle():
    import longattn
    from longattn.sparse import hip_select_blocks

    torch.manual_seed(5)
    q, k, v = torch.randn(1, 70, 2, 16), torch.randn(1, 70, 1, 16), torch.randn(1, 70, 1, 16)
    cfg = HiP(topk=8, block_q=16, block_k=2, sink_size=3, recent_size=9)
    tri, tri_lse = longattn.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=True, sparse=cfg,
                                      backend="triton", return_lse=True)
    eager, eager_lse = longattn.attention(q, k, v, causal=True, sparse=cfg, backend="eager", return_lse=True)
    layout = BlockSparseLayout(70, 70, cfg.block_q, cfg.block_k, cfg.sink_size, cfg.recent_size, True)
    # (the Triton search selects what the eager one does: the test below)
    mask = layout.dense_mask(hip_select_blocks(q, k, cfg, causal=True, backend="eager"))
    ref_out, ref_lse = attention_ref(q, k, v, mask=mask)
    assert_close_to_oracle(tri.cpu(), ref_out, eager)
    assert_close_to_oracle(tri_lse.cpu(), ref_lse, eager_lse, name="lse")


@pytest.mark.parametrize("causal", [True, False])
def test_triton_search_selects_what_the_eager_search_selects(causal):
    from longattn.sparse import hip_select_blocks

    torch.manual_seed(6)
    q, k = torch.randn(1, 150, 4, 16), torch.randn(1, 150, 2, 16)
    cfg = HiP(topk=12, block_q=16, block_k=3, query_stride=3, sink_size=4, recent_size=10)
    eager = hip_select_blocks(q, k, cfg, causal=causal, backend="eager")
    tri = hip_select_blocks(q.to(DEVICE), k.to(DEVICE), cfg, causal=causal, backend="triton")
    assert torch.equal(tri.cpu(), eager)


def test_triton_search_passes_over_nan_dot_products_as_the_eager_search_does():
    from longattn.sparse import hip_select_blocks
    from tests.sparse.test_hip import plant_nans

    torch.manual_seed(8)
    q, k = plant_nans(torch.randn(1, 150, 4, 16), torch.randn(1, 150, 2, 16), seed=8)
    k[:, 60:90] = float("nan")  # ten whole blocks: those scored score -inf in every twin
    cfg = HiP(topk=12, block_q=16, block_k=3, query_stride=3, sink_size=4, recent_size=10)
    eager = hip_select_blocks(q, k, cfg, backend="eager")
    tri = hip_select_blocks(q.to(DEVICE), k.to(DEVICE), cfg, backend="triton")
    assert torch.equal(tri.cpu(), eager)


# Compiles the kernels for GPU targets in a fresh process (this one may run the interpreter).
_AOT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from longattn.kernels.block_sparse import triton as bs
    from longattn.kernels.hip_score import triton as hs

    def compile_for(fn, ptrs, consts, arch, stages, fp32=("scale", "softcap")):
        sig = {name: ptrs.get(name) or ("constexpr" if name in consts else "fp32" if name in fp32 else "i32")
               for name in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": stages})
        assert k.asm["cubin"], (fn, arch)
        assert k.metadata.shared <= 99 * 1024, (consts, k.metadata.shared)

    def block_sparse(arch, dt, causal, headdim):
        block_m, block_n, block_d, bk, stages = bs.launch_config(64, 2, headdim, False)
        ptrs = dict(Q="*" + dt, K="*" + dt, V="*" + dt, Out="*" + dt, Lse="*fp32", Blocks="*i32")
        consts = dict(CAUSAL=causal, HAS_SOFTCAP=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BK=bk)
        compile_for(bs._block_sparse_fwd_kernel, ptrs, consts, arch, stages)

    def hip_score(arch, causal, headdim):
        block_d = bs.launch_config(64, 2, headdim, False)[2]
        ptrs = dict(Queries="*fp32", QueryPos="*i32", RangeEnd="*i64", Keys="*fp32", Blocks="*i32", Out="*fp32")
        compile_for(hs._hip_score_kernel, ptrs, dict(CAUSAL=causal, S=32, BLOCK_C=32, BK=2, BLOCK_D=block_d), arch, 1)

    configs = ((80, "bf16", True, 128), (90, "fp16", False, 128), (80, "fp32", True, 256))
    each_config([(block_sparse, c) for c in configs] + [(hip_score, (a, c, d)) for a, _, c, d in configs],
                lambda fn, config: fn(*config))
    print("compiled")
""")


def test_kernels_compile_for_gpu_targets():
    """Ahead-of-time compile to cubin for sm_80 and sm_90: catches what the interpreter
    accepts but the compiler rejects. Needs triton's bundled ptxas, not a GPU."""
    assert_compiles_for_gpu(_AOT)


def test_streaming_on_the_triton_twin_matches_the_oracle():
    import longattn
    from longattn.sparse import Streaming
    from longattn.sparse.streaming import lambda_mask

    torch.manual_seed(9)
    q, k, v = torch.randn(1, 90, 4, 16), torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16)
    out = longattn.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=True, sparse=Streaming(5, 17),
                             backend="triton")
    ref, _ = attention_ref(q, k, v, mask=lambda_mask(90, 100, 5, 17))
    eager = longattn.attention(q, k, v, causal=True, sparse=Streaming(5, 17), backend="eager")
    assert_close_to_oracle(out.cpu(), ref, eager)


def test_imports_without_triton(monkeypatch):
    from longattn.kernels.block_sparse import triton as block_sparse_triton
    from longattn.kernels.hip_score import triton as hip_score_triton

    for kernel_module in (block_sparse_triton, hip_score_triton):
        module = load_without_triton(kernel_module, monkeypatch)
        reason = module.triton_import_error()
        assert reason is not None and "triton" in reason and "\n" not in reason
    q = torch.zeros(1, 4, 1, 16)
    layout = BlockSparseLayout(4, 4, 4, 1, 0, 2, True)
    with pytest.raises(RuntimeError, match="needs triton"):
        load_without_triton(block_sparse_triton, monkeypatch).block_sparse_forward_triton(
            q, q, q, torch.empty(1, 1, 1, 0, dtype=torch.long), layout, scale=0.25, softcap=0.0)
