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

Decode through longattn's kernels: pass ``LongAttnCache(model.config,
max_cache_len=N)`` (``page_size=`` for a paged cache) as the cache of
``generate`` (``cache=`` in transformers 5.x, ``past_key_values=`` before).
Each step is one ``decode_attention`` call appending in place (dense, left
padding as ``cache_leftpad``; HiP with its decode state) or the
Streaming/Duo cache's step (constant memory for streaming heads); see
:mod:`longattn.integrations.transformers_cache`.

Refused with :class:`longattn.errors.UnsupportedFeatureError` (never ignored):
dropout > 0, custom 4D masks, attention sinks (``s_aux``), score biases, packed
sequences given only through ``position_ids``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from longattn.api import attention
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.decode_api import decode_attention
from longattn.integrations.transformers_names import SPARSE_FOR, is_decode_time, sparse_config  # noqa: F401
from longattn.integrations.transformers_unpad import any_unpadded_attention

__all__ = ["register", "NAMES", "LongAttnCache", "generate_with_correction", "recompute_recent"]

NAMES = ("longattn", "longattn_hip", "longattn_streaming", "longattn_duo", "longattn_quest",
         "longattn_double_sparsity", "longattn_tidal")

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
        # (compiled, the mask is not read on the host: it is passed on as it is)
        if attention_mask.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(attention_mask.all()):
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


_PACKED_MESSAGE = ("position_ids restart inside a row (packed sequences without a mask); pass an attention_mask "
                   "per sequence instead")


def _check_not_packed(position_ids: torch.Tensor | None, q_len: int, kv_len: int) -> None:
    """Raise if ``position_ids`` restart inside a row (sequences packed with no mask).

    Eagerly a host read and :class:`UnsupportedFeatureError`; under
    torch.compile an asynchronous assert (no graph break) that raises a
    ``RuntimeError`` with the same message when the compiled model runs."""
    if position_ids is None or q_len != kv_len or q_len < 2 or position_ids.shape[-1] != q_len:
        return
    restarts = (position_ids[..., 1:] - position_ids[..., :-1] != 1).any()
    if torch.compiler.is_compiling():
        torch._assert_async(~restarts, _PACKED_MESSAGE)
    elif bool(restarts):
        raise UnsupportedFeatureError(_PACKED_MESSAGE)


def _decode_time_without_cache(qt, kt, vt, mask, opts, sparse) -> torch.Tensor:
    """A decode-time method outside LongAttnCache: the prompt densely; a one-token
    step selects over the whole cache transformers hands in (``state=None``:
    rebuilt every step -- LongAttnCache keeps the state instead)."""
    from longattn.sparse import TidalLayer  # noqa: PLC0415

    if mask is not None:
        raise UnsupportedFeatureError(f"{type(sparse).__name__} decodes unpadded batches only; drop the padding "
                                      "(batch size 1, or equal lengths)")
    if qt.shape[1] == kt.shape[1]:
        return attention(qt, kt, vt, **opts)  # prefill: dense
    if isinstance(sparse, TidalLayer):
        raise UnsupportedFeatureError("TidalDecode carries one selection across the layers of a step: use "
                                      "LongAttnCache (past_key_values=LongAttnCache(model.config, max_cache_len=N))")
    lengths = torch.full((qt.shape[0],), kt.shape[1], dtype=torch.int32, device=qt.device)
    return decode_attention(qt, kt, vt, cache_seqlens=lengths, sparse=sparse, **opts)


def _make_attention_fn(sparse_for):
    """The ``AttentionInterface`` function; ``sparse_for(module)`` -> ``sparse=`` config or None."""

    def longattn_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
        """query ``(B, H, q_len, D)``, key/value ``(B, Hk, kv_len, D)`` -> ``((B, q_len, H, D), None)``."""
        _check_kwargs(dropout, attention_mask, kwargs)
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is None and kwargs.get("cu_seq_lens_q") is None:
            _check_not_packed(kwargs.get("position_ids"), q_len, kv_len)
        if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
            raise UnsupportedFeatureError("cu_seq_lens_q / cu_seq_lens_k (flash-attn packed kwargs) are not "
                                          "supported by longattn's transformers adapter; pass an attention_mask")
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
        sliding = kwargs.get("sliding_window")
        if "sliding_window" not in kwargs:
            sliding = getattr(module, "sliding_window", None)
        softcap = kwargs.get("softcap")
        opts: dict[str, Any] = dict(
            causal=causal,
            softmax_scale=None if scaling is None else float(scaling),
            window_size=_window(sliding),
            softcap=0.0 if softcap is None else float(softcap),
        )
        sparse = sparse_for(module)
        # (B, H, L, D) -> (B, L, H, D): views, longattn takes any strides
        qt, kt, vt = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        layer = kwargs.get(HANDOFF)
        if layer is not None:  # a LongAttnCache step: the layer holds the keys and attends
            return layer.attend(qt, kt, vt, attention_mask, opts, sparse), None
        if is_decode_time(sparse):
            return _decode_time_without_cache(qt, kt, vt, attention_mask, opts, sparse), None
        if attention_mask is None:
            out = attention(qt, kt, vt, sparse=sparse, **opts)
        else:
            out = any_unpadded_attention(qt, kt, vt, attention_mask, sparse=sparse, **opts)
        return out, None

    return longattn_attention


