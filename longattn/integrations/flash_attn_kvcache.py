"""flash-attn 2.8.3's ``flash_attn_with_kvcache`` on :func:`longattn.decode_attention`
(re-exported by :mod:`longattn.integrations.flash_attn`)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from longattn.decode_api import decode_attention
from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError, UnsupportedFeatureError
from longattn.integrations.flash_attn_eager import attention_with_bias, key_slots
from longattn.kernels.decode.rotary import check_rotary_data, check_rotary_layout, rotate_step
from longattn.integrations.flash_attn_options import CacheOverflowError, alibi_slopes_2d, fa_lse, fa_softcap, fa_window
from longattn.validation import check_flag, check_int, check_softmax_scale, check_tensor


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """q ``(batch_size, seqlen_q, nheads, headdim)``; k_cache, v_cache
    ``(batch_size_cache, seqlen_cache, nheads_k, headdim)``, or paged
    ``(num_blocks, page_block_size, nheads_k, headdim)`` with ``block_table
    (batch_size, max_num_blocks_per_seq)`` int32; k, v (new tokens, optional)
    ``(batch_size, seqlen_new, nheads_k, headdim)``; rotary_cos, rotary_sin
    ``(seqlen_ro, rotary_dim / 2)``; cache_seqlens int or ``(batch_size,)`` int32;
    cache_batch_idx, cache_leftpad ``(batch_size,)`` int32; alibi_slopes
    ``(nheads,)`` or ``(batch_size, nheads)`` float32 -> out ``(batch_size,
    seqlen_q, nheads, headdim)``, or ``(out, softmax_lse (batch_size, nheads,
    seqlen_q) float32)`` with ``return_softmax_lse=True``.

    flash-attn's semantics: ``k, v`` are written into the cache **in place** at
    ``cache_seqlens[b] ...`` and attended in the same call; ``cache_seqlens`` is
    not advanced (the caller does it). Sequence ``b`` attends its keys
    ``cache_leftpad[b] .. cache_seqlens[b] + seqlen_new - 1`` of cache row
    ``cache_batch_idx[b]``; causal and windows are bottom-right aligned on that
    range, and so is ALiBi's ``-slope * |i + seqlen_k - seqlen_q - j|``. With
    rotary_cos/sin, ``k`` is rotated at positions ``cache_seqlens[b] + i``
    before it is written, and q at the same positions if causal or local, else
    every query at ``cache_seqlens[b]`` (rotary_dim = 2 * rotary_cos.shape[1];
    ``rotary_interleaved`` pairs channels (0, 1), (2, 3), ... else (i, i +
    rotary_dim / 2)). ``cache_seqlens=None`` means every row is full (no new
    tokens allowed); an int is every sequence's length. A query that sees no
    key gets out 0 and lse ``+inf`` (flash-attn's value).

    How it runs, and what differs from flash-attn:

    - plain calls (contiguous or paged, any page size): :func:`longattn.decode_attention`.
    - ``cache_batch_idx`` / ``cache_leftpad`` / rotary: passed to
      :func:`longattn.decode_attention`, which maps the rows onto its paged
      kernels over the same memory (no copy). A ``cache_batch_idx`` with
      repeated rows is refused when ``k, v`` are appended (flash-attn leaves
      which write wins undefined). With a paged cache both are refused, as in
      flash-attn.
    - ``alibi_slopes``: the PyTorch path (float32, chunked; the new tokens are
      written first, then the sequence's keys are gathered).
    - rotary embedding runs in PyTorch before the kernel (float32 math);
      ``rotary_cos`` needs only as many rows as the positions rotated.
    - ``num_splits`` is accepted and ignored: longattn's stream-K schedule
      decides how the keys are split (the result does not depend on it).
    - the lengths are checked on the host when the tensors are on the CPU, or
      for ``cache_batch_idx`` / ``cache_leftpad`` / ALiBi calls on any device:
      ``cache_seqlens[b] + seqlen_new`` beyond what sequence ``b`` can hold
      raises :class:`CacheOverflowError` (a ``RuntimeError`` too) naming
      ``block_table``, before anything is written. On a GPU the plain path does
      not read the lengths (no host sync): an overflow there is undefined, as
      in flash-attn.
    - no backward (as in flash-attn); head dims, page sizes and dtypes are not
      restricted to what flash-attn's CUDA kernels take.
    """
    q = check_tensor("q", q, 4, "(batch_size, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    cache_layout = ("(num_blocks, page_block_size, nheads_k, headdim)" if paged
                    else "(batch_size_cache, seqlen_cache, nheads_k, headdim)")
    k_cache = check_tensor("k_cache", k_cache, 4, cache_layout)
    v_cache = check_tensor("v_cache", v_cache, 4, cache_layout)
    causal = check_flag("causal", causal)
    rotary_interleaved = check_flag("rotary_interleaved", rotary_interleaved)
    want_lse = check_flag("return_softmax_lse", return_softmax_lse)
    check_int("num_splits", num_splits, minimum=0)
    batch, seqlen_q, nheads, headdim = q.shape
    device = q.device
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
            raise ShapeError(f"block_table must be an int32 tensor (batch_size, max_num_blocks_per_seq), got {got}")
        for name, arg in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if arg is not None:
                raise UnsupportedFeatureError(f"{name} cannot be combined with a paged cache (block_table), as in "
                                              "flash-attn; pass the pages of each sequence through block_table")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    window = fa_window(window_size, causal, capacity)
    softcap = fa_softcap(softcap)
    scale = check_softmax_scale(softmax_scale, headdim)
    if (k is None) != (v is None):
        raise ArgumentError("k and v (the new tokens) must be given together (or neither)")
    seqlen_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, 4, "(batch_size, seqlen_new, nheads_k, headdim)")
            if t.shape[0] != batch or t.shape[2:] != k_cache.shape[2:] or t.shape != k.shape:
                raise ShapeError(f"{name} must have shape (batch_size, seqlen_new, nheads_k, headdim) with batch_size "
                                 f"{batch}, nheads_k {k_cache.shape[2]}, headdim {k_cache.shape[3]}; got "
                                 f"{tuple(t.shape)}")
        seqlen_new = k.shape[1]
    lens = _cache_seqlens(cache_seqlens, batch, capacity, device, k is not None)
    rows = _index_vector("cache_batch_idx", cache_batch_idx, batch, device)
    starts = _index_vector("cache_leftpad", cache_leftpad, batch, device)
    if not paged and rows is None and k_cache.shape[0] != batch:
        raise ShapeError(f"k_cache has batch {k_cache.shape[0]} but q has {batch} (contiguous cache; pass "
                         "cache_batch_idx to select rows, or block_table for a paged cache)")
    slopes = None if alibi_slopes is None else alibi_slopes_2d(alibi_slopes, batch, nheads, device)
    special = rows is not None or starts is not None or slopes is not None

    host = None  # cache_seqlens read on the host, when checked
    if device.type == "cpu" or special:
        host = _check_lengths(lens, rows, starts, k_cache, seqlen_new, capacity, paged, block_table)

    if slopes is None:
        # decode_attention does rotary, cache_batch_idx and cache_leftpad itself (a block table over the
        # same memory, no copy); flash-attn's causal is already folded into window.
        result = decode_attention(q, k_cache, v_cache, cache_seqlens=lens, block_table=block_table, k_new=k,
                                  v_new=v, cache_batch_idx=rows, cache_leftpad=starts, rotary_cos=rotary_cos,
                                  rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                                  softmax_scale=scale, causal=False, window_size=window, softcap=softcap,
                                  return_lse=want_lse, check=True if host is not None else None)
    else:
        if rotary_cos is not None or rotary_sin is not None:
            q, k = _rotary(q, k, rotary_cos, rotary_sin, lens, window, rotary_interleaved, host)
        result = _eager_kvcache(q, k_cache, v_cache, k, v, lens, rows, starts, block_table, host, scale, window,
                                softcap, slopes, want_lse)
    if not want_lse:
        return result
    out, lse = result
    return out, fa_lse(lse)


def _cache_seqlens(cache_seqlens, batch, capacity, device, appending) -> torch.Tensor:
    if cache_seqlens is None:
        if appending:
            raise ArgumentError("cache_seqlens is required when k and v (new tokens) are given: it says where they go")
        return torch.full((batch,), capacity, dtype=torch.int32, device=device)  # flash-attn: every row full
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        # (flash-attn broadcasts an int to k_cache.shape[0], which is wrong for paged caches and
        # cache_batch_idx; the batch of q is what it means)
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    lens = _index_vector("cache_seqlens", cache_seqlens, batch, device)
    if lens is None:
        raise DTypeError(f"cache_seqlens must be an int or an int32 tensor (batch_size,), got {cache_seqlens!r}")
    return lens


def _index_vector(name: str, t: object, batch: int, device: torch.device) -> torch.Tensor | None:
    """An integer ``(batch_size,)`` tensor on q's device, as int32 (None stays None)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be an int32 tensor (batch_size,), got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DTypeError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ShapeError(f"{name} must have shape (batch_size,) = ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise DeviceError(f"{name} is on {t.device} but q is on {device}")
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _check_lengths(lens, rows, starts, k_cache, seqlen_new, capacity, paged, block_table) -> list[int]:
    """The data checks of this module (host values), before anything is written:
    lengths >= 0, rows in range and not repeated when appending, leftpad within
    the length, no overflow. The rest (block_table entries) is decode_attention's."""
    lengths = lens.tolist()
    if lengths and min(lengths) < 0:
        raise ArgumentError(f"cache_seqlens must be >= 0, got {lengths}")
    if rows is not None:
        idx = rows.tolist()
        if idx and (min(idx) < 0 or max(idx) >= k_cache.shape[0]):
            raise ArgumentError(f"cache_batch_idx entries must be in 0..{k_cache.shape[0] - 1} (k_cache has "
                                f"{k_cache.shape[0]} rows), got {idx}")
        if seqlen_new and len(set(idx)) != len(idx):
            raise ArgumentError(f"cache_batch_idx {idx} repeats a row while k, v are appended: two sequences would "
                                "write the same cache row")
    if starts is not None:
        pads = starts.tolist()
        bad = [b for b, (p, n) in enumerate(zip(pads, lengths)) if p < 0 or p > n]
        if bad:
            raise ArgumentError(f"cache_leftpad[b] must be in 0..cache_seqlens[b]; sequence {bad[0]} has leftpad "
                                f"{pads[bad[0]]} and cache_seqlens {lengths[bad[0]]}")
    if lengths and max(lengths) + seqlen_new > capacity:
        b = max(range(len(lengths)), key=lengths.__getitem__)
        where = (f"block_table maps {block_table.shape[1]} pages of {k_cache.shape[1]} tokens" if paged
                 else f"k_cache rows hold {capacity} tokens")
        raise CacheOverflowError(
            f"cache overflow: sequence {b} needs {lengths[b] + seqlen_new} tokens (cache_seqlens {lengths[b]} + "
            f"seqlen_new {seqlen_new}) but {where}; allocate a longer cache or give block_table more pages"
        )
    return lengths


def _rotary(q, k, cos, sin, lens, window, interleaved, host):
    """The ALiBi path's rotary (decode_attention's rules and checks); returns the rotated ``(q, k)``."""
    check_rotary_layout(q, k, cos, sin, interleaved)
    per_query = window != (-1, -1)  # flash-attn: causal or local -> each query at its own position
    if host is not None:
        check_rotary_data(cos, host, q.shape[1], k.shape[1], per_query)
    return rotate_step(q, k, cos, sin, lens, per_query=per_query, interleaved=interleaved)


def _eager_kvcache(q, k_cache, v_cache, k, v, lens, rows, starts, block_table, host, scale, window, softcap, slopes,
                   want_lse):
    """The PyTorch path: write the new tokens, gather each sequence's keys, attend with the bias."""
    batch, device = q.shape[0], q.device
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype or (k is not None and k.dtype != q.dtype):
        raise DTypeError(f"q, k_cache, v_cache (and k, v) must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ShapeError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    if k_cache.device != device or v_cache.device != device:
        raise DeviceError(f"k_cache/v_cache are on {k_cache.device} but q is on {device}")
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != q.shape[3] or nheads_k == 0 or q.shape[2] % nheads_k:
        raise ShapeError(f"k_cache has shape {tuple(k_cache.shape)}: its headdim must be q's ({q.shape[3]}) and its "
                         f"nheads_k must divide q's nheads ({q.shape[2]})")
    seqlen_new = 0 if k is None else k.shape[1]
    page = k_cache.shape[1]
    pads = [0] * batch if starts is None else starts.tolist()
    counts = [n - p + seqlen_new for n, p in zip(host, pads)]  # keys each sequence attends
    width = max(counts, default=0)
    if block_table is not None:
        if block_table.dtype.is_floating_point or block_table.dtype == torch.bool or block_table.shape[0] != batch:
            raise ShapeError(f"block_table must be an int32 tensor (batch_size, max_num_blocks_per_seq) with "
                             f"batch_size {batch}, got {block_table.dtype} {tuple(block_table.shape)}")
        used = [-(-c // page) for c in counts]
        for b, u in enumerate(used):
            entries = block_table[b, :u].tolist()
            if entries and (min(entries) < 0 or max(entries) >= k_cache.shape[0]):
                raise ArgumentError(f"block_table[{b}] has entries outside 0..{k_cache.shape[0] - 1} in its first "
                                    f"{u} pages: {entries}")
    if seqlen_new:
        # Every check passed: write the new tokens where flash-attn writes them.
        pos = lens.to(torch.int64)[:, None] + torch.arange(seqlen_new, device=device)
        if block_table is not None:
            slots = (torch.gather(block_table.to(torch.int64), 1, pos // page), pos % page)
        else:
            row = torch.arange(batch, device=device) if rows is None else rows.to(torch.int64)
            slots = (row[:, None].expand_as(pos), pos)
        k_cache[slots] = k
        v_cache[slots] = v
    first, second = key_slots(rows, starts, block_table, page, batch, width, device)
    keys, values = k_cache[first, second], v_cache[first, second]  # (batch, width, nheads_k, headdim)
    out, lse = attention_with_bias(q, keys, values, seqlens_k=torch.tensor(counts, device=device), scale=scale,
                                   window=window, softcap=softcap, alibi=slopes)
    return (out, lse) if want_lse else out
