"""The Triton stream-K decode twin against the float64 oracle.

Errors follow the tolerance rule (2x the eager twin's error in the same
dtype, plus a rounding floor). Without CUDA the kernels run under the Triton
interpreter (conftest sets TRITON_INTERPRET=1): slow and without bfloat16, so
shapes stay tiny and bfloat16 is tested only on a GPU. Also checked here:
the kernels compile for real GPU targets (sm_80, sm_90) ahead of time.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import longattn
from longattn.decode import plan_decode
from longattn.kernels.decode.cache import check_cache
from longattn.kernels.decode import DECODE_BACKENDS, DecodeCall
from longattn.kernels.decode.eager import decode_forward_eager
from longattn.kernels.decode.triton import decode_forward_triton, triton_import_error
from longattn.masking import effective_window
from tests.decode.decode_cases import DecodeCase
from tests.tolerance import assert_close_to_oracle
from tests.triton_helpers import HAS_CUDA, assert_compiles_for_gpu, load_without_triton, triton_skip_reason

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def _skip_reason() -> str | None:
    return triton_skip_reason(triton_import_error())


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _to_device(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def run_case(case: DecodeCase, num_workers: int, block_n: int = 16, heads_per_tile: int = 1):
    """Build the case, run the Triton twin with an explicit plan, check it against the
    oracle (eager twin as baseline); returns what the second run needs."""
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    q, k_cache, v_cache = (t.to(DEVICE) for t in (q, k_cache, v_cache))
    kwargs = {name: _to_device(t) for name, t in kwargs.items()}
    view = check_cache(q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs.get("block_table"),
                       kwargs.get("k_new"), kwargs.get("v_new"))
    plan = plan_decode(view.seqlens, nheads_k=case.nheads_k, num_workers=num_workers, block_n=block_n,
                       heads_per_tile=heads_per_tile)
    args = (q, view.k_cache, view.v_cache, view.seqlens, view.block_table)
    params = dict(scale=case.headdim ** -0.5, window=effective_window(case.causal, case.window_size),
                  softcap=case.softcap)
    out, lse = decode_forward_triton(*args, **params, plan=plan)
    eager_out, eager_lse = decode_forward_eager(*args, **params)
    ref_out, ref_lse = case.oracle(q.cpu(), logical_k, logical_v)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (case.batch, q.shape[2], case.seqlen_q) and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")
    empty = torch.isinf(ref_lse).permute(0, 2, 1)  # (batch, seqlen_q, nheads)
    assert torch.all(out.cpu()[empty] == 0), "rows that see no key must be exactly 0"
    return args, params, plan, (out, lse), (ref_out, ref_lse), (eager_out, eager_lse)


@st.composite
def cases(draw):
    causal = draw(st.booleans())
    window = (-1, -1)
    if draw(st.booleans()):
        # The oracle rejects a causal window with right > 0.
        window = (draw(st.integers(-1, 12)), draw(st.sampled_from([-1, 0])) if causal else draw(st.integers(-1, 4)))
    batch = draw(st.integers(1, 3))
    return DecodeCase(
        cache_seqlens=tuple(draw(st.lists(st.sampled_from([0, 1, 2, 7, 16, 17, 29, 40]), min_size=batch, max_size=batch))),
        seqlen_new=draw(st.sampled_from([0, 0, 1])),
        seqlen_q=draw(st.integers(1, 8)),
        nheads_k=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 4, 8])),
        headdim=draw(st.sampled_from([16, 24, 64])),
        dtype=draw(st.sampled_from(DTYPES)),
        page_size=draw(st.sampled_from([None, 1, 3, 16])),
        causal=causal,
        window_size=window,
        softcap=draw(st.sampled_from([0.0, 0.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _case(**kw) -> DecodeCase:
    base = dict(cache_seqlens=(5,), seqlen_new=0, seqlen_q=1, nheads_k=1, group=1, headdim=16,
                dtype=torch.float32, page_size=None, causal=True, window_size=(-1, -1), softcap=0.0, seed=0)
    return DecodeCase(**{**base, **kw})


@given(case=cases(), workers=st.sampled_from(["one", "three", "more_than_work"]), block_n=st.sampled_from([4, 16]),
       fold_heads=st.booleans())
@settings(max_examples=2 * settings().max_examples)  # cheap here: twice the profile's count
# Ragged with empty and one-key sequences, paged with page_size 1 and 3 (pages shuffled), GQA 8.
@example(case=_case(cache_seqlens=(0, 1, 40), seqlen_q=3, nheads_k=2, group=8, page_size=3, dtype=torch.float16),
         workers="three", block_n=16, fold_heads=False)
@example(case=_case(cache_seqlens=(33, 0), seqlen_new=1, seqlen_q=8, group=4, page_size=1, window_size=(5, 0),
                    softcap=4.0), workers="more_than_work", block_n=4,
         fold_heads=False)
# seqlen_q > seqlen: the first rows see nothing; non-power-of-two block_n.
@example(case=_case(cache_seqlens=(2, 9), seqlen_q=6, group=4, causal=True), workers="three", block_n=3,
         fold_heads=False)
# The left window's block skipping: query 0 (position 32) sees keys 27..32, across a 16-key block edge.
@example(case=_case(cache_seqlens=(40,), seqlen_q=8, group=2, window_size=(5, 0)), workers="one", block_n=16,
         fold_heads=False)
# A split tile whose first rows see no key in any part (seqlen_q 8 > 5 keys): merge of all -inf.
@example(case=_case(cache_seqlens=(5, 0), seqlen_q=8, group=4), workers="more_than_work", block_n=2,
         fold_heads=False)
# headdim 160 > 128: 32-row blocks, so the 40 rows of the group (8 x seqlen_q 5) take two row blocks.
@example(case=_case(cache_seqlens=(20, 3), seqlen_q=5, group=8, headdim=160, page_size=3, window_size=(6, 0)),
         workers="three", block_n=4, fold_heads=False)
# A CPU-style plan: both kv heads in one output tile.
@example(case=_case(cache_seqlens=(30, 5), seqlen_q=2, nheads_k=2, group=4, page_size=3), workers="three",
         block_n=4, fold_heads=True)
def test_matches_oracle_for_any_worker_count(case, workers, block_n, fold_heads):
    heads_per_tile = case.nheads_k if fold_heads else 1
    total = sum(-(-n // block_n) for n in case.seqlens) * (case.nheads_k // heads_per_tile)
    num_workers = {"one": 1, "three": 3, "more_than_work": total + 3}[workers]
    run_case(case, num_workers, block_n, heads_per_tile)


def test_deterministic_for_a_fixed_plan():
    case = _case(cache_seqlens=(37, 22), seqlen_q=2, nheads_k=2, group=4, page_size=3, dtype=torch.float16,
                 window_size=(19, -1), softcap=4.0, seed=7)
    args, params, plan, (out, lse), _, _ = run_case(case, num_workers=8, block_n=4)
    assert any(len(segs) > 2 for segs in plan.contributors), "the plan should merge three or more partials"
    out2, lse2 = decode_forward_triton(*args, **params, plan=plan)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_plans_for_itself_when_no_plan_is_given():
    case = _case(cache_seqlens=(23, 0, 40), seqlen_q=2, nheads_k=2, group=4, page_size=16, seed=8)
    args, params, _, _, (ref_out, ref_lse), (eager_out, eager_lse) = run_case(case, num_workers=3)
    out, lse = decode_forward_triton(*args, **params)  # default workers and block_n
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


def test_large_logits_do_not_overflow():
    # q, k scaled up: scores ~1e3 would overflow exp without the running max and merge max.
    case = _case(cache_seqlens=(45,), seqlen_q=4, group=4, headdim=32, page_size=3, seed=9)
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    q, k_cache = (q * 30).round(), (k_cache * 30).round()
    logical_k = (logical_k * 30).round()
    plan = plan_decode([45], nheads_k=1, num_workers=4, block_n=8)
    params = dict(scale=32 ** -0.5, window=(-1, 0), softcap=0.0)
    args = (q, k_cache, v_cache, kwargs["cache_seqlens"], kwargs["block_table"])
    out, lse = decode_forward_triton(*(_to_device(a) for a in args), **params, plan=plan)
    eager_out, eager_lse = decode_forward_eager(*args, **params)
    ref_out, ref_lse = case.oracle(q, logical_k, logical_v)
    assert torch.isfinite(out).all()
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_front_door(dtype):
    case = _case(cache_seqlens=(11, 0, 30), seqlen_new=1, seqlen_q=2, nheads_k=2, group=4, page_size=3,
                 dtype=dtype, window_size=(20, -1), seed=10)
    q, k_cache, v_cache, kwargs, logical_k, logical_v = case.build()
    q, k_cache, v_cache = (t.to(DEVICE) for t in (q, k_cache, v_cache))
    kwargs = {name: _to_device(t) for name, t in kwargs.items()}
    k_eager, v_eager = k_cache.clone(), v_cache.clone()  # decode_attention appends k_new in place
    plan = plan_decode(case.seqlens, nheads_k=2, num_workers=3, block_n=8)
    out, lse = longattn.decode_attention(q, k_cache, v_cache, **kwargs, **case.kwargs(), plan=plan,
                                         backend="triton", return_lse=True)
    eager_out, eager_lse = longattn.decode_attention(q, k_eager, v_eager, **kwargs, **case.kwargs(),
                                                     backend="eager", return_lse=True)
    ref_out, ref_lse = case.oracle(q.cpu(), logical_k, logical_v)
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


def test_registry_order_and_reasons():
    assert DECODE_BACKENDS.names.index("triton") < DECODE_BACKENDS.names.index("eager")
    case = _case(cache_seqlens=(4,))
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    view = check_cache(q, k_cache, v_cache, kwargs["cache_seqlens"], None, None, None)
    call = DecodeCall(q, view, 0.25, (-1, 0), 0.0, None)
    triton_backend = DECODE_BACKENDS.backends[DECODE_BACKENDS.names.index("triton")]
    if not HAS_CUDA:  # the interpreter serves a forced call, never an auto one
        assert triton_backend.reasons(call) == []
        assert DECODE_BACKENDS.select(call, "auto").name != "triton"
        bf16 = DecodeCall(q.to(torch.bfloat16), view, 0.25, (-1, 0), 0.0, None)
        assert any("bfloat16" in r for r in triton_backend.reasons(bf16))
    wide = DecodeCall(torch.zeros(1, 1, 1, 320), view, 0.25, (-1, 0), 0.0, None)
    assert any("headdim 320" in r for r in triton_backend.reasons(wide))


# Compiles both kernels for GPU targets in a fresh process (this one may run the interpreter).
_AOT = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from longattn.kernels.decode import triton as m

    def compile_for(fn, ptrs, consts, arch, num_warps):
        sig = {}
        for name in fn.arg_names:
            sig[name] = ptrs.get(name) or ("constexpr" if name in consts else "fp32" if name in ("scale", "softcap") else "i32")
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 1})
        assert k.asm["cubin"], (fn, arch)
        # 99 KB: the smallest per-block opt-in shared memory from sm_80 on (sm_86/sm_89).
        assert k.metadata.shared <= 99 * 1024, (consts, k.metadata.shared)

    # The largest configs launch_config picks (64 rows; headdim 128 and 256), fp32 = most shared memory.
    def compile_both(arch, dt, paged, headdim):
        block_m, block_n, block_d, num_warps = m.launch_config(64, headdim, 64)
        ptrs = dict(Q="*" + dt, K="*" + dt, V="*" + dt, Out="*" + dt, Lse="*fp32", WsO="*fp32", WsL="*fp32",
                    Segs="*i32", WorkerFirst="*i32", Seqlens="*i32", BlockTable="*i32")
        consts = dict(PAGED=paged, HAS_LEFT=True, HAS_RIGHT=True, HAS_SOFTCAP=True,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        compile_for(m._streamk_partial_kernel, ptrs, consts, arch, num_warps)
        ptrs = dict(Out="*" + dt, Lse="*fp32", WsO="*fp32", WsL="*fp32", MergeTiles="*i32", TileFirst="*i32")
        compile_for(m._streamk_merge_kernel, ptrs, dict(BLOCK_M=block_m, BLOCK_D=block_d), arch, 4)

    each_config(((80, "bf16", True, 128), (90, "fp16", False, 256), (80, "fp32", True, 256), (90, "fp32", False, 128)),
                compile_both)
    print("compiled")
""")


def test_kernels_compile_for_gpu_targets():
    """Ahead-of-time compile to cubin for sm_80 and sm_90 (bf16, fp16, fp32; paged and
    contiguous): catches what the interpreter accepts but the compiler rejects, and checks
    shared memory fits. Needs triton's bundled ptxas, not a GPU."""
    assert_compiles_for_gpu(_AOT)


def test_imports_without_triton(monkeypatch):
    from longattn.kernels.decode import triton as decode_triton

    module = load_without_triton(decode_triton, monkeypatch)
    reason = module.triton_import_error()
    assert reason is not None and "triton" in reason and "\n" not in reason
    q = torch.zeros(1, 1, 1, 16)
    with pytest.raises(RuntimeError, match="needs triton"):
        module.decode_forward_triton(q, q, q, torch.ones(1, dtype=torch.int32), None,
                                     scale=0.25, window=(-1, 0), softcap=0.0)
