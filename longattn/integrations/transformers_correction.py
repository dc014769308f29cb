"""TidalDecode's cache correction for transformers models (arXiv 2410.05076).

Under sparse decode, a token's keys and values in layers after the first
sparse one are computed from approximate attention outputs. Every
``correction_interval`` decoded tokens, TidalDecode's reference recomputes
those tokens' KV with dense attention. That reruns the model's layers over
them, so it lives here, next to the model, not in ``decode_attention``:

- :func:`recompute_recent`: crop the last ``n`` tokens from a
  :class:`~longattn.integrations.transformers.LongAttnCache` and run them
  again through the model with dense attention (one chunked step of ``n``
  queries per layer), which writes their dense KV back in place;
- :func:`generate_with_correction`: greedy decoding that calls it every
  ``correction_interval`` decoded tokens.
"""

from __future__ import annotations

import inspect

import torch

from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.validation import check_int

__all__ = ["generate_with_correction", "recompute_recent"]


def _cache_kwarg(model) -> str:
    """transformers 5.x calls the cache argument ``cache`` (``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _check_cache(cache) -> None:
    from longattn.integrations.transformers_cache import LongAttnCache

    if not isinstance(cache, LongAttnCache):
        raise ArgumentError(f"cache must be a longattn LongAttnCache, got {type(cache).__name__}")


@torch.no_grad()
def recompute_recent(model, cache, recent_ids: torch.Tensor) -> None:
    """Replace the KV of the last ``n`` tokens ``cache`` holds by their dense KV.

    Args:
        model: a transformers causal LM whose attention is one of longattn's
            names (the dense ``"longattn"`` is used for the rerun and the
            model's own implementation is restored after).
        cache: the :class:`LongAttnCache` of the generation (dense buffers:
            TidalDecode, Quest, Double Sparsity or dense layers; Streaming/Duo
            caches have evicted tokens and refuse to crop).
        recent_ids: ``(batch, n)`` the ids of the last ``n`` tokens the cache
            holds (the tokens fed as decode steps since the last correction).
    """
    _check_cache(cache)
    if not isinstance(recent_ids, torch.Tensor) or recent_ids.dim() != 2 or recent_ids.dtype.is_floating_point:
        raise ArgumentError(f"recent_ids must be an integer tensor (batch, n), got "
                            f"{getattr(recent_ids, 'shape', type(recent_ids).__name__)}")
    n = recent_ids.shape[1]
    held = cache.get_seq_length()
    if not 0 < n <= held:
        raise ArgumentError(f"recent_ids has {n} tokens; the cache holds {held} (need 1 .. {held})")
    impl = model.config._attn_implementation
    if not (isinstance(impl, str) and impl.startswith("longattn")):
        raise UnsupportedFeatureError(f"recompute_recent needs a longattn attention implementation, the model uses "
                                      f"{impl!r}")
    cache.crop(-n)
    model.set_attn_implementation("longattn")  # dense attention for the rerun
    try:
        model(recent_ids, use_cache=True, **{_cache_kwarg(model): cache})
    finally:
        model.set_attn_implementation(impl)


@torch.no_grad()
def generate_with_correction(model, input_ids: torch.Tensor, cache, *, max_new_tokens: int,
                             correction_interval: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with TidalDecode's cache correction.

    The prompt is prefilled; then each step feeds the last token (its KV
    computed under the model's sparse attention) and, after every
    ``correction_interval`` fed tokens, :func:`recompute_recent` recomputes
    theirs densely. Unpadded batches (no attention mask). Returns ``(batch,
    prompt + generated)`` ids like ``model.generate``; stops early when every
    row produced ``eos_token_id``.
    """
    _check_cache(cache)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("correction_interval", correction_interval, minimum=1)
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    logits = model(input_ids, **kw).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)
    out = [input_ids, token]
    fed: list[torch.Tensor] = []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            done |= token[:, 0] == eos_token_id
            if bool(done.all()):
                break
        logits = model(token, **kw).logits[:, -1]
        fed.append(token)
        if len(fed) == correction_interval:
            recompute_recent(model, cache, torch.cat(fed, dim=1))
            fed = []
        token = logits.argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)
