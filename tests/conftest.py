"""Test-wide setup: OpenMP's wait policy, the Triton interpreter, hypothesis profiles.

``OMP_WAIT_POLICY=PASSIVE`` (unless set already) must reach OpenMP before
torch loads it, so it is set here, first. The suite runs in up to 4 xdist
workers on CI's 2 cores, each with torch's 2 intra-op threads: with OpenMP's
default policy a thread that finishes its share of a parallel region spins,
burning CPU the other workers need. Sleeping instead keeps every thread
count and result (the README gives the suite's time before and after).
Subprocesses the tests start (distributed ranks, examples, the CLI) inherit
it.

``TRITON_INTERPRET`` must be set before triton is imported anywhere, so it is
set here, at collection time, when the machine has no CUDA device. Triton
kernels then run on CPU tensors (slowly: tests keep their shapes tiny).

Hypothesis profiles: ``ci`` (default; few examples, derandomized so CI is
repeatable) and ``dev`` (many examples). Choose with
``HYPOTHESIS_PROFILE=dev pytest``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see above

import torch  # noqa: E402

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
