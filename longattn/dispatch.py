"""Backend registry: which twin of a primitive serves a call, and why not.

Each twin declares what it supports as data-driven checks that return a list
of reasons it *cannot* serve (empty = it can). ``backend="auto"`` walks the
priority list and takes the first twin with no reasons; a forced backend that
cannot serve raises :class:`~longattn.errors.BackendUnavailableError` listing
every backend and its reasons, so "why did this fail / why is it slow" is
answered by the message alone. ``longattn doctor`` prints the same table.

Selection runs on every call (a model calls attention once per layer per
token), so a registry may memoise it: given a ``signature(call)`` function,
the twin chosen for a signature is remembered when every twin consulted is
``pure`` (its reasons are functions of the signature and of machine facts
fixed for the life of the process). Errors are never memoised: a call that
cannot be served walks the backends again and reports every reason.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
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
    (e.g. the Triton interpreter is correct but slow). ``run(call)`` computes;
    it is None in a selection-only registry, whose caller drives the twin
    (HiP's search runs the rounds of the scoring twin it selects).
    ``pure`` declares that all three reason functions depend only on what the
    registry's ``signature`` captures (and on machine facts that do not change
    while the process runs, e.g. a build probe already made), so a selection
    that consulted only pure twins can be memoised.
    """

    name: str
    description: str
    run: Callable[[Call], object] | None
    machine_reasons: Callable[[], list[str]]
    call_reasons: Callable[[Call], list[str]]
    auto_reasons: Callable[[Call], list[str]] = field(default=lambda call: [])
    pure: bool = False

    def reasons(self, call: Call) -> list[str]:
        """Every reason this twin cannot serve ``call`` (empty = it can)."""
        return self.machine_reasons() + self.call_reasons(call)


class Registry(Generic[Call]):
    """The twins of one primitive in priority order (fastest first).

    ``signature(call)``, if given, returns a hashable key that determines
    every pure twin's reasons for ``call`` (None: do not memoise this call,
    e.g. while torch.compile traces). At most ``max_memo`` selections are
    remembered; past that the memo starts over (shapes that change every call
    then cost one walk each, as without a memo). ``auto_rules()`` lists the
    measured preferences ``backend="auto"`` applies on this machine beyond the
    priority order (shown by ``longattn doctor``).
    """

    def __init__(
        self,
        primitive: str,
        backends: Sequence[Backend[Call]],
        signature: Callable[[Call], Hashable | None] | None = None,
        max_memo: int = 512,
        auto_rules: Callable[[], list[str]] | None = None,
    ):
        self.primitive = primitive
        self.backends = list(backends)
        # the data-driven preferences of backend="auto" that apply on this
        # machine, one line each (``longattn doctor`` prints them)
        self.auto_rules: Callable[[], list[str]] = auto_rules or (lambda: [])
        self.signature = signature
        self.max_memo = max_memo
        self._by_name = {b.name: b for b in self.backends}
        # (signature, backend name) -> the twin chosen; a cache of a pure
        # function of the key, not state a caller could observe.
        self._memo: dict[Hashable, Backend[Call]] = {}

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def clear_memo(self) -> None:
        """Forget memoised selections (after changing what a pure twin's reasons read)."""
        self._memo.clear()

    def select(self, call: Call, backend: str, signature: Hashable | None = None) -> Backend[Call]:
        """The backend to run ``call`` with; ``backend`` is a name or ``"auto"``.

        ``signature``: ``self.signature(call)`` when the caller has already
        computed it from values it holds (it must equal what that function
        would return); None computes it here.
        """
        key = None
        if self.signature is not None and type(backend) is str:
            if signature is None:
                signature = self.signature(call)
            if signature is not None:
                key = (signature, backend)
                chosen = self._memo.get(key)
                if chosen is not None:
                    return chosen
        chosen, pure = self._walk(call, backend)
        if key is not None and pure:
            if len(self._memo) >= self.max_memo:
                self._memo.clear()
            self._memo[key] = chosen
        return chosen

    def memoised(self, signature: Hashable, backend: str) -> Backend[Call] | None:
        """The twin :meth:`select` remembered for ``(signature, backend)``, if any
        (only pure selections are remembered)."""
        return self._memo.get((signature, backend))

    def select_uncached(self, call: Call, backend: str) -> Backend[Call]:
        """:meth:`select` without the memo (what the memo must agree with)."""
        return self._walk(call, backend)[0]

    def _walk(self, call: Call, backend: str) -> tuple[Backend[Call], bool]:
        """The chosen twin, and whether every twin consulted was pure."""
        if not isinstance(backend, str) or (backend != "auto" and backend not in self._by_name):
            raise ArgumentError(
                f"backend must be 'auto' or one of {self.names} for {self.primitive}, got {backend!r}"
            )
        if backend != "auto":
            chosen = self._by_name[backend]
            if not chosen.reasons(call):
                return chosen, chosen.pure
            raise BackendUnavailableError(
                f"backend={backend!r} cannot serve this {self.primitive} call; every backend:",
                {b.name: b.reasons(call) for b in self.backends},
            )
        table: dict[str, list[str]] = {}
        pure = True
        for b in self.backends:
            pure = pure and b.pure
            why = b.reasons(call) or b.auto_reasons(call)
            if not why:
                return b, pure
            table[b.name] = why
        raise BackendUnavailableError(f"no backend can serve this {self.primitive} call:", table)

    def machine_table(self) -> dict[str, list[str]]:
        """Per backend, why it cannot run on this machine (empty = usable)."""
        return {b.name: b.machine_reasons() for b in self.backends}
