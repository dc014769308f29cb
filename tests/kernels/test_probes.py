"""The machine-limit probes (csrc/cpu/probes.cpp): sane figures, data really
read, bad arguments named, and no compiler reported rather than raised."""

from __future__ import annotations

import math
import os

import pytest
import torch

from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.kernels.support import cpp_build, probes

REASON = cpp_build.unavailable_reason(probes.SOURCE)
needs_library = pytest.mark.skipif(REASON is not None, reason=f"probes.cpp does not build here: {REASON}")
ISAS = {"avx512", "avx2", "scalar"}


@needs_library
@pytest.mark.parametrize("threads", [None, 1, 2])
def test_fma_peak_is_a_sane_positive_figure(threads):
    probe = probes.fma_peak_gflops(threads=threads, seconds=0.02)
    assert probe.reason is None and probe.isa in ISAS
    assert probe.threads == (cpp_build.kernel_threads() if threads is None else threads)
    # No lower bound: how fast a loaded CI machine runs is not the probe's
    # property (a floor here would be a timing assertion). The ceiling is: no
    # CPU core reaches 1 TFLOP/s fp32 by itself, so a figure above it means the
    # loop was optimised away or the flop count is wrong.
    assert math.isfinite(probe.value) and 0.0 < probe.value <= 1000.0 * probe.threads


@needs_library
def test_fma_peak_uses_the_builds_widest_vectors():
    features = cpp_build.build_plan(probes.SOURCE).features
    expected = "avx512" if "avx512f" in features else "avx2" if {"avx2", "fma"} <= features else "scalar"
    assert probes.fma_peak_gflops(threads=1, seconds=0.01).isa == expected


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("flops", [1, 383, 384, 385, 10**6 + 7, 3e7])
def test_fma_run_runs_at_least_the_flops_asked_in_whole_iterations(flops, threads):
    # One iteration is 12 FMAs on every lane (2 flops each): each thread rounds
    # its share up to whole iterations, never more than one over.
    lanes = {"avx512": 16, "avx2": 8, "scalar": 1}[probes.fma_peak_gflops(threads=1, seconds=0.001).isa]
    per_iteration = 2 * 12 * lanes
    ran = probes.fma_run(flops, threads=threads)
    assert ran >= flops and ran % per_iteration == 0
    assert ran == threads * math.ceil(flops / threads / per_iteration) * per_iteration


def _expected_bf16_arithmetic():
    features = cpp_build.build_plan(probes.SOURCE).features
    # (the OS could refuse AMX state to the process on an AMX CPU: not on these machines)
    if {"amx_tile", "amx_bf16", "avx512_bf16"} <= features:
        return "amx"
    return "avx512bf16" if "avx512_bf16" in features else None


@needs_library
def test_the_bf16_loop_is_the_builds_fastest_bf16_arithmetic():
    assert probes.bf16_arithmetic() == _expected_bf16_arithmetic()


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("flops", [1, 16383, 16384, 16385, 10**7 + 7, 3e8])
def test_bf16_run_runs_at_least_the_flops_asked_in_whole_iterations(flops, threads):
    # One AMX iteration is four 16 x 16 x 32 tile products, one AVX512-BF16
    # iteration 12 dot products of 16 lanes x 2 pairs (2 flops each multiply-add):
    # each thread rounds its share up to whole iterations.
    arithmetic = probes.bf16_arithmetic()
    if arithmetic is None:
        with pytest.raises(RuntimeError, match="no bfloat16 arithmetic here"):
            probes.bf16_run(flops, threads=threads)
        return
    per_iteration = {"amx": 4 * 2 * 16 * 16 * 32, "avx512bf16": 12 * 2 * 16 * 2}[arithmetic]
    ran = probes.bf16_run(flops, threads=threads)
    assert ran >= flops and ran == threads * math.ceil(flops / threads / per_iteration) * per_iteration


@needs_library
@pytest.mark.parametrize("cap, arithmetic", [("avx512bf16", "avx512bf16"), ("avx512", None)])
def test_each_bf16_loop_runs_in_a_build_capped_to_its_level(cap, arithmetic):
    """The AVX512-BF16 loop on an AMX CPU (and none below it): a fresh process
    with LONGATTN_MAX_CPU_ISA builds the probes at that level."""
    import subprocess
    import sys

    if _level_rank(cap) > _level_rank(cpp_build.isa_level().name):
        pytest.skip(f"this CPU has no {cap}: nothing to cap down to")
    script = ("from longattn.kernels.support import probes\n"
              "a = probes.bf16_arithmetic()\n"
              "print(a, probes.bf16_run(1e6, threads=2) if a else probes.fma_run(1e6, threads=2))\n")
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LONGATTN_MAX_CPU_ISA": cap},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    name, ran = run.stdout.split()
    per_iteration = 12 * 2 * 16 * 2 if arithmetic else 12 * 2 * 16
    assert name == str(arithmetic) and float(ran) == 2 * math.ceil(1e6 / 2 / per_iteration) * per_iteration


