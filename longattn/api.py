"""The public front door for prefill attention: :func:`attention`."""

from __future__ import annotations

import torch

from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.hooks import ATTENTION_HOOK, AttentionCall
from longattn.kernels.dense import DENSE_BACKENDS, DenseCall, bind_out_only, signature_of
from longattn.kernels.dense.varlen import DENSE_VARLEN_BACKENDS, DenseVarlenCall
from longattn.validation import check_attention_options, check_seqused_k, check_varlen, qkv_facts


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sparse: object | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_k: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with flash-attn's conventions; a drop-in for ``flash_attn_func``
    (and, with ``cu_seqlens_*``, for ``flash_attn_varlen_func``).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, float32/float16/bfloat16.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, same dtype and device;
            ``nheads % nheads_k == 0`` (MHA, GQA, MQA). Any strides.
        causal: bottom-right aligned mask; query ``i`` sees key ``j`` iff
            ``j <= i + seqlen_k - seqlen_q``. For seqlen_q=2, seqlen_k=5::

                1 1 1 1 0
                1 1 1 1 1

            With ``seqlen_q > seqlen_k`` the first rows see nothing and get
            ``out = 0`` (``lse = -inf``).
        softmax_scale: defaults to ``headdim ** -0.5``.
        window_size: ``(left, right)`` sliding window, -1 = unbounded: query
            ``i`` sees keys ``i + seqlen_k - seqlen_q - left`` through
            ``... + right``. With ``causal=True``, ``right`` must be -1 or 0.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        sparse: a sparse-method config: :class:`longattn.sparse.HiP`,
            :class:`longattn.sparse.Streaming` or :class:`longattn.sparse.Duo`;
            ``None`` means dense attention. A sparse method brings its own
            sinks and window, so ``window_size`` must stay ``(-1, -1)``; its
            attention runs on the block-sparse twin ``backend`` names ("auto",
            "cpp", "triton", "sdpa" or "eager"). Sparse methods are forward-only (inference):
            inputs that require grad are refused with a clear error. Under
            ``torch.compile`` (``fullgraph=True`` too) a sparse call (not
            packed) is one custom op, ``longattn::sparse_prefill``
            (:mod:`longattn.sparse.compile_ops`), giving the eager call's bits.
        backend: ``"auto"`` (fastest twin that can serve), or ``"cpp"``,
            ``"sdpa"``, ``"triton"``, ``"eager"``. A forced backend that cannot serve raises
            :class:`~longattn.errors.BackendUnavailableError` listing every
            backend's reasons (``longattn doctor`` shows them for this machine).
        return_lse: also return ``lse``.
        cu_seqlens_q, cu_seqlens_k: packed sequences (varlen): q is then
            ``(total_q, nheads, headdim)`` and k, v ``(total_k, nheads_k,
            headdim)``, and these int32 ``(batch + 1,)`` prefix sums say
            where each sequence starts (sequence ``b`` is rows
            ``cu[b]:cu[b + 1]``; lengths may differ between q and k and may
            be 0). Each sequence is aligned bottom-right on its own; causal,
            window and softcap apply per sequence; lse comes back as
            ``(nheads, total_q)`` (flash-attn's varlen layout). Dense and
            every sparse method (which select per sequence).
        max_seqlen_q, max_seqlen_k: the longest sequence of each side
            (None: read from the prefix sums).
        seqused_k: packed sequences only: ``(batch,)`` int32, sequence ``b``
            uses only its first ``seqused_k[b]`` keys (flash-attn's varlen
            kernel rule: the rest of its rows of k, v are ignored, get zero
            gradient, and alignment is bottom-right to ``seqused_k[b]``).
            The used keys are gathered into one packed copy first (one read
            of them) and run as ordinary packed sequences.

    Returns:
        ``out`` with q's shape and dtype, or ``(out, lse)`` with ``lse``
        ``(batch, nheads, seqlen_q)`` float32, natural log. Differentiable in
        q, k, v (and through lse). Math is float32 whatever the input dtype.

    Example::

        q = torch.randn(1, 1024, 8, 128)
        k = v = torch.randn(1, 1024, 2, 128)      # GQA, 4 query heads per kv head
        out = longattn.attention(q, k, v, causal=True)
    """
    # A model calls this once per layer per token: the checks, the twin's
    # selection (memoised per signature, see longattn.dispatch) and the twin's
    # own wrapper together cost a few microseconds (`longattn bench overhead`).
    # The commonest call -- dense, no lse, options of exactly the accepted
    # types -- skips even those when an identical call (same shapes, dtypes,
    # devices and options) already passed every check and picked a pure twin.
    compiling = torch.compiler.is_compiling()
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                       softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, sparse=sparse,
                       backend=backend, return_lse=return_lse, seqused_k=seqused_k)
    if max_seqlen_q is not None or max_seqlen_k is not None or seqused_k is not None:
        raise ArgumentError("max_seqlen_q / max_seqlen_k / seqused_k describe packed sequences: pass them with "
                            "cu_seqlens_q and cu_seqlens_k (or leave them None)")
    lane = None
    if (
        sparse is None and return_lse is False and not compiling
        and (causal is True or causal is False) and type(backend) is str
        and type(softcap) is float and (softmax_scale is None or type(softmax_scale) is float)
        and type(window_size) is tuple and len(window_size) == 2
        and type(window_size[0]) is int and type(window_size[1]) is int
        and type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
    ):
        lane = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                causal, softmax_scale, window_size, softcap, backend)
        checked = _CHECKED_CALLS.get(lane)
        if checked is not None and ATTENTION_HOOK.get() is None:
            scale, window, twin, bound = checked
            if bound is not None:
                return bound(q, k, v)
            return twin.run(DenseCall(q, k, v, scale, window, softcap, False))[0]
    qs, ks, dtype, device = qkv_facts(q, k, v)
    causal, return_lse, scale, window, softcap = check_attention_options(
        qs[3], causal, return_lse, softmax_scale, window_size, softcap
    )
    # (torch.compile cannot trace ContextVar.get; calibration never runs compiled)
    hook = None if compiling else ATTENTION_HOOK.get()
    if hook is not None:  # a calibration run observes or replaces this call (longattn.sparse.calibrate)
        if return_lse:
            raise UnsupportedFeatureError("return_lse=True is not available while a Duo calibration runs")
        return hook(AttentionCall(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sparse=sparse,
                                  backend=backend))
    if sparse is not None:
        out, lse = _sparse_prefill(q, k, v, sparse, causal, scale, window, window_size, softcap, backend)
        return (out, lse) if return_lse else out
    call = DenseCall(q, k, v, scale, window, softcap, return_lse)
    signature = signature_of(qs, ks, dtype, device, window, softcap, return_lse, compiling)
    twin = DENSE_BACKENDS.select(call, backend, signature)
    if lane is not None and DENSE_BACKENDS.memoised(signature, backend) is twin:
        if len(_CHECKED_CALLS) >= MAX_CHECKED_CALLS:
            _CHECKED_CALLS.clear()
        _CHECKED_CALLS[lane] = (scale, window, twin, bind_out_only(twin, call))
    out, lse = twin.run(call)
    return (out, lse) if return_lse else out


# Calls that passed every check, by everything the checks and a pure twin's
# selection read -> (scale, effective window, twin, the twin's runner bound to
# the call's settled options, or None): a bounded cache of a pure
# function of its key (see the fast lane in attention()), not state a caller
# can observe. Keys hold option values of exact types only (True is not 1 here).
MAX_CHECKED_CALLS = 512
_CHECKED_CALLS: dict[tuple, tuple] = {}


SPARSE_BACKENDS = ("auto", "cpp", "triton", "sdpa", "eager")  # the block-sparse twins


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, softmax_scale, window_size,
            softcap, sparse, backend, return_lse, seqused_k=None):
    """Packed sequences: dense through the varlen primitive, sparse methods per sequence."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ArgumentError("packed sequences need both cu_seqlens_q and cu_seqlens_k, got only "
                            + ("cu_seqlens_k" if cu_seqlens_q is None else "cu_seqlens_q"))
    max_q, max_k = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    causal, return_lse, scale, window, softcap = check_attention_options(
        q.shape[-1], causal, return_lse, softmax_scale, window_size, softcap
    )
    hook = None if torch.compiler.is_compiling() else ATTENTION_HOOK.get()
    if hook is not None:
        raise UnsupportedFeatureError("packed sequences (cu_seqlens_q/k) cannot be observed by a Duo calibration "
                                      "run; calibrate with a (batch, seqlen, ...) model call")
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    if seqused_k is not None:
        k, v, cu_k, max_k = _used_keys(k, v, cu_k, check_seqused_k(seqused_k, cu_k, q.device))
    if sparse is not None:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        for b in range(len(bounds_q) - 1):  # a sparse method selects per sequence
            (q0, q1), (k0, k1) = bounds_q[b : b + 2], bounds_k[b : b + 2]
            if q1 > q0:
                o, l = _sparse_prefill(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], sparse, causal, scale, window,
                                       window_size, softcap, backend)
                out[q0:q1], lse[:, q0:q1] = o[0], l[0]
        return (out, lse) if return_lse else out
    call = DenseVarlenCall(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap)
    out, lse = DENSE_VARLEN_BACKENDS.select(call, backend).run(call)
    return (out, lse) if return_lse else out


