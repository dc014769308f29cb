"""The gather-decode primitive's twins against the float64 oracle restricted to the listed tokens.

Every twin that can run here: eager (the specification and the tolerance
baseline), the C++ CPU kernel (every vector path this CPU has, forced splits,
bitwise equal across thread counts), the Triton kernel under TRITON_INTERPRET=1
(fp32/fp16, tiny shapes), and the CUDA kernels compiled with nvcc and run in
the CPU emulation of tests/decode/test_decode_cuda.py. The oracle is
``attention_ref`` over the logical cache with a boolean mask that is True
exactly at each head's listed positions.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.errors import ArgumentError, DTypeError, LongAttnError, ShapeError
from longattn.kernels.gather import GATHER_BACKENDS, GatherCall, gather_decode
from longattn.kernels.gather import cuda as gather_cuda
from longattn.kernels.gather.cpp import cpu_unavailable_reason, gather_decode_cpu, split_length
from longattn.kernels.gather.eager import gather_decode_eager
from longattn.reference import attention_ref
from tests.decode.test_decode_cuda import check_launch_args, macro_params
from tests.nvcc_check import NVCC, assert_nvcc_compiles
from tests.tolerance import assert_close_to_oracle

CPP_REASON = cpu_unavailable_reason()
requires_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"C++ kernel unavailable: {CPP_REASON}")


@dataclass(frozen=True)
class GatherCase:
    batch: int
    capacity: int  # positions per sequence (a multiple of page_size when paged)
    n: int  # entries per list (positions and -1 padding)
    nheads_k: int
    group: int
    headdim: int
    dtype: torch.dtype
    page_size: int | None  # None: contiguous cache
    per_query: bool  # one list per query head (else per kv head)
    pad: float  # fraction of entries that are -1
    softcap: float
    seed: int

    @property
    def nheads(self) -> int:
        return self.nheads_k * self.group

    def build(self):
        """``q, k_cache, v_cache, indices, block_table`` (the call's tensors) and
        ``k, v`` (the logical (batch, capacity, nheads_k, headdim) cache)."""
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.batch, self.nheads, self.headdim, generator=gen).to(self.dtype)
        k = torch.randn(self.batch, self.capacity, self.nheads_k, self.headdim, generator=gen).to(self.dtype)
        v = torch.randn(self.batch, self.capacity, self.nheads_k, self.headdim, generator=gen).to(self.dtype)
        nlists = self.nheads if self.per_query else self.nheads_k
        idx = torch.full((self.batch, nlists, self.n), -1, dtype=torch.int32)
        for b in range(self.batch):
            for lst in range(nlists):
                # Distinct positions in random order; -1 padding at random places.
                pos = torch.randperm(self.capacity, generator=gen)[: self.n]
                keep = torch.rand(len(pos), generator=gen) >= self.pad
                slots = torch.randperm(self.n, generator=gen)[: len(pos)]
                idx[b, lst, slots[keep]] = pos[keep].int()
        if self.page_size is None:
            return (q, k, v, idx, None), (k, v)
        pages_per_seq = self.capacity // self.page_size
        num_pages = self.batch * pages_per_seq + 2  # two spare pages never listed
        order = torch.randperm(num_pages, generator=gen)[: self.batch * pages_per_seq]  # pages out of order
        table = order.reshape(self.batch, pages_per_seq).int()
        k_cache = torch.randn(num_pages, self.page_size, self.nheads_k, self.headdim, generator=gen).to(self.dtype)
        v_cache = torch.randn(num_pages, self.page_size, self.nheads_k, self.headdim, generator=gen).to(self.dtype)
        k_cache[order] = k.reshape(-1, self.page_size, self.nheads_k, self.headdim)
        v_cache[order] = v.reshape(-1, self.page_size, self.nheads_k, self.headdim)
        return (q, k_cache, v_cache, idx, table), (k, v)

    def oracle(self, q, k, v, idx):
        """float64 ``(out (batch, nheads, headdim), lse (batch, nheads))`` over exactly the listed positions."""
        listed = torch.zeros(self.batch, idx.shape[1], self.capacity + 1, dtype=torch.bool)
        listed.scatter_(2, idx.long().clamp(min=-1) % (self.capacity + 1), True)  # -1 lands in the spare column
        mask = listed[..., : self.capacity]
        if not self.per_query:
            mask = mask.repeat_interleave(self.group, dim=1)
        out, lse = attention_ref(q[:, None], k, v, softcap=self.softcap, mask=mask[:, :, None, :])
        return out[:, 0], lse[..., 0]


@st.composite
def gather_cases(draw, *, dtypes=(torch.float32, torch.float16, torch.bfloat16), headdims=(16, 24, 59, 72, 100, 128),
                 max_capacity=64, max_n=40, groups=(1, 4, 8), max_batch=2, max_nheads_k=2):
    page_size = draw(st.sampled_from([None, None, 1, 3, 16, draw(st.integers(1, 16))]))
    capacity = draw(st.integers(1, max_capacity))
    if page_size is not None:
        capacity = -(-capacity // page_size) * page_size
    return GatherCase(
        batch=draw(st.integers(1, max_batch)),
        capacity=capacity,
        n=draw(st.integers(0, min(max_n, capacity))),
        nheads_k=draw(st.integers(1, max_nheads_k)),
        group=draw(st.sampled_from(groups)),
        headdim=draw(st.sampled_from(headdims)),
        dtype=draw(st.sampled_from(dtypes)),
        page_size=page_size,
        per_query=draw(st.booleans()),
        pad=draw(st.sampled_from([0.0, 0.3, 1.0])),
        softcap=draw(st.sampled_from([0.0, 0.0, 5.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _check(case: GatherCase, run) -> None:
    """``run(q, k_cache, v_cache, indices, block_table, scale=, softcap=)`` against the oracle."""
    (q, k_cache, v_cache, idx, table), (k, v) = case.build()
    scale = case.headdim ** -0.5
    out, lse = run(q, k_cache, v_cache, idx, table, scale=scale, softcap=case.softcap)
    eager_out, eager_lse = gather_decode_eager(q, k_cache, v_cache, idx, table, scale=scale, softcap=case.softcap)
    ref_out, ref_lse = case.oracle(q, k, v, idx)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (case.batch, case.nheads) and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, eager_out)
    assert_close_to_oracle(lse, ref_lse, eager_lse, name="lse")
    empty = (idx < 0).all(-1)
    if not case.per_query:
        empty = empty.repeat_interleave(case.group, dim=1)
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))  # empty lists: 0 and -inf


# --- eager (the specification) ----------------------------------------------

@given(gather_cases())
def test_eager_matches_oracle(case):
    # The baseline of every other twin must itself sit at the rounding floor.
    (q, k_cache, v_cache, idx, table), (k, v) = case.build()
    out, lse = gather_decode(q, k_cache, v_cache, idx, block_table=table, softcap=case.softcap, backend="eager")
    ref_out, ref_lse = case.oracle(q, k, v, idx)
    assert_close_to_oracle(out, ref_out, ref_out.to(out.dtype))
    assert_close_to_oracle(lse, ref_lse, ref_lse.float(), name="lse")


# --- C++ --------------------------------------------------------------------

@requires_cpp
@settings(max_examples=60)
@given(gather_cases(), st.sampled_from([None, 1, 3, 8, 16]))
def test_cpp_matches_oracle(case, split_len):
    # split_len forces lists into pieces merged afterwards (splits of only -1, of one entry, ...).
    _check(case, lambda *a, **kw: gather_decode_cpu(*a, **kw, split_len=split_len))


# The kernel has a vector path per instruction set; the build's ISA level picks one,
# so on an AVX-512 machine the others are built with features switched off. Paths
# this CPU lacks are simply lower than its own and build the same way.
VECTOR_PATHS = {
    "native": (),
    "avx512-without-bf16-dot": ("-mno-avx512bf16",),
    "avx2": ("-mno-avx512f",),
    "portable": ("-mno-avx512f", "-mno-avx2", "-mno-fma"),
}
PATH_CASES = {
    # GQA 4, per kv head, paged (page 5, out of order), several chunks, splits.
    "gqa4-paged": dict(batch=2, capacity=300, n=150, nheads_k=2, group=4, headdim=128, page_size=5, per_query=False,
                       pad=0.2, softcap=0.0),
    # Per query head, GQA 8, odd headdim (a tail after the vector width), softcap, contiguous.
    "per-query-hd72-softcap": dict(batch=1, capacity=90, n=61, nheads_k=1, group=8, headdim=72, page_size=None,
                                   per_query=True, pad=0.3, softcap=5.0),
    "mha-hd100": dict(batch=2, capacity=40, n=33, nheads_k=3, group=1, headdim=100, page_size=1, per_query=False,
                      pad=0.0, softcap=0.0),
}


@requires_cpp
@pytest.mark.parametrize("path", list(VECTOR_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", list(PATH_CASES))
def test_cpp_every_vector_path_matches_oracle(path, dtype, shape):
    case = GatherCase(**PATH_CASES[shape], dtype=dtype, seed=3)
    _check(case, lambda *a, **kw: gather_decode_cpu(*a, **kw, split_len=64, build_flags=VECTOR_PATHS[path]))


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_bitwise_equal_across_thread_counts(dtype):
    # Batch 1, 8 kv heads, 2000 entries: the default schedule splits every list
    # (8 lists < 64 pieces) and hands the pieces to threads dynamically.
    case = GatherCase(1, 4096, 2000, 8, 4, 128, dtype, 16, False, 0.1, 0.0, seed=9)
    (q, k_cache, v_cache, idx, table), (k, v) = case.build()
    assert split_length(1, 8, 2000) < 2000
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(gather_decode_cpu(q, k_cache, v_cache, idx, table, scale=0.1))
    finally:
        torch.set_num_threads(previous)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    eager_out, eager_lse = gather_decode_eager(q, k_cache, v_cache, idx, table, scale=0.1)
    ref_out, ref_lse = attention_ref(q[:, None], k, v, softmax_scale=0.1, mask=_mask(case, idx))
    assert_close_to_oracle(results[0][0], ref_out[:, 0], eager_out)
    assert_close_to_oracle(results[0][1], ref_lse[..., 0], eager_lse, name="lse")


def _mask(case: GatherCase, idx: torch.Tensor) -> torch.Tensor:
    listed = torch.zeros(case.batch, idx.shape[1], case.capacity, dtype=torch.bool)
    for b, lst, j in (idx >= 0).nonzero().tolist():
        listed[b, lst, idx[b, lst, j]] = True
    if not case.per_query:
        listed = listed.repeat_interleave(case.group, dim=1)
    return listed[:, :, None, :]


@requires_cpp
def test_cpp_reads_int64_lists_and_strided_inputs():
    case = GatherCase(2, 48, 20, 2, 4, 24, torch.float16, None, False, 0.2, 0.0, seed=4)
    (q, k_cache, v_cache, idx, _), (k, v) = case.build()
    q_strided = torch.randn(2, 8, 48).to(q.dtype)[..., ::2]  # headdim stride 2: copied for the kernel
    q_strided.copy_(q)
    out, lse = gather_decode(q_strided, k_cache, v_cache, idx.long(), backend="cpp")
    ref_out, ref_lse = case.oracle(q, k, v, idx)
    eager = gather_decode_eager(q, k_cache, v_cache, idx, None, scale=24 ** -0.5)
    assert_close_to_oracle(out, ref_out, eager[0])
    assert_close_to_oracle(lse, ref_lse, eager[1], name="lse")


@requires_cpp
def test_auto_picks_cpp_on_cpu_and_never_triton_or_cuda():
    q = torch.randn(1, 8, 64)
    k = torch.randn(1, 50, 2, 64)
    idx = torch.randint(0, 50, (1, 2, 10), dtype=torch.int32)
    call = GatherCall(q, k, k, idx, None, 0.125, 0.0)
    assert GATHER_BACKENDS.names == ["cpp", "triton", "cuda", "eager"]
    assert GATHER_BACKENDS.select(call, "auto").name == "cpp"
    assert GATHER_BACKENDS._by_name["triton"].auto_reasons(call)  # the interpreter is never auto's choice on cpu
    assert GATHER_BACKENDS._by_name["cuda"].auto_reasons(call)  # not yet run on a GPU


def test_forcing_cuda_on_cpu_names_every_reason():
    q = torch.randn(1, 8, 64)
    k = torch.randn(1, 50, 2, 64)
    idx = torch.randint(0, 50, (1, 2, 10), dtype=torch.int32)
    with pytest.raises(LongAttnError, match="cuda") as info:
        gather_decode(q, k, k, idx, backend="cuda")
    assert "cpu" in str(info.value)


# --- bad input ----------------------------------------------------------------

def _good():
    q = torch.randn(2, 8, 32)
    k = torch.randn(2, 20, 2, 32)
    idx = torch.randint(0, 20, (2, 2, 5), dtype=torch.int32)
    return q, k, k.clone(), idx


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpp", marks=requires_cpp)])
def test_bad_input_is_named(backend):
    q, k, v, idx = _good()
    cases = [
        (dict(q=q[0]), ShapeError, "q"),
        (dict(k_cache=k[..., :16]), ShapeError, "headdim"),
        (dict(v_cache=v[:, :10]), ShapeError, "v_cache"),
        (dict(q=torch.randn(2, 7, 32)), ShapeError, "nheads_k"),
        (dict(indices=idx[:, :1]), ShapeError, "indices"),
        (dict(indices=idx[:1]), ShapeError, "indices"),
        (dict(indices=idx.float()), DTypeError, "indices"),
        (dict(k_cache=k.half()), DTypeError, "k_cache"),
        (dict(q=q.double(), k_cache=k.double(), v_cache=v.double()), DTypeError, "q"),
        (dict(indices=torch.full_like(idx, 20)), ArgumentError, "indices"),
        (dict(indices=torch.full_like(idx, -2)), ArgumentError, "indices"),
    ]
    for change, error, word in cases:
        args = dict(q=q, k_cache=k, v_cache=v, indices=idx) | change
        with pytest.raises(error, match=word):
            gather_decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("indices"),
                          backend=backend)


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpp", marks=requires_cpp)])
def test_paged_bad_input_is_named(backend):
    k = torch.randn(6, 4, 2, 32)
    q = torch.randn(2, 8, 32)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    idx = torch.randint(0, 12, (2, 2, 5), dtype=torch.int32)
    gather_decode(q, k, k, idx, block_table=table, backend=backend)  # fine as built
    in_page_2 = torch.full((2, 2, 5), 9, dtype=torch.int32)  # position 9: page 2 of each sequence
    with pytest.raises(ArgumentError, match="pages outside"):
        gather_decode(q, k, k, in_page_2, block_table=torch.tensor([[0, 1, 6], [3, 4, 5]], dtype=torch.int32),
                      backend=backend)
    with pytest.raises(ShapeError, match="block_table"):
        gather_decode(q, k, k, idx, block_table=table[:1], backend=backend)
    with pytest.raises(ArgumentError, match="indices"):
        gather_decode(q, k, k, torch.full_like(idx, 12), block_table=table, backend=backend)


@requires_cpp
def test_cpp_never_reads_out_of_range_rows_even_unchecked():
    # check=False skips the Python range check; the kernel checks each entry itself.
    q, k, v, idx = _good()
    with pytest.raises(ArgumentError, match="indices"):
        gather_decode(q, k, v, torch.full_like(idx, 10**6), backend="cpp", check=False)
    k_paged = torch.randn(6, 4, 2, 32)
    table = torch.tensor([[0, 1, 2], [3, 4, 10**6]], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="page"):
        gather_decode(q, k_paged, k_paged, torch.full((2, 2, 3), 9, dtype=torch.int32), block_table=table,
                      backend="cpp", check=False)


# --- Triton (interpreter on CPU) ----------------------------------------------

def _triton_reason() -> str | None:
    from longattn.kernels.support import triton_support

    reasons = triton_support.machine_reasons()
    return reasons[0] if reasons else None


requires_triton = pytest.mark.skipif(_triton_reason() is not None, reason=f"Triton cannot run: {_triton_reason()}")


@requires_triton
@settings(max_examples=25)
@given(gather_cases(dtypes=(torch.float32, torch.float16), headdims=(16, 24, 59, 72), max_capacity=40, max_n=24,
                    max_batch=2, max_nheads_k=2),
       st.sampled_from([None, 5]))
def test_triton_matches_oracle(case, split_len):
    from longattn.kernels.gather.triton import gather_decode_triton

    _check(case, lambda *a, **kw: gather_decode_triton(*a, **kw, split_len=split_len))


@requires_triton
def test_triton_through_the_registry_splits_long_lists():
    # Default split rule: 1 list of 300 entries -> splits of 256 merged by the second kernel.
    case = GatherCase(1, 320, 300, 1, 4, 16, torch.float32, 16, False, 0.1, 0.0, seed=2)
    _check(case, lambda q, k, v, idx, table, scale, softcap: gather_decode(
        q, k, v, idx, block_table=table, softmax_scale=scale, softcap=softcap, backend="triton"))


# --- CUDA: nvcc compile check, launch arguments, CPU emulation ------------------



@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH (the CUDA source is compile-checked only with it)")
def test_cuda_source_compiles_for_sm80_and_sm90():
    assert_nvcc_compiles(gather_cuda.SOURCE)


@pytest.mark.parametrize("page_size", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_launch_arguments_match_the_kernel_signatures(page_size, dtype):
    case = GatherCase(2, 30, 20, 2, 4, 24, dtype, page_size, False, 0.2, 0.0, seed=1)
    (q, k_cache, v_cache, idx, table), _ = case.build()
    out, lse, launches = gather_cuda.prepare_launches(q, k_cache, v_cache, idx.long(), table, scale=0.2, softcap=0.0,
                                                      split_len=8)
    assert [launch.name.rsplit("_", 1)[0] for launch in launches] == ["gather_partial", "gather_merge"]
    partial, merge = launches
    check_launch_args(macro_params("LONGATTN_GATHER_PARAMS", gather_cuda.SOURCE), partial.args, dtype)
    check_launch_args(macro_params("LONGATTN_GATHER_MERGE_PARAMS", gather_cuda.SOURCE), merge.args, dtype)
    assert partial.grid == (2 * 2, 3 * 1) and merge.grid == (4, 1)
    src = gather_cuda.SOURCE.read_text()
    for name, value in (("kThreads", None), ("kRows", gather_cuda.ROWS), ("kBlockN", gather_cuda.BLOCK_N),
                        ("kMaxDim", gather_cuda.MAX_HEADDIM), ("kMergeCols", gather_cuda.MERGE_COLS)):
        if value is not None:
            assert re.search(rf"constexpr int {name} = {value};", src), f"{name} != {value} in the source"


_EMU_HARNESS = """#include "gather_decode.cu"
#define EMU_LAUNCH(SUFFIX, T)                                                                  \\
  extern "C" void emu_partial_##SUFFIX(int gx, int gy, LONGATTN_GATHER_PARAMS(T)) {           \\
    emu_grid(gx, gy, [&] { gather_partial_##SUFFIX(LONGATTN_GATHER_ARGS); });                   \\
  }                                                                                            \\
  extern "C" void emu_merge_##SUFFIX(int gx, int gy, LONGATTN_GATHER_MERGE_PARAMS(T)) {        \\
    emu_grid(gx, gy, [&] { gather_merge_##SUFFIX(LONGATTN_GATHER_MERGE_ARGS); });               \\
  }
EMU_LAUNCH(f32, float)
EMU_LAUNCH(f16, __half)
EMU_LAUNCH(bf16, __nv_bfloat16)
"""


@pytest.fixture(scope="module")
def emulated():
    """The CUDA source compiled for the decode tests' CPU emulation of the CUDA execution model."""
    from tests.decode.test_decode_cuda import build_emulation

    yield from build_emulation(_EMU_HARNESS, gather_cuda.SOURCE.parent, timeout=180)


def _emulate(lib, q, k_cache, v_cache, idx, table, *, scale, softcap, split_len=None):
    scalar = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float32: ctypes.c_float}
    out, lse, launches = gather_cuda.prepare_launches(q, k_cache, v_cache, idx, table, scale=scale, softcap=softcap,
                                                      split_len=split_len)
    for launch in launches:
        _, kind, suffix = launch.name.split("_")
        c_args = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else scalar[type(a)](a.item())
                  for a in launch.args]
        getattr(lib, f"emu_{kind}_{suffix}")(*(ctypes.c_int(g) for g in launch.grid), *c_args)
    return out, lse


_EMU_CASES = {
    # GatherCase fields: batch, capacity, n, nheads_k, group, headdim, dtype, page_size, per_query, pad, softcap, seed
    "paged3-fp16-gqa4-split": (GatherCase(2, 45, 40, 2, 4, 40, torch.float16, 3, False, 0.3, 0.0, 1), 16),
    "contiguous-bf16-per-query-softcap": (GatherCase(1, 70, 37, 1, 8, 72, torch.bfloat16, None, True, 0.2, 5.0, 2), None),
    "page1-fp32-gqa8-hd256-empty-lists": (GatherCase(1, 20, 12, 2, 8, 256, torch.float32, 1, False, 1.0, 0.0, 3), 5),
    # 24 query heads of one kv head in one list: two row blocks of 16.
    "rows-24-two-row-blocks": (GatherCase(1, 48, 33, 1, 24, 16, torch.float32, 16, False, 0.1, 0.0, 4), 8),
    # Every warp has rows and each CTA loops over 3 blocks with -1 entries in each: a warp that
    # ran ahead into the next block's offsets before another warp read this block's would be seen.
    "rows-16-three-blocks-padded": (GatherCase(1, 120, 80, 1, 16, 32, torch.float32, None, False, 0.3, 0.0, 5),
                                    None),
}


def _check_emulated(lib, case: GatherCase, split_len: int | None) -> None:
    """``case`` in the emulation against the oracle, twice (two schedules): bitwise equal."""
    results = []
    for _ in range(2):
        _check(case, lambda *a, **kw: results.append(_emulate(lib, *a, **kw, split_len=split_len)) or results[-1])
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("name", list(_EMU_CASES))
def test_cuda_kernels_match_oracle_in_cpu_emulation(emulated, name):
    _check_emulated(emulated, *_EMU_CASES[name])


@given(gather_cases(headdims=(16, 24, 59, 72, 128, 256), max_capacity=100, max_n=80, groups=(1, 4, 8, 16)),
       st.sampled_from([None, 1, 3, 8, 16, 40]))
def test_cuda_kernels_match_oracle_in_cpu_emulation_for_any_call(emulated, case, split_len):
    """Drawn calls (up to 3 blocks of 32 entries per list, up to 16 rows: every warp busy) in the
    emulation: against the oracle, and bitwise equal across two schedules."""
    _check_emulated(emulated, case, split_len)


@pytest.mark.parametrize("per_query", [False, True])
def test_page_lists_equal_their_token_lists(per_query):
    # pages_of=P: page p stands for positions p*P .. p*P+P-1, clipped to the sequence's length
    gen = torch.Generator().manual_seed(11)
    batch, nheads, nheads_k, d, page = 2, 8, 2, 16, 4
    q = torch.randn(batch, nheads, d, generator=gen)
    k = torch.randn(batch, 23, nheads_k, d, generator=gen)
    v = torch.randn(batch, 23, nheads_k, d, generator=gen)
    lens = torch.tensor([23, 10], dtype=torch.int32)
    lists = nheads if per_query else nheads_k
    pages = torch.full((batch, lists, 3), -1, dtype=torch.int32)
    pages[0, :, :2] = torch.tensor([5, 1], dtype=torch.int32)  # page 5 = positions 20..22 (length 23)
    pages[1, :, :3] = torch.tensor([0, 2, 1], dtype=torch.int32)  # page 2 = positions 8, 9 (length 10)
    tokens = torch.full((batch, lists, 12), -1, dtype=torch.int32)
    tokens[0, :, :7] = torch.tensor([20, 21, 22, 4, 5, 6, 7], dtype=torch.int32)
    tokens[1, :, :10] = torch.arange(10, dtype=torch.int32)
    out_p, lse_p = gather_decode(q, k, v, pages, pages_of=page, seqlens=lens)
    out_t, lse_t = gather_decode(q, k, v, tokens)
    # the same token sets (order differs): equal within float32 rounding of a reordered sum
    keep = torch.zeros(batch, lists, 23, dtype=torch.bool)
    for b in range(batch):
        for h in range(lists):
            keep[b, h, tokens[b, h][tokens[b, h] >= 0].long()] = True
    mask = keep if per_query else keep.repeat_interleave(nheads // nheads_k, dim=1)
    ref_out, ref_lse = attention_ref(q[:, None], k, v, mask=mask[:, :, None, :])
    assert_close_to_oracle(out_p, ref_out[:, 0], out_t)
    assert_close_to_oracle(lse_p, ref_lse[..., 0], lse_t, name="lse")


def test_page_lists_need_seqlens():
    q, k = torch.randn(1, 2, 8), torch.randn(1, 8, 2, 8)
    pages = torch.zeros(1, 2, 1, dtype=torch.int32)
    with pytest.raises(LongAttnError, match="seqlens"):
        gather_decode(q, k, k, pages, pages_of=4)
    with pytest.raises(ArgumentError, match="pages_of must be an int >= 1"):
        gather_decode(q, k, k, pages, pages_of=0, seqlens=torch.tensor([8]))
    with pytest.raises(ArgumentError, match="pass it with pages_of"):
        gather_decode(q, k, k, pages, seqlens=torch.tensor([8]))
