"""The C++ flash kernel's AMX engine (csrc/cpu/flash_amx.h) against the float64 oracle.

It runs twice where it can: on emulated tiles (``-DLONGATTN_AMX_EMULATE``, a
scalar model of the tile instructions that aborts on anything the hardware
would fault on; any CPU with AVX512-BF16) and on real tiles (CPUs with
AMX-TILE + AMX-BF16 whose OS grants the AMX state). The real-instruction
build is also compiled (not run) wherever the compiler knows the flags, so
a machine without AMX still checks that it builds.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.kernels.dense.cpp import (
    AMX_EMULATE, SOURCE, amx_unavailable_reason, choose_math, flash_forward_cpu, flash_unavailable_reason,
    maths_built,
)
from longattn.kernels.support import cpp_build as cb
from longattn.reference import attention_ref
from tests.kernels.test_dense_cpp import _mask
from tests.tolerance import assert_close_to_oracle

AMX_FEATURES = {"amx_tile", "amx_bf16"}
TILE_INSTRUCTIONS = ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease", "tilezero")


def _amx_skip_reason(flags: tuple[str, ...]) -> str | None:
    why = flash_unavailable_reason(flags)
    if why is None:
        why = amx_unavailable_reason(flags)
    return None if why is None else f"the AMX engine cannot run with build flags {flags or '(default)'}: {why}"


# build flags per way of running the engine: emulated tiles, and the default build's real ones.
RUNS = {"emulated": AMX_EMULATE, "real-tiles": ()}


@pytest.mark.parametrize("flags", RUNS.values(), ids=RUNS.keys())
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 100), st.integers(0, 140), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       st.sampled_from([16, 24, 40, 64, 80, 128]), st.integers(-1, 50), st.sampled_from([-1, 0, 3]),
       st.integers(0, 9), st.booleans(), st.sampled_from([0.0, 4.0]), st.integers(0, 2**16))
def test_matches_the_oracle(flags, seqlen_q, seqlen_k, heads, headdim, left, right, sink, causal, softcap, seed):
    """bf16 inputs, GQA, windows, sinks, softcap, odd lengths (partial key and
    row tiles), head dims padded by the caller (24, 40) and inside the engine
    (16, 80: not multiples of 32)."""
    if (why := _amx_skip_reason(flags)) is not None:
        pytest.skip(why)
    nheads, nheads_k = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seqlen_q, nheads, headdim, generator=gen).bfloat16()
    k = torch.randn(1, seqlen_k, nheads_k, headdim, generator=gen).bfloat16()
    v = torch.randn(1, seqlen_k, nheads_k, headdim, generator=gen).bfloat16()
    out, lse = flash_forward_cpu(q, k, v, scale=headdim ** -0.5, window=(left, right), softcap=softcap, sink=sink,
                                 causal=causal, build_flags=flags, math="amx")
    mask = _mask(seqlen_q, seqlen_k, left, right, sink, causal)
    ref_out, ref_lse = attention_ref(q, k, v, softcap=softcap, mask=mask)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


@pytest.mark.parametrize("flags", RUNS.values(), ids=RUNS.keys())
@settings(max_examples=20, deadline=None)
@given(st.integers(1, 120), st.integers(1, 150), st.sampled_from([1, 7, 48, 64]), st.integers(0, 40),
       st.integers(-1, 30), st.integers(0, 5), st.booleans(), st.integers(0, 2**16))
def test_listed_keys_match_the_oracle(flags, seqlen_q, seqlen_k, block_q, n_listed, left, sink, causal, seed):
    """Listed (gathered) keys in any order: K rows copied to the contiguous
    scratch, V rows paired across arbitrary positions."""
    if (why := _amx_skip_reason(flags)) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seqlen_q, 2, 32, generator=gen).bfloat16()
    k, v = (torch.randn(1, seqlen_k, 1, 32, generator=gen).bfloat16() for _ in range(2))
    blocks = -(-seqlen_q // block_q)
    listed = torch.stack([torch.randperm(seqlen_k + 5, generator=gen)[:n_listed] for _ in range(2 * blocks)])
    listed = torch.where(listed >= seqlen_k, -1, listed).reshape(1, 2, blocks, -1).to(torch.int32)
    right = 0 if causal else left
    out, lse = flash_forward_cpu(q, k, v, scale=0.2, window=(left, right), sink=sink, causal=causal, listed=listed,
                                 block_q=block_q, build_flags=flags, math="amx")
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=0.2,
                                     mask=_mask(seqlen_q, seqlen_k, left, right, sink, causal, listed, block_q))
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


@pytest.mark.parametrize("flags", RUNS.values(), ids=RUNS.keys())
def test_long_rows_stay_within_the_rule(flags):
    """P rounded to bf16 over ~1.5k keys per row (many tiles folded into
    one accumulator): still within the tolerance rule."""
    if (why := _amx_skip_reason(flags)) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1536, 1, 64, generator=gen).bfloat16() for _ in range(3))
    q = q[:, -48:]
    out, lse = flash_forward_cpu(q, k, v, scale=0.125, window=(-1, 0), build_flags=flags, math="amx")
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=0.125, causal=True)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


@pytest.mark.parametrize("flags", RUNS.values(), ids=RUNS.keys())
def test_result_does_not_depend_on_the_thread_count(flags):
    """Each thread configures its own tiles; items are computed the same on any of them."""
    if (why := _amx_skip_reason(flags)) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 150, 4, 64, generator=gen).bfloat16() for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flash_forward_cpu(q, k, v, scale=0.125, window=(-1, 0), build_flags=flags, math="amx")
        torch.set_num_threads(2)
        two = flash_forward_cpu(q, k, v, scale=0.125, window=(-1, 0), build_flags=flags, math="amx")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("flags", RUNS.values(), ids=RUNS.keys())
def test_rows_that_see_nothing_get_zero_and_minus_inf(flags):
    """Causal with more queries than keys: the first rows see no key."""
    if (why := _amx_skip_reason(flags)) is not None:
        pytest.skip(why)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 70, 2, 32, generator=gen).bfloat16()
    k, v = (torch.randn(1, 20, 2, 32, generator=gen).bfloat16() for _ in range(2))
    out, lse = flash_forward_cpu(q, k, v, scale=0.2, window=(-1, 0), build_flags=flags, math="amx")
    assert torch.equal(out[:, :50], torch.zeros_like(out[:, :50]))
    assert torch.isneginf(lse[..., :50]).all() and torch.isfinite(lse[..., 50:]).all()
    ref_out, ref_lse = attention_ref(q, k, v, softmax_scale=0.2, causal=True)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


# ---- the emulation itself ------------------------------------------------------------------------

def _emulated_library():
    if (why := _amx_skip_reason(AMX_EMULATE)) is not None:
        pytest.skip(why)
    return cb.build_plan(SOURCE, AMX_EMULATE).library, cb.load_library(SOURCE, AMX_EMULATE)


def test_the_emulation_computes_what_the_spec_says():
    """A small product worked out by hand from Intel's TDPBF16PS pseudocode:
    even/odd lanes, bf16 denormal inputs read as zero, denormal results
    flushed, stores touching only rows x colsb bytes (0 = every check passed)."""
    _, lib = _emulated_library()
    assert lib.longattn_amx_emulate_check(0) == 0


MISUSES = {
    1: "A.colsb / 4 != B.rows",
    2: "more than 16 rows",
    3: "more than 64 bytes per row",
    4: "tiles are not configured",
    5: "the three tiles must differ",
    6: "B.colsb != C.colsb",
    7: "A.rows != C.rows",
    8: "reserved byte",
    9: "tiles are not configured",  # a tile used after TILERELEASE
}


@pytest.mark.parametrize("case", MISUSES, ids=MISUSES.values())
def test_the_emulation_aborts_on_what_the_hardware_faults_on(case):
    library, _ = _emulated_library()
    code = f"import ctypes; ctypes.CDLL({str(library)!r}).longattn_amx_emulate_check({case})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGABRT, (run.returncode, run.stderr)
    assert "longattn AMX emulation" in run.stderr and MISUSES[case] in run.stderr, run.stderr


# ---- builds and reporting ------------------------------------------------------------------------

def test_maths_and_choice_report_the_amx_engine():
    if (why := flash_unavailable_reason()) is not None:
        pytest.skip(f"the flash kernel cannot run here: {why}")
    has_amx = AMX_FEATURES <= cb.cpu_features()
    assert ("amx" in maths_built()) == (has_amx and amx_unavailable_reason() is None)
    if "amx" in maths_built():
        assert choose_math(torch.bfloat16) == "amx"
    else:
        assert amx_unavailable_reason() is not None
        with pytest.raises(cb.BuildError, match="math='amx' cannot run here"):
            choose_math(torch.bfloat16, "amx")
        if not has_amx:
            assert "amx_tile" in amx_unavailable_reason() and "LONGATTN_AMX_EMULATE" in amx_unavailable_reason()
    if _amx_skip_reason(AMX_EMULATE) is None:
        assert "amx" in maths_built(AMX_EMULATE) and amx_unavailable_reason(AMX_EMULATE) is None
        assert choose_math(torch.bfloat16, build_flags=AMX_EMULATE) == "amx"
        assert choose_math(torch.float32, build_flags=AMX_EMULATE) == "fp32"
        with pytest.raises(ValueError, match="takes bfloat16"):
            choose_math(torch.float16, "amx", AMX_EMULATE)


AMX_CPU = frozenset(cb.LEVELS[0].requires | {"mmx", "sse", "sse2", "fxsr"})


@pytest.mark.skipif(not cb._is_x86(), reason="the ISA levels are x86's")
def test_a_cpu_with_amx_gets_the_amx_level_and_one_without_is_refused_it(monkeypatch):
    if cb.find_compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    assert cb.LEVELS[0].name == "amx" and cb.isa_level(AMX_CPU).name == "amx"
    assert cb.isa_level(AMX_CPU - {"amx_bf16"}).name == "avx512bf16"
    monkeypatch.setattr(cb, "cpu_features", lambda: AMX_CPU)
    try:
        plan = cb.build_plan(SOURCE)
    except cb.BuildError as exc:
        pytest.skip(f"the compiler cannot build the amx level: {exc}")
    if plan.isa != "amx":
        pytest.skip(f"{plan.compiler} lacks -mamx-tile/-mamx-bf16: the amx level falls back to {plan.isa}")
    assert {"-mamx-tile", "-mamx-bf16"} <= set(plan.flags) and AMX_FEATURES <= plan.features and not plan.missing
    assert plan.library.name.startswith("flash_cpu-amx-")
    emulated = cb.build_plan(SOURCE, AMX_EMULATE)  # -D flags are part of the cache key
    assert emulated.library != plan.library and "-DLONGATTN_AMX_EMULATE" in emulated.flags
    real = cb.build_features

    def no_amx_compiler(compiler, flags):  # a gcc older than 11
        if "-mamx-tile" in flags:
            raise cb.BuildError(f"{compiler} rejects the flags {' '.join(flags)}: unrecognized -mamx-tile")
        return real(compiler, flags)

    monkeypatch.setattr(cb, "build_features", no_amx_compiler)
    older = cb.build_plan(SOURCE)  # the next level down, not no kernels at all
    assert older.isa == "avx512bf16" and "-mamx-tile" not in older.flags and not older.missing
    monkeypatch.setattr(cb, "build_features", real)
    monkeypatch.setattr(cb, "cpu_features", lambda: AMX_CPU - AMX_FEATURES)
    with pytest.raises(cb.BuildError, match=r"needs amx_bf16, amx_tile, which this CPU lacks"):
        cb.load_library.__wrapped__(SOURCE, ("-mamx-tile", "-mamx-bf16"))


def test_the_real_amx_build_compiles_here(tmp_path):
    """The real-instruction build, compiled (never loaded) with the amx
    level's flags on any machine whose compiler knows them: the tile
    intrinsics, the permission request and the entry points all build, and
    the object holds the tile instructions."""
    compiler = cb.find_compiler()
    if compiler is None or not cb._is_x86():
        pytest.skip("no C++ compiler on PATH, or not x86 (AMX is x86's)")
    level = cb.LEVELS[0]
    flags = (cb.FLAGS[0], *level.flags, *(f for f in cb.FLAGS[1:] if f != "-shared"), "-c")
    try:
        features = cb.build_features(compiler, flags)
    except cb.BuildError as exc:
        pytest.skip(f"{compiler} does not take the amx level's flags {' '.join(level.flags)}: {exc}")
    assert AMX_FEATURES <= features
    obj = tmp_path / "flash_cpu_amx.o"
    run = subprocess.run([compiler, *flags, str(cb.source_path(SOURCE)), "-o", str(obj)],
                         capture_output=True, text=True, timeout=cb.BUILD_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    if shutil.which("objdump") is None:
        pytest.skip("compiled; objdump is not on PATH to look for the tile instructions")
    listing = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True, timeout=60).stdout
    for instruction in TILE_INSTRUCTIONS:
        assert instruction in listing, instruction
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, timeout=60).stdout \
        if shutil.which("nm") else "longattn_flash_cpu_amx_ready"
    assert "longattn_flash_cpu_amx_ready" in symbols


def test_emulated_build_runs_the_tiles_not_the_cpus_amx():
    """The emulated library runs no AMX instruction, whatever level it was
    built at (on an AMX CPU that is the amx level; elsewhere avx512bf16,
    whose record names no AMX feature, so it loads on CPUs without AMX)."""
    library, _ = _emulated_library()
    assert ctypes.CDLL(str(library)).longattn_flash_cpu_amx_ready() == 1
    if not AMX_FEATURES <= cb.cpu_features():
        assert not AMX_FEATURES & cb.recorded_features(library.with_suffix(".json"))
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not on PATH to look for tile instructions in the library")
    listing = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, timeout=120).stdout
    assert "longattn_flash_cpu_amx_ready" in listing
    assert not [i for i in TILE_INSTRUCTIONS if i in listing]
