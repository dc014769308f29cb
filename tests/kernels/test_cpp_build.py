"""The C++ kernel cache: builds keyed by instruction set, no library loaded
that this CPU cannot run, OpenMP threads that follow torch's and survive fork."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from longattn.kernels.support import cpp_build as cb

X86 = cb._is_x86()
needs_x86 = pytest.mark.skipif(not X86, reason="the ISA levels are x86's (other CPUs get one portable build)")
needs_compiler = pytest.mark.skipif(cb.find_compiler() is None, reason="no C++ compiler on PATH")

AVX2_CPU = cb._V3 | {"mmx", "sse", "sse2", "fxsr"}  # an AVX2-only EPYC, in /proc/cpuinfo names
AVX512_CPU = AVX2_CPU | cb._V4
TINY = 'extern "C" int longattn_tiny() { return 42; }\n'


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """A one-function ``csrc/cpu/tiny.cpp`` and an empty cache, both in tmp_path."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "tiny.cpp").write_text(TINY)
    monkeypatch.setattr(cb, "CSRC_DIRS", (csrc,))
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path / "cache"))
    yield "tiny.cpp"
    cb.load_library.cache_clear()  # forget tiny.cpp (library_status memoises through load_library)


def load(name, extra_flags=()):
    """load_library without its per-process memo (these tests change the CPU and the cache under it)."""
    return cb.load_library.__wrapped__(name, extra_flags)


def test_isa_labels():
    for level in cb.LEVELS:  # amx, avx512bf16, ...: each level's features are labelled with its name
        assert cb.isa_label(frozenset(level.requires)) == (level.name if level.requires else "generic")
    assert cb.isa_label(frozenset(AVX512_CPU)) == "avx512"
    assert cb.isa_label(frozenset(AVX2_CPU)) == "avx2"
    assert cb.isa_label(frozenset(AVX2_CPU - {"fma"})) == "avx"
    assert cb.isa_label(frozenset({"sse", "sse2"})) == "x86-64"
    assert cb.isa_label(frozenset()) == "generic"


@needs_x86
def test_isa_level_is_the_highest_this_cpu_runs():
    assert cb.isa_level(frozenset(AVX512_CPU | {"avx512_bf16", "amx_tile"})).name == "avx512bf16"
    assert cb.isa_level(frozenset(AVX512_CPU)).name == "avx512"
    assert cb.isa_level(frozenset(AVX2_CPU)).name == "avx2"
    assert cb.isa_level(frozenset(AVX2_CPU - {"avx2"})).name == "x86-64"  # e.g. a VM hiding AVX2
    for level in cb.LEVELS:
        assert "-march=native" not in level.flags


@needs_x86
@needs_compiler
def test_every_level_enables_exactly_what_it_requires():
    """The compiler's view of each level's flags (its ISA macros) needs no
    feature the level does not check for, so a CPU that passes the check
    runs everything the compiler may emit."""
    compiler = cb.find_compiler()
    for level in cb.LEVELS:
        features = cb.build_features(compiler, level.flags)
        assert features - level.requires <= {"mmx", "sse", "sse2", "fxsr"}, level.name
        assert cb.isa_label(features) == level.name
        if level.portable_flags:  # the spelling for compilers without x86-64-v3/v4 means the same
            assert cb.build_features(compiler, level.portable_flags) == features, level.name


@needs_x86
@needs_compiler
def test_the_cache_key_and_readable_name_follow_the_cpus_features(monkeypatch):
    monkeypatch.setattr(cb, "cpu_features", lambda: frozenset(AVX512_CPU | {"avx512_bf16"}))
    bf16 = cb.build_plan("flash_cpu.cpp")
    narrowed = cb.build_plan("flash_cpu.cpp", ("-mno-avx512f",))  # the tests' AVX2 path on an AVX-512 CPU
    monkeypatch.setattr(cb, "cpu_features", lambda: frozenset(AVX2_CPU))
    avx2 = cb.build_plan("flash_cpu.cpp")
    assert re.fullmatch(r"flash_cpu-avx512bf16-[0-9a-f]{16}\.so", bf16.library.name)
    assert re.fullmatch(r"flash_cpu-avx2-[0-9a-f]{16}\.so", avx2.library.name)
    assert narrowed.isa == "avx2" and narrowed.library.name.startswith("flash_cpu-avx2-")
    assert len({bf16.library, avx2.library, narrowed.library}) == 3
    assert "avx512f" in bf16.features and "avx512_bf16" in bf16.features
    assert "avx512f" not in avx2.features and "avx2" in avx2.features and "fma" in avx2.features
    assert "-march=native" not in bf16.flags and "-march=x86-64-v3" in avx2.flags
    assert bf16.sidecar == bf16.library.with_suffix(".json")
    assert not bf16.missing and not avx2.missing


