"""Helpers shared by the Triton twins' test files: when they can run, the
ahead-of-time GPU compile check, and loading a kernel module without triton."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from types import ModuleType

import pytest
import torch

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
# for each config in forked children, $EACH_CONFIG_WORKERS at once (default:
# as many as this process may use CPUs; each compile is seconds of
# single-threaded work), and raises naming the configs that failed; their
# tracebacks go to stderr.
_EACH_CONFIG = textwrap.dedent("""
    def each_config(configs, body):
        import os, traceback
        workers = int(os.environ.get("EACH_CONFIG_WORKERS") or len(os.sched_getaffinity(0)))
        running, failed = {}, []
        def reap():
            pid, status = os.wait()
            if status != 0:
                failed.append(running[pid])
            del running[pid]
        for config in configs:
            if len(running) >= max(1, workers):
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

# Marks a test whose body is ``assert_compiles_for_gpu(script, ...)``: the
# session then compiles ``script`` in the background from its start (see
# :class:`BackgroundCompiles`, started by conftest.py).
def gpu_compile(script: str):
    return pytest.mark.gpu_compile(script)


def _compile_command(script: str, cache_dir, workers: int | None = None) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache_dir), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if workers is not None:
        env["EACH_CONFIG_WORKERS"] = str(workers)
    return [sys.executable, "-c", _EACH_CONFIG + script], env


class BackgroundCompiles:
    """The GPU compile checks of a session, run one after another on a
    background thread at low priority from the session's start: they are
    minutes of single-threaded compiling, and most of the suite leaves the
    machine's second core idle. A test then only collects its script's result
    (:func:`assert_compiles_for_gpu`)."""

    def __init__(self) -> None:
        self._results: dict[str, subprocess.CompletedProcess | BaseException] = {}
        self._done: dict[str, threading.Event] = {}
        self._proc: subprocess.Popen | None = None
        self._stopped = False

    def start(self, scripts: list[str], cache_dir) -> None:
        scripts = [s for s in dict.fromkeys(scripts) if s not in self._done]
        for script in scripts:
            self._done[script] = threading.Event()
        if scripts:
            threading.Thread(target=self._run_all, args=(scripts, str(cache_dir)), daemon=True).start()

    def _run_all(self, scripts: list[str], cache_dir: str) -> None:
        for script in scripts:
            try:
                if self._stopped:
                    raise RuntimeError("the session ended first")
                cmd, env = _compile_command(script, cache_dir, workers=1)
                nice = shutil.which("nice")  # low priority: the foreground tests come first
                self._proc = subprocess.Popen(([nice, "-n", "10"] if nice else []) + cmd, env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              start_new_session=True)
                out, err = self._proc.communicate(timeout=600)
                self._results[script] = subprocess.CompletedProcess(cmd, self._proc.returncode, out, err)
            except BaseException as exc:  # reported by the test that asks for this script
                self._results[script] = exc
            finally:
                self._done[script].set()

    def result(self, script: str) -> subprocess.CompletedProcess | None:
        """The script's finished run (waits for it); None if it was never started."""
        if script not in self._done:
            return None
        self._done[script].wait()
        result = self._results[script]
        if isinstance(result, BaseException):
            raise RuntimeError(f"the background GPU compile failed to run: {result!r}") from result
        return result

    def stop(self) -> None:
        """End the session's compiles (the running one and its forked children)."""
        self._stopped = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


BACKGROUND = BackgroundCompiles()


def assert_compiles_for_gpu(script: str, cache_dir) -> None:
    """``script`` (which compiles kernels to cubin and prints "compiled") ran
    without the interpreter and succeeded; skip when triton has no ptxas
    here. Its run is the session's background one when the test is marked
    with :func:`gpu_compile` (conftest.py starts them), else a fresh process
    now. The script may call ``each_config(configs, body)`` (see
    ``_EACH_CONFIG``) to compile its configs side by side."""
    proc = BACKGROUND.result(script)
    if proc is None:
        cmd, env = _compile_command(script, cache_dir)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
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
