"""TokenRing attention (arXiv 2412.20501): the KV stays home, the queries travel.

Each of the ``N`` ranks holds its local shard of q, k, v (see
:mod:`longattn.parallel.layout`). At step ``t`` group rank ``r`` holds the
query block OWNED by rank ``o = (r - t) mod N`` (query blocks move to
``r + 1`` every step), computes it against its LOCAL keys and values, and
sends the partial ``(out, lse)`` straight back to ``o`` -- not around the
ring. The owner merges the partials in float32 as they arrive. Two flows run
at once in opposite directions: queries go to ``r + 1``, partial outputs of
step ``t`` go to ``r - t``, so every full-duplex link carries traffic both
ways.

Which (query rows, keys, window) pieces rank ``r`` computes for owner ``o``
is exactly what ring attention's rank ``o`` computes against the KV block of
rank ``r``: :func:`longattn.parallel.pieces.block_pieces` with ``(r=o, src=r)``. So
the zigzag layout is balanced here too (the roles of q and KV swapped), and
a piece that is empty (contiguous causal, keys all in the owner's future) is
neither computed nor sent; both sides know this from the pieces alone.

Schedule of one step ``t`` on rank ``r``::

    post  q exchange          (send q in hand to r+1, receive the next from r-1)   tag 0
    compute the pieces of owner (r - t) against the local KV
    post  output exchange     (send them to r-t, receive owner r's from r+t)       tag 1
    wait  output exchange of step t-1, merge what came in
    wait  q exchange

so the q transfer overlaps this step's compute and the output transfer the
next step's compute. The owner merges in a fixed order -- its own step-0
partial, then the partials of steps 1, 2, ..., N-1 (from ranks r+1, r+2, ...)
-- so the result is the same bits every run.

Message choices:

- q travels un-repeated (GQA/MQA: ``nheads`` heads of q, the KV never moves),
  in q's dtype: ``batch * L * nheads * headdim`` elements per hop.
- A partial output travels in q's dtype, with its float32 lse packed bit for
  bit behind it in the same message (``lse.view(q.dtype)``: 2 extra fp16/bf16
  elements or 1 float32 element per row and head). This is exactly what
  :func:`longattn.attention` returned, so nothing is rounded in transit: the
  owner merges the same partials ring attention would (ring also merges
  attention's input-dtype partials), and half the bytes of a float32 partial
  under fp16/bf16.
- The two flows share the process group and are told apart by tags (0 = q,
  1 = outputs; 2 = dq in the backward), not by a second process group: a
  second group would be a collective ``new_group`` on the first call
  (every rank of the WORLD group must join it unless created with local
  synchronisation), module-level cached state, and it would not inherit the
  user's group timeout (torch has no public getter), so a dead peer would
  hang for the 30-minute default instead of the group's timeout. On gloo
  every pair is one full-duplex TCP connection whatever the group, so tags
  lose nothing. NCCL ignores tags and matches point-to-point messages between
  a pair in posting order; the schedule never has a q message and a partial
  output in flight between the same ordered pair of ranks (an output of step
  ``t`` goes to ``r - t``, q to ``r + 1``; they coincide only at
  ``t = N - 1``, where q no longer moves), so the matching is unambiguous
  there too. (On NCCL a separate communicator would also give the outputs
  their own stream; that is the follow-up if GPUs show the flows serialised.)

Backward (autograd): the query block travels again, now with its ``dout``,
final ``out``, ``lse`` and ``dlse`` (one message in q's dtype, the float32
lse and dlse packed bit for bit as above; dlse is zeros when lse has no
gradient, so every rank sends the same size); every rank computes
:func:`~longattn.kernels.block_backward.block_backward` of the visiting rows
against its local KV, accumulates dk/dv LOCALLY in float32 (the KV never
moved) and sends the float32 dq partial straight home, where the owner adds
them in the same fixed order as the forward merge.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.api import attention
from longattn.kernels.block_backward import block_backward
from longattn.kernels.merge import merge_two_in_place
from longattn.parallel.autograd import ShardedAttention
from longattn.parallel.checks import settle_sharded
from longattn.parallel.comm import (GroupFacts, group_facts, naming_peer_failures, post_ring_exchange, ring_peers,
                                    wait_for_peers)
from longattn.parallel.pieces import block_pieces
from longattn.parallel.stats import compute, sent

_Q_TAG, _OUT_TAG, _DQ_TAG = 0, 1, 2


def token_ring_attention(
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
    """Exact attention over a sequence sharded across the ranks of a group, by TokenRing.

    A drop-in for :func:`longattn.parallel.ring_attention` on the same shards
    (same arguments, same layouts, same result up to the merge order): the
    keys and values stay on their rank; each query block visits every rank
    (to group rank ``r + 1`` each step) and the partial outputs come straight
    back to the block's owner (module docstring: schedule, what is sent).
    Collective: every rank of ``process_group`` must call it with its shard.

    Args:
        q: this rank's queries ``(batch, local_seqlen, nheads, headdim)``,
            float32/float16/bfloat16, as :func:`longattn.parallel.shard` cuts them.
        k, v: this rank's keys/values ``(batch, local_seqlen, nheads_k,
            headdim)``; GQA/MQA (``nheads % nheads_k == 0``); they never move.
        causal: causal over the GLOBAL sequence (positions as the layout
            assigns them); local lengths of q and k are equal.
        softmax_scale: defaults to ``headdim ** -0.5``.
        window_size: ``(left, right)`` sliding window over GLOBAL positions
            (flash-attn semantics, -1 = unbounded); each step computes (and
            sends back) only the rectangles the window reaches, as ring
            attention (:mod:`longattn.parallel.pieces`).
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        layout: ``"zigzag"`` (default, balanced under causal; local length
            even) or ``"contiguous"``. Must match how the shards were cut.
        process_group: the group (None = default group); any subgroup works.
            Both flows use it (told apart by tags); nothing else is created.
        return_lse: also return ``lse (batch, nheads, local_seqlen)`` float32.
        check: first run one small ``all_gather`` of every rank's shapes,
            dtype and options, so that ranks that disagree (or a rank whose
            inputs are invalid) make EVERY rank raise a named error instead of
            hanging; ``check=False`` skips it.

    Returns:
        ``out`` with q's shape and dtype (this rank's rows of the full
        attention), or ``(out, lse)``. Partials are merged in float32 in a
        fixed order (same bits every run). A row that sees no key gets
        ``out = 0``, ``lse = -inf``. When q, k or v requires grad (and grad
        mode is on), out and lse are differentiable; ``backward`` is
        collective like the forward and gives this rank's dq, dk, dv in the
        inputs' dtypes, accumulated in float32.

    Sent per rank (forward): ``N - 1`` q blocks (q's dtype, un-repeated) and
    one partial output per non-empty piece for the other ranks (q's dtype plus
    the packed float32 lse), counted with :func:`longattn.parallel.stats.sent`.

    Raises:
        ShapeError / DTypeError / ArgumentError: bad local input, or ranks
            that disagree (with ``check=True``, on every rank).
    """
    facts = group_facts(process_group)
    o = settle_sharded("token_ring_attention", facts, q, k, v, causal=causal, return_lse=return_lse,
                       softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, layout=layout,
                       check=check)
    options = (facts, o.causal, o.window, o.scale, o.softcap, o.layout)
    if o.grad:
        out, lse = ShardedAttention.apply(q, k, v, _token_ring_forward, _token_ring_backward, options)
    else:
        out, lse = _token_ring_forward(q, k, v, *options)
    return (out, lse) if o.return_lse else out


# ---------------------------------------------------------------------------------------------- messages


def _lse_width(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` that hold one float32 lse bit for bit (1 or 2)."""
    size = torch.empty((), dtype=dtype).element_size()
    return max(1, 4 // size)


def _pack(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``o (batch, rows, nheads, d)`` in dtype X and ``lse (batch, nheads, rows)``
    float32 -> one flat X tensor ``[o | lse bits]`` (rows, heads major)."""
    bits = lse.transpose(1, 2).contiguous().unsqueeze(-1).view(o.dtype)  # (batch, rows, nheads, 1 or 2)
    return torch.cat([o, bits], dim=-1).reshape(-1)


def _unpack(flat: torch.Tensor, batch: int, rows: int, nheads: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_pack`: ``o (batch, rows, nheads, d)`` view and lse
    ``(batch, rows, nheads)`` float32 (the layout the accumulators use)."""
    both = flat.view(batch, rows, nheads, -1)
    lse = both[..., d:].contiguous().view(torch.float32).squeeze(-1)
    return both[..., :d], lse


def _rows(pieces) -> int:
    return sum(rows.stop - rows.start for rows, _, _ in pieces)


def _exchange_name(facts: GroupFacts, step: int, what: str, peers: str) -> str:
    """How a failed exchange is named: the operation, this rank, the step, the peers."""
    return f"token_ring_attention{what}: group rank {facts.rank}, step {step}: exchange with global ranks {peers}"


def _post(ops: list, name: str) -> list | None:
    """``batch_isend_irecv`` of the non-empty op list (every rank posts all of
    its ops of one exchange together, so no world size can deadlock); a failed
    post is named by ``name``."""
    if not ops:
        return None
    with naming_peer_failures(name):
        return dist.batch_isend_irecv(ops)


def _wait(works: list | None, facts: GroupFacts, step: int, what: str, peers: str) -> None:
    wait_for_peers(works, _exchange_name(facts, step, what, peers))


def _global(facts: GroupFacts, group_rank: int) -> int:
    return dist.get_global_rank(facts.group, group_rank % facts.world_size)


def _home_exchange(facts, step: int, send: torch.Tensor | None, recv: torch.Tensor | None, tag: int, what: str):
    """Step ``step``'s flow home: ``send`` to the owner of the block in hand
    (rank ``r - step``), ``recv`` from the rank holding this rank's block
    (``r + step``). Either may be None (an empty piece: nothing travels)."""
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, _global(facts, facts.rank - step), facts.group, tag))
        sent(send.numel() * send.element_size())
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, _global(facts, facts.rank + step), facts.group, tag))
    return _post(ops, _exchange_name(facts, step, what, _home_peers(facts, step)))


