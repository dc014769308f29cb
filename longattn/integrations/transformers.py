"""Hugging Face transformers adapter: ``attn_implementation="longattn"``.

One call registers longattn's attention with transformers' ``AttentionInterface``
together with the matching mask function in ``AttentionMaskInterface`` (same
name: without a mask function transformers hands the attention ``mask=None``
and padding is silently lost)::

    import longattn.integrations.transformers as lt
    lt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="longattn")

Names registered:

- ``"longattn"``: dense attention (always);
- ``"longattn_hip"``, ``"longattn_streaming"``: when ``register(hip=HiP(...))`` /
  ``register(streaming=Streaming(...))`` is given a config;
- ``"longattn_duo"``: when ``register(duo=HeadPattern(...))`` is given a pattern
  (each layer picks its row by ``module.layer_idx``).

How padding reaches the kernel: the registered mask function returns, like
transformers' flash-attention path, ``None`` (no padding: plain bottom-right
causal attention on the batch) or a 2D boolean ``(batch, kv_len)`` mask of the
valid keys. With a mask the batch is unpadded into packed sequences and run
through ``longattn.attention(..., cu_seqlens_q=, cu_seqlens_k=)``; padded query
rows come back as zeros. Each row's valid keys must be one contiguous run (left
padding, right padding, or a static cache's filled prefix); anything else raises.

Decode through ``longattn.decode_attention``: pass
``LongAttnCache(model.config, max_cache_len=N)`` as the cache of ``generate``
(``cache=`` in transformers 5.x, ``past_key_values=`` before): contiguous
per-layer buffers, int32 lengths, new tokens appended in place.

Refused with :class:`longattn.errors.UnsupportedFeatureError` (never ignored):
dropout > 0, custom 4D masks, attention sinks (``s_aux``), score biases, packed
sequences given only through ``position_ids``.
"""

from __future__ import annotations

from typing import Any

import torch

from longattn.api import attention
from longattn.decode_api import decode_attention
from longattn.errors import ArgumentError, UnsupportedFeatureError

__all__ = ["register", "NAMES", "LongAttnCache"]

NAMES = ("longattn", "longattn_hip", "longattn_streaming", "longattn_duo")

# kwargs that would change the scores; longattn has no equivalent, so seeing
# one (not None) is an error rather than a silent difference.
_REFUSED_KWARGS = ("s_aux", "sinks", "attention_bias", "position_bias", "alibi", "alibi_slopes", "head_mask")


def _mask_fn(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
             mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """transformers mask function: ``None`` or a ``(batch, kv_length)`` bool mask of valid keys.

    ``attention_mask`` is the user's 2D padding mask over every token seen so far
    (sliced from the right to the ``kv_length`` keys the layer holds, as for
    sliding-window caches). A static cache reports its whole buffer as
    ``kv_length`` while only ``q_offset + q_length`` slots are filled: then the
    mask marks just that prefix valid, so the zero-filled tail is never attended.
    """
    device = kwargs.get("device", "cpu")
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        if attention_mask.shape[1] < kv_length:  # a static buffer longer than the tokens seen: pad on the right
            pad = torch.zeros(attention_mask.shape[0], kv_length - attention_mask.shape[1], dtype=torch.bool,
                              device=attention_mask.device)
            attention_mask = torch.cat([attention_mask, pad], dim=1)
        return attention_mask
    filled = q_offset + q_length - kv_offset
    if isinstance(filled, torch.Tensor) or filled < kv_length:
        valid = torch.arange(kv_length, device=device) < filled
        return valid.unsqueeze(0).expand(batch_size, kv_length)
    return None


def _window(sliding_window: Any) -> tuple[int, int]:
    """Mistral-style ``sliding_window`` (tokens seen, itself included) -> flash-attn ``(left, right)``."""
    if sliding_window is None:
        return (-1, -1)
    sw = int(sliding_window)
    if sw <= 0:
        raise ArgumentError(f"sliding_window must be a positive token count, got {sliding_window!r}")
    return (sw - 1, 0)


def _check_kwargs(dropout: float, attention_mask: Any, kwargs: dict) -> None:
    if dropout is not None and float(dropout) > 0.0:
        raise UnsupportedFeatureError(f"dropout={dropout} (attention dropout) is not supported by longattn; "
                                      "set the model's attention_dropout to 0 or call model.eval()")
    for name in _REFUSED_KWARGS:
        if kwargs.get(name) is not None:
            raise UnsupportedFeatureError(f"the model passes {name!r} to attention; longattn has no equivalent")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise UnsupportedFeatureError(
            f"attention_mask of shape {shape}: longattn's transformers adapter honours only 2D padding masks "
            "(batch, kv_len); a custom 4D mask cannot be expressed as causal + window + padding")


def _packed_by_position_ids(position_ids: torch.Tensor | None, q_len: int, kv_len: int) -> bool:
    """True if ``position_ids`` restart inside a row (sequences packed with no mask)."""
    if position_ids is None or q_len != kv_len or q_len < 2 or position_ids.shape[-1] != q_len:
        return False
    return bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any())


