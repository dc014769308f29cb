"""The one interception point of :func:`longattn.attention`, for calibration.

:data:`ATTENTION_HOOK` is a context variable: ``None`` (always, outside a
calibration run), or a function that computes the attention instead, set
only for the duration of a ``with`` block by
:mod:`longattn.sparse.calibrate` so a model's own calls to
``longattn.attention`` can be observed and mixed. Being a ContextVar, it is
scoped to the running context (thread / task), not global state.

The hook is called as ``hook(call)`` with one :class:`AttentionCall` holding
everything that defines the attention the model asked for, and returns the
output tensor (q's shape and dtype) in place of ``longattn.attention``'s.
A hook that cannot compute exactly that attention must raise (calibration
raises :class:`~longattn.errors.UnsupportedFeatureError`) rather than
compute something else.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionCall:
    """One :func:`longattn.attention` call, as a hook sees it (options validated).

    Attributes:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0``.
        causal: bottom-right aligned causal mask (already folded into ``window``).
        scale: the softmax scale (``softmax_scale``, or ``headdim ** -0.5`` when not given).
        window: the effective ``(left, right)`` window, -1 = unbounded, with
            ``causal`` folded in (causal => ``right == 0``): query ``i`` sees key
            ``j`` iff :func:`longattn.masking.dense_mask` of it says so.
        softcap: > 0 means scores become ``softcap * tanh(scores / softcap)``
            (after scaling); 0 = no capping.
        sparse: the sparse-method config passed (``None`` for dense attention),
            as given, not validated.
        backend: the backend the caller asked for; it selects a twin and does not
            change the result beyond rounding.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float
    window: tuple[int, int]
    softcap: float
    sparse: object | None = None
    backend: str = "auto"


ATTENTION_HOOK: contextvars.ContextVar[Callable[[AttentionCall], torch.Tensor] | None] = contextvars.ContextVar(
    "longattn_attention_hook", default=None
)
