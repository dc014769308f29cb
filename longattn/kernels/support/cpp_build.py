"""Build the C++ CPU kernels of ``csrc/cpu`` on first use, and load them.

The sources have a plain C ABI (pointers, strides, ints), so they compile in
a few seconds without torch's headers and load with :mod:`ctypes`.

Instruction sets. A kernel is never built with ``-march=native``: that bakes
in whatever the building CPU has, and the library then dies with SIGILL on a
CPU that lacks it (a home directory shared between an AVX-512 and an
AVX2-only machine, a VM that hides AVX-512). Instead :func:`isa_level` picks
the highest of a few explicit levels (:data:`LEVELS`: ``amx`` =
``-march=x86-64-v4 -mavx512bf16 -mamx-tile -mamx-bf16``, ``avx512bf16`` =
``-march=x86-64-v4 -mavx512bf16``, ``avx512`` = ``x86-64-v4``, ``avx2`` =
``x86-64-v3``, ``x86-64``; spelled ``-mavx2 -mfma ...`` for compilers that
predate those names; a compiler that knows neither spelling of a level, e.g.
one without ``-mamx-tile``, builds the next level down) whose features this
CPU has (``/proc/cpuinfo``'s flags, which the kernel clears for what the OS
does not enable), and tunes
for this CPU (``-mtune=``, resolved from ``native``; tuning never adds
instructions). The compiler is then asked which ISA macros those flags -- plus
the caller's ``extra_flags``, e.g. ``("-mno-avx512f",)`` -- define
(``-dM -E``), which gives the exact features the build may use, in
``/proc/cpuinfo``'s names (:func:`build_features`).

Cache. Libraries live in ``$LONGATTN_CACHE_DIR`` (default
``~/.cache/longattn``) as ``<stem>-<isa>-<hash>.so``, e.g.
``flash_cpu-avx512bf16-0123456789abcdef.so``; the hash covers the source and
the headers beside it, the compiler's version, the flags and the feature
list, so an edit, another compiler, ISA level or tuning target builds anew, and
one cache holds a build per level (and -mtune) side by side. Beside each library a sidecar
``<same name>.json`` records its ISA, features and flags.

Loading. Before a library is loaded its recorded features are checked
against this CPU's: a library whose sidecar is missing, unreadable or names
a feature this CPU lacks is rebuilt, and a build whose flags themselves ask
for a missing feature is refused with a :class:`BuildError` naming it. So a
library that could SIGILL is never loaded. Without a compiler, or if the
build fails, the reason is raised as :class:`BuildError` and the dispatcher
falls back to the PyTorch twins (``longattn doctor`` shows the reason, and
each library's ISA: :func:`library_status`).

Threads. Each kernel takes its OpenMP thread count as an argument:
:func:`kernel_threads`, i.e. ``torch.get_num_threads()``, so the kernels never
run more threads than torch's own ops. With torch's bundled GNU libgomp
(same soname as the system's) the kernels share torch's OpenMP runtime and
thread pool. In a process forked from one that ran a parallel region, GNU
libgomp hangs on the next region of more than one thread (the parent's pool
threads do not exist in the child), so in a forked child the kernels run on
one thread (:func:`os.register_at_fork`); their results do not depend on the
thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from longattn.errors import ArgumentError

_PACKAGE = Path(__file__).resolve().parents[2]  # longattn/
# A wheel carries the sources in longattn/_csrc (setup.py copies them there);
# a source checkout (editable install) has them in csrc/ beside the package.
CSRC_DIRS = (_PACKAGE / "_csrc" / "cpu", _PACKAGE.parent / "csrc" / "cpu")
COMPILERS = ("c++", "g++", "clang++")
# Everything but the instruction set and tuning, which isa_level() and
# native_tune() add per CPU.
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BUILD_TIMEOUT_S = 120
PROBE_TIMEOUT_S = 30


class BuildError(RuntimeError):
    """The compiler is missing or failed, or this CPU cannot run the build; the message says which and why."""


# ---------------------------------------------------------------- ISA levels

_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class IsaLevel:
    """One build target: its readable name, compiler flags, and the
    ``/proc/cpuinfo`` flags a CPU needs to run what those flags allow."""

    name: str
    flags: tuple[str, ...]
    requires: frozenset[str]
    # The same level spelled feature by feature, for compilers older than
    # the x86-64-v3/v4 names (gcc < 11, clang < 12).
    portable_flags: tuple[str, ...] = ()


_V3_FLAGS = ("-march=x86-64", "-msse3", "-mssse3", "-msse4.1", "-msse4.2", "-mpopcnt", "-mcx16", "-msahf",
             "-mavx", "-mavx2", "-mbmi", "-mbmi2", "-mf16c", "-mfma", "-mlzcnt", "-mmovbe", "-mxsave")
_V4_FLAGS = (*_V3_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl")
_AMX = _V4 | {"avx512_bf16", "amx_tile", "amx_bf16"}
_AMX_FLAGS = ("-mavx512bf16", "-mamx-tile", "-mamx-bf16")
# Highest first. The kernels' vector paths (csrc/cpu/simd.h) key on AVX2+FMA,
# AVX512F and AVX512BF16, and the flash kernel's AMX engine (flash_amx.h) on
# AMX-TILE + AMX-BF16, so these are the levels worth a build of their own.
LEVELS = (
    IsaLevel("amx", ("-march=x86-64-v4", *_AMX_FLAGS), _AMX, (*_V4_FLAGS, *_AMX_FLAGS)),
    IsaLevel("avx512bf16", ("-march=x86-64-v4", "-mavx512bf16"), _V4 | {"avx512_bf16"}, (*_V4_FLAGS, "-mavx512bf16")),
    IsaLevel("avx512", ("-march=x86-64-v4",), _V4, _V4_FLAGS),
    IsaLevel("avx2", ("-march=x86-64-v3",), _V3, _V3_FLAGS),
    IsaLevel("x86-64", ("-march=x86-64",), frozenset()),
)
# Not x86: no vector path, so a portable build (the compiler's default target).
GENERIC = IsaLevel("generic", (), frozenset())
# Readable names of what a build actually enables (extra flags can lower a
# level, e.g. -mno-avx512f): the first whose features the build has.
_LABELS = (
    ("amx", _AMX), ("avx512bf16", _V4 | {"avx512_bf16"}), ("avx512", _V4), ("avx2", _V3),
    ("avx", _V2 | {"avx"}), ("sse4.2", _V2),
)

# The compiler's ISA macros (gcc and clang ``-dM -E``), in /proc/cpuinfo's
# names. A macro not listed here (an exotic extension passed in extra_flags)
# is not checked; every macro the levels above can define is.
MACRO_FEATURES = {
    "__MMX__": "mmx", "__SSE__": "sse", "__SSE2__": "sse2", "__FXSR__": "fxsr",
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__CRC32__": "sse4_2", "__POPCNT__": "popcnt", "__GCC_HAVE_SYNC_COMPARE_AND_SWAP_16": "cx16",
    "__LAHF_SAHF__": "lahf_lm", "__SSE4A__": "sse4a", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma",
    "__FMA4__": "fma4", "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__LZCNT__": "abm",
    "__ABM__": "abm", "__MOVBE__": "movbe", "__XSAVE__": "xsave", "__XSAVEOPT__": "xsaveopt",
    "__XSAVEC__": "xsavec", "__XSAVES__": "xsaves", "__PCLMUL__": "pclmulqdq", "__AES__": "aes",
    "__SHA__": "sha_ni", "__RDRND__": "rdrand", "__RDSEED__": "rdseed", "__ADX__": "adx",
    "__FSGSBASE__": "fsgsbase", "__PRFCHW__": "3dnowprefetch", "__CLFLUSHOPT__": "clflushopt",
    "__CLWB__": "clwb", "__CLZERO__": "clzero", "__RDPID__": "rdpid", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw",
    "__AVX512CD__": "avx512cd", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl",
    "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVX512VP2INTERSECT__": "avx512_vp2intersect",
    "__AVXVNNI__": "avx_vnni", "__AMX_TILE__": "amx_tile", "__AMX_BF16__": "amx_bf16",
    "__AMX_INT8__": "amx_int8",
}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


# Caps the instruction sets longattn uses, like oneDNN's ONEDNN_MAX_CPU_ISA:
# one of the level names (amx, avx512bf16, avx512, avx2, x86-64). Read once.
MAX_ISA_ENV = "LONGATTN_MAX_CPU_ISA"

# Flag families a cap at each level hides besides the higher levels' own
# requirements (extensions no level names, e.g. avx512_vnni, amx_int8).
_HIDDEN_PREFIXES = {
    "amx": (),
    "avx512bf16": ("amx",),
    "avx512": ("amx", "avx512_bf16", "avx512_fp16"),
    "avx2": ("amx", "avx512"),
    "x86-64": ("amx", "avx512"),
}


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """This CPU's instruction-set features, in ``/proc/cpuinfo``'s names
    (``avx2``, ``avx512f``, ``avx512_bf16``, ...), less what
    ``$LONGATTN_MAX_CPU_ISA`` hides (:func:`cap_features`). Linux clears the
    flags of state the OS does not save, and a VM shows what its CPU model
    exposes, so this is what may run. Without /proc/cpuinfo: what the
    compiler's ``-march=native`` detects (its CPUID probe), else nothing."""
    return cap_features(_detected_features(), isa_cap())