def _used_keys(k, v, cu_k, used):
    """The first ``used[b]`` keys of each packed sequence, repacked: ``(k, v, cu_k, max_k)``.
    index_select's backward scatters gradients back (zero for unused keys)."""
    starts = cu_k.tolist()[:-1]
    index = torch.cat([torch.arange(s, s + n, device=k.device) for s, n in zip(starts, used)]
                      or [torch.zeros(0, dtype=torch.long, device=k.device)])
    new_cu = torch.zeros(len(used) + 1, dtype=torch.int32, device=k.device)
    new_cu[1:] = torch.tensor(used, dtype=torch.int64).cumsum(0).to(new_cu.device, torch.int32)
    return k.index_select(0, index), v.index_select(0, index), new_cu, max(used, default=0)


def _sparse_prefill(q, k, v, sparse, causal, scale, window, window_size, softcap, backend):
    """Run a sparse method's prefill after checking what only applies to dense attention."""
    from longattn.sparse import Duo, HiP, Streaming

    if not isinstance(sparse, (HiP, Streaming, Duo)):
        raise UnsupportedFeatureError(
            f"sparse={sparse!r} is not a sparse method this version of longattn provides "
            "(longattn.sparse.HiP, Streaming, Duo); use sparse=None for dense attention"
        )
    if window != (-1, 0 if causal else -1):
        raise UnsupportedFeatureError(
            f"window_size={tuple(window_size)} cannot be combined with sparse={type(sparse).__name__}: "
            "the method has its own sink_size and recent_size; leave window_size=(-1, -1)"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise UnsupportedFeatureError(
            f"sparse={type(sparse).__name__}(...) is forward-only: its kernels compute no gradients, and q, k or v "
            "requires grad; run it under torch.no_grad() / torch.inference_mode(), or use sparse=None"
        )
    if backend not in SPARSE_BACKENDS:
        raise UnsupportedFeatureError(
            f"backend={backend!r} cannot serve sparse={type(sparse).__name__} yet; use one of {SPARSE_BACKENDS}"
        )
    if torch.compiler.is_compiling():
        # The prefill reads host data (search sizes, head splits, a kernel
        # loader): traced, it is one opaque custom op running the same prefill.
        from longattn.sparse.compile_ops import traced_prefill

        return traced_prefill(q, k, v, sparse, causal=causal, scale=scale, softcap=softcap, backend=backend)
    return sparse.prefill(q, k, v, causal=causal, scale=scale, softcap=softcap, backend=backend)
