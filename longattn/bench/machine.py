"""What machine produced a set of numbers (stored with every result).

Absolute times mean little without the machine they came from; ratios
measured in one run are what to compare across machines.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

from longattn.bench.scenarios import Method, MethodUnavailable
from longattn.kernels.support.cpp_build import cpu_model

# The compute-bound cases' limit as a method (see fma_peak_method), and the
# bfloat16 cases' (bf16_peak_method).
FMA_PEAK = "fma peak"
BF16_PEAK = "bf16 peak"


def cpu_description() -> str:
    """``"<model> (<ISA flags of interest>)"``: which CPU a figure came from."""
    from longattn.parallel.cost_model import cpu_facts

    model, isa = cpu_facts()
    return f"{model} ({', '.join(isa) or 'no AVX2'})"


def machine_info() -> dict[str, object]:
    """A JSON-ready description of this machine and software."""
    from longattn import __version__

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "longattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "executable": sys.executable,
    }


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Memory read bandwidth in GB/s: the median time of ``torch.sum`` over
    ``gib`` GiB of float32 (the figure ../shared/MACHINE.md quotes), so
    memory-bound kernels can be reported as a fraction of it, in one run."""
    import time

    data = torch.ones(int(gib * (1 << 30)) // 4)
    data.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / sorted(times)[len(times) // 2] / 1e9


def measure_stream_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, object]:
    """The fair read-bandwidth limit for memory-bound kernels: the C++
    multi-threaded streaming read (:func:`longattn.kernels.support.probes.stream_read_gbs`,
    every kernel thread reading one contiguous slice of a fresh ``gib`` GiB
    float32 buffer, best of ``repeats`` passes). ``{"gbps", "gib", "threads",
    "isa"}``, or ``{"gbps": None, "reason"}`` when the probes library cannot
    be built here (no compiler): the caller then falls back to
    :func:`measure_read_bandwidth` and says so."""
    from longattn.kernels.support.probes import stream_read_gbs

    probe = stream_read_gbs(gib=gib, repeats=repeats)
    if probe.value is None:
        return {"gbps": None, "reason": probe.reason}
    return {"gbps": probe.value, "gib": gib, "threads": probe.threads, "isa": probe.isa}


def measure_fma_peak(seconds: float = 0.3, tries: int = 3) -> dict[str, object]:
    """The machine's fp32 FMA peak over the kernels' threads (a register-only
    loop in the C++ probes library, :mod:`longattn.kernels.support.probes`):
    ``{"gflops", "isa", "threads"}``, or ``{"gflops": None, "reason"}`` when the
    library cannot be built here. Compute-bound cases report their GFLOP/s as a
    fraction of it. The best of ``tries`` probes: a peak is a maximum, and a
    busy core (another process) only ever lowers a probe."""
    from longattn.kernels.support.probes import fma_peak_gflops

    probes = [fma_peak_gflops(seconds=seconds) for _ in range(tries)]
    probe = max(probes, key=lambda p: -1.0 if p.value is None else p.value)
    if probe.value is None:
        return {"gflops": None, "reason": probe.reason}
    return {"gflops": probe.value, "isa": probe.isa, "threads": probe.threads}


def fma_peak_method(flops) -> Method:
    """A compute-bound case's FMA peak as a method: the register-only loop of
    :func:`measure_fma_peak` run for the case's own flop count
    (``flops(inputs)``, :func:`longattn.kernels.support.probes.fma_run`) in
    the same interleaved rounds as the kernels, so its median GFLOP/s is the
    peak they meet at the same moments (this VM's speed moves by 2x within
    minutes; a probe at the start of the run is another moment). Like the
    kernels (a static split of the work), it gives each thread an equal share
    and waits for the slowest. Its output (the flops run) is not attention:
    not compared. Skipped, with the reason, where the probes library does not
    build."""
    from longattn.kernels.support.probes import fma_run

    def choose():
        fma_run(1)  # builds the library, or raises BuildError
        return fma_run, "FMA"

    return _limit_loop_method(FMA_PEAK, "FMA", flops, choose)


def bf16_peak_method(flops) -> Method:
    """:func:`fma_peak_method` for bfloat16 cases: the register-only loop of
    this machine's fastest bf16 arithmetic (:func:`longattn.kernels.support.
    probes.bf16_run`: AMX tiles, else AVX512-BF16 dot products) run for the
    case's flops in the same rounds; where the CPU has neither, bf16 is
    computed in float32 and the FMA loop is the limit. Its row's note names
    the loop."""
    from longattn.kernels.support.probes import bf16_arithmetic, bf16_run, fma_run

    def choose():
        arithmetic = bf16_arithmetic()
        what = {"amx": "AMX tile (TDPBF16PS)", "avx512bf16": "AVX512-BF16 dot-product (VDPBF16PS)",
                None: "fp32 FMA (bf16 runs in fp32 in this build)"}[arithmetic]
        return (fma_run if arithmetic is None else bf16_run), what

    return _limit_loop_method(BF16_PEAK, "bf16", flops, choose)


def _limit_loop_method(name: str, kind: str, flops, choose) -> Method:
    """A yardstick row: ``choose()`` gives (loop, what it is) -- a probes
    function that runs at least the flops asked, or raises BuildError, which
    skips the row -- run for ``flops(inputs)`` in the kernels' rounds."""
    from longattn.kernels.support import cpp_build

    def build(inputs):
        try:
            loop, what = choose()
        except cpp_build.BuildError as exc:
            raise MethodUnavailable(f"C++ {kind} loop unavailable: {exc}") from exc
        work = flops(inputs)

        def run(_inputs) -> torch.Tensor:
            return torch.tensor(loop(work))

        run.note = f"the limit: register-only {what} loop of the case's flops, same rounds"
        return run

    return Method(name, build, compare=False)
