"""KV caches for decode: validation and appending new tokens.

Two layouts, as in flash-attn's ``flash_attn_with_kvcache``:

- contiguous: ``k_cache, v_cache (batch, max_seqlen, nheads_k, headdim)``;
  sequence ``b`` holds its tokens at ``[b, 0:cache_seqlens[b]]``.
- paged: ``k_cache, v_cache (num_pages, page_size, nheads_k, headdim)`` and
  ``block_table (batch, max_pages)`` int32: token ``p`` of sequence ``b`` is
  in page ``block_table[b, p // page_size]`` at offset ``p % page_size``.
  Pages may be in any order; entries past a sequence's last used page are
  ignored.

``cache_seqlens (batch,)`` counts the tokens already in the cache. New tokens
(``k_new, v_new (batch, seqlen_new, nheads_k, headdim)``) are written in
place at positions ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1``;
``cache_seqlens`` itself is not modified (as in flash-attn): the caller
advances it by ``seqlen_new`` for the next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError, UnsupportedFeatureError
from longattn.validation import check_tensor


@dataclass  # not frozen: built on every decode call, and a frozen __init__ costs ~1 us more
class CacheView:
    """A validated cache: ``seqlens`` = keys attended per sequence after appending."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor | None
    seqlens: torch.Tensor  # (batch,) int32, on the cache's device
    capacity: int  # tokens one sequence can hold

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1] if self.paged else self.capacity


