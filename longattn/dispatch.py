"""Backend registry: which twin of a primitive serves a call, and why not.

Each twin declares what it supports as data-driven checks that return a list
of reasons it *cannot* serve (empty = it can). ``backend="auto"`` walks the
priority list and takes the first twin with no reasons; a forced backend that
cannot serve raises :class:`~longattn.errors.BackendUnavailableError` listing
every backend and its reasons, so "why did this fail / why is it slow" is
answered by the message alone. ``longattn doctor`` prints the same table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from longattn.errors import ArgumentError, BackendUnavailableError

Call = TypeVar("Call")


@dataclass(frozen=True)
class Backend(Generic[Call]):
    """One twin of a primitive.

    ``machine_reasons()`` says why the twin cannot run on this machine at all
    (library missing, no device); ``call_reasons(call)`` why it cannot serve
    this particular call (dtype, headdim, feature). ``auto_reasons(call)``
    lists why ``backend="auto"`` should not pick it even though it could
    (e.g. the Triton interpreter is correct but slow). ``run(call)`` computes.
    """

    name: str
    description: str
    run: Callable[[Call], object]
    machine_reasons: Callable[[], list[str]]
    call_reasons: Callable[[Call], list[str]]
    auto_reasons: Callable[[Call], list[str]] = field(default=lambda call: [])

    def reasons(self, call: Call) -> list[str]:
        """Every reason this twin cannot serve ``call`` (empty = it can)."""
        return self.machine_reasons() + self.call_reasons(call)


class Registry(Generic[Call]):
    """The twins of one primitive in priority order (fastest first)."""

    def __init__(self, primitive: str, backends: Sequence[Backend[Call]]):
        self.primitive = primitive
        self.backends = list(backends)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def select(self, call: Call, backend: str) -> Backend[Call]:
        """The backend to run ``call`` with; ``backend`` is a name or ``"auto"``."""
        if not isinstance(backend, str) or (backend != "auto" and backend not in self.names):
            raise ArgumentError(
                f"backend must be 'auto' or one of {self.names} for {self.primitive}, got {backend!r}"
            )
        if backend != "auto":
            chosen = self.backends[self.names.index(backend)]
            if not chosen.reasons(call):
                return chosen
            raise BackendUnavailableError(
                f"backend={backend!r} cannot serve this {self.primitive} call; every backend:",
                {b.name: b.reasons(call) for b in self.backends},
            )
        table: dict[str, list[str]] = {}
        for b in self.backends:
            why = b.reasons(call) or b.auto_reasons(call)
            if not why:
                return b
            table[b.name] = why
        raise BackendUnavailableError(f"no backend can serve this {self.primitive} call:", table)

    def machine_table(self) -> dict[str, list[str]]:
        """Per backend, why it cannot run on this machine (empty = usable)."""
        return {b.name: b.machine_reasons() for b in self.backends}