@needs_x86
@needs_compiler
def test_a_compiler_without_the_level_names_gets_the_level_feature_by_feature(monkeypatch):
    real = cb.build_features

    def old_compiler(compiler, flags):
        if any(f.startswith("-march=x86-64-v") for f in flags):
            raise cb.BuildError(f"{compiler} rejects the flags {' '.join(flags)}: bad value for -march")
        return real(compiler, flags)

    monkeypatch.setattr(cb, "cpu_features", lambda: frozenset(AVX2_CPU))
    new = cb.build_plan("flash_cpu.cpp")
    monkeypatch.setattr(cb, "build_features", old_compiler)
    old = cb.build_plan("flash_cpu.cpp")
    assert "-mavx2" in old.flags and "-march=x86-64" in old.flags and old.features == new.features
    assert old.isa == new.isa == "avx2" and old.library != new.library


@needs_x86
@needs_compiler
def test_flags_asking_for_what_this_cpu_lacks_are_refused_naming_it(tiny_source, monkeypatch):
    monkeypatch.setattr(cb, "cpu_features", lambda: frozenset(AVX2_CPU))
    with pytest.raises(cb.BuildError, match=r"needs .*avx512f.* which this CPU lacks"):
        load(tiny_source, ("-mavx512f",))
    assert not cb.cache_dir().exists()  # refused before building anything
    status = cb.library_status(tiny_source)  # the doctor's view of the default build: fine on this "CPU"
    assert status["isa"] == "avx2" and status["missing"] == [] and status["reason"] is None


@needs_compiler
def test_a_library_recorded_with_a_feature_this_cpu_lacks_is_rebuilt_not_loaded(tiny_source):
    plan = cb.build_plan(tiny_source)
    assert load(tiny_source).longattn_tiny() == 42
    record = json.loads(plan.sidecar.read_text())
    assert record["isa"] == plan.isa and record["features"] == sorted(plan.features)
    assert record["flags"] == list(plan.flags)

    # A build that claims an instruction this CPU does not have (as if made
    # on another machine under the same name): rebuilt before anything loads.
    record["features"].append("made_up_isa_extension")
    plan.sidecar.write_text(json.dumps(record))
    before = plan.library.stat().st_ino
    assert load(tiny_source).longattn_tiny() == 42
    assert plan.library.stat().st_ino != before
    assert "made_up_isa_extension" not in json.loads(plan.sidecar.read_text())["features"]

    plan.sidecar.unlink()  # a library without its record (an older longattn's cache): rebuilt too
    assert load(tiny_source).longattn_tiny() == 42 and plan.sidecar.is_file()


@needs_compiler
def test_a_library_this_cpu_cannot_run_is_never_loaded_even_when_the_rebuild_fails(tiny_source, monkeypatch):
    plan = cb.build_plan(tiny_source)
    load(tiny_source)
    record = json.loads(plan.sidecar.read_text())
    plan.sidecar.write_text(json.dumps({**record, "features": [*record["features"], "made_up_isa_extension"]}))

    def no_compiler(plan):
        raise cb.BuildError("the compiler went away")

    loaded = []
    monkeypatch.setattr(cb, "_build", no_compiler)
    monkeypatch.setattr(cb.ctypes, "CDLL", lambda path: loaded.append(path))
    with pytest.raises(cb.BuildError, match="went away"):
        load(tiny_source)
    assert loaded == []


@needs_compiler
def test_a_lost_sidecar_after_building_is_a_refusal(tiny_source, monkeypatch):
    real = cb._build

    def build_then_lose_the_record(plan):
        real(plan)
        plan.sidecar.unlink()

    monkeypatch.setattr(cb, "_build", build_then_lose_the_record)
    with pytest.raises(cb.BuildError, match="missing or unreadable"):
        load(tiny_source)


def test_cpu_features_reads_proc_cpuinfo():
    features = cb.cpu_features()
    if os.path.exists("/proc/cpuinfo") and X86:
        assert {"sse", "sse2"} <= features
    if X86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # torch's own CPUID probe agrees
        assert {"avx2", "fma"} <= features
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= features


