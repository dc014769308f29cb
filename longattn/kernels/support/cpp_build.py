"""Build the C++ CPU kernels of ``csrc/cpu`` on first use, and load them.

The sources have a plain C ABI (pointers, strides, ints), so they compile in
about a second without torch's headers and load with :mod:`ctypes`. The
shared library is cached under ``$LONGATTN_CACHE_DIR`` (default
``~/.cache/longattn``), keyed by a hash of the source and the headers beside it, the compiler's
version, the flags and the CPU model, so an edit or a different machine
rebuilds. Without a compiler, or if the build fails, the reason is returned
and the dispatcher falls back to the PyTorch twins (``longattn doctor``
shows it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[2]  # longattn/
# A wheel carries the sources in longattn/_csrc (setup.py copies them there);
# a source checkout (editable install) has them in csrc/ beside the package.
CSRC_DIRS = (_PACKAGE / "_csrc" / "cpu", _PACKAGE.parent / "csrc" / "cpu")
COMPILERS = ("c++", "g++", "clang++")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BUILD_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """The compiler is missing or failed; the message says which and why."""


def source_path(name: str) -> Path:
    """``csrc/cpu/<name>``: the packaged copy if there is one, else the checkout's."""
    for folder in CSRC_DIRS:
        if (folder / name).is_file():
            return folder / name
    return CSRC_DIRS[-1] / name


def cache_dir() -> Path:
    return Path(os.environ.get("LONGATTN_CACHE_DIR") or Path.home() / ".cache" / "longattn")


def find_compiler() -> str | None:
    env = os.environ.get("CXX")
    if env and shutil.which(env):
        return shutil.which(env)
    return next((shutil.which(c) for c in COMPILERS if shutil.which(c)), None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


@functools.lru_cache(maxsize=None)
def load_library(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (if not cached) and load ``csrc/cpu/<name>``; raises :class:`BuildError`.

    ``extra_flags`` are appended to :data:`FLAGS` (and to the cache key), e.g.
    ``("-mno-avx512f",)`` to build the AVX2 path on an AVX-512 machine: the
    tests use it to check every vector path this machine can run."""
    flags = (*FLAGS, *extra_flags)
    source = source_path(name)
    if not source.is_file():
        raise BuildError(f"the C++ source {source} is missing from this installation")
    compiler = find_compiler()
    if compiler is None:
        raise BuildError(f"no C++ compiler on PATH (looked for $CXX, {', '.join(COMPILERS)})")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{compiler} --version failed: {exc}") from exc
    key = hashlib.sha256(
        "\0".join([source.read_text(), *_headers(source), version, " ".join(flags), _cpu_model()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        # Build into a temporary name, then rename: concurrent first uses
        # (e.g. torchrun ranks) never load a half-written library.
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        except OSError as exc:  # a read-only home, say: the PyTorch twins serve instead
            raise BuildError(f"cannot write the kernel cache {target.parent} ({exc}); "
                             "set LONGATTN_CACHE_DIR to a writable directory") from exc
        os.close(fd)
        try:
            run = subprocess.run(
                [compiler, *flags, str(source), "-o", tmp],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
            )
            if run.returncode != 0:
                first = next((ln for ln in run.stderr.splitlines() if "error" in ln), run.stderr.strip()[:300])
                raise BuildError(f"{compiler} failed to build {source.name}: {first}")
            os.replace(tmp, target)
        except subprocess.SubprocessError as exc:
            raise BuildError(f"{compiler} did not finish building {source.name}: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise BuildError(f"built {target} but could not load it: {exc}") from exc


def _headers(source: Path) -> list[str]:
    """The headers beside ``source`` (csrc/cpu/*.h): part of the cache key, so
    editing a shared header rebuilds every kernel that may include it."""
    return [h.read_text() for h in sorted(source.parent.glob("*.h"))]


def unavailable_reason(name: str) -> str | None:
    """None when ``csrc/cpu/<name>`` builds and loads here, else why not."""
    try:
        load_library(name)
    except BuildError as exc:
        return str(exc)
    return None
