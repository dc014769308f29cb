"""Errors raised by longattn.

Every public function validates its inputs and raises one of these. The
message names the argument, what was expected and what was given, e.g.
``"k has headdim 64 but q has 128"``. Each class also derives from the
builtin exception that fits, so ``except ValueError`` keeps working for
callers that do not know longattn.
"""

from __future__ import annotations


class LongAttnError(Exception):
    """Base class of every error longattn raises on purpose."""


class ShapeError(LongAttnError, ValueError):
    """A tensor has the wrong number of dimensions or a mismatched size."""


class DTypeError(LongAttnError, TypeError):
    """A tensor has a dtype longattn does not accept, or dtypes disagree."""


class DeviceError(LongAttnError, ValueError):
    """Tensors live on different devices, or on one a backend cannot use."""


class ArgumentError(LongAttnError, ValueError):
    """A non-tensor argument is out of range or of the wrong kind."""


class UnsupportedFeatureError(LongAttnError, NotImplementedError):
    """The request is valid but this feature (or combination) is not supported."""


class BackendUnavailableError(UnsupportedFeatureError):
    """No backend (or not the forced one) can serve the request.

    ``reasons`` maps every backend name considered to the list of reasons it
    was rejected, so the message alone answers "why did this fail".
    """

    def __init__(self, message: str, reasons: dict[str, list[str]]):
        self.reasons = reasons
        lines = [message]
        for name, why in reasons.items():
            lines.append(f"  {name}: " + ("; ".join(why) if why else "can serve"))
        super().__init__("\n".join(lines))


class CorruptKVError(LongAttnError, OSError):
    """A KV page or file on disk failed its checksum, is truncated or is not a
    longattn file; the message names the file and the page. Never used silently."""


class OffloadIOError(LongAttnError, OSError):
    """A KV offload file could not be written or read (disk full, permission
    denied, file removed, locked by another process); the message names the
    file. What was committed before stays intact and readable."""


class OffloadCapacityError(LongAttnError, MemoryError):
    """A tiered KV cache has no room left: its byte budgets are full and it has
    no disk tier (or the page cannot move down)."""
