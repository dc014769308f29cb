"""DuoAttention: retrieval heads attend to everything, streaming heads to sinks + a window.

:class:`HeadPattern` says, per layer and per kv head (a GQA group shares its
kv head's kind), which heads are *retrieval* heads (full causal attention)
and which are *streaming* heads (the Lambda mask of
:mod:`longattn.sparse.streaming`). :class:`Duo` is the ``sparse=`` config of
one layer: ``attention(q, k, v, causal=True, sparse=Duo(pattern, layer_idx))``
runs the layer's retrieval heads densely and its streaming heads with sinks +
window in one call and returns the heads in their original order (no weight
reordering on the caller's side).

Pattern files are JSON (:meth:`HeadPattern.save` / :meth:`HeadPattern.load`)::

    {"format": "longattn.HeadPattern", "version": 1, "num_layers": 2, "nheads_k": 4,
     "retrieval": [[true, false, false, true], [false, false, true, false]],
     "gates": [[0.9, 0.1, 0.2, 0.8], [...]] or null, "sink_size": 64, "recent_size": 256}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.sparse.streaming import Streaming
from longattn.validation import check_softmax_scale, check_tensor

# Version 2 renamed "window_size" to "recent_size" (same meaning); version 1 files still load.
FORMAT, VERSION = "longattn.HeadPattern", 2


@dataclass(frozen=True)
class HeadPattern:
    """Retrieval (True) or streaming (False) per ``(layer, kv head)``.

    Attributes:
        retrieval: ``num_layers`` tuples of ``nheads_k`` bools.
        sink_size, recent_size: the streaming heads' sinks and window.
        gates: the scores the pattern came from (``from_gates``), if any.
    """

    retrieval: tuple[tuple[bool, ...], ...]
    sink_size: int = 64
    recent_size: int = 256
    gates: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.retrieval, tuple) or not self.retrieval:
            raise ArgumentError("HeadPattern retrieval must be a non-empty tuple of per-layer tuples")
        width = len(self.retrieval[0])
        for i, row in enumerate(self.retrieval):
            if not isinstance(row, tuple) or len(row) != width or width == 0:
                raise ShapeError(f"HeadPattern retrieval layer {i} has {len(row) if isinstance(row, tuple) else '?'} "
                                 f"heads; every layer needs the same number ({width}) of kv heads, at least one")
            if not all(isinstance(x, bool) for x in row):
                raise ArgumentError(f"HeadPattern retrieval layer {i} must hold bools, got {row!r}")
        if self.gates is not None:
            if len(self.gates) != len(self.retrieval) or any(len(g) != width for g in self.gates):
                raise ShapeError(f"HeadPattern gates must be {len(self.retrieval)} x {width}, like retrieval")
        Streaming(self.sink_size, self.recent_size)  # validates both

    @property
    def num_layers(self) -> int:
        return len(self.retrieval)

    @property
    def nheads_k(self) -> int:
        return len(self.retrieval[0])

    @property
    def retrieval_fraction(self) -> float:
        return sum(map(sum, self.retrieval)) / (self.num_layers * self.nheads_k)

    def layer(self, layer_idx: int) -> torch.Tensor:
        """``(nheads_k,)`` bool: the retrieval heads of layer ``layer_idx``."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise ArgumentError(f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}")
        return torch.tensor(self.retrieval[layer_idx], dtype=torch.bool)

    @classmethod
    def from_gates(cls, gates: torch.Tensor, sparsity: float = 0.5, *, sink_size: int = 64,
                   recent_size: int = 256) -> HeadPattern:
        """The lowest ``sparsity`` fraction of ``gates (num_layers, nheads_k)``, over
        all layers, become streaming heads (ties: the earlier head in layer-major
        order is the lower); the rest retrieval heads."""
        if not isinstance(gates, torch.Tensor) or gates.dim() != 2 or gates.numel() == 0:
            raise ShapeError(f"gates must be a non-empty (num_layers, nheads_k) tensor, got "
                             f"{tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__}")
        if not gates.dtype.is_floating_point or not bool(torch.isfinite(gates).all()):
            raise ArgumentError("gates must be finite floating-point scores")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
            raise ArgumentError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
        flat = gates.detach().to(torch.float64).flatten()
        streaming = math.floor(sparsity * flat.numel() + 1e-9)
        order = sorted(range(flat.numel()), key=lambda i: (float(flat[i]), i))
        retrieval = [True] * flat.numel()
        for i in order[:streaming]:
            retrieval[i] = False
        rows, cols = gates.shape
        return cls(tuple(tuple(retrieval[r * cols:(r + 1) * cols]) for r in range(rows)), sink_size, recent_size,
                   tuple(tuple(float(x) for x in row) for row in gates.detach().to(torch.float64).tolist()))

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "num_layers": self.num_layers, "nheads_k": self.nheads_k,
                "retrieval": [list(r) for r in self.retrieval],
                "gates": None if self.gates is None else [list(g) for g in self.gates],
                "sink_size": self.sink_size, "recent_size": self.recent_size}

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_layers: int | None = None,
             nheads_k: int | None = None) -> HeadPattern:
        """Read a pattern file; with ``num_layers`` / ``nheads_k``, check it fits the model."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ArgumentError(f"{path} is not a HeadPattern file (invalid JSON: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArgumentError(f"{path} is not a HeadPattern file (no \"format\": \"{FORMAT}\")")
        if data.get("version") not in (1, VERSION):
            raise ArgumentError(f"{path} has HeadPattern version {data.get('version')!r}; this longattn reads 1 and {VERSION}")
        if data.get("version") == 1 and "window_size" in data:
            data["recent_size"] = data.pop("window_size")
        try:
            pattern = cls(tuple(tuple(r) for r in data["retrieval"]), data["sink_size"], data["recent_size"],
                          None if data.get("gates") is None else tuple(tuple(g) for g in data["gates"]))
        except (KeyError, TypeError) as exc:
            raise ArgumentError(f"{path} is missing or mistypes a HeadPattern field: {exc}") from None
        if data.get("num_layers") != pattern.num_layers or data.get("nheads_k") != pattern.nheads_k:
            raise ShapeError(f"{path} says {data.get('num_layers')} layers x {data.get('nheads_k')} kv heads but "
                             f"holds {pattern.num_layers} x {pattern.nheads_k}")
        if num_layers is not None and num_layers != pattern.num_layers:
            raise ShapeError(f"{path} has {pattern.num_layers} layers, the model has {num_layers}")
        if nheads_k is not None and nheads_k != pattern.nheads_k:
            raise ShapeError(f"{path} has {pattern.nheads_k} kv heads per layer, the model has {nheads_k}")
        return pattern


@dataclass(frozen=True)
class Duo:
    """``sparse=`` config for layer ``layer_idx`` of a :class:`HeadPattern`.

    Retrieval heads: full causal attention. Streaming heads: sinks + window
    (``sink_size``/``recent_size`` here, defaulting to the pattern's).
    """

    pattern: HeadPattern
    layer_idx: int
    sink_size: int | None = None
    recent_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, HeadPattern):
            raise ArgumentError(f"Duo pattern must be a HeadPattern, got {type(self.pattern).__name__}")
        self.pattern.layer(self.layer_idx)  # validates the index
        self.streaming  # validates the sizes

    @property
    def streaming(self) -> Streaming:
        return Streaming(self.pattern.sink_size if self.sink_size is None else self.sink_size,
                         self.pattern.recent_size if self.recent_size is None else self.recent_size)

    def check_call(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
        """The checks of :meth:`prefill` that read no tensor data."""
        if not causal:
            raise ArgumentError("sparse=Duo(...) is defined for causal attention; pass causal=True")
        if k.shape[2] != self.pattern.nheads_k:
            raise ShapeError(f"the pattern has {self.pattern.nheads_k} kv heads per layer, k has {k.shape[2]}")

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                softcap: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """One call: retrieval heads dense, streaming heads Lambda; heads in their original order."""
        from longattn.kernels.dense import DENSE_BACKENDS, DenseCall

        self.check_call(q, k, causal)
        nheads, nheads_k = q.shape[2], k.shape[2]
        group = nheads // nheads_k
        # The pattern is host data: which heads go where is decided on the host
        # (no device read-back); only gather indices go to q's device.
        full_kv = self.pattern.layer(self.layer_idx)
        full_q = full_kv.repeat_interleave(group)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], nheads, q.shape[1], dtype=torch.float32, device=q.device)
        if bool(full_kv.any()):
            hq, hk = head_index(full_q, q.device), head_index(full_kv, q.device)
            call = DenseCall(q[:, :, hq], k[:, :, hk], v[:, :, hk], scale, (-1, 0), softcap, need_lse=True)
            o, l_ = DENSE_BACKENDS.select(call, backend).run(call)
            out[:, :, hq], lse[:, hq] = o, l_
        if not bool(full_kv.all()):
            hq, hk = head_index(~full_q, q.device), head_index(~full_kv, q.device)
            o, l_ = self.streaming.prefill(q[:, :, hq], k[:, :, hk], v[:, :, hk], causal=True, scale=scale,
                                           softcap=softcap, backend=backend)
            out[:, :, hq], lse[:, hq] = o, l_
        return out, lse


def head_index(heads: torch.Tensor, device: torch.device | str | None = None) -> slice | torch.Tensor:
    """Index for the heads marked in the bool vector ``heads`` (host data, e.g.
    :meth:`HeadPattern.layer`): a slice when they are one contiguous run (a
    strided view of q/k/v, no gather copy of a long sequence's heads), else
    the marked heads' indices as an int64 tensor on ``device`` (default:
    ``heads``' device) -- indices, not a bool mask, so indexing on a GPU
    needs no nonzero() and no host sync."""
    return marked_index(heads.cpu().tolist(), heads.device if device is None else device)


def marked_index(heads: list[bool], device: torch.device | str) -> slice | torch.Tensor:
    """:func:`head_index` of host bools: no tensor is read, so torch.compile
    traces it (the result is a constant of the graph)."""
    marked = [i for i, x in enumerate(heads) if x]
    if marked and marked[-1] - marked[0] + 1 == len(marked):
        return slice(marked[0], marked[-1] + 1)
    return torch.tensor(marked, dtype=torch.long, device=device)


class DuoCache:
    """The two-part decode cache of one DuoAttention layer: a full KV cache for
    the retrieval heads and a :class:`~longattn.sparse.StreamingCache` (sinks +
    window) for the streaming heads.

    Args:
        duo: the layer's :class:`Duo` config.
        batch, capacity: sequences, and tokens the full part can hold.
        nheads_k, headdim, dtype, device: as the model's K/V.

    Chunks of any length go through :meth:`step` (chunked prefill into the
    cache): retrieval heads see every earlier token; streaming heads by
    default exactly their sinks and window (the Lambda rule per query, also
    inside a chunk), with ``exact_lambda=False`` the looser rule of
    DuoAttention's reference chunked prefill (the whole streaming cache as it
    was when the chunk began, plus the chunk causally; see
    :mod:`longattn.sparse.streaming_cache`).

    :meth:`step` traces with ``torch.compile(fullgraph=True)``: head indices
    come from the pattern's host bools, the retrieval heads' attention is the
    ``longattn::decode_forward`` op while tracing; dynamo guards on the int
    ``length`` (it may recompile as it grows).
    """

    def __init__(self, duo: Duo, batch: int, capacity: int, nheads_k: int, headdim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        from longattn.sparse.streaming_cache import StreamingCache

        if not isinstance(duo, Duo):
            raise ArgumentError(f"duo must be a longattn.sparse.Duo, got {type(duo).__name__}")
        if nheads_k != duo.pattern.nheads_k:
            raise ShapeError(f"the pattern has {duo.pattern.nheads_k} kv heads per layer, nheads_k is {nheads_k}")
        self.duo = duo
        full = duo.pattern.layer(duo.layer_idx)
        self.full = full.to(device)
        n_full = sum(duo.pattern.retrieval[duo.layer_idx])
        self.k_full = torch.zeros(batch, capacity, n_full, headdim, dtype=dtype, device=device)
        self.v_full = torch.zeros_like(self.k_full)
        self.stream = (StreamingCache(duo.streaming, batch, nheads_k - n_full, headdim, dtype=dtype, device=device)
                       if n_full < nheads_k else None)
        self.length = 0
        # (retrieval, streaming) head indices: slices when contiguous (views, no copies), per query group size.
        self._index: dict[int, tuple[slice | torch.Tensor, slice | torch.Tensor]] = {}

    def _heads(self, group: int) -> tuple[slice | torch.Tensor, slice | torch.Tensor]:
        """Indices of the retrieval and the streaming heads among ``nheads_k * group`` heads."""
        if group not in self._index:
            # From the pattern's host bools (no tensor read: traceable).
            full = [x for x in self.duo.pattern.retrieval[self.duo.layer_idx] for _ in range(group)]
            device = self.k_full.device
            self._index[group] = marked_index(full, device), marked_index([not x for x in full], device)
        return self._index[group]

    @property
    def memory_bytes(self) -> int:
        """Bytes of K and V the cache needs for its ``length`` tokens:
        ``2 * batch * headdim * bytes * (H_full * length + H_stream * (sink + window))``."""
        batch, _, n_full, headdim = self.k_full.shape
        full = 2 * batch * headdim * self.k_full.element_size() * n_full * self.length
        return full + (self.stream.memory_bytes if self.stream is not None else 0)

    @property
    def allocated_bytes(self) -> int:
        """Bytes actually allocated (the full part at its capacity)."""
        full = 2 * self.k_full.numel() * self.k_full.element_size()
        return full + (self.stream.memory_bytes if self.stream is not None else 0)

    def _split(self, t: torch.Tensor, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``t (batch, n, heads, d)`` -> (retrieval heads, streaming heads)."""
        full, stream = self._heads(group)
        return t[:, :, full], t[:, :, stream]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prompt's ``(batch, n, nheads_k, headdim)`` keys/values (after its prefill)."""
        n = k.shape[1]
        if self.length + n > self.k_full.shape[1]:
            raise ArgumentError(f"the cache holds {self.k_full.shape[1]} tokens; {self.length} + {n} do not fit")
        kf, ks = self._split(k)
        vf, vs = self._split(v)
        self.k_full[:, self.length : self.length + n] = kf
        self.v_full[:, self.length : self.length + n] = vf
        if self.stream is not None:
            self.stream.append(ks, vs)
        self.length += n

    def _check_step(self, q: object, k_new: object, v_new: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything :meth:`step` needs of its tensors, checked before it writes anything."""
        q = check_tensor("q", q, 4, "(batch, n, nheads, headdim)")
        batch, n, nheads, headdim = q.shape
        want = (batch, n, self.duo.pattern.nheads_k, headdim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            t = check_tensor(name, t, 4, "(batch, n, nheads_k, headdim)")
            if tuple(t.shape) != want:
                raise ShapeError(f"{name} must have shape (batch, n, nheads_k, headdim) = {want}, got {tuple(t.shape)}")
        for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
            if t.dtype != self.k_full.dtype or t.device != self.k_full.device:
                raise DTypeError(f"{name} is {t.dtype} on {t.device}, the cache holds {self.k_full.dtype} on "
                                 f"{self.k_full.device}")
        if batch != self.k_full.shape[0] or headdim != self.k_full.shape[3]:
            raise ShapeError(f"q has batch {batch} and headdim {headdim}; the cache was made for batch "
                             f"{self.k_full.shape[0]} and headdim {self.k_full.shape[3]}")
        if nheads % want[2]:
            raise ShapeError(f"q has {nheads} heads, not a multiple of the cache's nheads_k {want[2]}")
        return q, k_new, v_new

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *,
             softmax_scale: float | None = None, exact_lambda: bool = True) -> torch.Tensor:
        """Attend ``q (batch, n, nheads, headdim)`` for ``n`` new tokens, store them;
        heads come back in their original order. ``exact_lambda`` chooses the
        streaming heads' rule inside a chunk (class docstring)."""
        from longattn.kernels.decode import decode_forward

        if not isinstance(exact_lambda, bool):
            raise ArgumentError(f"exact_lambda must be True or False, got {exact_lambda!r}")
        q, k_new, v_new = self._check_step(q, k_new, v_new)
        batch, n, nheads, headdim = q.shape
        scale = check_softmax_scale(softmax_scale, headdim)
        group = nheads // k_new.shape[2]
        if self.length + n > self.k_full.shape[1]:
            raise ArgumentError(f"the cache holds {self.k_full.shape[1]} tokens; {self.length} + {n} do not fit")
        full, stream = self._heads(group)  # among the query heads
        qf, qs = self._split(q, group)
        kf, ks = self._split(k_new)
        vf, vs = self._split(v_new)
        out = torch.empty_like(q)
        if qf.shape[2]:
            self.k_full[:, self.length : self.length + n] = kf
            self.v_full[:, self.length : self.length + n] = vf
            lens = torch.full((batch,), self.length + n, dtype=torch.int32, device=q.device)
            out[:, :, full], _ = decode_forward(qf, self.k_full, self.v_full, lens, scale=scale)
        if self.stream is not None:
            out[:, :, stream] = self.stream.step(qs, ks, vs, softmax_scale=softmax_scale, exact_lambda=exact_lambda)
        self.length += n
        return out