AMX_CPU = AVX512_CPU | {"avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}


@needs_x86
@pytest.mark.parametrize("cap", [level.name for level in cb.LEVELS])
def test_a_cap_makes_the_cpu_look_like_one_of_that_level(cap):
    capped = cb.cap_features(frozenset(AMX_CPU), cap)
    assert cb.isa_level(capped).name == cap
    index = [level.name for level in cb.LEVELS].index(cap)
    for level in cb.LEVELS[:index]:  # no feature only a higher level needs survives
        assert not (level.requires - cb.LEVELS[index].requires) & capped
    if cap in ("avx2", "x86-64"):
        assert not any(f.startswith(("avx512", "amx")) for f in capped)
    if cap == "avx512bf16":
        assert "avx512_bf16" in capped and not any(f.startswith("amx") for f in capped)
    assert cb.cap_features(frozenset(AMX_CPU), None) == frozenset(AMX_CPU)


def test_an_unknown_cap_is_an_error_naming_the_variable():
    from longattn.errors import ArgumentError

    with pytest.raises(ArgumentError, match="LONGATTN_MAX_CPU_ISA must be one of amx, avx512bf16, avx512, avx2, x86-64"):
        cb.cap_features(frozenset(AVX2_CPU), "avx9")


@needs_x86
@needs_compiler
@pytest.mark.skipif(not {"avx2", "fma"} <= cb.cpu_features(), reason="this CPU has no AVX2: nothing to cap down to")
def test_the_avx2_cap_runs_the_avx2_kernels_through_the_public_path():
    """LONGATTN_MAX_CPU_ISA=avx2 in a fresh process: the flash kernel is the
    AVX2 build, bf16 runs the float32 engine, auto's rules see no AVX-512
    flag, the result matches the oracle, and doctor's report says so (its
    libraries and registries cut to the flash kernel's: building every
    library at the cap would take the better part of a minute, and the full
    lists have their own tests)."""
    script = textwrap.dedent('''
        import torch, longattn
        from longattn import doctor
        from longattn.kernels.support import cpp_build
        from longattn.kernels.dense import cpu_flags
        from longattn.kernels.dense.cpp import choose_math
        from longattn.reference import attention_ref
        assert cpp_build.library_status("flash_cpu.cpp")["isa"] == "avx2"
        assert not any(f.startswith(("avx512", "amx")) for f in cpu_flags())
        assert choose_math(torch.bfloat16) == "fp32"
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 70, 2, 64, generator=g) for _ in range(3))
        out = longattn.attention(q, k, v, causal=True, backend="cpp")
        ref, _ = attention_ref(q, k, v, causal=True)
        assert (out.double() - ref).abs().max() < 1e-5
        doctor._cpp_libraries = lambda: [cpp_build.library_status("flash_cpu.cpp")]
        doctor.REGISTRIES = (("longattn.kernels.dense", "DENSE_BACKENDS"),)  # the others build their libraries
        report = doctor.format_report(doctor.collect())
        assert "LONGATTN_MAX_CPU_ISA  avx2 (the kernels use no instruction set above it)" in report, report
        assert "flash_cpu.cpp  usable      avx2 build" in report, report
        print("ok")
    ''')
    env = {**os.environ, "LONGATTN_MAX_CPU_ISA": "avx2"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@needs_compiler
def test_doctor_lists_each_library_with_its_isa_and_whether_this_cpu_runs_it():
    from longattn.doctor import _cpp_libraries, _cpp_threads

    libraries = {lib["source"]: lib for lib in _cpp_libraries()}
    assert {"flash_cpu.cpp", "decode_streamk.cpp", "hip_score.cpp"} <= set(libraries)
    for lib in libraries.values():
        assert lib["isa"] == cb.isa_label(cb.build_plan(lib["source"]).features)
        assert lib["missing"] == [] and (lib["reason"] is None) == (lib["library"] is not None and
                                                                    os.path.isfile(lib["library"]))
    assert "torch.get_num_threads()" in _cpp_threads() and "forked child" in _cpp_threads()


# ---------------------------------------------------------------- threads

# Runs each C++ kernel once (tiny shapes) and reports the thread count of
# this process around the calls, for torch.set_num_threads(1) then (2).
_THREADS_SCRIPT = textwrap.dedent("""
    import json, os, torch
    from longattn.kernels.support.cpp_build import openmp_runtimes
    from tests.kernels.test_cpp_build import run_every_kernel

    def tasks():
        return len(os.listdir("/proc/self/task"))

    report = {}
    torch.set_num_threads(1)
    run_every_kernel()  # builds/loads everything, on one thread: no OpenMP pool yet
    report["one_before"] = tasks()
    run_every_kernel()
    report["one_after"] = tasks()
    torch.set_num_threads(2)
    run_every_kernel()
    report["two_after_kernels"] = tasks()
    torch.randn(1 << 22).mul_(2)  # a torch op that runs on its OpenMP threads
    report["two_after_torch"] = tasks()
    report["runtimes"] = openmp_runtimes()
    print(json.dumps(report))
""")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "flash": (torch.randn(1, 96, 2, 32, generator=g), torch.randn(1, 160, 2, 32, generator=g)),
        "decode": (torch.randn(3, 1, 4, 32, generator=g), torch.randn(3, 300, 2, 32, generator=g),
                   torch.randn(3, 300, 2, 32, generator=g), torch.tensor([300, 170, 41])),
        "hip": (torch.randn(1, 256, 2, 32, generator=g), torch.randn(1, 256, 2, 32, generator=g)),
    }


def run_every_kernel(inputs=None, hip_call=None):
    """Every C++ kernel once: ``(flash out, decode out, hip selection)``.

    ``hip_call``: recorded ``(args, kwargs)`` of the HiP search, to call the
    kernel alone (no torch ops around it: what a forked child can run)."""
    from longattn.kernels.decode.cpp import decode_forward_cpu
    from longattn.kernels.dense.cpp import flash_forward_cpu
    from longattn.kernels.hip_score import cpp as hip_cpp

    x = _inputs() if inputs is None else inputs
    q, k = x["flash"]
    flash = flash_forward_cpu(q, k, k, scale=0.2, window=(-1, 0))[0]
    dq, dk, dv, lens = x["decode"]
    decode = decode_forward_cpu(dq, dk, dv, lens, None, scale=0.2, window=(-1, -1), softcap=0.0)[0]
    if hip_call is not None:
        hip = hip_cpp.search_blocks_cpu(*hip_call[0], **hip_call[1])[0]
    else:
        from longattn.sparse import HiP
        from longattn.sparse.hip_mask import hip_select_blocks

        hq, hk = x["hip"]
        hip = hip_select_blocks(hq, hk, HiP(topk=16, block_q=16, block_k=2, sink_size=2, recent_size=16), backend="cpp")
    return flash, decode, hip


def _skip_without_kernels():
    from longattn.kernels.decode.cpp import cpu_unavailable_reason
    from longattn.kernels.dense.cpp import flash_unavailable_reason
    from longattn.kernels.hip_score.cpp import score_unavailable_reason

    for reason in (flash_unavailable_reason(), cpu_unavailable_reason(), score_unavailable_reason()):
        if reason is not None:
            pytest.skip(f"a C++ kernel is unavailable here: {reason}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux)")
def test_kernels_run_no_more_threads_than_torch():
    """With torch.set_num_threads(1) no kernel starts a thread; with 2 they
    start one, which torch's own ops then reuse (one OpenMP pool, not two)."""
    _skip_without_kernels()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["one_after"] == report["one_before"], report  # one thread: no pool at all
    assert report["two_after_kernels"] == report["one_after"] + 1, report  # two: the caller and one more
    if len(report["runtimes"]) == 1:  # the kernels' libgomp is torch's: its ops run on the same pool
        assert report["two_after_torch"] == report["two_after_kernels"], report


def _child(conn, inputs, hip_call):
    # Plain pickle: Connection.send would hand tensors over in shared memory
    # (torch's reductions), which needs more machinery than this check.
    try:
        answer = ("ok", [t.clone() for t in run_every_kernel(inputs, hip_call)], cb.kernel_threads())
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        answer = ("error", repr(exc), None)
    conn.send_bytes(pickle.dumps(answer))
    conn.close()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="this platform cannot fork")
