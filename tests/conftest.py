"""Test-wide setup: the Triton interpreter, hypothesis profiles.

``TRITON_INTERPRET`` must be set before triton is imported anywhere, so it is
set here, at collection time, when the machine has no CUDA device. Triton
kernels then run on CPU tensors (slowly: tests keep their shapes tiny).

Hypothesis profiles: ``ci`` (default; few examples, derandomized so CI is
repeatable) and ``dev`` (many examples). Choose with
``HYPOTHESIS_PROFILE=dev pytest``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
