"""``longattn doctor``: what this machine offers longattn, and why not.

Reports the software (python, torch, triton, cupy), the toolchain (nvcc, a
C++ compiler) and, for every primitive's backend registry, which twins can
run here and the reasons the others cannot: the same reasons a forced
backend's error would give. Nothing is imported that is not needed to
answer (triton's version comes from its package metadata).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import torch

from longattn.kernels.support.cpp_build import MAX_ISA_ENV, cpu_model

# Every primitive's backend registry, as (module, attribute). A new primitive
# adds one line; a module that fails to import is reported, not fatal.
REGISTRIES = (
    ("longattn.kernels.dense", "DENSE_BACKENDS"),
    ("longattn.kernels.dense.varlen", "DENSE_VARLEN_BACKENDS"),
    ("longattn.kernels.decode", "DECODE_BACKENDS"),
    ("longattn.kernels.block_sparse", "BLOCK_SPARSE_BACKENDS"),
    ("longattn.kernels.hip_score", "HIP_SCORE_BACKENDS"),
    ("longattn.kernels.gather", "GATHER_BACKENDS"),
    ("longattn.kernels.block_backward", "BLOCK_BACKWARD_BACKENDS"),
)

CXX_COMPILERS = ("c++", "g++", "clang++")
TOOL_TIMEOUT_S = 10


def collect() -> dict[str, Any]:
    """Everything ``longattn doctor`` reports, as a JSON-ready dict."""
    from longattn import __version__

    return {
        "longattn": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "triton": _distribution("triton", "triton"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "LONGATTN_MAX_CPU_ISA": os.environ.get(MAX_ISA_ENV) or None,
        "cupy": _distribution("cupy", "cupy"),
        "distributed_backends": _distributed_backends(),
        "nvcc": _tool("nvcc", "release"),
        "cxx": next((t for t in (_tool(name) for name in CXX_COMPILERS) if t is not None), None),
        "registries": {name: table for name, table in (_registry(*r) for r in REGISTRIES)},
        # after the kernels above are loaded, so the thread line can name their OpenMP runtime
        "cpp_libraries": _cpp_libraries(),
        "cpp_threads": _cpp_threads(),
        "flash_engines": _flash_engines(),
        "hip_search_bf16": _hip_search_bf16(),
    }


def _distributed_backends() -> list[str]:
    """torch.distributed backends this torch build has (longattn.parallel runs on any of them)."""
    import torch.distributed as dist

    if not dist.is_available():
        return []
    checks = (("gloo", dist.is_gloo_available), ("nccl", dist.is_nccl_available), ("mpi", dist.is_mpi_available))
    return [name for name, available in checks if available()]


def _cpp_libraries() -> list[dict[str, Any]]:
    """Each C++ library's ISA build for this CPU and whether it builds, loads and can run here."""
    from longattn.kernels.support import cpp_build

    return [cpp_build.library_status(name) for name in cpp_build.sources()]