def _home_peers(facts, step: int) -> str:
    return f"{_global(facts, facts.rank - step)} (send) / {_global(facts, facts.rank + step)} (receive)"


# ---------------------------------------------------------------------------------------------- forward


def _token_ring_forward(q, k, v, facts: GroupFacts, causal: bool, window: tuple[int, int], scale: float,
                        softcap: float, layout: str):
    n, r = facts.world_size, facts.rank
    batch, seqlen, nheads, headdim = q.shape
    width = headdim + _lse_width(q.dtype)
    # float32 accumulators; lse kept (batch, seqlen, nheads) so row slices along dim 1 are views for the merge
    acc_out = torch.zeros(batch, seqlen, nheads, headdim, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((batch, seqlen, nheads), float("-inf"), dtype=torch.float32, device=q.device)

    def merge(pieces, parts) -> None:
        for (rows, _, _), (o, l) in zip(pieces, parts):
            merge_two_in_place(acc_out[:, rows], acc_lse[:, rows], o.to(torch.float32), l)

    def unpack_all(pieces, flat):
        parts, at = [], 0
        for rows, _, _ in pieces:
            count = batch * (rows.stop - rows.start) * nheads * width
            parts.append(_unpack(flat[at:at + count], batch, rows.stop - rows.start, nheads, headdim))
            at += count
        return parts

    q_in_hand = q.contiguous()
    pending = None  # (works, pieces, buffer, step) of the previous step's output exchange
    for step in range(n):
        owner = (r - step) % n
        q_works, q_next = None, None
        if step < n - 1:  # post the next q exchange first: it overlaps the compute below
            q_next = torch.empty_like(q_in_hand)
            q_works = post_ring_exchange(facts, q_in_hand, q_next, _Q_TAG,
                                         name=_exchange_name(facts, step, " (q)", ring_peers(facts)))
            sent(q_in_hand.numel() * q_in_hand.element_size())
        # what owner's rows need from this rank's KV
        mine = block_pieces(n, owner, r, seqlen, causal, window, layout)
        with compute():
            parts = []
            for rows, keys, piece_window in mine:
                o, l = attention(q_in_hand[:, rows], k[:, keys], v[:, keys], window_size=piece_window,
                                 softmax_scale=scale, softcap=softcap, return_lse=True)
                parts.append((o, l))
            if step == 0:  # this rank's own rows against its own KV: merged first
                merge(mine, [(o, l.transpose(1, 2)) for o, l in parts])
            else:
                outgoing = torch.cat([_pack(o, l) for o, l in parts]) if parts else None
        if step > 0:
            # what arrives for this rank's rows
            theirs = block_pieces(n, r, (r + step) % n, seqlen, causal, window, layout)
            incoming = q.new_empty(batch * _rows(theirs) * nheads * width) if theirs else None
            works = _home_exchange(facts, step, outgoing, incoming, _OUT_TAG, " (partial outputs)")
            if pending is not None:
                _merge_pending(pending, facts, merge, unpack_all)
            pending = (works, theirs, incoming, step)
        if q_works is not None:
            _wait(q_works, facts, step, " (q)", ring_peers(facts))
            q_in_hand = q_next
    if pending is not None:
        _merge_pending(pending, facts, merge, unpack_all)
    return acc_out.to(q.dtype), acc_lse.transpose(1, 2).contiguous()


def _merge_pending(pending, facts, merge, unpack_all) -> None:
    works, theirs, incoming, step = pending
    _wait(works, facts, step, " (partial outputs)", _home_peers(facts, step))
    if theirs:
        with compute():
            merge(theirs, unpack_all(theirs, incoming))


# ---------------------------------------------------------------------------------------------- backward


def _token_ring_backward(dout, dlse, q, k, v, out, lse, facts: GroupFacts, causal: bool, window: tuple[int, int],
                         scale: float, softcap: float, layout: str):
    """``(dq, dk, dv)`` of this rank's shard, in the dtypes of q, k, v.

    The query block travels as in the forward, in one q-dtype message
    ``[q | dout | out | lse bits | dlse bits]`` per hop; each rank adds the visiting rows' gradient into its own
    float32 dk/dv and sends the float32 dq partial home (tag 2), where the
    owner adds them in step order (own first) -- deterministic.
    """
    n, r = facts.world_size, facts.rank
    batch, seqlen, nheads, headdim = q.shape
    lw = _lse_width(q.dtype)
    # (batch, seqlen, nheads, 3 * headdim + 2 * lw): everything a visiting block needs, one message per hop.
    # dlse always travels (zeros when lse has no gradient here): whether lse is used may differ between
    # ranks, and the message size must not.
    if dlse is None:
        dlse = torch.zeros_like(lse)
    lse_bits, dlse_bits = (t.to(torch.float32).transpose(1, 2).contiguous().unsqueeze(-1).view(q.dtype)
                           for t in (lse, dlse))
    block = torch.cat([q, dout.to(q.dtype), out, lse_bits, dlse_bits], dim=-1).contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=q.device)

    def split(b):
        qq, dd, oo = b[..., :headdim], b[..., headdim:2 * headdim], b[..., 2 * headdim:3 * headdim]
        at = 3 * headdim
        ll, gl = (b[..., i:i + lw].contiguous().view(torch.float32).squeeze(-1).transpose(1, 2)
                  for i in (at, at + lw))
        return qq, dd, oo, ll, gl

    def add_home(pieces, flat) -> None:
        at = 0
        for rows, _, _ in pieces:
            count = batch * (rows.stop - rows.start) * nheads * headdim
            dq[:, rows] += flat[at:at + count].view(batch, rows.stop - rows.start, nheads, headdim)
            at += count

    def settle(pending) -> None:
        works, theirs, incoming, step = pending
        _wait(works, facts, step, " backward (dq)", _home_peers(facts, step))
        if theirs:
            with compute():
                add_home(theirs, incoming)

    pending = None
    for step in range(n):
        owner = (r - step) % n
        works, block_next = None, None
        if step < n - 1:
            block_next = torch.empty_like(block)
            works = post_ring_exchange(facts, block, block_next, _Q_TAG,
                                       name=_exchange_name(facts, step, " backward (q block)", ring_peers(facts)))
            sent(block.numel() * block.element_size())
        mine = block_pieces(n, owner, r, seqlen, causal, window, layout)
        with compute():
            qq, dd, oo, ll, gl = split(block)
            grads = []
            for rows, keys, piece_window in mine:
                gq, gk, gv = block_backward(dd[:, rows], qq[:, rows], k[:, keys], v[:, keys], oo[:, rows],
                                            ll[:, :, rows], scale=scale, causal=False, window_size=piece_window,
                                            softcap=softcap, dlse=gl[:, :, rows])
                dkv[0][:, keys] += gk
                dkv[1][:, keys] += gv
                grads.append(gq)
            if step == 0:
                for (rows, _, _), gq in zip(mine, grads):
                    dq[:, rows] += gq
            else:
                outgoing = torch.cat([g.to(torch.float32).reshape(-1) for g in grads]) if grads else None
        if step > 0:
            theirs = block_pieces(n, r, (r + step) % n, seqlen, causal, window, layout)
            incoming = dq.new_empty(batch * _rows(theirs) * nheads * headdim) if theirs else None
            home = _home_exchange(facts, step, outgoing, incoming, _DQ_TAG, " backward (dq)")
            if pending is not None:
                settle(pending)
            pending = (home, theirs, incoming, step)
        if works is not None:
            _wait(works, facts, step, " backward (q block)", ring_peers(facts))
            block = block_next
    if pending is not None:
        settle(pending)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
