"""The public front door for decode: :func:`decode_attention`."""

from __future__ import annotations

import torch

from longattn.kernels.decode.cache import check_cache
from longattn.kernels.decode.plan import DecodePlan
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.kernels.decode import DECODE_BACKENDS, DecodeCall
from longattn.validation import check_attention_options, check_tensor


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sparse: object | None = None,
    state: object | None = None,
    plan: DecodePlan | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few new queries over a KV cache; ``flash_attn_with_kvcache`` semantics.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; seqlen_q is 1 for plain
            decode, more for speculative or chunked steps.
        k_cache, v_cache: contiguous ``(batch, max_seqlen, nheads_k, headdim)``,
            or paged ``(num_pages, page_size, nheads_k, headdim)`` with
            ``block_table``. Same dtype and device as q.
        cache_seqlens: ``(batch,)`` int32, tokens already in each sequence's
            cache. Read only: the caller advances it after appending.
        block_table: ``(batch, max_pages)`` int32 page indices (paged cache);
            any page order, any page_size >= 1.
        k_new, v_new: ``(batch, seqlen_new, nheads_k, headdim)``, written into
            the cache **in place** at ``cache_seqlens[b] ...`` before attending.
        causal: bottom-right within each sequence: with ``L_b = cache_seqlens[b]
            + seqlen_new``, query ``i`` sits at key position ``L_b - seqlen_q + i``
            and sees keys up to it. seqlen_q=2, L_b=5::

                1 1 1 1 0
                1 1 1 1 1

        window_size, softcap, softmax_scale: as in :func:`longattn.attention`.
        sparse, state: a sparse decode method and the state object it keeps
            between steps of one layer: ``sparse=HiP(...)`` with
            ``state=HiPDecodeState()`` (see :mod:`longattn.sparse.hip_decode`;
            ``state=None`` searches every step). Sparse decode runs on the
            PyTorch twin, takes no ``window_size`` or ``plan``.
        plan: a stream-K :class:`~longattn.decode.DecodePlan` from
            :func:`~longattn.decode.plan_decode` over the lengths ``L_b``, to
            reuse one schedule across layers; None plans per call.
        backend: ``"auto"`` or a twin name (``longattn doctor`` lists them).
        return_lse: also return lse ``(batch, nheads, seqlen_q)`` float32.

    Returns:
        ``out`` like q (or ``(out, lse)``). A sequence with no visible key gets
        out 0 and lse -inf.

    Example::

        out = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens,
                                        k_new=k_step, v_new=v_step)
        lens += 1
    """
    q = check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    causal, return_lse, scale, window, softcap = check_attention_options(
        q.shape[-1], causal, return_lse, softmax_scale, window_size, softcap
    )
    if sparse is not None:
        _check_sparse_decode(sparse, window, causal, plan, backend)
    elif state is not None:
        raise UnsupportedFeatureError(f"state={state!r}: decode state objects belong to sparse methods; pass None")
    cache = check_cache(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    if sparse is not None:
        from longattn.sparse.hip_decode import hip_decode

        out, lse = hip_decode(q, cache, sparse, state, scale=scale, softcap=softcap, causal=causal)
        return (out, lse) if return_lse else out
    if plan is not None:
        if not isinstance(plan, DecodePlan):
            raise ArgumentError(f"plan must be a DecodePlan from longattn.decode.plan_decode, got {type(plan).__name__}")
        lengths = tuple(cache.seqlens.tolist())
        if plan.seqlens != lengths or plan.nheads_k != cache.k_cache.shape[2]:
            raise ArgumentError(
                f"plan was made for seqlens {list(plan.seqlens)} and nheads_k {plan.nheads_k}, but this call "
                f"attends seqlens {list(lengths)} (cache_seqlens + seqlen_new) with nheads_k {cache.k_cache.shape[2]}"
            )
    call = DecodeCall(q, cache, scale, window, softcap, plan)
    out, lse = DECODE_BACKENDS.select(call, backend).run(call)
    return (out, lse) if return_lse else out


def _check_sparse_decode(sparse, window, causal, plan, backend) -> None:
    from longattn.sparse import HiP

    if not isinstance(sparse, HiP):
        raise UnsupportedFeatureError(
            f"sparse={sparse!r} is not a sparse decode method this version provides (longattn.sparse.HiP)"
        )
    if window != (-1, 0 if causal else -1):
        raise UnsupportedFeatureError(
            "window_size cannot be combined with sparse=HiP: it has its own sink_size and recent_size"
        )
    if plan is not None:
        raise UnsupportedFeatureError("plan= schedules dense stream-K decode; it does not apply to sparse=HiP")
    if backend not in ("auto", "eager"):
        raise UnsupportedFeatureError(f"backend={backend!r} cannot serve sparse=HiP decode yet; use 'auto' or 'eager'")
