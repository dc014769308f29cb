"""A constant-size KV cache for streaming heads: the sinks and the last window.

:class:`StreamingCache` holds, per sequence and kv head, at most
``sink_size + recent_size`` tokens: slots ``[0, sink_size)`` keep the first
tokens for good, slots ``[sink_size, sink_size + recent_size)`` are a ring
where position ``p >= sink_size`` lives at slot ``sink_size + (p - sink_size)
% recent_size`` -- the middle is evicted as the window slides. Memory is
``2 * batch * nheads_k * headdim * (sink_size + recent_size) * element_size``
bytes whatever the length (:attr:`StreamingCache.memory_bytes`).

A step (:meth:`StreamingCache.step`) attends the step's queries under the
Lambda rule of :mod:`longattn.sparse.streaming` -- query at position ``p``
sees ``j < sink_size`` and ``p - recent_size < j <= p`` -- over the cache and
the step's own new tokens, then stores those tokens. This is exact for any
number of new tokens per step: the keys a query needs are either still in the
ring (written before the step) or among the new tokens.

Chunk semantics: by default (``exact_lambda=True``) a query inside a chunk
sees exactly its own sinks and window. ``exact_lambda=False`` is the looser
rule of DuoAttention's reference chunked prefill: every query of the step
sees all the cache held when the step began (sinks + up to ``recent_size``
latest tokens) plus the step's tokens up to itself -- so a query late in a
chunk of ``n`` sees up to ``recent_size + n`` recent tokens, and a one-token
step ``recent_size + 1``.

``torch.compile(fullgraph=True)`` traces a step (and :meth:`StreamingCache.append`):
the writes are plain indexed stores into ``k``/``v`` and the attention is
plain PyTorch or :func:`longattn.kernels.decode.decode_forward` (a custom op
while tracing). ``length`` is a Python int, so dynamo guards on it and may
recompile as it grows; no graph breaks.
"""

from __future__ import annotations

import torch

from longattn.errors import ArgumentError, ShapeError
from longattn.sparse.streaming import Streaming
from longattn.validation import FLOAT_DTYPES, check_int, check_softcap, check_softmax_scale, check_tensor


