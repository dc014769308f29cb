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
from dataclasses import dataclass

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
from longattn.parallel.layout import check_layout
from longattn.validation import check_attention_options, check_flag, check_qkv

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


@dataclass(frozen=True)
class ShardedOptions:
    """The validated options of a sequence-parallel call, the same on every rank."""

    causal: bool
    return_lse: bool
    scale: float
    window: tuple[int, int]
    softcap: float
    layout: str
    grad: bool  # q, k or v requires grad (and grad mode is on): the call's backward is collective too


_SHARDED_FIELDS = (
    "q batch", "q local seqlen", "q nheads", "q headdim", "k local seqlen", "k nheads_k",
    "dtype (1=float32, 2=float16, 3=bfloat16)", "layout (0=zigzag, 1=contiguous)", "causal",
    "softmax_scale", "softcap", "window_size left", "window_size right",
    "autograd (q, k or v requires grad)",
)


def settle_sharded(
    what: str,
    facts: GroupFacts,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: object,
    return_lse: object,
    softmax_scale: object,
    window_size: object,
    softcap: object,
    layout: object,
    check: object,
    extra_fields: Sequence[str] = (),
    extra_check: Callable[[ShardedOptions], Sequence[float]] | None = None,
) -> ShardedOptions:
    """Validate the local shards and options of ``what`` (a sharded-sequence
    attention taking q, k, v shards of equal local length in ``layout``) and,
    with ``check`` (on by default), :func:`agree` on them across the group.

    ``extra_check(options)`` adds method-specific checks (raise a named error)
    and returns one value per name in ``extra_fields`` that every rank must
    agree on. Agreeing on ``autograd`` matters: a rank that runs the
    collective backward while another does not would wait for it forever.
    """
    check = check_flag("check", check)
    settled: list[ShardedOptions] = []

    def local_check() -> list[float]:
        check_qkv(q, k, v)
        is_causal, want_lse, scale, window, cap = check_attention_options(
            q.shape[3], causal, return_lse, softmax_scale, window_size, softcap
        )
        lay = check_layout(layout)
        if k.shape[1] != q.shape[1]:
            raise ShapeError(f"{what}: k has local seqlen {k.shape[1]} but q has {q.shape[1]}; the shards of q, "
                             "k and v are cut from one sequence alike")
        if lay == "zigzag" and q.shape[1] % 2:
            raise ShapeError(f"{what}: q has local seqlen {q.shape[1]}, which layout 'zigzag' needs to be even "
                             "(two equal chunks per rank); pad the full sequence to a multiple of 2 x world_size "
                             "(see longattn.parallel.shard)")
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        options = ShardedOptions(is_causal, want_lse, scale, window, cap, lay, grad)
        extra = list(extra_check(options)) if extra_check is not None else []
        settled.append(options)
        return [q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2], DTYPE_CODES[q.dtype],
                0 if lay == "zigzag" else 1, float(is_causal), scale, cap, window[0], window[1], float(grad),
                *extra]

    if check:
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        agree(facts, what, (*_SHARDED_FIELDS, *extra_fields), local_check, device)
    else:
        local_check()
    return settled[0]
