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

from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from longattn.validation import check_tensor


@dataclass(frozen=True)
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


def check_cache(
    q: torch.Tensor,
    k_cache: object,
    v_cache: object,
    cache_seqlens: object,
    block_table: object,
    k_new: object,
    v_new: object,
) -> CacheView:
    """Validate the cache arguments of :func:`longattn.decode_attention` against q."""
    batch, _, nheads, headdim = q.shape
    paged = block_table is not None
    layout = "(num_pages, page_size, nheads_k, headdim)" if paged else "(batch, max_seqlen, nheads_k, headdim)"
    k_cache = check_tensor("k_cache", k_cache, 4, layout)
    v_cache = check_tensor("v_cache", v_cache, 4, layout)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape[3] != headdim:
            raise ShapeError(f"{name} has headdim {t.shape[3]} but q has {headdim}")
    if v_cache.shape != k_cache.shape:
        raise ShapeError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    nheads_k = k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k:
        raise ShapeError(f"q has {nheads} heads, which is not a multiple of the cache's nheads_k {nheads_k}")

    cache_seqlens = _check_int_vector("cache_seqlens", cache_seqlens, batch, q.device)
    lengths = cache_seqlens.to(torch.int64)
    if batch and int(lengths.min()) < 0:
        raise ArgumentError(f"cache_seqlens must be >= 0, got {cache_seqlens.tolist()}")

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
            if t.device != q.device:
                raise DeviceError(f"{name} is on {t.device} but q is on {q.device}")
        seqlen_new = k_new.shape[1]

    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
            got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
            raise ShapeError(f"block_table must be an int32 tensor (batch, max_pages) with batch {batch}, got {got}")
        if block_table.dtype.is_floating_point or block_table.dtype == torch.bool:
            raise DTypeError(f"block_table must be an integer tensor (int32), got {block_table.dtype}")
        if block_table.device != q.device:
            raise DeviceError(f"block_table is on {block_table.device} but q is on {q.device}")
        page_size = k_cache.shape[1]
        if page_size < 1:
            raise ShapeError("k_cache has page_size 0; pages must hold at least one token")
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != batch:
            raise ShapeError(f"k_cache has batch {k_cache.shape[0]} but q has {batch} (contiguous cache; pass block_table for a paged one)")
        capacity = k_cache.shape[1]

    total = lengths + seqlen_new
    if batch and int(total.max()) > capacity:
        worst = int(total.argmax())
        raise ArgumentError(
            f"cache overflow: sequence {worst} needs {int(total[worst])} tokens "
            f"(cache_seqlens {int(lengths[worst])} + seqlen_new {seqlen_new}) but the cache holds {capacity} per sequence"
        )
    if paged and batch:
        num_pages = k_cache.shape[0]
        used = (total + page_size - 1) // page_size  # pages each sequence touches
        cols = torch.arange(block_table.shape[1], device=q.device)
        in_use = cols[None, :] < used[:, None]
        entries = block_table.to(torch.int64)
        bad = in_use & ((entries < 0) | (entries >= num_pages))
        if bool(bad.any()):
            b, p = (int(i) for i in bad.nonzero()[0])
            raise ArgumentError(
                f"block_table[{b}, {p}] = {int(entries[b, p])} is out of range: the cache has {num_pages} pages (0..{num_pages - 1})"
            )
    view = CacheView(k_cache, v_cache, block_table if paged else None, total.to(torch.int32), capacity)
    if k_new is not None and seqlen_new:
        _append(view, lengths, k_new, v_new)
    return view


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
