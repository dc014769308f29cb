"""Which ``sparse=`` config each registered attention name uses (filled by
:func:`longattn.integrations.transformers.register`, read by the cache)."""

from __future__ import annotations

import types
from typing import Any

from longattn.errors import UnsupportedFeatureError

# name -> its sparse_for(module) (returns None for dense), as last registered.
SPARSE_FOR: dict[str, Any] = {}


def sparse_config(name: str, layer_idx: int) -> object | None:
    """The ``sparse=`` config registered under ``name`` for layer ``layer_idx`` (None: dense)."""
    sparse_for = SPARSE_FOR.get(name)
    if sparse_for is None:
        raise UnsupportedFeatureError(f"attn_implementation {name!r} is not registered by "
                                      "longattn.integrations.transformers.register()")
    return sparse_for(types.SimpleNamespace(layer_idx=layer_idx))


def is_decode_time(sparse: object | None) -> bool:
    """True for the methods that only select at decode (Quest, Double Sparsity,
    TidalDecode): their prefill is dense attention."""
    if sparse is None:
        return False
    from longattn.sparse import DoubleSparsity, Quest, TidalLayer

    return isinstance(sparse, (Quest, DoubleSparsity, TidalLayer))
