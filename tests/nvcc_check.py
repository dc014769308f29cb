"""The CUDA sources' compile check, shared by their test files: nvcc for
sm_80 and sm_90 with every warning an error (no GPU is needed to compile)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.tool_cache import cache_path

NVCC = shutil.which("nvcc")
FLAGS = ("-c", "-std=c++17", "--Werror", "all-warnings",
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90")


def assert_nvcc_compiles(source: Path) -> None:
    """``nvcc FLAGS source`` succeeds and writes an object file.

    A success is remembered (:func:`tests.tool_cache.cache_path`: nvcc's
    version, the flags, the source with every file beside it -- the headers
    it includes live there): only an edit, or another nvcc, compiles again.
    Cold, each check takes 12-16 s of one core here."""
    marker = cache_path("nvcc-checks", source.stem, ".ok", NVCC, (*FLAGS, source.name), {}, source.parent)
    if marker.exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / f"{source.stem}.o"
        cmd = [NVCC, *FLAGS, "-o", str(obj), str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr}"
        assert obj.stat().st_size > 0, f"nvcc wrote an empty {obj.name}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(" ".join(cmd) + "\n")
