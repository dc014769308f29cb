"""The C++ CPU flash kernel against the float64 oracle, in every vector build and math engine this machine runs.

The dense twin ``cpp`` is also run through tests/test_attention.py; here the
kernel's own features (attention sinks with a left window, both vector
widths, the float32 and native bfloat16 engines, thread-count independence)
and its availability reporting.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.kernels.dense.cpp import (
    amx_unavailable_reason, choose_math, flash_forward_cpu, flash_unavailable_reason, flash_varlen_forward_cpu,
    maths_built,
)
from longattn.kernels.support.cpp_build import cpu_features
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle

# The AVX-512 build (where the CPU has it) and the AVX2 build.
BUILDS = [(), ("-mno-avx512f",)]
# (build flags, math) pairs covering every engine: the default build's own
# choice (bf16 dot products or AMX for bfloat16 where the CPU has them), its
# float32 engine on the same inputs, AVX-512 without the bf16 dot, and AVX2.
ENGINES = {
    "default": ((), "auto"),
    "default-fp32": ((), "fp32"),
    "avx512-without-bf16-dot": (("-mno-avx512bf16",), "auto"),
    "avx2": (("-mno-avx512f",), "auto"),
    # the AMX engine on emulated tiles (any AVX512-BF16 CPU; tests/kernels/test_dense_amx.py runs the real ones)
    "amx-emulated": (("-DLONGATTN_AMX_EMULATE",), "amx"),
}


def _skip_reason(flags: tuple[str, ...], math: str = "auto") -> str | None:
    reason = flash_unavailable_reason(flags)
    if reason is None and math == "amx":
        reason = amx_unavailable_reason(flags)
    return None if reason is None else f"the flash kernel cannot run with build flags {flags}: {reason}"


def _dtypes(math: str) -> list[torch.dtype]:
    """The input dtypes an engine takes: the native bf16 engines only bfloat16."""
    return [torch.float32, torch.bfloat16] if math in ("auto", "fp32") else [torch.bfloat16]


def _mask(seqlen_q, seqlen_k, left, right, sink, causal, listed=None, block_q=1):
    """The kernel's rule: (not causal or j <= p) and (j in the window (left, right),
    flash-attn's with -1 unbounded, or j < sink, or j listed for the row's block)."""
    p = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    j = torch.arange(seqlen_k)[None, :]
    in_window = ((j >= p - left) | (left < 0)) & ((j <= p + right) | (right < 0))
    mask = in_window | (j < sink)
    if listed is not None:  # (batch, nheads, blocks, n) positions -> (batch, nheads, seqlen_q, seqlen_k)
        batch, nheads, blocks, _ = listed.shape
        hit = torch.zeros(batch, nheads, blocks, seqlen_k + 1, dtype=torch.bool)
        hit.scatter_(-1, torch.where(listed < 0, seqlen_k, listed).long(), True)
        mask = mask | hit[..., :seqlen_k][:, :, torch.arange(seqlen_q) // block_q]
    if causal:
        mask = mask & (j <= p)
    return mask


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 130), st.integers(0, 130), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       st.sampled_from([8, 16, 40, 64, 128]), st.integers(-1, 50), st.sampled_from([-1, 0, 3]), st.integers(0, 9),
       st.booleans(), st.sampled_from([0.0, 4.0]), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**16))
def test_matches_the_oracle(engine, seqlen_q, seqlen_k, heads, headdim, left, right, sink, causal, softcap, dtype,
                            seed):
    flags, math = engine
    if (why := _skip_reason(flags, math)) is not None:
        pytest.skip(why)
    dtype = dtype if dtype in _dtypes(math) else torch.bfloat16
    nheads, nheads_k = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen_q, nheads, headdim, generator=gen).to(dtype)
    k = torch.randn(2, seqlen_k, nheads_k, headdim, generator=gen).to(dtype)
    v = torch.randn(2, seqlen_k, nheads_k, headdim, generator=gen).to(dtype)
    out, lse = flash_forward_cpu(q, k, v, scale=headdim ** -0.5, window=(left, right), softcap=softcap, sink=sink,
                                 causal=causal, build_flags=flags, math=math)
    mask = _mask(seqlen_q, seqlen_k, left, right, sink, causal)
    ref_out, ref_lse = attention_ref(q, k, v, softcap=softcap, mask=mask)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.sampled_from([(1, 1), (2, 1)]), st.sampled_from([1, 7, 48, 64]),
       st.integers(0, 40), st.integers(-1, 30), st.integers(0, 5), st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**16))
def test_listed_keys_match_the_oracle(engine, seqlen_q, seqlen_k, heads, block_q, n_listed, left, sink, causal,
                                      dtype, seed):
    """Block-sparse mode: per block of block_q query rows, listed key
    positions (-1 padding, in any order, so tiles of gathered keys pair
    arbitrary rows for the bf16 engines) seen besides the window and sinks."""
    flags, math = engine
    if (why := _skip_reason(flags, math)) is not None:
        pytest.skip(why)
    dtype = dtype if dtype in _dtypes(math) else torch.bfloat16
    nheads, nheads_k = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seqlen_q, nheads, 32, generator=gen).to(dtype)
    k = torch.randn(1, seqlen_k, nheads_k, 32, generator=gen).to(dtype)
    v = torch.randn(1, seqlen_k, nheads_k, 32, generator=gen).to(dtype)
    blocks = -(-seqlen_q // block_q)
    listed = torch.stack([torch.randperm(seqlen_k + 5, generator=gen)[:n_listed] for _ in range(nheads * blocks)])
    listed = torch.where(listed >= seqlen_k, -1, listed).reshape(1, nheads, blocks, -1).to(torch.int32)
    right = 0 if causal else left
    out, lse = flash_forward_cpu(q, k, v, scale=0.2, window=(left, right), sink=sink, causal=causal, listed=listed,
                                 block_q=block_q, build_flags=flags, math=math)
    mask = _mask(seqlen_q, seqlen_k, left, right, sink, causal, listed, block_q)
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=0.2, mask=mask)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
def test_short_items_after_long_ones_give_the_bits_of_a_fresh_call(engine):
    """Items shorter than a full work item score only the row vectors they
    use; on one thread, packed sequences of 48, 16, 70, 5, 33 and 1 rows run
    full, short and partial items back to back in one engine. Each sequence
    must come out bit for bit as when it is computed alone (no lane of an
    earlier item leaks in), and match the oracle (softcap and a window: masked tiles)."""
    flags, math = engine
    if (why := _skip_reason(flags, math)) is not None:
        pytest.skip(why)
    lengths = [48, 16, 70, 5, 33, 1]
    gen = torch.Generator().manual_seed(3)
    for dtype in _dtypes(math):
        q, k, v = (torch.randn(sum(lengths), 2, 32, generator=gen).to(dtype) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        options = dict(scale=0.3, window=(20, 0), softcap=5.0, build_flags=flags, math=math)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            out, lse = flash_varlen_forward_cpu(q, k, v, cu, cu, max(lengths), max(lengths), **options)
            for i, n in enumerate(lengths):
                rows = slice(int(cu[i]), int(cu[i + 1]))
                alone, alone_lse = flash_forward_cpu(q[None, rows], k[None, rows], v[None, rows], **options)
                assert torch.equal(out[rows], alone[0]), f"sequence {i} ({n} rows) differs from a fresh call"
                assert torch.equal(lse[:, rows], alone_lse[0])
                ref_out, ref_lse = attention_ref(q[None, rows], k[None, rows], v[None, rows], softmax_scale=0.3,
                                                 window_size=(20, 0), softcap=5.0, causal=True)
                assert_close_to_oracle(alone, ref_out, ref_out)
                assert_close_to_oracle(alone_lse, ref_lse, ref_lse, name="lse")
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("flags", BUILDS, ids=["default", "avx2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_fp32_engine_on_half_inputs_gives_the_bits_of_widened_inputs(flags, dtype):
    """The float32 engine reads bf16/fp16 K/V in place and widens them per
    tile (no float32 copy): bitwise what float32 inputs of the same values
    give, over a window, sinks, listed keys and a long key span (head-major copies)."""
    if (why := _skip_reason(flags)) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(5)
    for seqlen, options in ((130, dict(window=(40, 0), sink=3, softcap=4.0)),
                            (8300, dict(window=(-1, 0)))):
        q, k, v = (torch.randn(1, seqlen, 2, 64, generator=gen).to(dtype) for _ in range(3))
        if seqlen > 1000:  # a long span: only the last rows, to keep it quick
            q = q[:, -50:]
        half, half_lse = flash_forward_cpu(q, k, v, scale=0.2, build_flags=flags, math="fp32", **options)
        wide, wide_lse = flash_forward_cpu(q.float(), k.float(), v.float(), scale=0.2, build_flags=flags,
                                           math="fp32", **options)
        assert half.dtype == dtype and torch.equal(half, wide.to(dtype)) and torch.equal(half_lse, wide_lse)
    blocks = torch.tensor([[[[5, 17, -1], [60, 2, 90]]]], dtype=torch.int32).expand(1, 2, 2, 3).contiguous()
    q, k, v = (torch.randn(1, 100, 2, 64, generator=gen).to(dtype) for _ in range(3))
    listed = dict(window=(10, 0), causal=True, listed=blocks, block_q=64)
    half, half_lse = flash_forward_cpu(q, k, v, scale=0.2, build_flags=flags, math="fp32", **listed)
    wide, wide_lse = flash_forward_cpu(q.float(), k.float(), v.float(), scale=0.2, build_flags=flags, math="fp32",
                                       **listed)
    assert torch.equal(half, wide.to(dtype)) and torch.equal(half_lse, wide_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_does_not_depend_on_the_thread_count(dtype):
    if (why := _skip_reason(())) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 4, 64, generator=gen).to(dtype) for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flash_forward_cpu(q, k, v, scale=0.125, window=(-1, 0))
        torch.set_num_threads(2)
        two = flash_forward_cpu(q, k, v, scale=0.125, window=(-1, 0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_the_bf16_dot_engine_is_built_where_the_cpu_has_avx512_bf16():
    """The default build has the native bf16 engine exactly when the CPU does,
    and auto sends bfloat16 there; float32 and float16 stay on float32 math."""
    if (why := _skip_reason(())) is not None:
        pytest.skip(why)
    has = {"avx512f", "avx512_bf16"} <= cpu_features()
    assert ("bf16-dot" in maths_built()) == has
    assert choose_math(torch.bfloat16) in (("amx", "bf16-dot") if has else ("fp32", "amx"))
    assert choose_math(torch.float32) == choose_math(torch.float16) == "fp32"
    assert "bf16-dot" not in maths_built(("-mno-avx512bf16",))


def test_math_errors_name_the_engine():
    if (why := _skip_reason(())) is not None:
        pytest.skip(why)
    with pytest.raises(ValueError, match="math must be"):
        choose_math(torch.bfloat16, "tensor-cores")
    if "bf16-dot" in maths_built():
        with pytest.raises(ValueError, match="takes bfloat16"):
            choose_math(torch.float32, "bf16-dot")
    with pytest.raises(Exception, match="not in this build"):
        choose_math(torch.bfloat16, "bf16-dot", ("-mno-avx512bf16",))


def test_bf16_engine_error_stays_within_the_rule_on_long_rows():
    """The bf16 engines round P to bfloat16 for P V (relative error <= 2**-9
    per weight, independent across keys): over 4k keys the output error must
    still be within the tolerance rule, i.e. dominated by the output's own rounding."""
    if (why := _skip_reason(())) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4096, 1, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    q = q[:, -64:]  # the last 64 queries, each over ~4k keys
    out, lse = flash_forward_cpu(q, k, v, scale=0.125, window=(-1, 0))
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=0.125, causal=True)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_a_build_without_avx2_reports_itself_unavailable():
    reason = flash_unavailable_reason(("-mno-avx2", "-mno-fma", "-mno-avx512f"))
    assert reason is not None and ("AVX2" in reason or "compiler" in reason)