def _flash_engines() -> dict[str, str]:
    """The C++ flash kernel's arithmetic per input dtype here (fp32, bf16-dot, amx); empty without the kernel."""
    import torch

    from longattn.kernels.dense import cpp as flash_cpu

    if flash_cpu.flash_unavailable_reason() is not None:
        return {}
    return {str(dtype).removeprefix("torch."): flash_cpu.choose_math(dtype)
            for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def _hip_search_bf16() -> str | None:
    """How the C++ HiP search scores bfloat16 here: ``"amx"`` (AMX tiles),
    ``"bf16-dot"`` (vdpbf16ps) or ``"fp32"`` (widened); None without the search."""
    from longattn.kernels.hip_score import cpp as hip_cpu

    if hip_cpu.score_unavailable_reason() is not None:
        return None
    return hip_cpu.bf16_search_arithmetic()


def _cpp_threads() -> str:
    from longattn.kernels.support.cpp_build import thread_policy

    return thread_policy()


def _distribution(module: str, dist_prefix: str) -> dict[str, Any]:
    """Whether ``module`` is importable and its distribution's version, without
    importing it (``cupy`` ships as ``cupy-cuda12x`` and the like)."""
    installed = importlib.util.find_spec(module) is not None
    version = None
    if installed:
        for dist in importlib.metadata.packages_distributions().get(module, []):
            if dist.lower().startswith(dist_prefix):
                version = importlib.metadata.version(dist)
                version += f" ({dist})" if dist != module else ""
                break
    return {"installed": installed, "version": version}


def _tool(name: str, version_marker: str | None = None) -> dict[str, Any] | None:
    """``name`` on the PATH: its path and the version line of ``name --version``
    (the first line, or the first containing ``version_marker``)."""
    path = shutil.which(name)
    if path is None:
        return None
    try:
        run = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
        lines = [ln.strip() for ln in run.stdout.splitlines() if ln.strip()]
    except (OSError, subprocess.SubprocessError) as exc:
        return {"name": name, "path": path, "version": f"unknown ({type(exc).__name__})"}
    marked = [ln for ln in lines if version_marker and version_marker in ln]
    version = (marked or lines or ["unknown"])[0]
    return {"name": name, "path": path, "version": version}


def _registry(module: str, attribute: str) -> tuple[str, dict[str, Any]]:
    source = f"{module}.{attribute}"
    try:
        registry = getattr(importlib.import_module(module), attribute)
    except Exception as exc:  # a broken registry is a finding, not a crash
        return source, {"source": source, "error": f"{type(exc).__name__}: {exc}", "backends": {}}
    reasons = registry.machine_table()
    backends = {
        b.name: {"usable": not reasons[b.name], "reasons": reasons[b.name], "description": b.description}
        for b in registry.backends
    }
    auto_rules = registry.auto_rules() if hasattr(registry, "auto_rules") else []
    return registry.primitive, {"source": source, "backends": backends, "auto_rules": auto_rules}


def format_report(info: dict[str, Any]) -> str:
    """The human-readable report of :func:`collect`'s dict."""

    def installed(entry: dict[str, Any]) -> str:
        if not entry["installed"]:
            return "not installed"
        return entry["version"] or "installed (version unknown)"

    def tool(entry: dict[str, Any] | None, missing: str) -> str:
        return missing if entry is None else f"{entry['path']} ({entry['version']})"

    devices = ", ".join(info["cuda_devices"])
    rows = [
        ("longattn", info["longattn"]),
        ("python", f"{info['python']} ({info['python_executable']})"),
        ("torch", info["torch"]),
        ("CUDA available", f"yes: {devices}" if info["cuda_available"] else "no"),
        ("threads", f"{info['threads']} torch threads, {info['cpu_count']} CPUs ({info['cpu_model']})"),
        ("triton", installed(info["triton"])),
        ("TRITON_INTERPRET", info["TRITON_INTERPRET"] if info["TRITON_INTERPRET"] is not None else "unset"),
        ("LONGATTN_MAX_CPU_ISA", f"{info['LONGATTN_MAX_CPU_ISA']} (the kernels use no instruction set above it)"
         if info.get("LONGATTN_MAX_CPU_ISA") else "unset"),
        ("cupy", installed(info["cupy"])),
        ("torch.distributed", ", ".join(info["distributed_backends"]) or "not available in this torch build"),
        ("nvcc", tool(info["nvcc"], "not on PATH")),
        ("C++ compiler", tool(info["cxx"], f"none of {', '.join(CXX_COMPILERS)} on PATH")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for primitive, table in info["registries"].items():
        lines += ["", f"{primitive} backends ({table['source']}), in priority order:"]
        if "error" in table:
            lines.append(f"  cannot load: {table['error']}")
            continue
        name_width = max((len(n) for n in table["backends"]), default=0)
        for name, b in table["backends"].items():
            status = "usable" if b["usable"] else "NOT usable"
            lines.append(f"  {name.ljust(name_width)}  {status:<10}  {b['description']}")
            lines += [f"  {'':{name_width}}  {'':10}  - {why}" for why in b["reasons"]]
        if table.get("auto_rules"):
            lines.append("  auto also prefers, on this machine (measured):")
            lines += [f"    - {rule}" for rule in table["auto_rules"]]
    lines += ["", "C++ CPU libraries (csrc/cpu, built per instruction-set level; "
                  "cache $LONGATTN_CACHE_DIR or ~/.cache/longattn):"]
    name_width = max((len(lib["source"]) for lib in info.get("cpp_libraries", [])), default=0)
    for lib in info.get("cpp_libraries", []):
        if lib["isa"] is None:
            build = "no build"
        else:
            can_run = ("this CPU can run it" if not lib["missing"]
                       else f"this CPU CANNOT run it (lacks {', '.join(lib['missing'])})")
            build = f"{lib['isa']} build ({' '.join(f for f in lib['flags'] if f.startswith('-m'))}), {can_run}"
        status = "usable" if lib["reason"] is None else "NOT usable"
        lines.append(f"  {lib['source'].ljust(name_width)}  {status:<10}  {build}")
        lines.append(f"    - {lib['reason']}" if lib["reason"] is not None else f"    {lib['library']}")
    if info.get("flash_engines"):
        engines = ", ".join(f"{dtype} -> {math}" for dtype, math in info["flash_engines"].items())
        lines.append(f"  flash_cpu.cpp arithmetic per input dtype: {engines} (fp32 = float32 FMAs on widened inputs)")
    if info.get("hip_search_bf16"):
        lines.append(f"  hip_score.cpp arithmetic for bfloat16: {info['hip_search_bf16']}")
    if "cpp_threads" in info:
        lines.append(f"  threads: {info['cpp_threads']}")
    return "\n".join(lines)