def _level_rank(name: str) -> int:
    """Index of an ISA level, lowest first."""
    return [level.name for level in reversed(cpp_build.LEVELS)].index(name)


@needs_library
@pytest.mark.parametrize("threads", [None, 1, 2])
def test_stream_read_is_a_sane_positive_figure(threads):
    probe = probes.stream_read_gbs(gib=1 / 64, threads=threads, repeats=2)
    assert probe.reason is None and probe.isa in ISAS
    # No lower bound (a floor is a timing assertion: CI once read 0.75 GB/s for
    # this 16 MiB buffer while the hypervisor took the CPUs). The ceiling is a
    # property: no memory system streams 10 TB/s, so a figure above it means the
    # read was optimised away or the byte count is wrong.
    assert math.isfinite(probe.value) and 0.0 < probe.value <= 10_000.0


@needs_library
@pytest.mark.parametrize("n", [1, 7, 63, 64, 65, 1000, 16384 * 3 + 5])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_stream_read_sums_every_element(n, threads):
    # Small integers: every partial sum is exact in float32, so the sum is
    # exactly the float64 one -- whatever the slicing, vector width and tail.
    data = torch.randint(-8, 9, (n,)).float()
    _, total = probes.read_tensor(data, threads=threads)
    assert total == data.double().sum().item()


@needs_library
def test_stream_read_sum_matches_on_random_data():
    data = torch.rand(1_000_003, generator=torch.Generator().manual_seed(0))
    _, total = probes.read_tensor(data, threads=2, repeats=2)
    assert total == pytest.approx(data.double().sum().item(), rel=1e-6)


@needs_library
@pytest.mark.parametrize("where", [0, 123_457, 500_016, 1_000_002])
def test_a_planted_nan_shows_up_wherever_it_is(where):
    # Each position is in another part of the pass (first slice, mid slice,
    # second thread's slice, the scalar tail): a skipped read would miss it.
    data = torch.ones(1_000_003)
    data[where] = float("nan")
    _, total = probes.read_tensor(data, threads=2)
    assert math.isnan(total)


@pytest.mark.parametrize("threads", [0, -1, True, 1.5, "2"])
def test_bad_threads_are_named(threads):
    for call in (lambda: probes.fma_peak_gflops(threads=threads), lambda: probes.stream_read_gbs(threads=threads),
                 lambda: probes.fma_run(100, threads=threads), lambda: probes.bf16_run(100, threads=threads)):
        with pytest.raises(ArgumentError, match="threads"):
            call()


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan"), float("inf"), 1e6, None, "0.1", True])
def test_bad_seconds_are_named(seconds):
    with pytest.raises(ArgumentError, match="seconds"):
        probes.fma_peak_gflops(seconds=seconds)


@pytest.mark.parametrize("flops", [0, 0.5, -1, float("nan"), float("inf"), 1e16, None, "100", True])
def test_bad_flops_are_named(flops):
    for run in (probes.fma_run, probes.bf16_run):
        with pytest.raises(ArgumentError, match="flops"):
            run(flops)


@pytest.mark.parametrize("gib", [0, -0.5, float("nan"), float("inf"), 1e4, None, False])
def test_bad_gib_is_named(gib):
    with pytest.raises(ArgumentError, match="gib"):
        probes.stream_read_gbs(gib=gib)


@pytest.mark.parametrize("repeats", [0, -3, 2.0, None, True])
def test_bad_repeats_are_named(repeats):
    with pytest.raises(ArgumentError, match="repeats"):
        probes.stream_read_gbs(gib=1 / 1024, repeats=repeats)


@pytest.mark.parametrize("data, error", [
    (torch.ones(8, dtype=torch.float64), DTypeError),
    (torch.ones(2, 8), ShapeError),
    (torch.ones(16)[::2], ShapeError),
    (torch.ones(0), ShapeError),
    ([1.0, 2.0], ArgumentError),
])
def test_bad_data_is_named(data, error):
    with pytest.raises(error, match="data"):
        probes.read_tensor(data)


def test_no_compiler_gives_a_reason_not_an_error(monkeypatch):
    def unavailable():
        raise cpp_build.BuildError("no C++ compiler on PATH (test)")

    monkeypatch.setattr(probes, "_library", unavailable)
    for probe in (probes.fma_peak_gflops(threads=1, seconds=0.01), probes.stream_read_gbs(gib=1 / 1024, threads=1)):
        assert probe.value is None and probe.isa is None and probe.threads == 1
        assert probe.reason == "no C++ compiler on PATH (test)"