@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (40, 0)])
def test_head_major_copies_give_the_same_bits(monkeypatch, window):
    """Long key spans read K/V from head-major copies (a speed choice); the
    result must not change by a bit. The threshold is lowered to reach it."""
    from longattn.kernels.dense import cpp as flash_cpu

    if (why := _skip_reason(())) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 70, 4, 32, generator=gen)
    k, v = (torch.randn(1, 90, 2, 32, generator=gen) for _ in range(2))
    token_major = flash_forward_cpu(q, k, v, scale=0.2, window=window)
    monkeypatch.setattr(flash_cpu, "HEAD_MAJOR_MIN_KEYS", 16)
    monkeypatch.setattr(flash_cpu, "HEAD_MAJOR_MIN_ROWS", 16)
    head_major = flash_forward_cpu(q, k, v, scale=0.2, window=window)
    assert torch.equal(token_major[0], head_major[0]) and torch.equal(token_major[1], head_major[1])
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=0.2, window_size=window)
    assert_close_to_oracle(head_major[0], ref_out, ref_out)
    assert_close_to_oracle(head_major[1], ref_lse, ref_lse, name="lse")


def test_listed_keys_read_from_head_major_copies_give_the_same_bits(monkeypatch):
    """Block-sparse calls (listed keys, a short window: HiP's) read K/V from
    head-major copies too; the decision is taken and changes no bit."""
    from longattn.kernels.dense import cpp as flash_cpu

    if (why := _skip_reason(())) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 70, 4, 32, generator=gen)
    k, v = (torch.randn(1, 90, 2, 32, generator=gen) for _ in range(2))
    listed = torch.randint(-1, 90, (1, 4, 3, 8), generator=gen, dtype=torch.int32)
    call = dict(scale=0.2, window=(7, 0), sink=3, causal=True, listed=listed, block_q=32)
    assert not flash_cpu.reads_head_major(70, 90, 4, 2, (7, 0), listed=True)
    token_major = flash_forward_cpu(q, k, v, **call)
    monkeypatch.setattr(flash_cpu, "HEAD_MAJOR_MIN_KEYS", 16)
    monkeypatch.setattr(flash_cpu, "HEAD_MAJOR_MIN_ROWS", 16)
    assert flash_cpu.reads_head_major(70, 90, 4, 2, (7, 0), listed=True)
    assert not flash_cpu.reads_head_major(70, 90, 4, 2, (7, 0), listed=False)  # a short window alone: as it is
    head_major = flash_forward_cpu(q, k, v, **call)
    assert torch.equal(token_major[0], head_major[0]) and torch.equal(token_major[1], head_major[1])


def test_output_is_contiguous_for_padded_head_dims():
    if (why := _skip_reason(())) is not None:
        pytest.skip(why)
    q = torch.randn(1, 9, 2, 40)
    out, lse = flash_forward_cpu(q, q, q, scale=0.1, window=(-1, 0))
    assert out.is_contiguous() and out.shape == q.shape and lse.is_contiguous()


def test_an_unwritable_kernel_cache_is_a_build_error_not_a_crash(tmp_path, monkeypatch):
    """A read-only cache directory makes the C++ kernels unavailable (with the
    reason), so callers fall back to the PyTorch twins instead of failing."""
    from longattn.kernels.support.cpp_build import BuildError, load_library

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(BuildError, match="LONGATTN_CACHE_DIR"):
        load_library("flash_cpu.cpp", ("-DLONGATTN_CACHE_TEST",))  # a flag no cached build has