@dataclass  # not frozen, as CacheView
class CacheArgs:
    """The cache arguments of one decode call, checked for everything that can
    be checked without reading tensor data (types, shapes, dtypes, devices):
    :func:`check_cache_layout`. :func:`check_cache_data` checks the rest from
    the lengths read on the host. Nothing is written until both passed."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor  # (batch,) integer, not yet read
    block_table: torch.Tensor | None
    k_new: torch.Tensor | None
    v_new: torch.Tensor | None
    seqlen_new: int
    capacity: int  # tokens one sequence can hold
    page_size: int  # paged: tokens per page; contiguous: capacity

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def batch(self) -> int:
        return self.cache_seqlens.shape[0]

    def view(self, seqlens: torch.Tensor) -> CacheView:
        """The cache as attended: ``seqlens (batch,)`` int32 keys per sequence."""
        return CacheView(self.k_cache, self.v_cache, self.block_table, seqlens, self.capacity)


def _check_int_vector(name: str, t: object, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be an int32 tensor (batch,), got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DTypeError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    if t.shape != (length,):
        raise ShapeError(f"{name} must have shape (batch,) = ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise DeviceError(f"{name} is on {t.device} but q is on {device}")
    return t


def check_cache_layout(
    q: torch.Tensor,
    k_cache: object,
    v_cache: object,
    cache_seqlens: object,
    block_table: object,
    k_new: object,
    v_new: object,
) -> CacheArgs:
    """Validate the cache arguments of :func:`longattn.decode_attention` against
    q without reading tensor data (no host sync, traceable by torch.compile)."""
    fast = _layout_fast(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    if fast is not None:
        return fast
    return _check_layout_full(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)


def _layout_fast(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new) -> CacheArgs | None:
    """The common valid call (contiguous cache, with or without new tokens) in
    one chain of cheap comparisons: a decode step runs once per layer per
    token. Accepts only what the full check accepts; None sends everything
    else (every invalid input included) to the full check."""
    if block_table is not None or type(k_cache) is not torch.Tensor or type(v_cache) is not torch.Tensor:
        return None
    if type(cache_seqlens) is not torch.Tensor:
        return None
    qs, ks = q.shape, k_cache.shape
    dtype, device = q.dtype, q.device
    if not (
        len(ks) == 4 and v_cache.shape == ks and ks[0] == qs[0] and ks[3] == qs[3]
        and ks[2] != 0 and qs[2] % ks[2] == 0
        and k_cache.dtype is dtype and v_cache.dtype is dtype
        and cache_seqlens.dtype is torch.int32 and cache_seqlens.shape == (qs[0],)
        and k_cache.device == device and v_cache.device == device and cache_seqlens.device == device
    ):
        return None
    seqlen_new = 0
    if k_new is not None:
        if type(k_new) is not torch.Tensor or type(v_new) is not torch.Tensor:
            return None
        ns = k_new.shape
        if not (
            len(ns) == 4 and v_new.shape == ns and ns[0] == qs[0] and ns[2] == ks[2] and ns[3] == qs[3]
            and k_new.dtype is dtype and v_new.dtype is dtype
            and k_new.device == device and v_new.device == device
        ):
            return None
        seqlen_new = ns[1]
    elif v_new is not None:
        return None
    return CacheArgs(k_cache, v_cache, cache_seqlens, None, k_new, v_new, seqlen_new, ks[1], ks[1])


def _check_layout_full(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new) -> CacheArgs:
    batch, _, nheads, headdim = q.shape
    paged = block_table is not None
    layout = "(num_pages, page_size, nheads_k, headdim)" if paged else "(batch, max_seqlen, nheads_k, headdim)"
    k_cache = check_tensor("k_cache", k_cache, 4, layout)
    v_cache = check_tensor("v_cache", v_cache, 4, layout)
    device = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != device:
            raise DeviceError(f"{name} is on {t.device} but q is on {device}")
        if t.shape[3] != headdim:
            raise ShapeError(f"{name} has headdim {t.shape[3]} but q has {headdim}")
    if v_cache.shape != k_cache.shape:
        raise ShapeError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    nheads_k = k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k:
        raise ShapeError(f"q has {nheads} heads, which is not a multiple of the cache's nheads_k {nheads_k}")

    cache_seqlens = _check_int_vector("cache_seqlens", cache_seqlens, batch, device)

    seqlen_new = 0
    if (k_new is None) != (v_new is None):
        raise ArgumentError("k_new and v_new must be given together (or neither)")
    if k_new is not None:
        k_new = check_tensor("k_new", k_new, 4, "(batch, seqlen_new, nheads_k, headdim)")
        v_new = check_tensor("v_new", v_new, 4, "(batch, seqlen_new, nheads_k, headdim)")
        want = (batch, k_new.shape[1], nheads_k, headdim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if tuple(t.shape) != want:
                raise ShapeError(f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = {want}, got {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise DTypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
            if t.device != device:
                raise DeviceError(f"{name} is on {t.device} but q is on {device}")
        seqlen_new = k_new.shape[1]

    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
            got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
            raise ShapeError(f"block_table must be an int32 tensor (batch, max_pages) with batch {batch}, got {got}")
        if block_table.dtype.is_floating_point or block_table.dtype.is_complex or block_table.dtype == torch.bool:
            raise DTypeError(f"block_table must be an integer tensor (int32), got {block_table.dtype}")
        if block_table.device != device:
            raise DeviceError(f"block_table is on {block_table.device} but q is on {device}")
        page_size = k_cache.shape[1]
        if page_size < 1:
            raise ShapeError("k_cache has page_size 0; pages must hold at least one token")
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != batch:
            raise ShapeError(f"k_cache has batch {k_cache.shape[0]} but q has {batch} (contiguous cache; pass cache_batch_idx to pick rows, or block_table for a paged one)")
        capacity = page_size = k_cache.shape[1]
    return CacheArgs(k_cache, v_cache, cache_seqlens, block_table if paged else None, k_new, v_new,
                     seqlen_new, capacity, page_size)


# Paged checks walk the used block_table entries in Python (cheap for the
# few pages of a short cache); past this many entries one vectorised pass
# over the table is cheaper. Both raise the same errors.
PYTHON_TABLE_CHECK_MAX = 1024


def check_cache_data(args: CacheArgs, lengths: list[int], *, python_max: int | None = None) -> None:
    """The checks that read data, from ``lengths`` (``cache_seqlens`` read on the
    host once): lengths >= 0, no overflow, block_table entries in range, and no
    page written by one sequence's new tokens that another table entry in use
    (another sequence's visible or appended range, or another slot of the same
    row) also maps: two writers or a writer and a reader of one page is a data
    race that corrupts the cache. Read-only sharing (a common prefix) is fine."""
    if not lengths:
        return
    seqlen_new, capacity = args.seqlen_new, args.capacity
    if min(lengths) < 0:
        raise ArgumentError(f"cache_seqlens must be >= 0, got {lengths}")
    worst = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[worst] + seqlen_new > capacity:
        raise ArgumentError(
            f"cache overflow: sequence {worst} needs {lengths[worst] + seqlen_new} tokens "
            f"(cache_seqlens {lengths[worst]} + seqlen_new {seqlen_new}) but the cache holds {capacity} per sequence"
        )
    if not args.paged:
        return
    page_size = args.page_size
    used = [-(-(n + seqlen_new) // page_size) for n in lengths]  # pages each sequence touches
    # First page slot that receives new tokens (== used: none).
    first_written = [n // page_size if seqlen_new else u for n, u in zip(lengths, used)]
    limit = PYTHON_TABLE_CHECK_MAX if python_max is None else python_max
    if sum(used) <= limit:
        _check_table_python(args, used, first_written)
    else:
        _check_table_torch(args, used, first_written)


def _range_error(b: int, col: int, page: int, num_pages: int) -> ArgumentError:
    return ArgumentError(
        f"block_table[{b}, {col}] = {page} is out of range: the cache has {num_pages} pages (0..{num_pages - 1})"
    )


def _shared_error(b: int, col: int, page: int, other_b: int, other_col: int, written_by_other: bool) -> ArgumentError:
    what = "new tokens" if written_by_other else "visible tokens"
    return ArgumentError(
        f"block_table[{b}, {col}] = {page} receives new tokens of sequence {b}, but page {page} is also "
        f"block_table[{other_b}, {other_col}] (sequence {other_b}'s {what}): a page written by one sequence "
        "must not be used by any other table entry (two writers, or a writer and a reader, corrupt the cache)"
    )


def _check_table_python(args: CacheArgs, used: list[int], first_written: list[int]) -> None:
    num_pages, max_used = args.k_cache.shape[0], max(used)
    rows = args.block_table[:, :max_used].tolist()
    for b, (row, u) in enumerate(zip(rows, used)):
        if u and (min(row[:u]) < 0 or max(row[:u]) >= num_pages):
            col = next(c for c in range(u) if not 0 <= row[c] < num_pages)
            raise _range_error(b, col, row[col], num_pages)
    if all(w >= u for w, u in zip(first_written, used)):
        return  # nothing is written (a plain decode read): no page can be raced on
    owners: dict[int, list[tuple[int, int]]] = {}
    for b, (row, u) in enumerate(zip(rows, used)):
        for col in range(u):
            owners.setdefault(row[col], []).append((b, col))
    for b, (row, u, w) in enumerate(zip(rows, used, first_written)):
        for col in range(w, u):
            entries = owners[row[col]]
            if len(entries) > 1:
                other_b, other_col = next(e for e in entries if e != (b, col))
                raise _shared_error(b, col, row[col], other_b, other_col, other_col >= first_written[other_b])


def _check_table_torch(args: CacheArgs, used: list[int], first_written: list[int]) -> None:
    """Vectorised twin of :func:`_check_table_python` (same errors, same order)."""
    num_pages, max_used = args.k_cache.shape[0], max(used)
    table = args.block_table[:, :max_used].to(torch.int64)
    device = table.device
    cols = torch.arange(max_used, device=device)[None, :]
    in_use = cols < torch.tensor(used, device=device)[:, None]
    bad = in_use & ((table < 0) | (table >= num_pages))
    if bool(bad.any()):
        b, col = bad.nonzero()[0].tolist()
        raise _range_error(b, col, int(table[b, col]), num_pages)
    written = in_use & (cols >= torch.tensor(first_written, device=device)[:, None])
    if not bool(written.any()):
        return
    counts = torch.bincount(table[in_use], minlength=num_pages)
    shared = written & (counts[table.clamp(0, num_pages - 1)] > 1)
    if bool(shared.any()):
        b, col = shared.nonzero()[0].tolist()
        page = int(table[b, col])
        same = (in_use & (table == page)).nonzero().tolist()
        other_b, other_col = next(e for e in same if e != [b, col])
        raise _shared_error(b, col, page, other_b, other_col, other_col >= first_written[other_b])


def attended_seqlens(args: CacheArgs, lengths: list[int] | None) -> torch.Tensor:
    """``cache_seqlens + seqlen_new`` as int32 on the cache's device: the keys
    each sequence attends. From host ``lengths`` when known (a CPU tensor
    build), else one device op (no sync)."""
    seqlens = args.cache_seqlens
    if args.seqlen_new == 0 and seqlens.dtype == torch.int32:
        return seqlens
    if lengths is not None and seqlens.device.type == "cpu":
        return torch.tensor([n + args.seqlen_new for n in lengths], dtype=torch.int32)
    return (seqlens + args.seqlen_new).to(torch.int32)


# Contiguous appends for up to this many sequences are per-sequence slice
# copies from host lengths (a couple of copy_ calls instead of an index build).
SLICE_APPEND_MAX_BATCH = 8


def append_new(args: CacheArgs, lengths: list[int] | None) -> None:
    """Write ``k_new, v_new`` into the cache (call only after every check passed).
    ``lengths``: ``cache_seqlens`` as host ints if already read, else None."""
    if args.k_new is None or args.seqlen_new == 0 or args.batch == 0:
        return
    if lengths is not None and not args.paged:
        n_new = args.seqlen_new
        if min(lengths) == max(lengths):  # one slice of every sequence (batch 1, or lockstep)
            args.k_cache.narrow(1, lengths[0], n_new).copy_(args.k_new)
            args.v_cache.narrow(1, lengths[0], n_new).copy_(args.v_new)
            return
        if len(lengths) <= SLICE_APPEND_MAX_BATCH:
            for b, start in enumerate(lengths):
                args.k_cache[b].narrow(0, start, n_new).copy_(args.k_new[b])
                args.v_cache[b].narrow(0, start, n_new).copy_(args.v_new[b])
            return
    view = args.view(args.cache_seqlens)
    _append(view, args.cache_seqlens.to(torch.int64), args.k_new, args.v_new)


def check_cache(
    q: torch.Tensor,
    k_cache: object,
    v_cache: object,
    cache_seqlens: object,
    block_table: object,
    k_new: object,
    v_new: object,
) -> CacheView:
    """Validate everything (reading ``cache_seqlens`` on the host), then append
    ``k_new, v_new``; returns the cache as attended. For tests and callers that
    drive a twin directly; :func:`longattn.decode_attention` runs the same
    steps with backend selection between the checks and the write."""
    args = check_cache_layout(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    lengths = args.cache_seqlens.tolist()
    check_cache_data(args, lengths)
    seqlens = attended_seqlens(args, lengths)
    append_new(args, lengths)
    return args.view(seqlens)


def _append(view: CacheView, starts: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Write ``k_new, v_new`` into the cache at positions ``starts[b] + arange(seqlen_new)``."""
    batch, seqlen_new = k_new.shape[:2]
    positions = starts[:, None] + torch.arange(seqlen_new, device=starts.device)[None, :]  # (batch, seqlen_new)
    if view.paged:
        page_size = view.page_size
        pages = torch.gather(view.block_table.to(torch.int64), 1, positions // page_size)
        slots = (pages, positions % page_size)
    else:
        slots = (torch.arange(batch, device=starts.device)[:, None].expand_as(positions), positions)
    view.k_cache[slots] = k_new
    view.v_cache[slots] = v_new


# --- cache_batch_idx / cache_leftpad ------------------------------------------
# flash-attn's row selection and left padding for contiguous caches, mapped
# onto the paged layout over the same memory (no copy): with cache_batch_idx
# alone each cache row is one page (page_size = max_seqlen, block_table =
# cache_batch_idx); with cache_leftpad every token is its own page
# (page_size 1) so a sequence's block_table row can start mid-row.


@dataclass
class RowSelect:
    """Checked ``cache_batch_idx`` / ``cache_leftpad`` (either may be None)."""

    rows: torch.Tensor | None  # (batch,) integer, cache row of each sequence
    leftpad: torch.Tensor | None  # (batch,) integer, first visible slot of each sequence


def check_row_layout(
    q: torch.Tensor,
    k_cache: object,
    v_cache: object,
    block_table: object,
    cache_batch_idx: object,
    cache_leftpad: object,
) -> RowSelect:
    """Layout checks of ``cache_batch_idx`` / ``cache_leftpad`` (no data read)."""
    if block_table is not None:
        name = "cache_batch_idx" if cache_batch_idx is not None else "cache_leftpad"
        raise UnsupportedFeatureError(f"{name} applies to a contiguous cache; with a paged cache (block_table) "
                                      "give each sequence its pages through block_table (as in flash-attn)")
    layout = "(batch_cache, max_seqlen, nheads_k, headdim)"
    k_cache = check_tensor("k_cache", k_cache, 4, layout)
    v_cache = check_tensor("v_cache", v_cache, 4, layout)
    if v_cache.shape != k_cache.shape:
        raise ShapeError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    batch, device = q.shape[0], q.device
    rows = None if cache_batch_idx is None else _check_int_vector("cache_batch_idx", cache_batch_idx, batch, device)
    pads = None if cache_leftpad is None else _check_int_vector("cache_leftpad", cache_leftpad, batch, device)
    if rows is None and k_cache.shape[0] != batch:
        raise ShapeError(f"k_cache has batch {k_cache.shape[0]} but q has {batch} (pass cache_batch_idx to pick "
                         "cache rows)")
    if pads is not None and _token_pages(k_cache) != _token_pages(v_cache):
        raise ShapeError(f"k_cache strides {k_cache.stride()} and v_cache strides {v_cache.stride()} lay tokens out "
                         "differently; cache_leftpad needs one token layout for both")
    return RowSelect(rows, pads)


def check_row_data(k_cache: torch.Tensor, select: RowSelect, lengths: list[int], seqlen_new: int) -> None:
    """Data checks (``lengths`` = cache_seqlens on the host): lengths >= 0, rows in
    range and not repeated while appending, ``0 <= leftpad <= cache_seqlens``,
    and ``cache_seqlens + seqlen_new <= max_seqlen`` (positions count from the row start)."""
    if not lengths:
        return
    if min(lengths) < 0:
        raise ArgumentError(f"cache_seqlens must be >= 0, got {lengths}")
    if select.rows is not None:
        idx = select.rows.tolist()
        n_rows = k_cache.shape[0]
        if min(idx) < 0 or max(idx) >= n_rows:
            raise ArgumentError(f"cache_batch_idx entries must be in 0..{n_rows - 1} (k_cache has {n_rows} rows), "
                                f"got {idx}")
        if seqlen_new and len(set(idx)) != len(idx):
            raise ArgumentError(f"cache_batch_idx {idx} repeats a row while k_new, v_new are appended: two "
                                "sequences would write the same cache row")
    if select.leftpad is not None:
        pads = select.leftpad.tolist()
        bad = [b for b, (p, n) in enumerate(zip(pads, lengths)) if p < 0 or p > n]
        if bad:
            b = bad[0]
            raise ArgumentError(f"cache_leftpad[b] must be in 0..cache_seqlens[b]; sequence {b} has cache_leftpad "
                                f"{pads[b]} and cache_seqlens {lengths[b]}")
    worst = max(range(len(lengths)), key=lengths.__getitem__)
    capacity = k_cache.shape[1]
    if lengths[worst] + seqlen_new > capacity:
        raise ArgumentError(
            f"cache overflow: sequence {worst} needs {lengths[worst] + seqlen_new} tokens (cache_seqlens "
            f"{lengths[worst]} + seqlen_new {seqlen_new}, counted from the start of its cache row) but the cache "
            f"holds {capacity} per row"
        )


def _token_pages(cache: torch.Tensor) -> tuple[int, int, int]:
    """``(unit, row_step, token_step)``: token ``s`` of row ``r`` starts at element
    ``(r * row_step + s * token_step) * unit`` past the cache's offset. unit is
    the gcd of the two strides, so page-size-1 pages of ``unit`` elements
    address every token whatever the strides (a slice of a longer cache too)."""
    s0 = cache.stride(0) if cache.shape[0] > 1 else 0
    s1 = cache.stride(1) if cache.shape[1] > 1 else 0
    unit = math.gcd(s0, s1) or 1
    return unit, s0 // unit, s1 // unit


def _token_view(cache: torch.Tensor) -> torch.Tensor:
    """``cache (rows, max_seqlen, nheads_k, headdim)`` as page-size-1 pages over the same memory."""
    rows, width, nheads_k, headdim = cache.shape
    unit, row_step, token_step = _token_pages(cache)
    pages = (rows - 1) * row_step + (width - 1) * token_step + 1 if rows and width else 0
    return cache.as_strided((pages, 1, nheads_k, headdim), (unit, unit, cache.stride(2), cache.stride(3)),
                            cache.storage_offset())


def row_view(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    select: RowSelect,
    lengths: list[int] | None,
    seqlen_new: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k_pages, v_pages, block_table, view_seqlens)``: the selected rows as a
    paged cache over the same memory, where sequence ``b``'s token ``j`` is
    slot ``leftpad[b] + j`` of row ``rows[b]`` and ``view_seqlens =
    cache_seqlens - leftpad``. ``lengths`` (host cache_seqlens, when read)
    narrows the table to the longest sequence; otherwise it spans the row."""
    batch = cache_seqlens.shape[0]
    width = k_cache.shape[1]
    device = cache_seqlens.device
    rows = (torch.arange(batch, device=device, dtype=torch.int32) if select.rows is None
            else select.rows.to(torch.int32))
    if select.leftpad is None and width > 0:
        # Each row is one page: no index build at all.
        return k_cache, v_cache, rows.view(batch, 1), cache_seqlens
    pads = torch.zeros(batch, dtype=torch.int64, device=device) if select.leftpad is None else select.leftpad.to(torch.int64)
    if lengths is not None and device.type == "cpu":
        pad_list = pads.tolist()
        view_lens = torch.tensor([n - p for n, p in zip(lengths, pad_list)], dtype=torch.int32)
        span = max([n - p + seqlen_new for n, p in zip(lengths, pad_list)], default=0)
    else:
        view_lens = (cache_seqlens.to(torch.int64) - pads).to(torch.int32)
        span = width
    _, row_step, token_step = _token_pages(k_cache)
    slot = (pads[:, None] + torch.arange(span, device=device)[None, :]).clamp(max=max(width - 1, 0))
    table = (rows.to(torch.int64)[:, None] * row_step + slot * token_step).to(torch.int32)
    return _token_view(k_cache), _token_view(v_cache), table, view_lens
