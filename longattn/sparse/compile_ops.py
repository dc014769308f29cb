"""The sparse methods' prefill under ``torch.compile``: one ``torch.library`` custom op.

A method's prefill reads host data on the way (HiP's search sizes and
``.item()`` reads, Duo's head split, the C++ kernel's loader), none of which
dynamo can put in a graph. So while tracing, :func:`longattn.attention`
calls ``longattn::sparse_prefill`` instead: an op opaque to the tracer whose
fake kernel knows the output shapes, and whose real kernel rebuilds the
method's config and runs the same ``prefill`` an uncompiled call runs (so
compiled and eager give bitwise the same result, and the eager path gains
nothing). The config crosses the op boundary as primitives: the method's
name and a list of ints (:func:`method_spec`), Duo's layer as its
retrieval row (0/1 per kv head) with its sink and window sizes.
"""

from __future__ import annotations

import functools

import torch

from longattn.errors import ArgumentError
from longattn.sparse.duo import Duo, HeadPattern
from longattn.sparse.hip import HiP
from longattn.sparse.streaming import Streaming


def method_spec(sparse: HiP | Streaming | Duo) -> tuple[str, list[int]]:
    """``(name, ints)`` describing ``sparse`` completely for its prefill.

    ``"hip"``: :meth:`HiP.as_ints` (``[topk, block_q, block_k, query_stride,
    sink_size, recent_size, refresh_interval]``); ``"streaming"``: ``[sink_size, recent_size]``;
    ``"duo"``: ``[sink_size, recent_size, *retrieval]`` with the layer's
    ``nheads_k`` retrieval flags as 0/1. Reads attributes only (dynamo
    traces it into constants)."""
    if isinstance(sparse, HiP):
        return "hip", sparse.as_ints()
    if isinstance(sparse, Streaming):
        return "streaming", [sparse.sink_size, sparse.recent_size]
    if isinstance(sparse, Duo):
        pattern = sparse.pattern
        # (not sparse.streaming: building a Streaming while tracing buys nothing)
        sink = pattern.sink_size if sparse.sink_size is None else sparse.sink_size
        recent = pattern.recent_size if sparse.recent_size is None else sparse.recent_size
        return "duo", [sink, recent, *[1 if x else 0 for x in pattern.retrieval[sparse.layer_idx]]]
    raise ArgumentError(f"sparse must be HiP, Streaming or Duo, got {type(sparse).__name__}")


@functools.lru_cache(maxsize=64)
def method_from_spec(name: str, spec: tuple[int, ...]) -> HiP | Streaming | Duo:
    """The inverse of :func:`method_spec` (Duo as layer 0 of a one-layer pattern:
    the prefill reads nothing else of the pattern). Cached: configs are immutable."""
    if name == "hip":
        return HiP(*spec)
    if name == "streaming":
        return Streaming(*spec)
    if name == "duo":
        sink, recent, *retrieval = spec
        pattern = HeadPattern((tuple(bool(x) for x in retrieval),), sink_size=sink, recent_size=recent)
        return Duo(pattern, 0)
    raise ArgumentError(f"method must be 'hip', 'streaming' or 'duo', got {name!r}")


@torch.library.custom_op("longattn::sparse_prefill", mutates_args=())
def sparse_prefill_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str,
    spec: list[int],
    causal: bool,
    scale: float,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``method_from_spec(method, spec).prefill(q, k, v, ...)``:
    q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k,
    headdim)`` (validated by the caller); out like q, lse ``(batch, nheads,
    seqlen_q)`` float32. Forward only (no autograd formula: the methods are
    inference-only, and attention() refuses inputs that require grad)."""
    config = method_from_spec(method, tuple(spec))
    out, lse = config.prefill(q, k, v, causal=causal, scale=scale, softcap=softcap, backend=backend)
    # Fresh, contiguous outputs, as the fake kernel promises (a twin may hand back
    # a view, e.g. of a head-permuted buffer).
    return out.contiguous(), lse.contiguous()


@sparse_prefill_op.register_fake
def _sparse_prefill_fake(q, k, v, method, spec, causal, scale, softcap, backend):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


def traced_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse: HiP | Streaming | Duo, *,
                   causal: bool, scale: float, softcap: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``sparse.prefill`` does, as the custom op (for a caller being traced).
    The method's checks that read no data run here, while tracing, so a bad
    call fails at the call site as it does uncompiled."""
    sparse.check_call(q, k, causal)
    name, spec = method_spec(sparse)
    return sparse_prefill_op(q, k, v, name, spec, causal, scale, softcap, backend)
