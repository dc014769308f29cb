"""flash-attn 2.8.3's Python API on longattn: change one import line.

    # from flash_attn import flash_attn_func, flash_attn_with_kvcache
    from longattn.integrations.flash_attn import flash_attn_func, flash_attn_with_kvcache

Every function has flash-attn 2.8.3's signature (positional order, names,
defaults) and return conventions, and runs on :func:`longattn.attention` /
:func:`longattn.decode_attention` (CPU and GPU, float32/float16/bfloat16).
flash-attn's conventions that longattn's front doors do not share are
converted here:

- ``window_size`` may be a tuple, a list or a 2-element integer tensor; any
  negative entry means unbounded; ``causal=True`` sets the right window to 0
  (longattn's front doors refuse a positive right window with causal);
  fixed-length and KV-cache calls treat an edge ``>= seqlen_k`` as unbounded,
  as flash-attn's kernels do.
- ``softcap <= 0`` disables softcapping.
- the lse of a query that sees no key is ``+inf`` (longattn: ``-inf``).
- ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``, where
  ``S_dmask`` is an empty tensor, as flash-attn returns whenever
  ``dropout_p == 0`` (its probabilities only come with dropout).
- ``flash_attn_with_kvcache``: ``cache_seqlens`` may be an int; a cache
  overflow raises :class:`CacheOverflowError` (also a ``RuntimeError``) when
  the lengths are checked (see :func:`flash_attn_with_kvcache`).

What differs from flash-attn:

- ``dropout_p > 0`` is refused (:class:`~longattn.errors.UnsupportedFeatureError`,
  also a ``RuntimeError``): longattn is an inference library, its kernels
  have no dropout. ``deterministic`` is accepted and has no effect: longattn's
  forward and backward are always deterministic.
- ``alibi_slopes`` runs on a PyTorch path (float32, chunked over query rows,
  differentiable; :func:`~longattn.integrations.flash_attn_eager.attention_with_bias`):
  longattn's kernels take no bias. Correct everywhere, not fast.
- ``flash_attn_varlen_func(block_table=...)`` (paged keys) gathers the pages
  into packed keys first (a copy of the keys). It also takes ``seqused_k=``
  (keyword only), which flash-attn's varlen kernel has and its Python
  function does not expose: sequence ``b`` uses its first ``seqused_k[b]`` keys.
- ``flash_attn_with_kvcache``: ``num_splits`` is accepted and ignored (longattn's
  stream-K schedule decides the split); rotary embedding is applied in PyTorch
  before the kernel; ``cache_batch_idx`` and ``cache_leftpad`` run as a
  page-size-1 block table over the same cache memory (no copy) when the cache
  rows are back to back in memory, else on the PyTorch path; a
  ``cache_batch_idx`` with repeated rows is refused when new tokens are
  appended (flash-attn leaves which write wins undefined). There is no backward
  (as in flash-attn). flash-attn's other limits (head dim a multiple of 8 and at
  most 256, page sizes a multiple of 256, fp16/bf16 only) do not apply.
"""

from __future__ import annotations

import torch

from longattn.api import attention
from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from longattn.integrations.flash_attn_eager import attention_with_bias
from longattn.integrations.flash_attn_kvcache import flash_attn_with_kvcache
from longattn.integrations.flash_attn_options import CacheOverflowError, alibi_slopes_2d, check_dropout, fa_lse, \
    fa_softcap, fa_window
from longattn.validation import check_flag, check_qkv, check_seqused_k, check_softmax_scale, check_tensor, check_varlen

