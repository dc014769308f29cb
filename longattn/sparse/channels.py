"""Double Sparsity's offline calibration: the "outlier" channels of each kv head.

Double Sparsity (arXiv 2408.07092) approximates a decode step's scores
``q . k`` from only ``r`` of the ``headdim`` channels of each kv head, the
channels that carry most of the product. Which channels those are is
decided once, offline, from calibration queries and keys:
:func:`calibrate_channels` scores every channel of every ``(layer, kv head)``
and returns a :class:`ChannelConfig` holding, per head, *all* channels
ranked best first, so ``r`` can still be chosen when the config is loaded
(``config.layer(i, r)`` is the top ``r``; ``config.for_layer(i)`` the layer's
``sparse=`` config, :class:`longattn.sparse.DoubleSparsity`).

Channel scores (per layer and kv head, mean over the calibration tokens and,
for queries, over the kv head's query group): ``method="qk"`` ``|q_c * k_c|``
(q and k of the same token), ``"q"`` ``|q_c|``, ``"k"`` ``|k_c|``.

Rotary layouts. The queries and keys a model passes to attention are
rotary-embedded: channels come in pairs, and each pair is rotated by a
position-dependent angle, so a large component of the un-rotated vector
shows up in *either* channel of its pair depending on the position (and
for ``method="qk"`` the pair's summed score ``|q_a k_a| + |q_b k_b|`` is
exactly rotation invariant when the two components are aligned: ``|QK|
(cos^2 + sin^2)``). An outlier therefore lives in a pair, not in one
channel, and keeping one channel of a pair keeps a fraction of it that
changes with the position. So with ``rotary="half"`` (GPT-NeoX / Llama:
channel ``i`` pairs with ``i + headdim / 2``) or ``rotary="interleaved"``
(GPT-J: ``2i`` with ``2i + 1``) a pair is scored as the sum of its two
channels' scores, pairs are ranked by that sum, and each pair contributes
both channels, adjacent in the ranking, the higher-scoring one first. Every
even prefix of the ranking is then a set of whole pairs, and ``r`` must be
even. ``rotary="none"`` ranks single channels. The rotary must cover the
whole head (partial rotary, ``rotary_dim < headdim``, is not supported).
Ties rank the lower channel (or pair) index first, so the ranking is a
deterministic function of the scores.

Config files are JSON (:meth:`ChannelConfig.save` / :meth:`ChannelConfig.load`),
never pickle::

    {"format": "longattn.ChannelConfig", "version": 1, "num_layers": 2, "nheads_k": 2,
     "headdim": 4, "r": 2, "rotary": "half", "method": "qk",
     "ranking": [[[1, 3, 0, 2], [0, 2, 3, 1]], [[...], [...]]],
     "scores": [[[0.1, 2.0, 0.3, 1.5], [...]], [...]] or null}

``scores`` (the per-channel scores the ranking came from) is informational.

:func:`calibrate_double_sparsity` runs a model on synthetic tokens and
calibrates from the queries and keys of its :func:`longattn.attention`
calls (the interception point Duo calibration uses, :mod:`longattn.hooks`);
``longattn calibrate double-sparsity`` is its command line.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError, DTypeError, LongAttnError, ShapeError, UnsupportedFeatureError
from longattn.validation import check_int, check_tensor

FORMAT, VERSION = "longattn.ChannelConfig", 1
ROTARY_LAYOUTS = ("half", "interleaved", "none")
METHODS = ("qk", "q", "k")
_FIELDS = ("format", "version", "num_layers", "nheads_k", "headdim", "r", "rotary", "method", "ranking", "scores")
_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def rotary_pairs(headdim: int, rotary: str) -> list[tuple[int, ...]]:
    """The ranking units of a head: pairs ``(i, i + headdim // 2)`` (``"half"``),
    ``(2i, 2i + 1)`` (``"interleaved"``), or single channels (``"none"``), in
    index order (the tie-break order)."""
    _check_choice("rotary", rotary, ROTARY_LAYOUTS)
    if rotary == "none":
        return [(c,) for c in range(headdim)]
    if headdim % 2:
        raise ShapeError(f"rotary={rotary!r} pairs channels, so headdim must be even, got {headdim}")
    half = headdim // 2
    if rotary == "half":
        return [(i, i + half) for i in range(half)]
    return [(2 * i, 2 * i + 1) for i in range(half)]


def rank_channels(scores: torch.Tensor, rotary: str = "half") -> list[list[int]]:
    """Every channel of every row of ``scores (heads, headdim)``, best first
    (pairs kept together under a rotary layout; see the module docstring)."""
    scores = check_tensor("scores", scores, 2, "(heads, headdim)", _SCORE_DTYPES)
    units = rotary_pairs(scores.shape[1], rotary)
    ranking = []
    for row in scores.detach().to("cpu", torch.float64).tolist():
        unit_score = [sum(row[c] for c in unit) for unit in units]
        order = sorted(range(len(units)), key=lambda u: (-unit_score[u], u))
        ranking.append([c for u in order for c in sorted(units[u], key=lambda c: (-row[c], c))])
    return ranking


def _check_r(name: str, r: object, headdim: int, rotary: str) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= headdim:
        raise ArgumentError(f"{name} must be an int in [1, headdim={headdim}], got {r!r}")
    if rotary != "none" and r % 2:
        raise ArgumentError(f"{name} must be even with rotary={rotary!r} (whole rotary pairs), got {r}")
    return r


@dataclass(frozen=True)
class ChannelConfig:
    """Double Sparsity's channels: per ``(layer, kv head)`` every channel, best first.

    Attributes:
        ranking: ``num_layers`` tuples of ``nheads_k`` tuples, each a
            permutation of ``range(headdim)`` (best channel first; under a
            rotary layout the two channels of a pair are adjacent).
        r: the channels :meth:`layer` keeps by default (``1 <= r <= headdim``;
            even under a rotary layout, so no pair is split).
        rotary: ``"half"``, ``"interleaved"`` or ``"none"`` (module docstring).
        method: the score the ranking came from, ``"qk"``, ``"q"`` or ``"k"``.
        scores: the per-channel scores (same nesting as ``ranking``,
            non-negative floats), or ``None``; informational.
    """

    ranking: tuple[tuple[tuple[int, ...], ...], ...]
    r: int
    rotary: str = "half"
    method: str = "qk"
    scores: tuple[tuple[tuple[float, ...], ...], ...] | None = None

    def __post_init__(self) -> None:
        _check_choice('ChannelConfig field "rotary"', self.rotary, ROTARY_LAYOUTS)
        _check_choice('ChannelConfig field "method"', self.method, METHODS)
        if not isinstance(self.ranking, tuple) or not self.ranking:
            raise ArgumentError("ChannelConfig field \"ranking\" must be a non-empty tuple (layers) of tuples "
                                f"(kv heads) of tuples (channels), got {type(self.ranking).__name__}")
        nheads_k = headdim = None
        for i, layer in enumerate(self.ranking):
            if not isinstance(layer, tuple) or not layer:
                raise ArgumentError(f"ChannelConfig field \"ranking\" layer {i} must be a non-empty tuple of "
                                    "per-head tuples")
            if nheads_k is None:
                nheads_k = len(layer)
            if len(layer) != nheads_k:
                raise ShapeError(f"ChannelConfig field \"ranking\" layer {i} has {len(layer)} kv heads; every "
                                 f"layer needs the same number ({nheads_k})")
            for h, row in enumerate(layer):
                if not isinstance(row, tuple) or not row:
                    raise ArgumentError(f"ChannelConfig field \"ranking\" layer {i} head {h} must be a non-empty "
                                        "tuple of channel indices")
                if headdim is None:
                    headdim = len(row)
                if any(isinstance(c, bool) or not isinstance(c, int) for c in row) or sorted(row) != list(
                        range(headdim)):
                    raise ArgumentError(f"ChannelConfig field \"ranking\" layer {i} head {h} must be a permutation "
                                        f"of the channels 0..{headdim - 1} (the full ranking of a head), got {row!r}")
        units = rotary_pairs(headdim, self.rotary)  # validates an even headdim for rotary layouts
        if self.rotary != "none":
            partner = {a: b for a, b in units} | {b: a for a, b in units}
            for i, layer in enumerate(self.ranking):
                for h, row in enumerate(layer):
                    for j in range(0, headdim, 2):
                        if partner[row[j]] != row[j + 1]:
                            raise ArgumentError(
                                f"ChannelConfig field \"ranking\" layer {i} head {h} splits a rotary pair: with rotary="
                                f"{self.rotary!r} positions {j} and {j + 1} must hold the two channels of one pair "
                                f"({row[j]} and {partner[row[j]]}), got {row[j]} and {row[j + 1]}")
        self._check_r('ChannelConfig field "r"', self.r)
        if self.scores is not None:
            shape = (len(self.ranking), nheads_k, headdim)
            ok = (isinstance(self.scores, tuple) and len(self.scores) == shape[0]
                  and all(isinstance(layer, tuple) and len(layer) == shape[1] for layer in self.scores)
                  and all(isinstance(row, tuple) and len(row) == shape[2] for layer in self.scores for row in layer))
            if not ok:
                raise ShapeError(f"ChannelConfig field \"scores\" must be None or tuples of shape {shape}, like "
                                 "ranking")
            for i, layer in enumerate(self.scores):
                for h, row in enumerate(layer):
                    if not all(not isinstance(s, bool) and isinstance(s, numbers.Real) and math.isfinite(s) and s >= 0
                               for s in row):
                        raise ArgumentError(f"ChannelConfig field \"scores\" layer {i} head {h} must be finite "
                                            f"numbers >= 0, got {row!r}")

    def _check_r(self, name: str, r: object) -> int:
        return _check_r(name, r, self.headdim, self.rotary)

    @property
    def num_layers(self) -> int:
        return len(self.ranking)

    @property
    def nheads_k(self) -> int:
        return len(self.ranking[0])

    @property
    def headdim(self) -> int:
        return len(self.ranking[0][0])

    @classmethod
    def from_scores(cls, scores: torch.Tensor, r: int, *, method: str = "qk", rotary: str = "half") -> ChannelConfig:
        """The config ranking ``scores (num_layers, nheads_k, headdim)`` (finite, >= 0)."""
        _check_choice("method", method, METHODS)
        _check_choice("rotary", rotary, ROTARY_LAYOUTS)
        scores = check_tensor("scores", scores, 3, "(num_layers, nheads_k, headdim)", _SCORE_DTYPES)
        if 0 in scores.shape:
            raise ShapeError(f"scores must be a non-empty (num_layers, nheads_k, headdim) tensor, got "
                             f"{tuple(scores.shape)}")
        scores = scores.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
            raise ArgumentError("scores must be finite and >= 0 (means of absolute values); check the calibration "
                                "q/k for inf/NaN")
        layers, heads, headdim = scores.shape
        rotary_pairs(headdim, rotary)  # an even headdim for a rotary layout
        _check_r("r", r, headdim, rotary)
        ranking = rank_channels(scores.reshape(layers * heads, headdim), rotary)
        return cls(tuple(tuple(tuple(ranking[i * heads + h]) for h in range(heads)) for i in range(layers)), r,
                   rotary, method, tuple(tuple(tuple(row) for row in layer) for layer in scores.tolist()))

    def layer(self, layer_idx: int, r: int | None = None) -> torch.Tensor:
        """``(nheads_k, r)`` int64: the top ``r`` (default: the config's ``r``)
        channels of each kv head of layer ``layer_idx``, best first."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise ArgumentError(f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}")
        r = self.r if r is None else self._check_r("r", r)
        return torch.tensor([row[:r] for row in self.ranking[layer_idx]], dtype=torch.int64)

    def for_layer(self, layer_idx: int, token_budget: int = 2048, r: int | None = None):
        """Layer ``layer_idx``'s ``sparse=`` config:
        ``DoubleSparsity(channels=self.layer(layer_idx, r), token_budget=token_budget)``."""
        # Imported here: the runtime method need not load for calibration, and no import cycle can form if it
        # ever imports this module.
        from longattn.sparse.double_sparsity import DoubleSparsity

        return DoubleSparsity(channels=self.layer(layer_idx, r), token_budget=token_budget)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "num_layers": self.num_layers, "nheads_k": self.nheads_k,
                "headdim": self.headdim, "r": self.r, "rotary": self.rotary, "method": self.method,
                "ranking": [[list(row) for row in layer] for layer in self.ranking],
                "scores": None if self.scores is None else [[list(row) for row in layer] for layer in self.scores]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file: the scalar fields, then one line per (layer, kv head)
        of ``ranking`` and of ``scores`` (a 32-layer model's file stays readable)."""
        data = self.to_json()
        lines = []
        for key, value in data.items():
            if key in ("ranking", "scores") and value is not None:
                layers = [",\n  ".join(json.dumps(row) for row in layer) for layer in value]
                value = "[\n [" + "],\n [".join(layers) + "]\n]"
            else:
                value = json.dumps(value)
            lines.append(f"{json.dumps(key)}: {value}")
        with open(path, "w", encoding="utf-8") as f:
            f.write("{\n" + ",\n".join(lines) + "\n}\n")

    @classmethod
    def load(cls, path: str | os.PathLike, num_layers: int | None = None, nheads_k: int | None = None,
             headdim: int | None = None) -> ChannelConfig:
        """Read a config file (JSON, see the module docstring); every field is
        checked, a bad one is an :class:`~longattn.errors.ArgumentError` naming
        the file and the field. With ``num_layers`` / ``nheads_k`` / ``headdim``,
        check that it fits the model (:class:`~longattn.errors.ShapeError`)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise ArgumentError(f"cannot read the ChannelConfig file {path}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArgumentError(f"{path} is not a ChannelConfig file (not JSON: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArgumentError(f"{path} is not a ChannelConfig file (field \"format\" must be \"{FORMAT}\", got "
                                f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r})")
        version = data.get("version")
        if type(version) is not int or version != VERSION:  # not True, not 1.0
            raise ArgumentError(f"{path}: field \"version\" is {version!r}; this longattn reads ChannelConfig version "
                                f"{VERSION}")
        missing = [k for k in _FIELDS if k not in data]
        unknown = sorted(k for k in data if k not in _FIELDS)
        if missing:
            raise ArgumentError(f"{path}: missing ChannelConfig field \"{missing[0]}\" (version {VERSION} has "
                                f"{list(_FIELDS)})")
        if unknown:
            raise ArgumentError(f"{path}: unknown ChannelConfig field \"{unknown[0]}\" (version {VERSION} has "
                                f"{list(_FIELDS)})")
        dims = {}
        for name in ("num_layers", "nheads_k", "headdim"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{path}: field \"{name}\" must be an int >= 1, got {value!r}")
            dims[name] = value
        shape = (dims["num_layers"], dims["nheads_k"], dims["headdim"])
        ranking = _nested(path, "ranking", data["ranking"], shape, lambda c: isinstance(c, int) and not isinstance(
            c, bool), "channel indices (ints)")
        scores = None
        if data["scores"] is not None:
            scores = _nested(path, "scores", data["scores"], shape,
                             lambda s: isinstance(s, (int, float)) and not isinstance(s, bool), "numbers")
            scores = tuple(tuple(tuple(float(s) for s in row) for row in layer) for layer in scores)
        for name in ("r", "rotary", "method"):
            value = data[name]
            ok = (isinstance(value, int) and not isinstance(value, bool)) if name == "r" else isinstance(value, str)
            if not ok:
                raise ArgumentError(f"{path}: field \"{name}\" must be {'an int' if name == 'r' else 'a string'}, "
                                    f"got {value!r}")
        try:
            config = cls(ranking, data["r"], data["rotary"], data["method"], scores)
        except LongAttnError as exc:  # the constructor's messages name the field; add the file
            raise ArgumentError(f"{path}: {exc}") from None
        for name, want in (("num_layers", num_layers), ("nheads_k", nheads_k), ("headdim", headdim)):
            if want is not None and want != getattr(config, name):
                raise ShapeError(f"{path} has {name} = {getattr(config, name)}, the model has {want}")
        return config


def _nested(path: object, field: str, value: object, shape: tuple[int, int, int], leaf, leaf_kind: str) -> tuple:
    """JSON lists of ``shape`` (layers, kv heads, channels) -> nested tuples, or a named error."""
    where = f"{path}: field \"{field}\""

    def check_list(x: object, n: int, what: str, header: str, at: str) -> None:
        if not isinstance(x, list):
            raise ArgumentError(f"{where}{at} must be a list of {what}, got {type(x).__name__}")
        if len(x) != n:
            raise ArgumentError(f"{where}{at} holds {len(x)} {what}, but field \"{header}\" says {n}")

    check_list(value, shape[0], "layers", "num_layers", "")
    out = []
    for i, layer in enumerate(value):
        check_list(layer, shape[1], "kv heads", "nheads_k", f" layer {i}")
        rows = []
        for h, row in enumerate(layer):
            check_list(row, shape[2], leaf_kind, "headdim", f" layer {i} head {h}")
            if not all(leaf(x) for x in row):
                raise ArgumentError(f"{where} layer {i} head {h} must hold {leaf_kind}, got {row!r}")
            rows.append(tuple(row))
        out.append(tuple(rows))
    return tuple(out)


# --- calibration ----------------------------------------------------------------------------------------------------

def channel_scores(q: torch.Tensor, k: torch.Tensor, method: str = "qk") -> torch.Tensor:
    """Per kv head and channel, the calibration score: ``(nheads_k, headdim)`` float64.

    ``q (tokens, nheads, headdim)`` and ``k (tokens, nheads_k, headdim)`` of the
    same tokens (row ``t`` of both is one token), ``nheads % nheads_k == 0``;
    query head ``h`` belongs to kv head ``h // (nheads // nheads_k)``. Mean over
    tokens and the query group of ``|q_c * k_c|`` (``"qk"``), ``|q_c|`` (``"q"``)
    or, over tokens, ``|k_c|`` (``"k"``). Math in float64 (a calibration-sized
    reduction; the ranking should not depend on rounding).
    """
    _check_choice("method", method, METHODS)
    q = check_tensor("q", q, 3, "(tokens, nheads, headdim)", _SCORE_DTYPES)
    k = check_tensor("k", k, 3, "(tokens, nheads_k, headdim)", _SCORE_DTYPES)
    tokens, nheads, headdim = q.shape
    if k.shape[0] != tokens or k.shape[2] != headdim:
        raise ShapeError(f"k must have q's tokens and headdim: (tokens={tokens}, nheads_k, headdim={headdim}), got "
                         f"{tuple(k.shape)}")
    if tokens == 0 or headdim == 0:
        raise ShapeError(f"q needs at least one token and one channel, got {tuple(q.shape)}")
    nheads_k = k.shape[1]
    if nheads_k == 0 or nheads % nheads_k:
        raise ShapeError(f"q has {nheads} heads, not a multiple of k's nheads_k {nheads_k}")
    if q.device != k.device:
        raise ArgumentError(f"q is on {q.device} but k is on {k.device}")
    group = nheads // nheads_k
    if method == "k":
        return k.detach().double().abs().mean(dim=0)
    qg = q.detach().double().reshape(tokens, nheads_k, group, headdim)
    if method == "q":
        return qg.abs().mean(dim=(0, 2))
    return (qg * k.detach().double()[:, :, None, :]).abs().mean(dim=(0, 2))


def calibrate_channels(q: torch.Tensor | Sequence[torch.Tensor], k: torch.Tensor | Sequence[torch.Tensor], r: int,
                       method: str = "qk", rotary: str = "half") -> ChannelConfig:
    """Rank every channel of every ``(layer, kv head)`` by its calibration score.

    Args:
        q: ``(layers, tokens, nheads, headdim)``, or a list with one
            ``(tokens, nheads, headdim)`` per layer (token counts may differ
            between layers): the queries as attention sees them (after rotary).
        k: ``(layers, tokens, nheads_k, headdim)`` or a list per layer, the keys
            of the same tokens (row ``t`` of ``q[i]`` and ``k[i]`` is one token).
        r: the config's default number of channels (even under a rotary layout).
        method: ``"qk"`` (mean ``|q_c k_c|``, the paper's default), ``"q"`` or ``"k"``
            (:func:`channel_scores`).
        rotary: ``"half"``, ``"interleaved"`` or ``"none"``: how the model's
            rotary embedding pairs channels (module docstring).

    Returns:
        A :class:`ChannelConfig` with the full ranking per head and the scores.
    """
    _check_choice("method", method, METHODS)
    _check_choice("rotary", rotary, ROTARY_LAYOUTS)
    check_int("r", r)
    qs, ks = _per_layer("q", q), _per_layer("k", k)
    if len(qs) != len(ks):
        raise ShapeError(f"q has {len(qs)} layers but k has {len(ks)}")
    scores = []
    for i, (qi, ki) in enumerate(zip(qs, ks)):
        try:
            scores.append(channel_scores(qi, ki, method))
        except LongAttnError as exc:
            raise type(exc)(f"layer {i}: {exc}") from None
        if scores[i].shape != scores[0].shape:
            raise ShapeError(f"layer {i} has (nheads_k, headdim) = {tuple(scores[i].shape)}, layer 0 has "
                             f"{tuple(scores[0].shape)}; every layer needs the same")
    return ChannelConfig.from_scores(torch.stack([s.cpu() for s in scores]), r, method=method, rotary=rotary)


def _per_layer(name: str, x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        check_tensor(name, x, 4, f"(layers, tokens, {'nheads' if name == 'q' else 'nheads_k'}, headdim)",
                     _SCORE_DTYPES)
        layers = list(x.unbind(0))
    elif isinstance(x, (list, tuple)):
        layers = list(x)
    else:
        raise DTypeError(f"{name} must be a tensor (layers, tokens, heads, headdim) or a list of per-layer "
                         f"(tokens, heads, headdim) tensors, got {type(x).__name__}")
    if not layers:
        raise ShapeError(f"{name} must hold at least one layer")
    return layers


def capture_channel_scores(model: torch.nn.Module, *, vocab_size: int, method: str = "qk", seqlen: int = 256,
                           batch: int = 4, seed: int = 0) -> torch.Tensor:
    """Channel scores of ``model``'s attention calls: ``(num_layers, nheads_k, headdim)`` float64.

    Runs ``model`` once on ``batch`` sequences of ``seqlen`` uniform random
    token ids (seeded: deterministic) with every :func:`longattn.attention`
    call intercepted: the call's queries and keys are scored
    (:func:`channel_scores`, the call's batch and positions are the tokens)
    and the call's own dense attention is returned, so the model runs
    unchanged. The i-th call is layer i. A call with ``seqlen_q < seqlen_k``
    pairs query ``j`` with key ``j + seqlen_k - seqlen_q`` (bottom-right, the
    token the query belongs to); the other keys are not scored.

    Raises:
        UnsupportedFeatureError: a call passes ``sparse=`` (calibrate the
            dense model) or has more queries than keys.
        ArgumentError: the model never calls longattn.attention, or its
            layers differ in kv heads or head dim.
    """
    from longattn.kernels.dense import DENSE_BACKENDS, DenseCall
    from longattn.sparse.calibrate import _intercept

    _check_choice("method", method, METHODS)
    check_int("vocab_size", vocab_size)
    check_int("seqlen", seqlen)
    check_int("batch", batch)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seqlen), generator=gen)
    scores: list[torch.Tensor] = []

    def hook(call) -> torch.Tensor:
        if call.sparse is not None:
            raise UnsupportedFeatureError(
                f"a longattn.attention call passed sparse={type(call.sparse).__name__}(...) during Double Sparsity "
                "calibration: calibrate the dense model, with sparse=None")
        q, k = call.q, call.k
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
        if seqlen_q > seqlen_k:
            raise UnsupportedFeatureError(f"a longattn.attention call has seqlen_q={seqlen_q} > seqlen_k={seqlen_k}: "
                                          "its queries have no keys of their own tokens to score against")
        k_own = k[:, seqlen_k - seqlen_q:]
        scores.append(channel_scores(q.reshape(-1, q.shape[2], q.shape[3]),
                                     k_own.reshape(-1, k.shape[2], k.shape[3]), method))
        dense = DenseCall(q, k, call.v, call.scale, call.window, call.softcap, False)
        return DENSE_BACKENDS.select(dense, call.backend).run(dense)[0]

    with torch.no_grad(), _intercept(hook):
        model(tokens)
    if not scores:
        raise ArgumentError("the model never called longattn.attention; its attention must go through longattn")
    shapes = [tuple(s.shape) for s in scores]
    if len(set(shapes)) != 1:
        raise ArgumentError(f"every layer must have the same (nheads_k, headdim); the calls had {shapes}")
    return torch.stack([s.cpu() for s in scores])


def calibrate_double_sparsity(model: torch.nn.Module, *, vocab_size: int, r: int, method: str = "qk",
                              rotary: str = "half", seqlen: int = 256, batch: int = 4, seed: int = 0) -> ChannelConfig:
    """A :class:`ChannelConfig` for ``model`` from :func:`capture_channel_scores`
    (``r``, ``method``, ``rotary`` as :func:`calibrate_channels`)."""
    _check_choice("rotary", rotary, ROTARY_LAYOUTS)
    check_int("r", r)
    scores = capture_channel_scores(model, vocab_size=vocab_size, method=method, seqlen=seqlen, batch=batch,
                                    seed=seed)
    return ChannelConfig.from_scores(scores, r, method=method, rotary=rotary)
