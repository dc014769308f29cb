"""The C++ decode kernel's 16-key AVX-512 path (run_segment_wide in
csrc/cpu/decode_streamk.cpp) against the float64 oracle.

It serves head dims that are a multiple of 16 when the build has AVX-512: q
rows in registers for 64 and 128, a runtime loop otherwise; bf16 uses
vdpbf16ps for QK and PV (P rounded to bf16) when the build has AVX512-BF16
and the head dim is a multiple of 32, else widens in registers. The cases
below cross every one of those with partial chunks (lengths not a multiple of
16), seqlen_q up to 8, windows, softcap, and paged caches whose pages split
chunks (page_size 7, NaN-filled unused slots), and the address-order walk
over every kv head of a tile with query rows per head that are not a
multiple of 4.
"""

from __future__ import annotations

import pytest
import torch

from longattn.kernels.decode.cpp import cpu_unavailable_reason, decode_forward_cpu
from longattn.kernels.support.cpp_build import build_plan
from tests.decode.decode_cases import DecodeCase
from tests.decode.test_decode_cpp import _run
from tests.tolerance import assert_close_to_oracle

pytestmark = pytest.mark.skipif(
    cpu_unavailable_reason() is not None, reason=f"C++ kernel unavailable: {cpu_unavailable_reason()}"
)

# Builds that take the 16-key path (it needs AVX-512): as built here, and without the bf16 dot product.
WIDE_BUILDS = {"native": (), "avx512-without-bf16-dot": ("-mno-avx512bf16",)}


def _has_avx512(flags: tuple[str, ...]) -> bool:
    return "avx512f" in build_plan("decode_streamk.cpp", flags).features


@pytest.mark.parametrize("build", list(WIDE_BUILDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("headdim", [48, 64, 96, 128])
@pytest.mark.parametrize(
    "lengths,seqlen_q,window,softcap,page_size",
    [
        ((1, 15, 17, 300), 1, (-1, -1), 0.0, None),  # chunks of 1, 15, 16 + 1, 18 x 16 + 12 keys
        ((40, 233), 8, (20, 0), 0.0, 7),  # rows that see part of a chunk; pages split chunks
        ((0, 150), 3, (-1, -1), 30.0, 16),  # an empty sequence (out 0, lse -inf) and softcap
    ],
)
def test_wide_path_matches_oracle(build, dtype, headdim, lengths, seqlen_q, window, softcap, page_size):
    if not _has_avx512(WIDE_BUILDS[build]):
        pytest.skip("this CPU has no AVX-512: the 16-key path is not built here")
    case = DecodeCase(lengths, 0, seqlen_q, 2, 4, headdim, dtype, page_size, True, window, softcap, seed=headdim)
    (out, lse), (eager_out, eager_lse), (ref_out, ref_lse), _ = _run(
        case, {"num_workers": 3, "block_n": 48, "heads_per_tile": 2}, WIDE_BUILDS[build])
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_bf16_rounded_p_stays_within_tolerance(dtype):
    # 8192 keys, GQA 4, one query: the decode shape of the benchmark. With
    # bf16, P is rounded to bf16 for PV (relative error <= 2**-9 per weight,
    # unbiased, so it averages out over many keys) while the denominator and
    # lse use the unrounded fp32 P: lse keeps float32 accuracy.
    case = DecodeCase((8192,), 0, 1, 8, 4, 128, dtype, None, True, (-1, -1), 0.0, seed=21)
    (out, lse), (eager_out, eager_lse), (ref_out, ref_lse), _ = _run(case, None)
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_path_bitwise_equal_across_thread_counts(dtype):
    case = DecodeCase((1000, 37, 0, 517), 0, 2, 8, 4, 128, dtype, 256, True, (-1, -1), 0.0, seed=4)
    (out, lse), _, _, (args, params, plan) = _run(case, {"num_workers": 6, "block_n": 64, "heads_per_tile": 8})
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            again = decode_forward_cpu(*args, **params, plan=plan)
            assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("build", list(WIDE_BUILDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "group,seqlen_q,headdim,page_size",
    [
        (3, 1, 64, None),  # 3 rows per kv head: a 3-row block
        (5, 2, 96, 5),  # 10 rows: 4 + 4 + 2; pages of 5 split every 4-key group of a chunk
        (1, 1, 128, 16),  # 1 row per kv head (MHA)
    ],
)
def test_address_order_walk_over_heads_matches_oracle(build, dtype, group, seqlen_q, headdim, page_size):
    # The wide path walks each chunk 4 key positions at a time over every kv
    # head of the tile (QK, then PV); with all 3 kv heads in one tile, query
    # rows per head that are not a multiple of 4, chunk tails and pages that
    # split the 4-key groups, every (key, head) must still meet its own rows.
    if not _has_avx512(WIDE_BUILDS[build]):
        pytest.skip("this CPU has no AVX-512: the 16-key path is not built here")
    case = DecodeCase((45, 130, 3), 0, seqlen_q, 3, group, headdim, dtype, page_size, True, (-1, -1), 0.0, seed=group)
    (out, lse), (eager_out, eager_lse), (ref_out, ref_lse), _ = _run(
        case, {"num_workers": 4, "block_n": 32, "heads_per_tile": 3}, WIDE_BUILDS[build])
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")
