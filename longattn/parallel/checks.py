"""Fail fast, on every rank, when the ranks of a group disagree.

A collective whose ranks disagree on shapes or options does not fail: it hangs
(until the group's timeout) or computes garbage. :func:`agree` runs one small
``all_gather`` of each rank's metadata (a float64 vector) before any
point-to-point traffic, and every rank compares the same gathered table, so
every rank raises the same kind of named error together. A rank whose inputs
failed its own local checks still joins the gather (flagging itself), raises
its own error, and the other ranks raise the same error class naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from longattn.errors import (
    ArgumentError,
    DeviceError,
    DTypeError,
    LongAttnError,
    ShapeError,
    UnsupportedFeatureError,
)
from longattn.parallel.comm import GroupFacts

# Error classes a failed local check can carry to the other ranks, by index.
_ERROR_CLASSES: tuple[type[LongAttnError], ...] = (
    ArgumentError, ShapeError, DTypeError, DeviceError, UnsupportedFeatureError,
)
DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}


def _error_code(exc: BaseException) -> int:
    # Last match wins over ArgumentError (index 0), which also stands for anything unexpected.
    for i in reversed(range(len(_ERROR_CLASSES))):
        if isinstance(exc, _ERROR_CLASSES[i]):
            return i
    return 0


def _error_for(name: str) -> type[LongAttnError]:
    if name.startswith("dtype"):
        return DTypeError
    if name.startswith(("q ", "k ", "v ")):
        return ShapeError
    return ArgumentError


def agree(
    facts: GroupFacts,
    what: str,
    fields: Sequence[str],
    local_check: Callable[[], Sequence[float]],
    device: torch.device,
) -> None:
    """Run ``local_check`` (returns one number per name in ``fields``, or raises;
    a ``LongAttnError`` travels to the peers as its class), gather every rank's numbers, and raise on every rank
    if any rank failed or any field differs from rank 0's.

    ``what`` names the operation in messages (e.g. ``"ring_attention"``).
    """
    failure: Exception | None = None
    row = torch.zeros(2 + len(fields), dtype=torch.float64)
    try:
        values = list(local_check())
        row[2:] = torch.tensor(values, dtype=torch.float64)
    except Exception as exc:  # join the gather anyway so no peer waits for us (re-raised below)
        failure = exc
        row[0], row[1] = 1.0, float(_error_code(exc))
    row = row.to(device)
    table = [torch.empty_like(row) for _ in range(facts.world_size)]
    dist.all_gather(table, row, group=facts.group)
    rows = torch.stack(table).cpu()
    if failure is not None:
        raise failure
    failed = [r for r in range(facts.world_size) if rows[r, 0] != 0]
    if failed:
        first = failed[0]
        cls = _ERROR_CLASSES[int(rows[first, 1])]
        raise cls(f"{what}: rank {first} of the group rejected its inputs (its own error says why); "
                  f"ranks that failed their local checks: {failed}")
    for r in range(1, facts.world_size):
        for i, name in enumerate(fields):
            mine, theirs = float(rows[0, 2 + i]), float(rows[r, 2 + i])
            if mine != theirs:
                raise _error_for(name)(
                    f"{what}: ranks disagree on {name}: rank 0 has {_show(mine)}, rank {r} has {_show(theirs)}; "
                    "every rank of the group must pass shards of one shape and dtype and the same options"
                )


def _show(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)