def test_kernels_run_in_a_forked_child_of_a_process_that_ran_them_on_several_threads(monkeypatch):
    """GNU libgomp hangs a forked child's first parallel region of more than
    one thread when the parent had a pool; the kernels run on one thread there
    and give the parent's results, bit for bit."""
    _skip_without_kernels()
    from longattn.kernels.hip_score import cpp as hip_cpp

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls = []
        real = hip_cpp.search_blocks_cpu
        monkeypatch.setattr(hip_cpp, "search_blocks_cpu", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
        inputs = _inputs()
        expected = run_every_kernel(inputs)  # 2 threads: the parent now has an OpenMP pool
        hip_call = calls[0]
        expected = (*expected[:2], real(*hip_call[0], **hip_call[1])[0])
        parent_end, child_end = multiprocessing.Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(target=_child, args=(child_end, inputs, hip_call))
        child.start()
        child_end.close()
        hung = ("timeout", "no answer in 120 s: the child hung", None)
        got = pickle.loads(parent_end.recv_bytes()) if parent_end.poll(120) else hung
        child.join(30)
        if child.exitcode is None:
            child.kill()
            child.join()
        assert got[0] == "ok", got[1]
        assert child.exitcode == 0
        assert got[2] == 1  # the child's kernels ran single-threaded
        for name, want, have in zip(("flash", "decode", "hip"), expected, got[1]):
            assert torch.equal(want, have), name
    finally:
        torch.set_num_threads(threads)
