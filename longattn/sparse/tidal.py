"""TidalDecode (arXiv 2410.05076), position-persistent sparse decode:
``decode_attention(q, ..., sparse=tidal.layer(i), state=step_state)``.

A decode step runs the model's ``num_layers`` layers; each layer has a role:

- **dense** (``dense_layers``, reference: 0 and 1): ordinary dense decode;
- **selection** (``selection_layers``, reference: 2 and ``num_layers // 2``):
  dense decode too (the engine's dense path, exact), and the top
  ``token_budget`` positions per kv head by score ``q . k`` (max over the
  query heads of the group; all positions when the sequence is shorter) are
  recorded in the step's :class:`TidalState`;
- **reuse** (every other layer): attends exactly the positions the latest
  selection layer before it recorded (``gather_decode``).

Every layer has its own KV cache; they all hold the same positions, so the
selection of one layer indexes the caches of the next. The caller holds one
:class:`TidalState` per decode step and passes it to every layer of that step
(reusing one object across steps is fine: each selection layer overwrites
it, and a reuse layer refuses a selection made for other lengths).

Cache correction (the paper's option: every ``correction_interval`` decoded
tokens, recompute the KV of the tokens decoded sparsely since the last
correction with dense attention) reruns the model's layers over those
tokens, which an attention call cannot do: ``decode_attention`` never
corrects. The transformers integration does it:
:func:`longattn.integrations.transformers.recompute_recent` (crop the
cache by those tokens, rerun them densely) and
:func:`longattn.integrations.transformers.generate_with_correction` (greedy
decoding that calls it every ``tidal.correction_interval`` tokens). Off by
default (``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError
from longattn.sparse.token_select import (
    SCAN_CHUNK,
    check_state_batch,
    key_span,
    length_mask,
    register_state,
    top_positions,
)
from longattn.validation import check_int

ROLES = ("dense", "selection", "reuse")


def _layer_tuple(name: str, layers: object, num_layers: int) -> tuple[int, ...]:
    if not isinstance(layers, (tuple, list)):
        raise ArgumentError(f"TidalDecode {name} must be a tuple of layer indices, got {layers!r}")
    for i in layers:
        check_int(f"TidalDecode {name} entry", i, minimum=0)
        if i >= num_layers:
            raise ArgumentError(f"TidalDecode {name} must be layer indices in 0 .. {num_layers - 1} "
                                f"(num_layers={num_layers}), got {i}")
    if len(set(layers)) != len(layers):
        raise ArgumentError(f"TidalDecode {name} must not repeat a layer, got {tuple(layers)}")
    return tuple(sorted(int(i) for i in layers))


@dataclass(frozen=True)
class TidalLayer:
    """One layer's ``sparse=`` config in a TidalDecode schedule (made by
    :meth:`TidalDecode.layer`).

    Attributes:
        index: the layer.
        role: ``"dense"``, ``"selection"`` or ``"reuse"``.
        token_budget: positions a selection keeps per kv head.
        source: for ``"reuse"``, the selection layer whose choice it attends
            (the latest one before it); None otherwise.
    """

    index: int
    role: str
    token_budget: int
    source: int | None = None

    def __post_init__(self) -> None:
        check_int("TidalLayer index", self.index, minimum=0)
        check_int("TidalLayer token_budget", self.token_budget, minimum=1)
        if self.role not in ROLES:
            raise ArgumentError(f"TidalLayer role must be one of {ROLES}, got {self.role!r}")
        if (self.role == "reuse") != (self.source is not None):
            raise ArgumentError(f"TidalLayer source must name a selection layer exactly for role 'reuse', got "
                                f"role={self.role!r}, source={self.source!r}")
        if self.source is not None:
            check_int("TidalLayer source", self.source, minimum=0)
            if self.source >= self.index:
                raise ArgumentError(f"TidalLayer source must be a layer before {self.index}, got {self.source}")


@dataclass(frozen=True)
class TidalDecode:
    """A TidalDecode schedule over a model's layers (validated on construction).

    Attributes:
        num_layers: layers of the model.
        dense_layers: layers that run dense decode (and select nothing).
        selection_layers: layers that run dense decode and record the top
            ``token_budget`` positions; None (default) means ``(2, num_layers
            // 2)`` (one entry when both are the same layer). Every layer that
            is neither dense nor a selection layer reuses the latest selection
            before it, so the first non-dense layer must be a selection layer.
        token_budget: positions kept per kv head.
        correction_interval: None, or every how many decoded tokens the
            transformers integration's ``generate_with_correction`` recomputes
            the sparsely decoded tokens' KV densely (module docstring).
    """

    num_layers: int
    dense_layers: tuple[int, ...] = (0, 1)
    selection_layers: tuple[int, ...] | None = None
    token_budget: int = 2048
    correction_interval: int | None = None

    def __post_init__(self) -> None:
        n = check_int("TidalDecode num_layers", self.num_layers, minimum=1)
        check_int("TidalDecode token_budget", self.token_budget, minimum=1)
        if self.correction_interval is not None:
            check_int("TidalDecode correction_interval", self.correction_interval, minimum=1)
        dense = _layer_tuple("dense_layers", self.dense_layers, n)
        if self.selection_layers is None:
            if n < 3:
                raise ArgumentError(f"TidalDecode with num_layers={n} has no layer 2 for the default "
                                    "selection_layers (2, num_layers // 2): pass selection_layers explicitly")
            selection = tuple(sorted({2, n // 2}))
        else:
            selection = _layer_tuple("selection_layers", self.selection_layers, n)
        both = sorted(set(dense) & set(selection))
        if both:
            raise ArgumentError(f"TidalDecode layers {both} are both in dense_layers {dense} and selection_layers "
                                f"{selection}; a layer has one role")
        first_other = next((i for i in range(n) if i not in dense), None)
        if first_other is not None and first_other not in selection:
            raise ArgumentError(
                f"TidalDecode layer {first_other} is the first layer that is not dense, so it must be a selection "
                f"layer (nothing before it selected tokens to reuse); got selection_layers {selection}"
            )
        object.__setattr__(self, "dense_layers", dense)
        object.__setattr__(self, "selection_layers", selection)

    def role(self, i: int) -> str:
        """``"dense"``, ``"selection"`` or ``"reuse"`` for layer ``i``."""
        return self.layer(i).role

    def layer(self, i: int) -> TidalLayer:
        """Layer ``i``'s ``sparse=`` config for :func:`longattn.decode_attention`."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers:
            raise ArgumentError(f"TidalDecode.layer takes a layer index in 0 .. {self.num_layers - 1}, got {i!r}")
        if i in self.dense_layers:
            return TidalLayer(i, "dense", self.token_budget)
        if i in self.selection_layers:
            return TidalLayer(i, "selection", self.token_budget)
        source = max(s for s in self.selection_layers if s < i)
        return TidalLayer(i, "reuse", self.token_budget, source)


class TidalState:
    """The selection carried between the layers of one decode step.

    Attributes:
        selection: ``(batch, nheads_k, n)`` int32 positions (ascending, ``-1`` =
            none) recorded by the latest selection layer, or None.
        layer: that selection layer's index.
        lengths: the sequence lengths (tokens attended, new ones included) it
            was made over; a reuse layer must attend the same lengths.
    """

    def __init__(self) -> None:
        self.handle = register_state(self)  # for torch.compile: see token_select.register_state
        self.reset()

    def reset(self) -> None:
        self.selection: torch.Tensor | None = None
        self.layer: int | None = None
        self.lengths: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"TidalState(layer={self.layer}, lengths={self.lengths})"

    def record(self, layer: int, selection: torch.Tensor, lengths: list[int]) -> None:
        self.selection, self.layer, self.lengths = selection, layer, tuple(lengths)

    def check_reuse(self, config: TidalLayer, lengths: list[int], nheads_k: int) -> torch.Tensor:
        """The selection a reuse layer attends; raises unless it was recorded by
        ``config.source`` over these ``lengths`` (after appending) and heads."""
        if self.selection is None:
            raise ArgumentError(f"state holds no selection: layer {config.index} reuses layer {config.source}'s, "
                                "so run that layer with the same TidalState earlier in this step")
        if self.layer != config.source:
            raise ArgumentError(f"state holds layer {self.layer}'s selection, but layer {config.index} reuses "
                                f"layer {config.source}'s (run the layers of a step in order with one TidalState)")
        if self.selection.shape[1] != nheads_k:
            raise ArgumentError(f"state's selection has {self.selection.shape[1]} kv heads, this call's cache has "
                                f"nheads_k {nheads_k}")
        check_state_batch("TidalState", self.lengths, lengths, what="this call attends (cache_seqlens + seqlen_new)",
                          advice="the selection belongs to another step or batch (run the step's selection "
                                 "layer first)")
        return self.selection


def select_top_tokens(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None,
                      lengths: list[int], token_budget: int) -> torch.Tensor:
    """A selection layer's choice: ``q (batch, nheads, headdim)`` (scaled by the
    softmax scale) against every cached key (``lengths[b]`` per sequence) ->
    the top ``token_budget`` positions per kv head by ``q . k``, max over the
    query group: ``(batch, nheads_k, min(token_budget, longest))`` int32,
    ascending, ``-1`` = none. Scans the cache in chunks (float32 scores of one
    chunk at a time)."""
    batch, nheads, d = q.shape
    hk = k_cache.shape[2]
    longest = max(lengths, default=0)
    qg = q.float().view(batch, hk, nheads // hk, d)
    scores = torch.empty((batch, hk, longest), dtype=torch.float32, device=q.device)
    for start in range(0, longest, SCAN_CHUNK):
        end = min(longest, start + SCAN_CHUNK)
        keys = key_span(k_cache, block_table, start, end).float()  # (batch, n, hk, d)
        scores[:, :, start:end] = torch.einsum("bhgd,bnhd->bhgn", qg, keys).amax(dim=2)
    valid = length_mask(lengths, longest, q.device)[:, None, :].expand_as(scores)
    return top_positions(scores, valid, token_budget)


def all_positions(lengths: list[int], nheads_k: int, device: torch.device) -> torch.Tensor:
    """Every position of each sequence: ``(batch, nheads_k, longest)`` int32, -1 past its length."""
    longest = max(lengths, default=0)
    pos = torch.arange(longest, device=device, dtype=torch.int32).expand(len(lengths), -1)
    pos = torch.where(length_mask(lengths, longest, device), pos, torch.full_like(pos, -1))
    return pos[:, None, :].expand(-1, nheads_k, -1).contiguous()
