"""NaN in q or k reaches exactly the rows the float64 oracle makes NaN, in
every C++ kernel and build.

A NaN in an input (an fp16 overflow upstream, a bad checkpoint) makes the
dense answer NaN wherever a row attends it. The C++ kernels used to return
finite rows there: their vector exp clamped NaN to its lower bound (weight 0),
so a NaN key was dropped, and a row whose every score was NaN was written as
empty (0, lse -inf). These check the NaN pattern of out and lse against the
oracle's, rows that do not see the NaN staying finite, on the flash kernel's
engines (float32 math, bf16 dot products, AMX tiles under emulation), the
stream-K decode kernel (its 16- and 8-key paths, with partials merged) and
gather decode (split lists merged).
"""

from __future__ import annotations

import pytest
import torch

from longattn.kernels.decode.cpp import cpu_unavailable_reason, decode_forward_cpu
from longattn.kernels.decode.plan import plan_decode
from longattn.kernels.dense.cpp import AMX_EMULATE, flash_forward_cpu, flash_unavailable_reason, maths_built
from longattn.kernels.gather.cpp import gather_decode_cpu
from longattn.kernels.support.cpp_build import build_plan
from longattn.reference import attention_ref

_UNAVAILABLE = cpu_unavailable_reason() or flash_unavailable_reason()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"C++ kernels unavailable: {_UNAVAILABLE}")

BUILDS = {"native": (), "no-bf16-dot": ("-mno-avx512bf16",), "avx2": ("-mno-avx512f",),
          "portable": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}


def _built(source: str, flags: tuple[str, ...]) -> bool:
    """Whether these flags give a build this CPU runs that differs from the
    native one (a flag that removes an instruction set the CPU lacks changes nothing)."""
    native = build_plan(source, ()).features
    return flags == () or build_plan(source, flags).features != native


def _poisoned(shape_q, shape_k, dtype, seed, nan_in):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=gen)
    k = torch.randn(*shape_k, generator=gen)
    v = torch.randn(*shape_k, generator=gen)
    if nan_in == "k":
        k[0, shape_k[1] // 3, shape_k[2] - 1, 5] = float("nan")
    else:
        q[0, shape_q[1] - 1, 0, 3] = float("nan")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _assert_nan_rows_match(out, lse, ref_out, ref_lse):
    """out (..., headdim) and lse NaN exactly where the oracle's are; some are."""
    ref_rows = ref_out.isnan().any(-1)
    assert ref_rows.any() and not ref_rows.all()  # the case has both kinds of row
    assert torch.equal(out.float().isnan().any(-1), ref_rows)
    assert torch.equal(out.float().isnan().all(-1), ref_rows)  # a NaN row is NaN throughout
    assert torch.equal(lse.isnan(), ref_lse.isnan())


@pytest.mark.parametrize("nan_in", ["k", "q"])
@pytest.mark.parametrize("math", ["fp32", "bf16-dot", "amx"])
@pytest.mark.parametrize("window", [(-1, 0), (40, 0)])
def test_flash_kernel_nan_rows_are_the_oracles(nan_in, math, window):
    flags = AMX_EMULATE if math == "amx" else ()
    if math not in maths_built(flags):
        pytest.skip(f"the {math} engine is not built for this CPU")
    dtype = torch.float32 if math == "fp32" else torch.bfloat16
    q, k, v = _poisoned((1, 150, 4, 64), (1, 150, 2, 64), dtype, seed=1, nan_in=nan_in)
    out, lse = flash_forward_cpu(q, k, v, scale=64 ** -0.5, window=window, causal=True, build_flags=flags,
                                 math=math)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=True, window_size=window)
    _assert_nan_rows_match(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("nan_in", ["k", "q"])
@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("headdim", [64, 40])  # 40: the 8-key path in every build
def test_decode_kernel_nan_rows_are_the_oracles(nan_in, build, dtype, headdim):
    if not _built("decode_streamk.cpp", BUILDS[build]):
        pytest.skip(f"the {build} build is the native one on this CPU")
    q, k, v = _poisoned((1, 3, 8, headdim), (1, 300, 2, headdim), dtype, seed=2, nan_in=nan_in)
    seqlens = torch.tensor([300], dtype=torch.int32)
    plan = plan_decode(seqlens, nheads_k=2, num_workers=3, block_n=32)  # split keys: partials merged
    out, lse = decode_forward_cpu(q, k, v, seqlens, None, scale=headdim ** -0.5, window=(-1, 0), softcap=0.0,
                                  plan=plan, build_flags=BUILDS[build])
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=True)
    _assert_nan_rows_match(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("build", ["native", "avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_decode_nan_rows_are_the_oracles(build, dtype):
    if not _built("gather_decode.cpp", BUILDS[build]):
        pytest.skip(f"the {build} build is the native one on this CPU")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 64, generator=gen).to(dtype)
    k = torch.randn(1, 200, 2, 64, generator=gen)
    v = torch.randn(1, 200, 2, 64, generator=gen)
    k[0, 50, 1, 7] = float("nan")  # listed for kv head 1 only
    k, v = k.to(dtype), v.to(dtype)
    indices = torch.stack([torch.arange(0, 200, 2), torch.arange(0, 200, 2)])[None].to(torch.int32)  # (1, 2, 100)
    out, lse = gather_decode_cpu(q, k, v, indices, None, scale=0.125, split_len=16, build_flags=BUILDS[build])
    # The oracle: each query head over its list's keys.
    keys = k[:, ::2].double().repeat_interleave(4, dim=2)  # (1, 100, 8, 64)
    values = v[:, ::2].double().repeat_interleave(4, dim=2)
    ref_out, ref_lse = attention_ref(q[:, None].double(), keys, values, softmax_scale=0.125)
    _assert_nan_rows_match(out, lse, ref_out[:, 0], ref_lse[..., 0])
