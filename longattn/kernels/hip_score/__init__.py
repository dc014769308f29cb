"""HiP branch scoring: which twin scores the candidate key blocks of HiP's
tree search (:func:`longattn.sparse.hip_mask.select_blocks` runs the rounds).

Twins (priority order for ``backend="auto"``):

- ``cpp``: ``csrc/cpu/hip_score.cpp``, every round of the search in one call,
  reading keys in place (:mod:`.cpp`).
- ``triton``: one round's scores per launch (GPU; on CPU only under
  ``TRITON_INTERPRET=1``, never picked by auto there) (:mod:`.triton`).
- ``eager``: gather + matmul per round in PyTorch, in the search itself
  (the specification).

The search drives the rounds, so this registry only *selects*: its twins
have no ``run`` of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.dispatch import Backend, Registry
from longattn.kernels.support import triton_support


@dataclass(frozen=True)
class HipScoreCall:
    """The queries of one HiP search (their device, dtype and head dim decide)."""

    q: torch.Tensor


def _cpp_machine_reasons() -> list[str]:
    from longattn.kernels.hip_score.cpp import score_unavailable_reason

    why = score_unavailable_reason()
    return [] if why is None else [why]


CPP = Backend[HipScoreCall](
    name="cpp",
    description="C++ CPU search, every round in one call (csrc/cpu/hip_score.cpp)",
    run=None,
    machine_reasons=_cpp_machine_reasons,
    call_reasons=lambda call: [] if call.q.device.type == "cpu" else [f"CPU only, q is on {call.q.device.type}"],
)

TRITON = Backend[HipScoreCall](
    name="triton",
    description="branch scores in Triton, one launch per round (GPU; CPU under TRITON_INTERPRET=1)",
    run=None,
    machine_reasons=triton_support.machine_reasons,
    call_reasons=lambda call: triton_support.call_reasons(call.q),
    auto_reasons=lambda call: triton_support.auto_reasons(call.q),
)

EAGER = Backend[HipScoreCall](
    name="eager",
    description="PyTorch gather + matmul per round; serves every call",
    run=None,
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
)

HIP_SCORE_BACKENDS = Registry[HipScoreCall]("HiP branch scoring", [CPP, TRITON, EAGER])


def scoring_backend(q: torch.Tensor, backend: str) -> str:
    """The name of the twin that scores a search over queries ``q``; raises
    :class:`~longattn.errors.BackendUnavailableError` (every twin's reasons)
    when a forced one cannot serve."""
    return HIP_SCORE_BACKENDS.select(HipScoreCall(q), backend).name
