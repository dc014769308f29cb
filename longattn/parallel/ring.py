"""Ring attention over a process group, forward and backward (contiguous and zigzag layouts).

Each of the ``N`` ranks holds its local shard of q, k, v (see
:mod:`longattn.parallel.layout`). For ``N`` steps every rank computes its
local queries against the KV block in hand and passes that block on to rank
``r + 1`` while receiving the next one from rank ``r - 1``; the partial
``(out, lse)`` of the steps are merged in float32 (:mod:`longattn.kernels.merge`).
After ``N`` steps every rank has seen every KV block, so its output equals
the matching rows of attention over the full sequence.

Which pieces a step computes (``s`` = the rank the KV block came from, ``r`` =
this rank, ``L`` = half the local length):

- not causal: every local query against the whole block, any layout.
- causal, contiguous: ``s == r``: causal (the diagonal block, equal lengths,
  so bottom-right = the usual causal); ``s < r``: the whole block, no mask;
  ``s > r``: skipped (every key is in the future).
- causal, zigzag (rank ``r`` holds chunks ``r`` and ``2N-1-r``): ``s == r``:
  causal on the local pair (chunk order makes the concatenated pair exactly
  causal); ``s < r``: all local queries against the block's FIRST chunk
  (chunk ``s`` precedes both local chunks; chunk ``2N-1-s`` follows both);
  ``s > r``: the SECOND local chunk against the whole block (both of the
  block's chunks precede chunk ``2N-1-r``; neither precedes chunk ``r``).
  Every rank computes the same number of query-key pairs at every step.
- a sliding window: chunk pair by chunk pair, only the rectangles the window
  reaches, each with the local window equal to the global one
  (:mod:`longattn.parallel.pieces`, which holds all of these rules).
"""

from __future__ import annotations

import torch

from longattn.api import attention
from longattn.kernels.block_backward import block_backward
from longattn.kernels.merge import merge_two_in_place
from longattn.parallel.autograd import ShardedAttention
from longattn.parallel.checks import settle_sharded
from longattn.parallel.comm import group_facts, post_ring_exchange, ring_peers, wait_for_peers
from longattn.parallel.pieces import block_pieces, forward_steps
from longattn.parallel.stats import compute, sent

