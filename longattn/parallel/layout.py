"""How a sequence is split over the ranks of a group: contiguous and zigzag.

``contiguous``: the sequence is cut into ``N`` equal blocks (``N`` = world
size); rank ``r`` holds block ``r``. Simple, but under causal attention rank
``N - 1`` does ``N`` blocks of work and rank 0 one.

``zigzag``: the sequence is cut into ``2N`` equal chunks; rank ``r`` holds
chunks ``r`` and ``2N - 1 - r``, in that order (its local shard is the two
chunks concatenated). Under causal attention every rank does the same work.

Length rule (no implicit padding): the sequence length must be divisible by
``N`` (contiguous) or ``2N`` (zigzag); otherwise :func:`shard` raises
:class:`~longattn.errors.ShapeError` saying the multiple to pad to. Pad at the
END of the sequence: under ``causal=True`` trailing padding keys come after
every real query, so the real rows are unchanged (drop the padded rows of the
output afterwards). Without causal the padded keys would be attended, and
the sequence-parallel functions take no key-padding mask: non-causal
attention needs a length that divides exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.parallel.comm import group_facts

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: object) -> str:
    """``layout`` is ``"zigzag"`` or ``"contiguous"``."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ArgumentError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    """How many equal chunks of the sequence one rank holds (1 or 2)."""
    return 2 if check_layout(layout) == "zigzag" else 1


def local_positions(seqlen: int, layout: str, rank: int, world_size: int) -> torch.Tensor:
    """Global positions (int64, ascending within each chunk) of the tokens rank
    ``rank`` holds, in its local order. No process group needed.

    Example: ``seqlen=8, world_size=2, zigzag``: rank 0 holds ``[0, 1, 6, 7]``,
    rank 1 ``[2, 3, 4, 5]``.
    """
    layout = check_layout(layout)
    parts = world_size * chunks_per_rank(layout)
    _check_divisible(seqlen, parts, layout, world_size, "seqlen")
    size = seqlen // parts
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunks])


def _check_divisible(seqlen: int, parts: int, layout: str, world_size: int, name: str) -> None:
    if seqlen % parts:
        padded = -(-seqlen // parts) * parts
        rule = f"{parts} (= world_size {world_size}" + (" x 2 chunks per rank)" if layout == "zigzag" else ")")
        raise ShapeError(
            f"{name} {seqlen} is not divisible by {rule} for layout {layout!r}; pad the sequence at the end to "
            f"{padded} tokens (trailing padding leaves the real rows of causal attention unchanged)"
        )


def _check_dim(x: object, dim: int, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ArgumentError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}, "
                            f"got {dim!r}")
    return dim % x.dim()


def shard(x: torch.Tensor, layout: str = "zigzag", group: object = None, dim: int = 1) -> torch.Tensor:
    """This rank's local shard of a full tensor (every rank passes the same ``x``).

    Args:
        x: the full tensor, e.g. ``(batch, seqlen, nheads, headdim)``.
        layout: ``"zigzag"`` (rank ``r`` gets chunks ``r`` and ``2N-1-r`` of
            ``2N``) or ``"contiguous"`` (block ``r`` of ``N``).
        group: process group (None = default); ``N`` is its size, ``r`` this
            process's rank in it.
        dim: the sequence dimension (1 in longattn's layout; 2 for an lse
            ``(batch, nheads, seqlen)``).

    Returns:
        A contiguous tensor with ``x.shape[dim] / N`` positions along ``dim``.

    Raises:
        ShapeError: ``x.shape[dim]`` is not divisible by ``N`` (contiguous) or
            ``2N`` (zigzag); the message says what length to pad to.
    """
    dim = _check_dim(x, dim, "x")
    layout = check_layout(layout)
    facts = group_facts(group)
    positions = local_positions_checked(x.shape[dim], layout, facts.rank, facts.world_size, "x.shape[dim]")
    return x.index_select(dim, positions.to(x.device)).contiguous()


def local_positions_checked(seqlen: int, layout: str, rank: int, world_size: int, name: str) -> torch.Tensor:
    """:func:`local_positions` with the length error naming ``name``."""
    _check_divisible(seqlen, world_size * chunks_per_rank(layout), layout, world_size, name)
    return local_positions(seqlen, layout, rank, world_size)


def unshard(local: torch.Tensor, layout: str = "zigzag", group: object = None, dim: int = 1) -> torch.Tensor:
    """The full tensor on every rank, from every rank's local shard (one ``all_gather``).

    The inverse of :func:`shard`: ``unshard(shard(x, layout), layout)`` equals
    ``x`` exactly. Every rank must pass a shard of the same shape and dtype
    (collective: every rank of ``group`` must call it).

    Args:
        local: this rank's shard; ``local.shape[dim]`` is the local length
            (even for zigzag: two equal chunks).
        layout, group, dim: as in :func:`shard`.
    """
    dim = _check_dim(local, dim, "local")
    layout = check_layout(layout)
    facts = group_facts(group)
    per_rank = chunks_per_rank(layout)
    if local.shape[dim] % per_rank:
        raise ShapeError(f"local has {local.shape[dim]} positions along dim {dim}, which layout 'zigzag' needs "
                         "to be even (two equal chunks per rank)")
    local = local.contiguous()
    gathered = [torch.empty_like(local) for _ in range(facts.world_size)]
    dist.all_gather(gathered, local, group=facts.group)
    if layout == "contiguous":
        return torch.cat(gathered, dim)
    n = facts.world_size
    chunks: list[torch.Tensor | None] = [None] * (2 * n)
    for r, part in enumerate(gathered):
        first, second = part.chunk(2, dim)
        chunks[r], chunks[2 * n - 1 - r] = first, second
    return torch.cat(chunks, dim)  # type: ignore[arg-type]