__all__ = [
    "CacheOverflowError",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _unpack(name: str, packed: object, ndim: int, dim: int, count: int, layout: str) -> tuple[torch.Tensor, ...]:
    packed = check_tensor(name, packed, ndim, layout)
    if packed.shape[dim] != count:
        raise ShapeError(f"{name} must have shape {layout}, got {tuple(packed.shape)} (size {packed.shape[dim]} "
                         f"where {count} is expected)")
    return packed.unbind(dim)


# --- fixed-length ---------------------------------------------------------------

def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs):
    check_dropout(dropout_p)
    causal = check_flag("causal", causal)
    check_flag("deterministic", deterministic)
    probs = check_flag("return_attn_probs", return_attn_probs)
    seqlen_k = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else None
    window = fa_window(window_size, causal, seqlen_k)
    softcap = fa_softcap(softcap)
    if alibi_slopes is None:
        result = attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window, softcap=softcap,
                           return_lse=probs)
        if not probs:
            return result
        out, lse = result
    else:
        check_qkv(q, k, v)
        scale = check_softmax_scale(softmax_scale, q.shape[-1])
        out, lse = attention_with_bias(q, k, v, seqlens_k=None, scale=scale, window=window, softcap=softcap,
                                       alibi=alibi_slopes_2d(alibi_slopes, q.shape[0], q.shape[2], q.device))
        if not probs:
            return out
    return out, fa_lse(lse), q.new_empty((0,))


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(batch_size, seqlen_q, nheads, headdim)``, k, v ``(batch_size, seqlen_k,
    nheads_k, headdim)`` -> out ``(batch_size, seqlen_q, nheads, headdim)``; with
    ``return_attn_probs=True`` ``(out, softmax_lse (batch_size, nheads, seqlen_q)
    float32, S_dmask)``.

    flash-attn's ``flash_attn_func`` on :func:`longattn.attention`: bottom-right
    causal, ``(left, right)`` windows, softcap, GQA/MQA, ``alibi_slopes``
    ``(nheads,)`` or ``(batch_size, nheads)`` float32 (bias ``-slope * |i +
    seqlen_k - seqlen_q - j|``). Differentiable in q, k, v.

    Differs from flash-attn: ``dropout_p > 0`` raises
    :class:`~longattn.errors.UnsupportedFeatureError`; ``S_dmask`` is the empty
    tensor flash-attn returns without dropout; ``deterministic`` has no effect
    (always deterministic); ALiBi runs on a PyTorch path (float32, slower).
    """
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # <=0.0 means deactivate
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv ``(batch_size, seqlen, 3, nheads, headdim)`` -> out ``(batch_size,
    seqlen, nheads, headdim)`` (and ``softmax_lse (batch_size, nheads, seqlen)``,
    ``S_dmask`` with ``return_attn_probs=True``).

    :func:`flash_attn_func` on ``qkv.unbind(2)`` (views, no copy); the same
    differences from flash-attn."""
    q, k, v = _unpack("qkv", qkv, 5, 2, 3, "(batch_size, seqlen, 3, nheads, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(batch_size, seqlen_q, nheads, headdim)``, kv ``(batch_size, seqlen_k, 2,
    nheads_k, headdim)`` -> out ``(batch_size, seqlen_q, nheads, headdim)`` (and
    ``softmax_lse``, ``S_dmask`` with ``return_attn_probs=True``).

    :func:`flash_attn_func` on ``kv.unbind(2)`` (views, no copy); the same
    differences from flash-attn."""
    k, v = _unpack("kv", kv, 5, 2, 2, "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


# --- varlen ---------------------------------------------------------------------

def _gather_paged(k, v, cu_seqlens_k, block_table):
    """Paged keys ``(num_blocks, page_block_size, nheads_k, headdim)`` + ``block_table
    (batch, max_blocks)`` -> packed ``(total_k, nheads_k, headdim)`` (a copy)."""
    layout = "(num_blocks, page_block_size, nheads_k, headdim) with block_table"
    k, v = check_tensor("k", k, 4, layout), check_tensor("v", v, 4, layout)
    if v.shape != k.shape:
        raise ShapeError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.shape[0] < 1:
        raise ShapeError("cu_seqlens_k must be an int32 tensor (batch + 1,)")
    bounds = cu_seqlens_k.tolist()
    batch, page_size = len(bounds) - 1, k.shape[1]
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != batch:
        got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise ShapeError(f"block_table must be an int32 tensor (batch, max_num_blocks) with batch {batch}, got {got}")
    if block_table.dtype.is_floating_point or block_table.dtype.is_complex or block_table.dtype == torch.bool:
        raise DTypeError(f"block_table must be an integer tensor (int32), got {block_table.dtype}")
    if block_table.device != k.device:
        raise DeviceError(f"block_table is on {block_table.device} but k is on {k.device}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    capacity = block_table.shape[1] * page_size
    if lengths and (min(lengths) < 0 or max(lengths) > capacity):
        raise ArgumentError(f"cu_seqlens_k gives sequence lengths {lengths}, but block_table maps "
                            f"{block_table.shape[1]} pages of {page_size} tokens ({capacity}) per sequence")
    device = k.device
    total = bounds[-1] - bounds[0]
    seq = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(lengths, device=device))
    local = torch.arange(total, device=device) - (cu_seqlens_k.to(device=device, dtype=torch.int64)[seq] - bounds[0])
    pages = block_table.to(torch.int64)[seq, local // page_size]
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= k.shape[0]):
        raise ArgumentError(f"block_table has entries outside 0..{k.shape[0] - 1} (k has {k.shape[0]} pages)")
    slots = local % page_size
    # cu_seqlens_k as it indexes the packed keys (starting at 0)
    return k[pages, slots], v[pages, slots], cu_seqlens_k - bounds[0]


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None, seqused_k=None):
    check_dropout(dropout_p)
    causal = check_flag("causal", causal)
    check_flag("deterministic", deterministic)
    probs = check_flag("return_attn_probs", return_attn_probs)
    window = fa_window(window_size, causal, None)  # flash-attn's varlen kernel does not clamp the window
    softcap = fa_softcap(softcap)
    if block_table is not None:
        if cu_seqlens_k is None and seqused_k is not None:
            # Paged decode as vLLM's flash-attn calls it: the lengths come from
            # seqused_k alone (sequence b's keys are its first pages).
            if not isinstance(seqused_k, torch.Tensor) or seqused_k.dim() != 1:
                raise ShapeError("seqused_k must be an int32 tensor (batch,) when cu_seqlens_k is None")
            cu_seqlens_k = torch.zeros(seqused_k.shape[0] + 1, dtype=torch.int32, device=seqused_k.device)
            cu_seqlens_k[1:] = seqused_k.to(torch.int64).cumsum(0).to(torch.int32)
            seqused_k = None
        k, v, cu_seqlens_k = _gather_paged(k, v, cu_seqlens_k, block_table)
    if alibi_slopes is None:
        result = attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                           max_seqlen_k=max_seqlen_k, causal=causal, softmax_scale=softmax_scale, window_size=window,
                           softcap=softcap, return_lse=probs, seqused_k=seqused_k)
        if not probs:
            return result
        out, lse = result
    else:
        check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        scale = check_softmax_scale(softmax_scale, q.shape[-1])
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        used = None if seqused_k is None else check_seqused_k(seqused_k, cu_seqlens_k, q.device)
        slopes = alibi_slopes_2d(alibi_slopes, len(bounds_q) - 1, q.shape[1], q.device)
        outs, lses = [], []
        for b in range(len(bounds_q) - 1):  # each sequence aligned bottom-right on its own
            (q0, q1), (k0, k1) = bounds_q[b:b + 2], bounds_k[b:b + 2]
            if used is not None:
                k1 = k0 + used[b]
            o, l = attention_with_bias(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], seqlens_k=None, scale=scale,
                                       window=window, softcap=softcap, alibi=slopes[b:b + 1])
            outs.append(o[0])
            lses.append(l[0])
        out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
        lse = torch.cat(lses, 1) if lses else torch.zeros(q.shape[1], 0, dtype=torch.float32, device=q.device)
        if not probs:
            return out
    return out, fa_lse(lse), q.new_empty((0,))


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    *,
    seqused_k=None,
):
    """q ``(total_q, nheads, headdim)``, k, v ``(total_k, nheads_k, headdim)`` (or
    ``(num_blocks, page_block_size, nheads_k, headdim)`` with ``block_table
    (batch_size, max_num_blocks_per_seq)`` int32), ``cu_seqlens_q/k (batch_size +
    1,)`` int32, ``max_seqlen_q/k`` ints -> out ``(total_q, nheads, headdim)``;
    with ``return_attn_probs=True`` ``(out, softmax_lse (nheads, total_q) float32,
    S_dmask)``.

    Each sequence is aligned bottom-right on its own (causal, window, ALiBi).
    Runs on :func:`longattn.attention` with ``cu_seqlens_*``. Differs from
    flash-attn: as :func:`flash_attn_func` (dropout refused, empty ``S_dmask``,
    ALiBi on a PyTorch path, one sequence at a time); ``block_table`` gathers
    the pages into packed keys first (a copy; any page size).

    Extension (keyword only; flash-attn's varlen kernel has it, its Python
    function does not expose it): ``seqused_k (batch_size,)`` int32 -- sequence
    ``b`` uses only its first ``seqused_k[b]`` keys (alignment included), as
    :func:`longattn.attention`'s ``seqused_k``. With ``block_table``,
    ``cu_seqlens_k=None`` and ``seqused_k`` give each sequence's length on
    its pages (how vLLM's flash-attn fork runs paged decode)."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, seqused_k)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv ``(total, 3, nheads, headdim)``, ``cu_seqlens (batch_size + 1,)`` int32,
    ``max_seqlen`` int -> out ``(total, nheads, headdim)`` (and ``softmax_lse
    (nheads, total)``, ``S_dmask`` with ``return_attn_probs=True``).

    :func:`flash_attn_varlen_func` on ``qkv.unbind(1)`` with the same lengths for
    queries and keys; the same differences from flash-attn."""
    q, k, v = _unpack("qkv", qkv, 4, 1, 3, "(total, 3, nheads, headdim)")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``(total_q, nheads, headdim)``, kv ``(total_k, 2, nheads_k, headdim)``,
    ``cu_seqlens_q/k (batch_size + 1,)`` int32, ``max_seqlen_q/k`` ints -> out
    ``(total_q, nheads, headdim)`` (and ``softmax_lse (nheads, total_q)``,
    ``S_dmask`` with ``return_attn_probs=True``).

    :func:`flash_attn_varlen_func` on ``kv.unbind(1)``; the same differences
    from flash-attn."""
    k, v = _unpack("kv", kv, 4, 1, 2, "(total_k, 2, nheads_k, headdim)")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