def _unpadded(qt, kt, vt, mask: torch.Tensor, **opts) -> torch.Tensor:
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
    counts = mask.sum(dim=1)
    first = mask.to(torch.int8).argmax(dim=1)
    last_plus = kv_len - mask.flip(1).to(torch.int8).argmax(dim=1)
    run = torch.where(counts > 0, last_plus - first, torch.zeros_like(counts))
    if bool((run != counts).any()):
        raise UnsupportedFeatureError("attention_mask has padding inside a sequence (valid keys not one contiguous "
                                      "run per row); longattn's transformers adapter supports left/right padding only")
    starts = torch.where(counts > 0, first, torch.zeros_like(first))
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


def _make_attention_fn(sparse_for):
    """The ``AttentionInterface`` function; ``sparse_for(module)`` -> ``sparse=`` config or None."""

    def longattn_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
        """query ``(B, H, q_len, D)``, key/value ``(B, Hk, kv_len, D)`` -> ``((B, q_len, H, D), None)``."""
        _check_kwargs(dropout, attention_mask, kwargs)
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is None and kwargs.get("cu_seq_lens_q") is None and _packed_by_position_ids(
                kwargs.get("position_ids"), q_len, kv_len):
            raise UnsupportedFeatureError("position_ids restart inside a row (packed sequences without a mask); "
                                          "pass an attention_mask per sequence instead")
        if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
            raise UnsupportedFeatureError("cu_seq_lens_q / cu_seq_lens_k (flash-attn packed kwargs) are not "
                                          "supported by longattn's transformers adapter; pass an attention_mask")
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
        sliding = kwargs.get("sliding_window")
        if "sliding_window" not in kwargs:
            sliding = getattr(module, "sliding_window", None)
        softcap = kwargs.get("softcap")
        opts = dict(
            causal=causal,
            softmax_scale=None if scaling is None else float(scaling),
            window_size=_window(sliding),
            softcap=0.0 if softcap is None else float(softcap),
        )
        sparse = sparse_for(module)
        if sparse is not None:
            opts["sparse"] = sparse
        # (B, H, L, D) -> (B, L, H, D): views, longattn takes any strides
        qt, kt, vt = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        pending = kwargs.get(_HANDOFF)
        if pending is not None:  # a LongAttnCache decode step: the new tokens are not in the cache yet
            layer, k_new, v_new = pending
            if attention_mask is None and sparse is None:
                out = decode_attention(qt, layer.k_buf, layer.v_buf, cache_seqlens=layer.lengths,
                                       k_new=k_new.transpose(1, 2), v_new=v_new.transpose(1, 2), **opts)
                layer.advance(k_new.shape[2])
                return out, None
            # padding or a sparse method: append, then attend over the cache's views (key/value alias it)
            layer.append(k_new, v_new)
        if attention_mask is None:
            out = attention(qt, kt, vt, **opts)
        else:
            out = _unpadded(qt, kt, vt, attention_mask, **opts)
        return out, None

    return longattn_attention


def register(*, hip: object | None = None, streaming: object | None = None, duo: object | None = None) -> tuple[str, ...]:
    """Register longattn with transformers; returns the names registered.

    Args:
        hip: a :class:`longattn.sparse.HiP` config -> also ``"longattn_hip"``.
        streaming: a :class:`longattn.sparse.Streaming` config -> ``"longattn_streaming"``.
        duo: a :class:`longattn.sparse.HeadPattern` -> ``"longattn_duo"`` (layer
            ``module.layer_idx`` uses its row).

    Idempotent: registering again replaces the earlier functions.
    """
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UnsupportedFeatureError("longattn.integrations.transformers needs transformers>=4.51 "
                                      "(pip install 'longattn[transformers]')") from exc

    entries: list[tuple[str, Any]] = [("longattn", lambda module: None)]
    if hip is not None:
        entries.append(("longattn_hip", lambda module, cfg=hip: cfg))
    if streaming is not None:
        entries.append(("longattn_streaming", lambda module, cfg=streaming: cfg))
    if duo is not None:
        from longattn.sparse import Duo, HeadPattern  # noqa: PLC0415 - only needed when Duo is asked for

        if not isinstance(duo, HeadPattern):
            raise ArgumentError(f"duo must be a longattn.sparse.HeadPattern, got {type(duo).__name__}")
        per_layer: dict[int, Duo] = {}

        def duo_for(module, pattern=duo):
            idx = getattr(module, "layer_idx", None)
            if idx is None:
                raise UnsupportedFeatureError("longattn_duo needs module.layer_idx on the attention module; "
                                              f"{type(module).__name__} has none")
            cfg = per_layer.get(idx)
            if cfg is None:
                cfg = per_layer[idx] = Duo(pattern, int(idx))
            return cfg

        entries.append(("longattn_duo", duo_for))
    for name, sparse_for in entries:
        AttentionInterface.register(name, _make_attention_fn(sparse_for))
        AttentionMaskInterface.register(name, _mask_fn)
    return tuple(name for name, _ in entries)


