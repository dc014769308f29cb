"""Helpers shared by the Triton twins' test files: when they can run, the
ahead-of-time GPU compile check, and loading a kernel module without triton."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest
import torch

from longattn.kernels.support import cpp_build

HAS_CUDA = torch.cuda.is_available()
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_skip_reason(import_error: str | None) -> str | None:
    """None when Triton kernels can run: triton imports (``import_error`` is its
    module's reason otherwise) and there is a GPU or the interpreter is on."""
    if import_error is not None:
        return import_error
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET != '1' (it must be set before triton is imported)"
    return None


# Defined in every compile script: each_config(configs, body) runs body(*config)
# for each config in forked children, as many at once as this process may use
# CPUs (each compile is seconds of single-threaded work), and raises naming
# the configs that failed; their tracebacks go to stderr.
_EACH_CONFIG = textwrap.dedent("""
    def each_config(configs, body):
        import os, traceback
        workers = max(1, len(os.sched_getaffinity(0)))
        running, failed = {}, []
        def reap():
            pid, status = os.wait()
            if status != 0:
                failed.append(running[pid])
            del running[pid]
        for config in configs:
            if len(running) >= workers:
                reap()
            pid = os.fork()
            if pid == 0:
                try:
                    body(*config)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            running[pid] = config
        while running:
            reap()
        if failed:
            raise AssertionError(f"failed to compile for {failed}")
""")


def assert_compiles_for_gpu(script: str) -> None:
    """Run ``script`` (which compiles kernels to cubin and prints "compiled") in a
    fresh process without the interpreter; skip when triton has no ptxas here.
    The script may call ``each_config(configs, body)`` (see ``_EACH_CONFIG``)
    to compile its configs side by side.

    The compiled kernels stay in a Triton cache beside longattn's C++ builds
    (``<cache_dir>/triton-aot``), as those do: Triton keys each entry by the
    kernel's source and what it calls, the signature and constants, the target,
    the options and Triton's own version, so a hit is this very kernel compiled
    before, and any edit compiles anew. (Cold, these checks take minutes.)"""
    cache = cpp_build.cache_dir() / "triton-aot"
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _EACH_CONFIG + script], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip(f"triton cannot compile for GPU targets here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


def load_without_triton(module: ModuleType, monkeypatch) -> ModuleType:
    """A fresh copy of kernel ``module`` imported as if triton were not installed
    (a None entry in sys.modules makes ``import triton`` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location(f"_{module.__name__.rsplit('.', 1)[-1]}_without_triton",
                                                  module.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy
