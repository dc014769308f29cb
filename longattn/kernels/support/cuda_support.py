"""What the CUDA twins share: finding a ``.cu`` source, saying why a twin
cannot run, compiling it once per device with NVRTC (through cupy, an
optional dependency: imported only when a kernel is built), passing torch
tensors to cupy, and the record of one kernel launch.

A wheel carries the sources in ``longattn/_csrc/cuda`` (setup.py copies them
there); a source checkout (editable install) has them in ``csrc/cuda`` beside
the package.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parents[2]  # longattn/


def cuda_source(name: str) -> Path:
    """The path of ``csrc/cuda/<name>`` (the wheel's copy first)."""
    candidates = (_PACKAGE / "_csrc" / "cuda" / name, _PACKAGE.parent / "csrc" / "cuda" / name)
    return next((p for p in candidates if p.is_file()), candidates[1])


def cuda_unavailable_reason(source: Path) -> str | None:
    """None when a CUDA twin built from ``source`` can run here, else a one-line
    reason. Imports nothing heavy."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install 'longattn[cuda]')"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not source.is_file():
        return f"the CUDA source {source} is missing (neither longattn/_csrc nor a checkout's csrc/ has it)"
    return None


@functools.cache
def compiled_module(source: Path, device_index: int):
    """``source`` compiled for one device (NVRTC compiles for that device's arch;
    cupy also caches the binary on disk). A compile cache, not state."""
    import cupy

    with cupy.cuda.Device(device_index):
        # -I: the sources include their shared header (cuda_common.cuh) from their own directory
        module = cupy.RawModule(code=source.read_text(), options=("--std=c++17", f"-I{source.parent}"))
        module.compile()
        return module


def kernel_pair(source: Path, device_index: int, partial: str, merge: str, smem: int):
    """The partial and merge kernels of ``source``; the partial kernel opts in to
    ``smem`` bytes of dynamic shared memory beyond the default 48 KB limit."""
    module = compiled_module(source, device_index)
    partial_fn, merge_fn = module.get_function(partial), module.get_function(merge)
    if smem > 48 * 1024:  # (headdim > ~150; H100/A100 allow >= 163 KB)
        partial_fn.max_dynamic_shared_size_bytes = smem
    return partial_fn, merge_fn


def to_cupy(t: torch.Tensor):
    """A cupy view of a torch tensor (DLPack, zero copy; 16-bit floats as int16)."""
    import cupy

    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return cupy.from_dlpack(t)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: entry point, grid, arguments in the kernel's parameter
    order (tensors for pointers; numpy int64/int32/float32 for scalars)."""

    name: str
    grid: tuple[int, ...]
    args: tuple
    shared_mem: int