def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    layout: str = "zigzag",
    process_group: object = None,
    return_lse: bool = False,
    check: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of a group, differentiable.

    Collective: every rank of ``process_group`` must call it with its own
    shard. Communication is point-to-point around the ring (the KV block in
    hand goes to group rank ``r + 1``, the next one comes from ``r - 1``),
    posted before the compute on the current block so the two overlap.

    Args:
        q: this rank's queries ``(batch, local_seqlen, nheads, headdim)``,
            float32/float16/bfloat16, as :func:`longattn.parallel.shard` cuts them.
        k, v: this rank's keys/values ``(batch, local_seqlen, nheads_k,
            headdim)``; GQA/MQA (``nheads % nheads_k == 0``) travel un-repeated.
        causal: causal over the GLOBAL sequence (positions as the layout
            assigns them); local lengths of q and k are equal, so alignment is
            the ordinary top-left = bottom-right one.
        softmax_scale: defaults to ``headdim ** -0.5``.
        window_size: ``(left, right)`` sliding window over GLOBAL positions,
            flash-attn's semantics (-1 = unbounded; with causal, right is -1 or
            0). Each step computes only the (rows, keys) rectangles the window
            reaches, each with the local window that reproduces the global one
            (:mod:`longattn.parallel.pieces`). On the contiguous layout a
            causal window ends the forward ring early: a block travels only as
            far as the window reaches (``1 + ceil(left / local_seqlen)``
            steps); the backward always runs all ``N`` steps (dk/dv must get home).
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        layout: ``"zigzag"`` (default, balanced under causal; local length
            even) or ``"contiguous"``. Must match how the shards were cut.
        process_group: the group (None = default group); any subgroup works.
        return_lse: also return ``lse (batch, nheads, local_seqlen)`` float32.
        check: first run one small ``all_gather`` of every rank's shapes,
            dtype and options so that ranks that disagree (or a rank whose
            inputs are invalid) make EVERY rank raise a named error instead of
            hanging. ``check=False`` skips it; then mismatched ranks fail only
            by the group's timeout, or compute garbage.

    Returns:
        ``out`` with q's shape and dtype (this rank's rows of the full
        attention), or ``(out, lse)``. Each step's partial output comes from
        :func:`longattn.attention` in the input dtype; partials are merged in
        float32. A row that sees no key gets ``out = 0``, ``lse = -inf``.
        When q, k or v requires grad (and grad mode is on), out and lse are
        differentiable: ``backward`` runs the ring again (collective: every
        rank of the group must call it) and gives this rank's shard of dq, dk,
        dv in the inputs' dtypes, accumulated in float32.

    Raises:
        ShapeError / DTypeError / ArgumentError: bad local input, or ranks
            that disagree (with ``check=True``, on every rank).
    """
    facts = group_facts(process_group)
    o = settle_sharded("ring_attention", facts, q, k, v, causal=causal, return_lse=return_lse,
                       softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, layout=layout,
                       check=check)
    options = (facts, o.causal, o.window, o.scale, o.softcap, o.layout)
    if o.grad:
        out, lse = ShardedAttention.apply(q, k, v, _ring_forward, _ring_backward, options)
    else:
        out, lse = _ring_forward(q, k, v, *options)
    return (out, lse) if o.return_lse else out


def _exchange_name(facts, step: int, what: str) -> str:
    """How a failed exchange is named: the operation, this rank, the step, the peers."""
    return f"ring_attention{what}: group rank {facts.rank}, step {step}: exchange with global ranks {ring_peers(facts)}"


def _wait(works: list | None, facts, step: int, what: str) -> None:
    wait_for_peers(works, _exchange_name(facts, step, what))


def _ring_forward(q, k, v, facts, causal: bool, window: tuple[int, int], scale: float, softcap: float,
                  layout: str):
    n, r = facts.world_size, facts.rank
    batch, seqlen, nheads, headdim = q.shape
    # float32 accumulators; lse kept (batch, seqlen, nheads) so row slices along dim 1 are views for the merge
    acc_out = torch.zeros(batch, seqlen, nheads, headdim, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((batch, seqlen, nheads), float("-inf"), dtype=torch.float32, device=q.device)

    kv = torch.stack([k, v]).contiguous()  # one message per step: (2, batch, seqlen, nheads_k, headdim)
    steps = forward_steps(n, seqlen, causal, window, layout)  # same on every rank
    for step in range(steps):
        src = (r - step) % n
        works, incoming = None, None
        if step < steps - 1:  # post the next exchange first: communication overlaps the compute below
            incoming = torch.empty_like(kv)
            works = post_ring_exchange(facts, kv, incoming, name=_exchange_name(facts, step, ""))
            sent(kv.numel() * kv.element_size())
        with compute():
            for rows, keys, piece_window in block_pieces(n, r, src, seqlen, causal, window, layout):
                o, l = attention(q[:, rows], kv[0][:, keys], kv[1][:, keys], window_size=piece_window,
                                 softmax_scale=scale, softcap=softcap, return_lse=True)
                merge_two_in_place(acc_out[:, rows], acc_lse[:, rows], o.to(torch.float32), l.transpose(1, 2))
        if works is not None:
            _wait(works, facts, step, "")
            kv = incoming
    return acc_out.to(q.dtype), acc_lse.transpose(1, 2).contiguous()


_KV_TAG, _GRAD_TAG = 0, 1


def _ring_backward(dout, dlse, q, k, v, out, lse, facts, causal: bool, window: tuple[int, int], scale: float,
                   softcap: float, layout: str):
    """``(dq, dk, dv)`` of this rank's shard, in the dtypes of q, k, v.

    The K/V blocks travel as in the forward; with each goes a float32
    ``(2, batch, seqlen, nheads_k, headdim)`` dk/dv accumulator that every rank
    adds its contribution to (:func:`~longattn.kernels.block_backward.block_backward`
    given the rows' final out and lse). The accumulator leaves after the
    compute of a step and is awaited after the compute of the next, so its
    transfer overlaps that compute; after ``N`` hops it is back with the
    block's owner. dq accumulates locally in float32.
    """
    n, r = facts.world_size, facts.rank
    seqlen = q.shape[1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v]).contiguous()
    acc = None
    acc_works, acc_in = None, None
    for step in range(n):
        src = (r - step) % n
        kv_works, kv_in = None, None
        if step < n - 1:
            kv_in = torch.empty_like(kv)
            kv_works = post_ring_exchange(facts, kv, kv_in, _KV_TAG, name=_exchange_name(facts, step, " backward (k/v)"))
            sent(kv.numel() * kv.element_size())
        part = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        with compute():
            for rows, keys, piece_window in block_pieces(n, r, src, seqlen, causal, window, layout):
                gq, gk, gv = block_backward(dout[:, rows], q[:, rows], kv[0][:, keys], kv[1][:, keys],
                                            out[:, rows], lse[:, :, rows], scale=scale, causal=False,
                                            window_size=piece_window, softcap=softcap,
                                            dlse=None if dlse is None else dlse[:, :, rows])
                dq[:, rows] += gq
                part[0][:, keys] += gk
                part[1][:, keys] += gv
        if acc_works is not None:  # the accumulator of this block, from the previous rank
            _wait(acc_works, facts, step, " backward (dk/dv)")
            part += acc_in
        acc = part
        if n > 1:  # pass it on; after the last step this hop takes it home
            acc_in = torch.empty_like(acc)
            acc_works = post_ring_exchange(facts, acc, acc_in, _GRAD_TAG,
                                           name=_exchange_name(facts, step, " backward (dk/dv)"))
            sent(acc.numel() * acc.element_size())
        if kv_works is not None:
            _wait(kv_works, facts, step, " backward (k/v)")
            kv = kv_in
    if acc_works is not None:
        _wait(acc_works, facts, n, " backward (dk/dv home)")
        acc = acc_in
    return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype)