def isa_cap() -> str | None:
    """The level ``$LONGATTN_MAX_CPU_ISA`` names, None when unset or empty."""
    return os.environ.get(MAX_ISA_ENV) or None


def cap_features(features: frozenset[str], cap: str | None) -> frozenset[str]:
    """``features`` as a CPU capped at level ``cap`` would show them (None:
    unchanged): without the flags of every higher level in :data:`LEVELS`
    and the extension families above the cap. So builds, ``auto``'s rules and
    ``longattn doctor`` act as on a CPU without those instructions: set
    ``LONGATTN_MAX_CPU_ISA=avx2`` to run (and measure) the AVX2 kernels on an
    AVX-512 machine. Raises :class:`~longattn.errors.ArgumentError` naming
    the variable for an unknown level."""
    if cap is None:
        return features
    names = [level.name for level in LEVELS]
    if cap not in names:
        raise ArgumentError(f"{MAX_ISA_ENV} must be one of {', '.join(names)}; got {cap!r}")
    index = names.index(cap)
    hidden = set().union(*(level.requires for level in LEVELS[:index])) - LEVELS[index].requires
    prefixes = _HIDDEN_PREFIXES[cap]
    return frozenset(f for f in features if f not in hidden and not f.startswith(prefixes))


def _detected_features() -> frozenset[str]:
    """What the CPU says (see :func:`cpu_features`), uncapped."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    compiler = find_compiler()
    if compiler is None or not _is_x86():
        return frozenset()
    try:
        return build_features(compiler, ("-march=native",))
    except BuildError:
        return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def isa_level(features: frozenset[str] | None = None) -> IsaLevel:
    """The highest of :data:`LEVELS` whose features ``features`` (default:
    :func:`cpu_features`) has; :data:`GENERIC` off x86."""
    if not _is_x86():
        return GENERIC
    have = cpu_features() if features is None else features
    return next(level for level in LEVELS if level.requires <= have)


def isa_label(features: frozenset[str]) -> str:
    """A readable name for a build's feature set: ``avx512bf16``, ``avx512``, ``avx2``, ..."""
    if not features:
        return "generic"
    return next((name for name, needs in _LABELS if needs <= features), "x86-64")


