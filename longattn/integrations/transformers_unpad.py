"""Padding masks -> packed sequences, for the transformers adapter.

transformers hands attention a ``(batch, kv_len)`` boolean mask of valid keys
(see the adapter's mask function). Each row's valid keys are one contiguous
run: left padding, right padding, or a static buffer's filled prefix.
:func:`unpadded_attention` packs the valid tokens and runs varlen attention;
:func:`left_padding` recognises the common left-padded batch, which decode
serves through ``decode_attention(cache_leftpad=...)`` without unpadding.
"""

from __future__ import annotations

import torch

from longattn.api import attention
from longattn.errors import ArgumentError, UnsupportedFeatureError


def left_padding(mask: torch.Tensor) -> torch.Tensor | None:
    """``(batch,)`` int32 count of leading pad slots if every row of ``mask
    (batch, kv_len)`` is padding then valid keys to its end, else None.

    Reads the mask on the host once (a sync on a GPU).
    """
    kv_len = mask.shape[1]
    first = mask.to(torch.int8).argmax(dim=1)
    first = torch.where(mask.any(dim=1), first, torch.full_like(first, kv_len))
    expected = torch.arange(kv_len, device=mask.device)[None, :] >= first[:, None]
    if not torch.equal(mask, expected):
        return None
    return first.to(torch.int32)


def valid_runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, starts)``, each ``(batch,)``: row b's valid keys are ``[starts_b,
    starts_b + counts_b)``; raises if a row's valid keys are not one run."""
    kv_len = mask.shape[1]
    counts = mask.sum(dim=1)
    first = mask.to(torch.int8).argmax(dim=1)
    last_plus = kv_len - mask.flip(1).to(torch.int8).argmax(dim=1)
    run = torch.where(counts > 0, last_plus - first, torch.zeros_like(counts))
    if bool((run != counts).any()):
        raise UnsupportedFeatureError("attention_mask has padding inside a sequence (valid keys not one contiguous "
                                      "run per row); longattn's transformers adapter supports left/right padding only")
    return counts, torch.where(counts > 0, first, torch.zeros_like(first))


def unpadded_attention(qt, kt, vt, mask: torch.Tensor, **opts) -> torch.Tensor:
    """Run ``attention`` on the valid tokens of each row; padded query rows get 0.

    qt ``(B, q_len, H, D)``, kt/vt ``(B, kv_len, Hk, D)``, mask ``(B, kv_len)``
    bool. Row b's keys are the run ``[start_b, end_b)``; its queries sit at key
    positions ``[0, kv_len)`` when ``q_len == kv_len`` (no cache), otherwise at
    the last ``q_len`` positions ending at ``end_b`` (a cache: dynamic, or a
    static buffer's filled prefix); those before ``start_b`` are padding.
    """
    B, q_len, H, D = qt.shape
    kv_len = kt.shape[1]
    if mask.shape != (B, kv_len):
        raise ArgumentError(f"attention_mask must be (batch, kv_len) = ({B}, {kv_len}), got {tuple(mask.shape)}")
    counts, starts = valid_runs(mask)
    ends = starts + counts
    if q_len == kv_len:
        q_lo, q_hi = starts, ends
    else:
        # query i of row b sits at key position end_b - q_len + i: valid iff >= start_b
        q_lo = (starts - (ends - q_len)).clamp(min=0, max=q_len)
        q_hi = torch.full_like(q_lo, q_len)
        q_lo = torch.where(counts > 0, q_lo, q_hi)
    dev = qt.device
    ar_q = torch.arange(q_len, device=dev)
    q_keep = (ar_q[None, :] >= q_lo[:, None]) & (ar_q[None, :] < q_hi[:, None])
    q_idx = q_keep.reshape(-1).nonzero().squeeze(1)
    k_idx = mask.reshape(-1).nonzero().squeeze(1)
    cu_q = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu_q[1:] = torch.cumsum(q_keep.sum(dim=1), 0).to(torch.int32)
    cu_k = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    cu_k[1:] = torch.cumsum(counts, 0).to(torch.int32)
    qp = qt.reshape(B * q_len, H, D).index_select(0, q_idx)
    kp = kt.reshape(B * kv_len, kt.shape[2], D).index_select(0, k_idx)
    vp = vt.reshape(B * kv_len, vt.shape[2], vt.shape[3]).index_select(0, k_idx)
    out_p = attention(qp, kp, vp, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)
    out = torch.zeros(B * q_len, H, vt.shape[3], dtype=out_p.dtype, device=dev)
    out.index_copy_(0, q_idx, out_p)
    return out.reshape(B, q_len, H, vt.shape[3])


# --- torch.compile ------------------------------------------------------------
# Packing reads the mask on the host (data-dependent sizes): traced, the whole
# unpadded call is one custom op with a known output shape.

@torch.library.custom_op("longattn::unpadded_attention", mutates_args=())
def unpadded_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    method: str,
    spec: list[int],
) -> torch.Tensor:
    """:func:`unpadded_attention` with the sparse method (``method`` "" for
    dense) as :func:`longattn.sparse.compile_ops.method_spec` primitives."""
    from longattn.sparse.compile_ops import method_from_spec

    sparse = method_from_spec(method, tuple(spec)) if method else None
    out = unpadded_attention(q, k, v, mask, causal=causal, softmax_scale=scale, window_size=(window_left, window_right),
                             softcap=softcap, sparse=sparse)
    return out.contiguous()


@unpadded_attention_op.register_fake
def _unpadded_fake(q, k, v, mask, causal, scale, window_left, window_right, softcap, method, spec):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def traced_unpadded_attention(qt, kt, vt, mask, *, causal, softmax_scale, window_size, softcap, sparse=None):
    """:func:`unpadded_attention` for a caller being traced (same arguments)."""
    from longattn.sparse.compile_ops import method_spec

    method, spec = ("", []) if sparse is None else method_spec(sparse)
    scale = qt.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return unpadded_attention_op(qt, kt, vt, mask, causal, scale, int(window_size[0]), int(window_size[1]),
                                 float(softcap), method, spec)


def any_unpadded_attention(qt, kt, vt, mask, **opts) -> torch.Tensor:
    """:func:`unpadded_attention`, or its custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return traced_unpadded_attention(qt, kt, vt, mask, **opts)
    return unpadded_attention(qt, kt, vt, mask, **opts)


def first_valid(mask: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` int32 index of each row's first valid key (``kv_len`` for an
    empty row): the row's left padding if it is left-padded. No host read."""
    kv_len = mask.shape[1]
    first = mask.to(torch.int8).argmax(dim=1)
    return torch.where(mask.any(dim=1), first, torch.full_like(first, kv_len)).to(torch.int32)


def assert_left_padded(mask: torch.Tensor, pads: torch.Tensor | None, what: str) -> None:
    """Under torch.compile: an asynchronous check (no host read, no graph break)
    that ``mask`` is ``pads[b]`` pad slots then valid keys (no padding when
    ``pads`` is None); a RuntimeError naming ``what`` when the graph runs."""
    kv_len = mask.shape[1]
    if pads is None:
        ok = mask.all()
    else:
        ok = (mask == (torch.arange(kv_len, device=mask.device)[None, :] >= pads[:, None])).all()
    torch._assert_async(ok, f"longattn under torch.compile: {what}")