class StreamingCache:
    """Sinks + sliding-window KV cache for ``batch`` sequences (all advance together).

    Args:
        config: the :class:`~longattn.sparse.Streaming` sink and window sizes.
        batch, nheads_k, headdim: the cache's shape.
        dtype, device: of the stored keys and values.

    Attributes:
        k, v: ``(batch, sink_size + recent_size, nheads_k, headdim)`` storage.
        length: tokens seen so far per sequence (positions of the next ones start here).
    """

    def __init__(self, config: Streaming, batch: int, nheads_k: int, headdim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if not isinstance(config, Streaming):
            raise ArgumentError(f"config must be a longattn.sparse.Streaming, got {type(config).__name__}")
        for name, value in (("batch", batch), ("nheads_k", nheads_k), ("headdim", headdim)):
            check_int(name, value)
        if dtype not in FLOAT_DTYPES:
            raise ArgumentError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.config = config
        self.k = torch.zeros(batch, config.budget, nheads_k, headdim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def memory_bytes(self) -> int:
        """Bytes of K and V held: constant in the sequence length."""
        return 2 * self.k.numel() * self.k.element_size()

    def _check_new(self, name: str, t: object, seqlen: int | None) -> torch.Tensor:
        batch, _, nheads_k, headdim = self.k.shape
        t = check_tensor(name, t, 4, "(batch, seqlen_new, nheads_k, headdim)")
        if (t.shape[0], t.shape[2], t.shape[3]) != (batch, nheads_k, headdim) or (
                seqlen is not None and t.shape[1] != seqlen):
            want = f"({batch}, {'seqlen_new' if seqlen is None else seqlen}, {nheads_k}, {headdim})"
            raise ShapeError(f"{name} must have shape {want} for this cache, got {tuple(t.shape)}")
        return t

    def positions(self) -> torch.Tensor:
        """``(sink_size + recent_size,)`` position held by each slot, -1 for an empty slot."""
        sink, window = self.config.sink_size, self.config.recent_size
        slot = torch.arange(sink + window, device=self.k.device)
        pos = torch.where(slot < sink, slot, torch.full_like(slot, -1))
        pos = torch.where(slot < min(sink, self.length), pos, torch.full_like(slot, -1))
        if self.length > sink:
            ring = slot[sink:] - sink  # the newest position at ring index r: last - ((last - sink - r) mod window)
            last = self.length - 1
            newest = last - torch.remainder(last - sink - ring, window)
            pos[sink:] = torch.where(newest >= max(sink, self.length - window), newest, torch.full_like(newest, -1))
        return pos

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store ``(batch, n, nheads_k, headdim)`` tokens at positions ``length ..
        length + n - 1`` (e.g. a prompt after its prefill), evicting what leaves the window."""
        k_new = self._check_new("k_new", k_new, None)
        v_new = self._check_new("v_new", v_new, k_new.shape[1])
        sink, window = self.config.sink_size, self.config.recent_size
        n = k_new.shape[1]
        if n == 1:  # a decode step: one slot, found without building index tensors
            p = self.length
            slot = p if p < sink else sink + (p - sink) % window
            self.k[:, slot] = k_new[:, 0]
            self.v[:, slot] = v_new[:, 0]
            self.length += 1
            return
        # Only the sinks and the last `window` new tokens survive: write just
        # those. Both runs of new tokens are ranges known on the host, so the
        # indices are built on the cache's device (no mask read back).
        device = self.k.device
        head = max(0, min(n, sink - self.length))  # new tokens that are sinks
        tail = max(head, n - window)  # first new token still in the window at the end
        src = torch.cat([torch.arange(head, device=device), torch.arange(tail, n, device=device)])
        pos = src + self.length
        slots = torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, window))
        self.k[:, slots] = k_new[:, src.to(k_new.device)].to(self.k.dtype)
        self.v[:, slots] = v_new[:, src.to(v_new.device)].to(self.v.dtype)
        self.length += n

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *, softmax_scale: float | None = None,
             softcap: float = 0.0, return_lse: bool = False,
             exact_lambda: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One decode (or chunked) step: ``q (batch, n, nheads, headdim)`` for the
        ``n`` new tokens ``k_new, v_new (batch, n, nheads_k, headdim)`` at
        positions ``length .. length + n - 1``; attends under the Lambda rule,
        then appends them. Returns ``out`` like q (and lse ``(batch, nheads, n)``).
        ``exact_lambda=False``: the reference's chunk rule (module docstring)."""
        if not isinstance(exact_lambda, bool):
            raise ArgumentError(f"exact_lambda must be True or False, got {exact_lambda!r}")
        q = check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
        k_new = self._check_new("k_new", k_new, q.shape[1])
        v_new = self._check_new("v_new", v_new, q.shape[1])
        batch, n, nheads, headdim = q.shape
        nheads_k = self.k.shape[2]
        if batch != self.k.shape[0] or headdim != self.k.shape[3] or nheads % nheads_k:
            raise ShapeError(f"q must be (batch={self.k.shape[0]}, seqlen, a multiple of nheads_k={nheads_k}, "
                             f"headdim={self.k.shape[3]}), got {tuple(q.shape)}")
        scale = check_softmax_scale(softmax_scale, headdim)
        softcap = check_softcap(softcap)
        sink, window = self.config.sink_size, self.config.recent_size
        if exact_lambda and n == 1 and q.dtype == self.k.dtype == k_new.dtype == v_new.dtype:
            return self._decode_one(q, k_new, v_new, scale, softcap, return_lse)
        keys = torch.cat([self.k.to(q.dtype), k_new], dim=1).float()  # (batch, slots + n, nheads_k, headdim)
        values = torch.cat([self.v.to(q.dtype), v_new], dim=1).float()
        key_pos = torch.cat([self.positions(), torch.arange(self.length, self.length + n, device=q.device)])
        query_pos = torch.arange(self.length, self.length + n, device=q.device)[:, None]
        visible = (key_pos >= 0) & (key_pos <= query_pos)
        if exact_lambda:  # else everything cached when the step began stays visible to the whole chunk
            visible &= (key_pos < sink) | (key_pos > query_pos - window)
        group = nheads // nheads_k
        qg = q.float().reshape(batch, n, nheads_k, group, headdim)
        scores = torch.einsum("bnkgd,bmkd->bkgnm", qg, keys) * scale  # (batch, nheads_k, group, n, keys)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # every query sees at least itself
        out = torch.einsum("bkgnm,bmkd->bnkgd", torch.exp(scores - lse[..., None]), values)
        self.append(k_new, v_new)
        out = out.reshape(batch, n, nheads, headdim).to(q.dtype)
        return (out, lse.reshape(batch, nheads, n)) if return_lse else out

    def _decode_one(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, scale: float, softcap: float,
                    return_lse: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One new token: store it first -- it overwrites the one ring slot its
        query may no longer see (position ``p - recent_size``) -- and the filled
        slots are then exactly the keys the query sees, in slots ``[0, filled)``
        (the ring fills in order before it wraps). So the step is plain decode
        over the slots, through the fast decode kernel."""
        from longattn.kernels.decode import decode_forward

        self.append(k_new, v_new)
        filled = torch.full((q.shape[0],), min(self.length, self.config.budget), dtype=torch.int32,
                            device=q.device)
        out, lse = decode_forward(q, self.k, self.v, filled, scale=scale, window=(-1, 0), softcap=softcap)
        return (out, lse) if return_lse else out
