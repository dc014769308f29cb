"""Shared pieces of the decode-time token selectors (Quest, Double Sparsity,
TidalDecode): reading key rows of a contiguous or paged cache by logical
position, validating a cache handed to a state's ``prefill``, and turning
per-(sequence, kv head) scores into ``-1``-padded position lists for
:func:`longattn.kernels.gather.gather_decode`.

Positions are logical token positions of a sequence: position ``p`` of
sequence ``b`` is ``k_cache[b, p]`` (contiguous) or ``k_cache[block_table[b,
p // page_size], p % page_size]`` (paged), whatever the cache's page order.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from longattn.errors import ArgumentError
from longattn.kernels.decode.cache import check_cache_data, check_cache_layout
from longattn.validation import check_tensor

# Keys read per chunk when a selector scans a whole cache (prefill, Tidal's
# selection layer): bounds the float32 temporaries to ~chunk * nheads_k * headdim.
SCAN_CHUNK = 8192


def check_prefill_cache(owner: str, k_cache: object, cache_seqlens: object,
                        block_table: object) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Validate ``owner.prefill(k_cache, cache_seqlens, block_table)``'s arguments
    with the decode engine's own cache checks; returns ``(k_cache, block_table,
    lengths)`` with ``lengths`` the host ints of ``cache_seqlens``."""
    paged = block_table is not None
    layout = "(num_pages, page_size, nheads_k, headdim)" if paged else "(batch, capacity, nheads_k, headdim)"
    k_cache = check_tensor(f"{owner}.prefill k_cache", k_cache, 4, layout)
    if paged:
        block_table = check_tensor(f"{owner}.prefill block_table", block_table, 2, "(batch, max_pages)",
                                   (torch.int32, torch.int64))
        batch = block_table.shape[0]
    else:
        batch = k_cache.shape[0]
    # A stand-in query of the cache's heads makes every other check the engine's.
    probe = k_cache.new_empty((batch, 1, k_cache.shape[2], k_cache.shape[3]))
    args = check_cache_layout(probe, k_cache, k_cache, cache_seqlens, block_table, None, None)
    lengths = args.cache_seqlens.tolist()
    check_cache_data(args, lengths)
    return k_cache, (block_table if paged else None), lengths


def capacity_of(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Token positions one sequence can address."""
    return k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def key_rows(k_cache: torch.Tensor, block_table: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """Rows of every kv head at ``positions (batch, n)`` (int64, each in range;
    callers clamp padding to 0): ``(batch, n, nheads_k, headdim)``, a copy."""
    b = torch.arange(positions.shape[0], device=positions.device)[:, None]
    if block_table is None:
        return k_cache[b, positions]
    page_size = k_cache.shape[1]
    pages = block_table.to(torch.long)[b, positions // page_size]
    return k_cache[pages, positions % page_size]


def key_span(k_cache: torch.Tensor, block_table: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
    """Rows ``start .. end - 1`` of every sequence: ``(batch, end - start, nheads_k,
    headdim)`` (a view for a contiguous cache; positions past a sequence's pages
    and ``end <= capacity``; rows past a sequence's length are garbage the
    caller masks: a paged read maps unused table entries to page 0, see
    :func:`clamped_table`)."""
    if block_table is None:
        return k_cache[:, start:end]
    positions = torch.arange(start, end, device=k_cache.device).expand(block_table.shape[0], -1)
    return key_rows(k_cache, clamped_table(block_table, k_cache.shape[0]), positions)


def clamped_table(block_table: torch.Tensor | None, num_pages: int) -> torch.Tensor | None:
    """``block_table`` with out-of-range entries (unused slots past a sequence's
    length may hold anything, e.g. -1) replaced by page 0, so a vectorised read
    of a fixed span stays in bounds; the rows read through them are masked."""
    if block_table is None:
        return None
    return torch.where((block_table >= 0) & (block_table < num_pages), block_table, torch.zeros_like(block_table))


def top_positions(scores: torch.Tensor, valid: torch.Tensor | None, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring valid entries along the last axis of ``scores
    (batch, lists, n)``: ``(batch, lists, min(k, n))`` int32 indices, ascending,
    ``-1`` after the last one (rows with fewer than ``k`` valid entries keep all
    of them). ``valid`` is a bool mask like ``scores`` or None (every entry
    valid: skips the masking passes over a long score row). Ties go to
    whichever entry ``torch.topk`` returns (deterministic for a given device)."""
    n = scores.shape[-1]
    k = min(k, n)
    if k == 0:
        return torch.empty((*scores.shape[:-1], 0), dtype=torch.int32, device=scores.device)
    masked = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
    if k == n:
        idx = torch.arange(n, device=scores.device).expand_as(scores)
    else:
        idx = masked.topk(k, dim=-1, sorted=False).indices
    if valid is None:
        return idx.sort(dim=-1).values.to(torch.int32)  # ascending: friendlier to the gather kernels' reads
    keep = valid.gather(-1, idx)
    # Ascending positions (friendlier to the gather kernels' memory reads), padding last.
    idx = torch.where(keep, idx, torch.full_like(idx, n)).sort(dim=-1).values
    return torch.where(idx < n, idx, torch.full_like(idx, -1)).to(torch.int32)


def all_inside(lengths: list[int] | tuple[int, ...]) -> bool:
    """Every sequence is as long as the longest (a length mask would be all True)."""
    return all(n == lengths[0] for n in lengths)


def length_mask(lengths: list[int], n: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """``(batch, n)`` bool: position ``start + j`` lies inside sequence ``b``."""
    lens = torch.tensor(lengths, dtype=torch.long, device=device)
    return (torch.arange(start, start + n, device=device)[None, :] < lens[:, None])


def check_state_batch(owner: str, filled_lengths: tuple[int, ...], lengths: list[int], *,
                      what: str = "this call's cache_seqlens are", advice: str = "") -> None:
    """A state follows one batch of growing sequences: this call's cache must hold
    exactly the tokens the state has seen."""
    if len(lengths) != len(filled_lengths) or any(a != b for a, b in zip(lengths, filled_lengths)):
        advice = advice or ("a state follows one batch of growing sequences (pass it to every step of its layer, "
                            "or call state.reset() / state.prefill(...) for a new batch)")
        raise ArgumentError(f"state ({owner}) covers sequences of lengths {list(filled_lengths)}, but {what} "
                            f"{lengths}: {advice}")


# --- states as handles (torch.compile) -------------------------------------------
# A traced decode step cannot read or update a Python state object; it passes
# the state's integer handle to a custom op, which looks the live object up and
# steps it eagerly. Handles are given out at construction (no side effect while
# tracing); the registry holds the states weakly.

_LIVE_STATES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT_HANDLE = itertools.count(1)


def register_state(state: object) -> int:
    """A new handle for ``state`` (call from its ``__init__``)."""
    handle = next(_NEXT_HANDLE)
    _LIVE_STATES[handle] = state
    return handle


def state_of(handle: int) -> object | None:
    """The live state behind ``handle`` (None for -1: no state)."""
    if handle < 0:
        return None
    state = _LIVE_STATES.get(handle)
    if state is None:
        raise ArgumentError(f"decode state handle {handle} belongs to a state that no longer exists")
    return state