# The key under which LongAttnCache.update hands a decode step's new tokens to
# the attention function: transformers passes the same kwargs dict to
# ``cache.update(..., kwargs=kwargs)`` and then ``attention(..., **kwargs)``.
_HANDOFF = "_longattn_pending"

try:  # the cache classes need transformers; the attention functions do not import it at module level
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import CacheLayerMixin as _HFLayer
except ImportError:  # pragma: no cover - depends on the environment
    _HFCache = _HFLayer = None


if _HFLayer is not None:

    class LongAttnLayer(_HFLayer):
        """One layer's contiguous cache in longattn's layout.

        ``k_buf``, ``v_buf``: ``(batch, max_cache_len, nheads_k, headdim)``;
        ``lengths``: ``(batch,)`` int32 tokens held (equal across the batch:
        padding lives in the attention mask). ``keys``/``values`` are the
        transformers-layout views ``(batch, nheads_k, max_cache_len, headdim)``
        of the same memory.
        """

        is_sliding = False
        is_compileable = False

        def __init__(self, max_cache_len: int, attn_implementation_of):
            super().__init__()
            self.max_cache_len = max_cache_len
            self._impl_of = attn_implementation_of
            self.length = 0
            self.k_buf = self.v_buf = self.lengths = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            b, hk, _, d = key_states.shape
            dv = value_states.shape[-1]
            self.k_buf = torch.zeros(b, self.max_cache_len, hk, d, dtype=key_states.dtype, device=key_states.device)
            self.v_buf = torch.zeros(b, self.max_cache_len, hk, dv, dtype=value_states.dtype,
                                     device=value_states.device)
            self.lengths = torch.zeros(b, dtype=torch.int32, device=key_states.device)
            self.keys, self.values = self.k_buf.transpose(1, 2), self.v_buf.transpose(1, 2)
            self.is_initialized = True

        def _check_room(self, n: int) -> None:
            if self.length + n > self.max_cache_len:
                raise ArgumentError(f"LongAttnCache max_cache_len={self.max_cache_len} is too small: "
                                    f"{self.length} tokens held + {n} new")

        def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """Copy ``(batch, nheads_k, n, headdim)`` new tokens in place after the held ones."""
            n = key_states.shape[2]
            self._check_room(n)
            self.k_buf[:, self.length:self.length + n].copy_(key_states.transpose(1, 2))
            self.v_buf[:, self.length:self.length + n].copy_(value_states.transpose(1, 2))
            self.advance(n)

        def advance(self, n: int) -> None:
            self.length += n
            self.lengths.fill_(self.length)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            impl = self._impl_of()
            if not (isinstance(impl, str) and impl.startswith("longattn")):
                raise UnsupportedFeatureError(
                    f"LongAttnCache serves attn_implementation='longattn*' only, the model uses {impl!r}: "
                    "its decode steps append through longattn.decode_attention")
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[2]
            attn_kwargs = kwargs.get("kwargs")
            if self.length == 0 or not isinstance(attn_kwargs, dict):
                self.append(key_states, value_states)  # prefill: attention runs on the views
                end = self.length
            else:
                self._check_room(n)
                attn_kwargs[_HANDOFF] = (self, key_states, value_states)
                end = self.length + n  # the views cover the slots decode_attention is about to fill
            return self.keys[:, :, :end], self.values[:, :, :end]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.max_cache_len

        def reset(self) -> None:
            if self.is_initialized:
                self.k_buf.zero_()
                self.v_buf.zero_()
                self.lengths.zero_()
            self.length = 0

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.is_initialized:
                idx = beam_idx.to(self.k_buf.device)
                self.k_buf.copy_(self.k_buf.index_select(0, idx))
                self.v_buf.copy_(self.v_buf.index_select(0, idx))

    class LongAttnCache(_HFCache):
        """A transformers ``Cache`` whose decode steps run through :func:`longattn.decode_attention`.

        ``generate(..., past_key_values=LongAttnCache(model.config, max_cache_len=N))``:
        the prompt is copied into contiguous per-layer buffers
        ``(batch, max_cache_len, nheads_k, headdim)``; each later step's new
        tokens are appended in place by ``decode_attention`` (int32 lengths).
        With a padding mask or a sparse variant the step appends first and
        runs ``longattn.attention`` on the cache's views instead. Used under
        any other attention implementation, ``update`` raises.
        """

        def __init__(self, config, max_cache_len: int):
            if not isinstance(max_cache_len, int) or max_cache_len < 1:
                raise ArgumentError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
            cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
            if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "layer_types", None) is not None \
                    and any(t != "full_attention" for t in cfg.layer_types):
                raise UnsupportedFeatureError("LongAttnCache keeps every token (full-attention layers); this model "
                                              f"has layer types {sorted(set(cfg.layer_types))}")
            impl_of = lambda: getattr(cfg, "_attn_implementation", None)  # noqa: E731 - read at each update
            layers = [LongAttnLayer(max_cache_len, impl_of) for _ in range(cfg.num_hidden_layers)]
            super().__init__(layers=layers)