@functools.lru_cache(maxsize=None)
def build_features(compiler: str, flags: tuple[str, ...]) -> frozenset[str]:
    """The instruction-set features ``compiler`` may use under ``flags``, in
    /proc/cpuinfo's names: the ISA macros it defines (``-dM -E``)."""
    try:
        run = subprocess.run(
            [compiler, *flags, "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{compiler} could not be asked which instructions {' '.join(flags)} enables: {exc}") from exc
    if run.returncode != 0:
        first = next((ln for ln in run.stderr.splitlines() if "error" in ln), run.stderr.strip()[:300])
        raise BuildError(f"{compiler} rejects the flags {' '.join(flags)}: {first}")
    macros = {m.group(1) for m in re.finditer(r"^#define (\w+)", run.stdout, re.MULTILINE)}
    return frozenset(MACRO_FEATURES[m] for m in macros & MACRO_FEATURES.keys())


@functools.lru_cache(maxsize=None)
def native_tune(compiler: str) -> tuple[str, ...]:
    """``-mtune=<this CPU>`` on x86: what gcc resolves ``-mtune=native`` to
    (e.g. ``-mtune=znver3``), else ``-mtune=native`` (clang cannot say).
    Tuning schedules instructions and never adds any, so it is safe on any
    CPU. Nothing off x86 (clang's ``-mcpu=native`` would set the ISA too)."""
    if not _is_x86():
        return ()
    try:
        run = subprocess.run(
            [compiler, "-mtune=native", "-Q", "--help=target"],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
        )
        match = re.search(r"^\s*-mtune=\s+(\S+)\s*$", run.stdout, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        match = None
    return (f"-mtune={match.group(1)}" if match and match.group(1) != "native" else "-mtune=native",)


# ---------------------------------------------------------------- building


def source_path(name: str) -> Path:
    """``csrc/cpu/<name>``: the packaged copy if there is one, else the checkout's."""
    for folder in CSRC_DIRS:
        if (folder / name).is_file():
            return folder / name
    return CSRC_DIRS[-1] / name


def sources() -> list[str]:
    """The names of the C++ kernels (``csrc/cpu/*.cpp``) of this installation."""
    folder = next((f for f in CSRC_DIRS if f.is_dir()), CSRC_DIRS[-1])
    return sorted(p.name for p in folder.glob("*.cpp"))


def cache_dir() -> Path:
    return Path(os.environ.get("LONGATTN_CACHE_DIR") or Path.home() / ".cache" / "longattn")


def find_compiler() -> str | None:
    env = os.environ.get("CXX")
    if env and shutil.which(env):
        return shutil.which(env)
    return next((shutil.which(c) for c in COMPILERS if shutil.which(c)), None)


@functools.lru_cache(maxsize=None)
def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{compiler} --version failed: {exc}") from exc


@dataclass(frozen=True)
class BuildPlan:
    """What :func:`load_library` builds for one source and extra flags on this CPU.

    ``features``: what the build may use (/proc/cpuinfo names); ``missing``:
    those this CPU lacks (non-empty: the build is refused); ``isa``: the
    readable name of ``features``; ``library``/``sidecar``: the cache files."""

    source: Path
    compiler: str
    flags: tuple[str, ...]
    features: frozenset[str]
    missing: frozenset[str]
    isa: str
    library: Path
    sidecar: Path


def build_plan(name: str, extra_flags: tuple[str, ...] = ()) -> BuildPlan:
    """The flags, features and cache file of ``csrc/cpu/<name>`` on this CPU;
    raises :class:`BuildError` without a source or compiler. Builds nothing."""
    source = source_path(name)
    if not source.is_file():
        raise BuildError(f"the C++ source {source} is missing from this installation")
    compiler = find_compiler()
    if compiler is None:
        raise BuildError(f"no C++ compiler on PATH (looked for $CXX, {', '.join(COMPILERS)})")
    flags, features = _level_flags(compiler, isa_level(), extra_flags)
    key = hashlib.sha256("\0".join([
        source.read_text(), *_headers(source), _compiler_version(compiler), " ".join(flags), " ".join(sorted(features)),
    ]).encode()).hexdigest()[:16]
    isa = isa_label(features)
    library = cache_dir() / f"{source.stem}-{isa}-{key}.so"
    return BuildPlan(source, compiler, flags, features, features - cpu_features(), isa, library,
                     library.with_suffix(".json"))


def _level_flags(
    compiler: str, level: IsaLevel, extra_flags: tuple[str, ...],
) -> tuple[tuple[str, ...], frozenset[str]]:
    """The build flags for ``level`` (its own spelling, else feature by
    feature) and the features they enable. A compiler that rejects both (a gcc
    older than 11 has no ``-mamx-tile``, say) gets the next lower level, so a
    newer CPU never leaves the kernels unbuilt; the lowest level's error is raised."""
    error = None
    for spelling in (level.flags, level.portable_flags) if level.portable_flags else (level.flags,):
        flags = (FLAGS[0], *spelling, *native_tune(compiler), *FLAGS[1:], *extra_flags)
        try:
            return flags, build_features(compiler, flags)
        except BuildError as exc:
            error = exc
    lower = LEVELS[LEVELS.index(level) + 1:] if level in LEVELS else ()
    if not lower:
        raise error
    return _level_flags(compiler, lower[0], extra_flags)


def _missing_reason(what: str, missing: frozenset[str]) -> str:
    return f"{what} needs {', '.join(sorted(missing))}, which this CPU lacks (it would die with SIGILL)"


def recorded_features(sidecar: Path) -> frozenset[str] | None:
    """The features a sidecar records, or None when it is missing or unreadable."""
    try:
        features = json.loads(sidecar.read_text())["features"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        return None
    return frozenset(features)


@functools.lru_cache(maxsize=None)
def load_library(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (if not cached) and load ``csrc/cpu/<name>``; raises :class:`BuildError`.

    ``extra_flags`` are appended to the flags (and so to the cache key), e.g.
    ``("-mno-avx512f",)`` to build the AVX2 path on an AVX-512 machine, or a
    macro such as ``("-DLONGATTN_AMX_EMULATE",)``: the tests use them to
    check every vector path this machine can run. A library
    is loaded only when this CPU has every feature its sidecar records;
    otherwise it is rebuilt, or refused when the flags ask for what this CPU
    lacks."""
    plan = build_plan(name, extra_flags)
    if plan.missing:
        raise BuildError(_missing_reason(f"{plan.source.name} built with {' '.join(plan.flags)}", plan.missing))
    recorded = recorded_features(plan.sidecar) if plan.library.exists() else None
    if recorded is None or not recorded <= cpu_features() or recorded != plan.features:
        # Not built yet, or its record is lost or not for this CPU: build
        # (again) rather than load something that could SIGILL.
        _build(plan)
        recorded = recorded_features(plan.sidecar)
    if recorded is None:  # the build's record vanished (a concurrent cache clean, say): never load blind
        raise BuildError(f"{plan.sidecar}, the record of {plan.library.name}'s features, is missing or unreadable")
    if not recorded <= cpu_features():
        raise BuildError(_missing_reason(plan.library.name, recorded - cpu_features()))
    try:
        return ctypes.CDLL(str(plan.library))
    except OSError as exc:
        raise BuildError(f"built {plan.library} but could not load it: {exc}") from exc


def _build(plan: BuildPlan) -> None:
    """Compile ``plan.source`` into ``plan.library`` and write its sidecar.

    Both are written under temporary names and renamed, sidecar first:
    concurrent first uses (e.g. torchrun ranks) never load a half-written
    library, nor one without its record."""
    folder = plan.library.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
    except OSError as exc:  # a read-only home, say: the PyTorch twins serve instead
        raise BuildError(f"cannot write the kernel cache {folder} ({exc}); "
                         "set LONGATTN_CACHE_DIR to a writable directory") from exc
    tmp_json = tmp[:-3] + ".json"
    try:
        run = subprocess.run(
            [plan.compiler, *plan.flags, str(plan.source), "-o", tmp],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
        )
        if run.returncode != 0:
            first = next((ln for ln in run.stderr.splitlines() if "error" in ln), run.stderr.strip()[:300])
            raise BuildError(f"{plan.compiler} failed to build {plan.source.name}: {first}")
        record = {
            "source": plan.source.name, "isa": plan.isa, "features": sorted(plan.features),
            "flags": list(plan.flags), "compiler": plan.compiler,
            "compiler_version": _compiler_version(plan.compiler).partition("\n")[0],
        }
        Path(tmp_json).write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp_json, plan.sidecar)
        os.replace(tmp, plan.library)
    except subprocess.SubprocessError as exc:
        raise BuildError(f"{plan.compiler} did not finish building {plan.source.name}: {exc}") from exc
    except OSError as exc:
        raise BuildError(f"cannot write {plan.library} ({exc}); "
                         "set LONGATTN_CACHE_DIR to a writable directory") from exc
    finally:
        for leftover in (tmp, tmp_json):
            if os.path.exists(leftover):
                os.remove(leftover)


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


def library_status(name: str) -> dict[str, object]:
    """For ``longattn doctor``: the ISA build of ``csrc/cpu/<name>`` for this
    CPU, its flags, whether this CPU can run it (``missing`` features) and
    whether it builds and loads (``reason``: None, else why not)."""
    try:
        plan = build_plan(name)
    except BuildError as exc:
        return {"source": name, "isa": None, "flags": [], "missing": [], "library": None, "reason": str(exc)}
    return {
        "source": name, "isa": plan.isa, "flags": list(plan.flags), "missing": sorted(plan.missing),
        "library": str(plan.library), "reason": unavailable_reason(name),
    }


# ---------------------------------------------------------------- threads

_FORKED = False


def _after_fork_in_child() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def kernel_threads() -> int:
    """The OpenMP thread count to pass a kernel: ``torch.get_num_threads()``
    (so a kernel never runs more threads than torch's ops, whose pool it
    shares), or 1 in a forked child, where GNU libgomp would wait forever for
    the parent's pool threads."""
    return 1 if _FORKED else max(1, torch.get_num_threads())


def thread_policy() -> str:
    """One line for ``longattn doctor``: how many threads the kernels run, and on which OpenMP runtime."""
    runtimes = openmp_runtimes()
    if not runtimes:
        shared = "OpenMP runtime not loaded yet"
    elif len(runtimes) == 1:
        shared = f"one OpenMP runtime for torch and the kernels ({runtimes[0]})"
    else:
        shared = f"{len(runtimes)} OpenMP runtimes ({', '.join(runtimes)}): their pools do not share threads"
    if _FORKED:
        policy = "1 thread per call (this process is a forked child)"
    else:
        policy = f"torch.get_num_threads() = {kernel_threads()} threads per call (1 in a forked child)"
    return f"{policy}; {shared}"


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (Linux), by file."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {fields[-1] for fields in (line.split() for line in f) if len(fields) == 6}
    except OSError:
        return []
    return sorted(p for p in paths if Path(p).name.startswith(("libgomp", "libiomp", "libomp")))
