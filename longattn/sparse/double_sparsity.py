"""Double Sparsity (arXiv 2408.07092) for decode:
``decode_attention(q, ..., sparse=DoubleSparsity(channels), state=DoubleSparsityState(config))``.

Offline calibration (:mod:`longattn.sparse.channels`) picks, per kv head,
``r`` "outlier" channels of the head dimension. The state keeps a *label
cache*: every cached key restricted to its kv head's channels, ``(batch,
capacity, nheads_k, r)``, appended together with the KV cache. A step
approximates the score of every cached token ``t`` for query head ``h`` (kv
head ``g = h // group``) as

    s~(h, t) = sum_j q_h[c_g[j]] * label[t, g, j]      (q already multiplied by the softmax scale)

takes the max over the query heads of each group, keeps the ``token_budget``
tokens of highest approximate score per kv head (all of them when the
sequence is shorter), and attends exactly those (``gather_decode``: softmax
renormalised over the set). With ``token_budget`` >= the sequence's length the
step is dense decode.

Channel indices refer to the head dimension as the keys are stored in the
cache (after rotary embedding, in whatever rotary layout the model uses);
the calibration config records that layout.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from longattn.errors import ArgumentError, ShapeError
from longattn.sparse.ds_scores import group_max_scores
from longattn.sparse.token_select import (  # noqa: I001
    register_state,
    SCAN_CHUNK,
    all_inside,
    capacity_of,
    check_prefill_cache,
    check_state_batch,
    key_rows,
    key_span,
    length_mask,
    top_positions,
)
from longattn.validation import check_int


def _channel_rows(channels: object) -> tuple[tuple[int, ...], ...]:
    """``channels`` (an int tensor or nested sequences ``(nheads_k, r)``) as
    tuples of ints, validated: 2-D, r >= 1, ints >= 0, distinct within a row."""
    if isinstance(channels, torch.Tensor):
        if channels.dtype.is_floating_point or channels.dtype.is_complex or channels.dtype == torch.bool:
            raise ArgumentError(f"DoubleSparsity channels must be an integer tensor, got {channels.dtype}")
        if channels.dim() != 2:
            raise ShapeError(f"DoubleSparsity channels must be (nheads_k, r), got a tensor of shape "
                             f"{tuple(channels.shape)}")
        rows = channels.tolist()
    elif isinstance(channels, (tuple, list)):
        rows = channels
        if not all(isinstance(row, (tuple, list)) for row in rows):
            raise ShapeError("DoubleSparsity channels must be (nheads_k, r): a tensor or a sequence of per-kv-head "
                             f"sequences of channel indices, got {channels!r}")
        rows = [list(row) for row in rows]
    else:
        raise ArgumentError(f"DoubleSparsity channels must be an (nheads_k, r) int tensor or nested tuples, got "
                            f"{type(channels).__name__} (a ChannelConfig gives one layer's with .layer(i))")
    if not rows:
        raise ShapeError("DoubleSparsity channels must have at least one kv head row, got none")
    r = len(rows[0])
    if r == 0 or any(len(row) != r for row in rows):
        raise ShapeError(f"DoubleSparsity channels must have the same r >= 1 channels per kv head, got row lengths "
                         f"{[len(row) for row in rows]}")
    for h, row in enumerate(rows):
        for c in row:
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
                raise ArgumentError(f"DoubleSparsity channels[{h}] must hold channel indices (ints >= 0), got "
                                    f"{c!r}")
        if len(set(row)) != r:
            raise ArgumentError(f"DoubleSparsity channels[{h}] must be distinct, got {list(row)}")
    return tuple(tuple(int(c) for c in row) for row in rows)


@dataclass(frozen=True)
class DoubleSparsity:
    """Double Sparsity settings for one layer (validated on construction).

    Attributes:
        channels: per kv head the ``r`` channel indices of the head dimension
            the label cache keeps, given as an ``(nheads_k, r)`` int tensor or
            nested tuples/lists; stored as a tuple of tuples. Each row distinct;
            checked against the cache's ``nheads_k`` and ``headdim`` when used.
        token_budget: tokens attended per step and kv head.
    """

    channels: tuple[tuple[int, ...], ...]
    token_budget: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", _channel_rows(self.channels))
        check_int("DoubleSparsity token_budget", self.token_budget, minimum=1)

    @property
    def nheads_k(self) -> int:
        return len(self.channels)

    @property
    def r(self) -> int:
        """Channels kept per kv head."""
        return len(self.channels[0])

    def channel_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The channels as an ``(nheads_k, r)`` int64 tensor."""
        return torch.tensor(self.channels, dtype=torch.long, device=device)

    def check_cache(self, nheads_k: int, headdim: int) -> None:
        """Raise unless the channels fit a cache of ``nheads_k`` heads of ``headdim``."""
        if nheads_k != self.nheads_k:
            raise ShapeError(f"DoubleSparsity channels has {self.nheads_k} kv head rows, but the cache has nheads_k "
                             f"{nheads_k}")
        top = max(max(row) for row in self.channels)
        if top >= headdim:
            raise ArgumentError(f"DoubleSparsity channels must be in 0 .. headdim - 1 = {headdim - 1}, got channel "
                                f"{top}")


