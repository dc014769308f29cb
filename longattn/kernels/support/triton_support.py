"""When a Triton twin can run, shared by every primitive's registry.

Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), which is for
verification only: ``backend="auto"`` never picks it. Importing this module
does not import triton (that costs seconds); the kernels' modules call
:func:`import_triton` when they are first used.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

MAX_HEADDIM = 256  # every Triton twin's headdim limit (they import it from here)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def machine_reasons() -> list[str]:
    """Why no Triton twin can run on this machine (empty: it can)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install triton)"]
    if not torch.cuda.is_available() and not interpreting():
        return ["no CUDA device, and TRITON_INTERPRET=1 is not set (the interpreter runs kernels on CPU)"]
    return []


def call_reasons(q: torch.Tensor) -> list[str]:
    """Why a Triton twin cannot serve a call whose queries are ``q``."""
    reasons = []
    device = q.device.type
    if device == "cpu" and not interpreting() and torch.cuda.is_available():
        # (without CUDA, the machine-level reason already says this)
        reasons.append("tensors are on cpu; Triton runs them only under TRITON_INTERPRET=1")
    elif device not in ("cpu", "cuda"):
        reasons.append(f"tensors are on {device}; Triton needs cuda (or cpu under the interpreter)")
    if device == "cpu" and q.dtype == torch.bfloat16:
        reasons.append("the Triton interpreter has no bfloat16")
    if q.shape[-1] > MAX_HEADDIM:
        reasons.append(f"headdim {q.shape[-1]} > {MAX_HEADDIM}")
    return reasons


def auto_reasons(q: torch.Tensor) -> list[str]:
    """Why ``backend="auto"`` should not pick a Triton twin it could run."""
    if q.device.type == "cpu":
        return ["on cpu it runs in the Triton interpreter: correct but far slower than eager (force backend='triton' to use it)"]
    return []


def import_triton() -> tuple[ModuleType | None, ModuleType | None, str | None]:
    """``(triton, triton.language, None)``, or ``(None, None, reason)`` when
    triton is missing or its install is broken: a kernel module then still
    imports, and its wrapper raises with the reason."""
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # ImportError, or a broken install failing on import
        return None, None, f"triton is not importable: {type(exc).__name__}: {exc}".splitlines()[0]
    return triton, tl, None
