"""The one interception point of :func:`longattn.attention`, for calibration.

:data:`ATTENTION_HOOK` is a context variable: ``None`` (always, outside a
calibration run), or a function that computes the attention instead, set
only for the duration of a ``with`` block by
:mod:`longattn.sparse.calibrate` so a model's own calls to
``longattn.attention`` can be observed and mixed. Being a ContextVar, it is
scoped to the running context (thread / task), not global state.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

ATTENTION_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("longattn_attention_hook",
                                                                                  default=None)