def _per_layer(what: str, config_of):
    """``sparse_for(module)`` from ``config_of(layer_idx)``, cached per layer."""
    per_layer: dict[int, object] = {}

    def sparse_for(module):
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            raise UnsupportedFeatureError(f"longattn's {what} variant needs module.layer_idx on the attention "
                                          f"module; {type(module).__name__} has none")
        cfg = per_layer.get(idx)
        if cfg is None:
            cfg = per_layer[idx] = config_of(int(idx))
        return cfg

    return sparse_for


def _ds_for_layer(double_sparsity: object):
    """``layer_idx -> DoubleSparsity`` from a ChannelConfig, its path, or such a callable."""
    from longattn.sparse import ChannelConfig  # noqa: PLC0415

    if isinstance(double_sparsity, (str, os.PathLike)):
        double_sparsity = ChannelConfig.load(double_sparsity)
    if isinstance(double_sparsity, ChannelConfig):
        return double_sparsity.for_layer
    if callable(double_sparsity):
        return double_sparsity
    raise ArgumentError("double_sparsity must be a longattn.sparse.ChannelConfig, the path of its file, or a "
                        f"callable layer_idx -> DoubleSparsity; got {type(double_sparsity).__name__}")


def register(*, hip: object | None = None, streaming: object | None = None, duo: object | None = None,
             quest: object | None = None, double_sparsity: object | None = None,
             tidal: object | None = None) -> tuple[str, ...]:
    """Register longattn with transformers; returns the names registered.

    Args:
        hip: a :class:`longattn.sparse.HiP` config -> also ``"longattn_hip"``.
        streaming: a :class:`longattn.sparse.Streaming` config -> ``"longattn_streaming"``.
        duo: a :class:`longattn.sparse.HeadPattern`, or the path of a pattern
            file (``HeadPattern.save``, ``longattn calibrate duo``) ->
            ``"longattn_duo"`` (layer ``module.layer_idx`` uses its row).
        quest: a :class:`longattn.sparse.Quest` -> ``"longattn_quest"``.
        double_sparsity: a :class:`longattn.sparse.ChannelConfig` (or the path
            of its file, ``longattn calibrate double-sparsity``; token budget
            2048), or a callable ``layer_idx -> DoubleSparsity`` ->
            ``"longattn_double_sparsity"``.
        tidal: a :class:`longattn.sparse.TidalDecode` schedule (its
            ``num_layers`` the model's) -> ``"longattn_tidal"``.

    The last three are decode-time methods: prefill is dense attention; each
    decode step selects tokens (through ``LongAttnCache``, with the layer's
    state kept there; TidalDecode needs ``LongAttnCache``, whose layers share
    one selection per step). Padded batches are refused for them.

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

        if isinstance(duo, (str, os.PathLike)):
            duo = HeadPattern.load(duo)  # a file written by HeadPattern.save / longattn calibrate duo
        if not isinstance(duo, HeadPattern):
            raise ArgumentError(f"duo must be a longattn.sparse.HeadPattern or the path of a pattern file, got "
                                f"{type(duo).__name__}")
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
    if quest is not None:
        from longattn.sparse import Quest  # noqa: PLC0415

        if not isinstance(quest, Quest):
            raise ArgumentError(f"quest must be a longattn.sparse.Quest, got {type(quest).__name__}")
        entries.append(("longattn_quest", lambda module, cfg=quest: cfg))
    if double_sparsity is not None:
        entries.append(("longattn_double_sparsity", _per_layer("double_sparsity", _ds_for_layer(double_sparsity))))
    if tidal is not None:
        from longattn.sparse import TidalDecode  # noqa: PLC0415

        if not isinstance(tidal, TidalDecode):
            raise ArgumentError(f"tidal must be a longattn.sparse.TidalDecode, got {type(tidal).__name__}")
        entries.append(("longattn_tidal", _per_layer("tidal", tidal.layer)))
    for name, sparse_for in entries:
        SPARSE_FOR[name] = sparse_for
        AttentionInterface.register(name, _make_attention_fn(sparse_for))
        AttentionMaskInterface.register(name, _mask_fn)
    return tuple(name for name, _ in entries)


from longattn.integrations.transformers_correction import generate_with_correction, recompute_recent  # noqa: E402,F401

try:  # the cache classes need transformers; the attention functions do not import it at module level
    from longattn.integrations.transformers_cache import HANDOFF, LongAttnCache, LongAttnLayer  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    HANDOFF = "_longattn_pending"
