"""Why a Triton test cannot run here (shared by the Triton twins' test files)."""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()


def triton_skip_reason(import_error: str | None) -> str | None:
    """None when Triton kernels can run: triton imports (``import_error`` is its
    module's reason otherwise) and there is a GPU or the interpreter is on."""
    if import_error is not None:
        return import_error
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET != '1' (it must be set before triton is imported)"
    return None