class DoubleSparsityState:
    """Double Sparsity's label cache for one layer, held by the caller.

    Build it once from the prompt (``state.prefill(k_cache, cache_seqlens,
    block_table)``) or let the first ``decode_attention`` step fill it from
    the cache; every later step appends the labels of the keys it appends. It
    follows one batch of growing sequences: a step whose ``cache_seqlens``
    differ from the lengths it covers, whose cache has another head layout or
    dtype, or whose ``DoubleSparsity`` has other channels raises
    :class:`~longattn.errors.ArgumentError` (the ``token_budget`` may change).

    Attributes:
        config: the :class:`DoubleSparsity` it was made for.
        lengths: tokens covered per sequence (None before it is filled).
        dtype: the keys' dtype (None before it is filled).
        label: ``(batch, capacity, nheads_k, r)`` float32 whatever the keys'
            dtype (fp16 / bf16 values are exact in float32, and a step never
            converts the whole cache): position ``p``'s key restricted to its
            kv head's channels (rows past a sequence's length are stale and
            never read). One block per sequence whatever the KV cache's
            layout; a view of channel-major storage ``(batch, nheads_k, r,
            capacity)``: a kv head's ``r`` label channels are ``r``
            contiguous rows over the positions, so a step scores a run of
            positions with whole-vector loads and no transposes.
    """

    def __init__(self, config: DoubleSparsity) -> None:
        self.handle = register_state(self)  # for torch.compile: see token_select.register_state
        if not isinstance(config, DoubleSparsity):
            raise ArgumentError(f"DoubleSparsityState needs a longattn.sparse.DoubleSparsity config, got "
                                f"{type(config).__name__}")
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget everything (the next step, or ``prefill``, fills it again)."""
        self.lengths: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self._label: torch.Tensor | None = None  # (batch, nheads_k, r, capacity) float32

    @property
    def label(self) -> torch.Tensor | None:
        """``(batch, capacity, nheads_k, r)`` (a view; see the class docstring)."""
        return None if self._label is None else self._label.permute(0, 3, 1, 2)

    @property
    def filled(self) -> bool:
        return self.lengths is not None

    def __repr__(self) -> str:
        return f"DoubleSparsityState(nheads_k={self.config.nheads_k}, r={self.config.r}, lengths={self.lengths})"

    def prefill(self, k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                block_table: torch.Tensor | None = None) -> DoubleSparsityState:
        """Build the label cache from the first ``cache_seqlens[b]`` keys of each
        sequence (contiguous or paged cache); replaces any earlier content.
        Returns the state."""
        k_cache, block_table, lengths = check_prefill_cache("DoubleSparsityState", k_cache, cache_seqlens,
                                                            block_table)
        self.config.check_cache(k_cache.shape[2], k_cache.shape[3])
        self.reset()
        self._fill(k_cache, block_table, lengths)
        return self

    def _fill(self, k_cache: torch.Tensor, block_table: torch.Tensor | None, lengths: list[int]) -> None:
        batch, hk = len(lengths), k_cache.shape[2]
        self._label = torch.zeros((batch, hk, self.config.r, capacity_of(k_cache, block_table)),
                                  dtype=torch.float32, device=k_cache.device)
        self.dtype = k_cache.dtype
        longest = max(lengths, default=0)
        index = self.config.channel_index(k_cache.device)
        for start in range(0, longest, SCAN_CHUNK):
            end = min(longest, start + SCAN_CHUNK)
            # Rows past a sequence's length are copied too: stale, never read.
            self.label[:, start:end] = _restrict(key_span(k_cache, block_table, start, end), index)
        self.lengths = tuple(lengths)

    def check_step(self, config: DoubleSparsity, lengths: list[int], k_cache: torch.Tensor) -> None:
        """Raise unless this state (when filled) can serve a step of ``config`` over a
        cache holding ``lengths`` tokens (before appending). Reads only."""
        config.check_cache(k_cache.shape[2], k_cache.shape[3])
        if config.channels != self.config.channels:
            raise ArgumentError("state is a DoubleSparsityState for other channels than sparse= holds; use one "
                                "state per layer (each layer has its own channels)")
        if not self.filled:
            return
        if k_cache.dtype != self.dtype or k_cache.device != self._label.device:
            raise ArgumentError(f"state was filled from a {self.dtype} cache on {self._label.device}; this "
                                f"call's cache is {k_cache.dtype} on {k_cache.device}")
        check_state_batch("DoubleSparsityState", self.lengths, lengths)

    def extend(self, k_cache: torch.Tensor, block_table: torch.Tensor | None, lengths: list[int]) -> None:
        """Append the labels of the keys at ``self.lengths[b] .. lengths[b] - 1``
        (the cache, validated, now holds ``lengths`` tokens)."""
        if not self.filled:
            self._fill(k_cache, block_table, lengths)
            return
        need, have = max(lengths, default=0), self._label.shape[3]
        if need > have:  # the cache grew since the fill
            batch, hk, r, _ = self._label.shape
            self._label = torch.cat([self._label, self._label.new_zeros((batch, hk, r, max(need, 2 * have) - have))],
                                    dim=3)
        old = list(self.lengths)
        span = max((n - o for n, o in zip(lengths, old)), default=0)
        if span > 0:
            device = k_cache.device
            pos = torch.tensor(old, dtype=torch.long, device=device)[:, None] + torch.arange(span, device=device)
            valid = pos < torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
            pos = torch.where(valid, pos, torch.zeros_like(pos))
            labels = _restrict(key_rows(k_cache, block_table, pos), self.config.channel_index(device))
            b = torch.arange(len(lengths), device=device)[:, None].expand_as(pos)
            self.label[b[valid], pos[valid]] = labels[valid].float()
        self.lengths = tuple(lengths)

    def approx_scores(self, q: torch.Tensor) -> torch.Tensor:
        """Approximate scores per query head: ``q (batch, nheads, headdim)`` ->
        ``(batch, nheads, n)`` float32 over the positions of the longest
        sequence, ``-inf`` past each sequence's length."""
        q_sel, n = self._query_channels(q)
        batch, hk, group, _ = q_sel.shape
        scores = torch.matmul(q_sel, self._label[..., :n]).reshape(batch, hk * group, n)
        if not all_inside(self.lengths):
            inside = length_mask(list(self.lengths), n, q.device)[:, None, :]
            scores = scores.masked_fill(~inside, float("-inf"))
        return scores

    def group_scores(self, q: torch.Tensor) -> torch.Tensor:
        """The max of :meth:`approx_scores` over each kv head's query group:
        ``q (batch, nheads, headdim)`` -> ``(batch, nheads_k, n)`` float32 over
        the positions of the longest sequence (entries past a shorter
        sequence's length are garbage, not ``-inf``: callers mask them). The
        C++ kernel (:mod:`longattn.sparse.ds_scores`) when it builds here, else
        the same sum in PyTorch."""
        q_sel, n = self._query_channels(q)
        return group_max_scores(q_sel, self._label, n)

    def _query_channels(self, q: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``q (batch, nheads, headdim)`` -> (its kv heads' channels ``(batch,
        nheads_k, group, r)`` float32, the longest sequence's length)."""
        if not self.filled:
            raise ArgumentError("DoubleSparsityState.approx_scores needs a filled state (call prefill first)")
        batch, nheads, d = q.shape
        hk, r = self._label.shape[1], self._label.shape[2]
        if batch != len(self.lengths) or nheads % hk:
            raise ShapeError(f"q must be (batch, nheads, headdim) with batch {len(self.lengths)} and nheads a "
                             f"multiple of {hk}, got {tuple(q.shape)}")
        index = self.config.channel_index(q.device)  # (hk, r)
        qg = q.float().reshape(batch, hk, nheads // hk, d)
        q_sel = qg.gather(-1, index[None, :, None, :].expand(batch, hk, nheads // hk, r))
        return q_sel, max(self.lengths, default=0)

    def select(self, q: torch.Tensor, token_budget: int | None = None) -> torch.Tensor:
        """The positions a step attends: ``q (batch, nheads, headdim)`` (scaled by
        the softmax scale) -> ``(batch, nheads_k, min(token_budget, longest))``
        int32, ascending, ``-1`` = none."""
        budget = self.config.token_budget if token_budget is None else token_budget
        scores = self.group_scores(q)  # max over the query group
        valid = None  # every position inside: no mask pass over the scores
        if not all_inside(self.lengths):
            valid = length_mask(list(self.lengths), scores.shape[-1], q.device)[:, None, :].expand_as(scores)
        return top_positions(scores, valid, budget)


def _restrict(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows (batch, n, nheads_k, headdim)`` -> ``(batch, n, nheads_k, r)``: kv
    head ``g``'s channels ``index[g]``."""
    batch, n, hk, _ = rows.shape
    return rows.gather(-1, index[None, None].expand(batch, n, hk, index.shape[1]))
