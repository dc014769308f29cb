"""Ulysses attention (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards and back.

Each of the ``N`` ranks holds its sequence shard of q, k, v (``L = S / N``
positions, all heads; :mod:`longattn.parallel.layout`). One all-to-all gives
every rank the WHOLE sequence for ``nheads / N`` of the query heads (and the kv
heads those need); it reorders the gathered chunks into global order and runs
:func:`longattn.attention` on the full sequence, so causal masks, sliding
windows and softcap act exactly as in single-process attention. A second
all-to-all returns every rank its sequence shard of the output (and lse) for
all heads.

Messages: ``all_to_all_single`` over a ``(N, bytes_per_destination)`` uint8
buffer: block ``j`` of the buffer goes to group rank ``j``. q, k and v (one
dtype) travel in ONE all-to-all; out (q's dtype) and lse (float32) in one
more, their bytes packed side by side. All-to-all is blocking (no compute to
hide it behind), so there is no overlap; it is its own transpose (block
``(i, j)`` goes to ``(j, i)``), so the backward of each exchange is the same
exchange applied to the gradients.

Accounting (:mod:`longattn.parallel.stats`): ``compute`` covers the reorders
and the attention between the two exchanges (in the backward: everything
autograd runs between the two backward exchanges, i.e. attention's backward
and the reorders); ``waiting`` covers each all-to-all (nothing overlaps it);
``sent`` counts the ``N - 1`` blocks that leave this rank per exchange (its own
block stays local), as ``N - 1`` messages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.api import attention
from longattn.errors import ShapeError
from longattn.parallel.checks import ShardedOptions, settle_sharded
from longattn.parallel.comm import GroupFacts, group_facts, naming_peer_failures, wait_for_peers
from longattn.parallel.stats import compute, sent



def kv_heads_per_rank(nheads: int, nheads_k: int, world_size: int) -> int:
    """How many kv heads one rank attends with; raises ShapeError for unsupported head counts.

    Rule: ``nheads % world_size == 0`` (each rank takes a contiguous range of
    ``nheads / world_size`` query heads). Then either ``nheads_k %
    world_size == 0``: each rank gets ``nheads_k / world_size`` kv heads,
    un-repeated (contiguous ranges keep the q -> kv head mapping); or
    ``nheads_k < world_size`` with ``world_size % nheads_k == 0``: every q
    head of a rank maps to ONE kv head, which that rank receives (kv heads
    are replicated ``world_size / nheads_k`` times across ranks). Any other
    combination raises.
    """
    if nheads % world_size:
        raise ShapeError(
            f"ulysses_attention: q nheads {nheads} is not divisible by the world size {world_size}; Ulysses gives "
            "each rank nheads / world_size query heads (use ring_attention, or a world size dividing nheads)"
        )
    if nheads_k % world_size == 0:
        return nheads_k // world_size
    if world_size % nheads_k == 0:
        return 1
    raise ShapeError(
        f"ulysses_attention: k nheads_k {nheads_k} does not fit world size {world_size}: need nheads_k % "
        f"world_size == 0 (kv heads split across ranks) or world_size % nheads_k == 0 (each rank gets the one "
        f"kv head its query heads use, replicated); got nheads {nheads}, nheads_k {nheads_k}"
    )


def ulysses_attention(
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
    """Exact attention over a sequence sharded across the ranks of a group, by head-parallel all-to-all.

    Collective: every rank of ``process_group`` must call it with its own
    shard (and, when it builds a graph, run the backward). Takes the same
    shards as :func:`longattn.parallel.ring_attention`, so the two swap freely.

    Heads (``N`` = world size, ``H`` = nheads, ``Hk`` = nheads_k): needs
    ``H % N == 0``; group rank ``j`` computes query heads ``j H/N ..
    (j+1) H/N - 1``. GQA: if ``Hk % N == 0`` rank ``j`` receives kv heads
    ``j Hk/N .. (j+1) Hk/N - 1`` (un-repeated); if ``Hk < N`` and ``N % Hk
    == 0`` its query heads all use kv head ``j // (N/Hk)``, which it receives
    (that kv head is REPLICATED to ``N/Hk`` ranks; the backward sums the
    replicas' gradients). Otherwise :class:`~longattn.errors.ShapeError`.

    What is sent (per rank, to the other ``N - 1`` ranks; ``B`` batch, ``L =
    S/N`` local length, ``D`` headdim, ``e`` bytes per element, ``hk = Hk/N``
    or 1 when replicating)::

        in:  (N-1) * B * L * (H/N + 2 hk) * D * e       (q, k, v, one all-to-all)
        out: (N-1) * B * L * (H/N) * (D * e + 4 * return_lse)   (out [+ lse])

    i.e. ``(N-1)/N^2 * B S (2H + 2Hk) D e`` without lse or replication: per
    rank about ``4 B S H D e / N`` for MHA, independent of ``N`` per token of
    the shard. Replicating kv heads makes the k/v part ``2 (N-1)/N * B S D e``,
    ``N/Hk`` times the ``2 (N-1)/N^2 * B S Hk D e`` of an even split. The
    backward sends the same volumes (dout [+ dlse], then dq, dk, dv).
    Each rank also holds the whole sequence for its heads: ``S * (H/N +
    2 hk) * D`` elements per batch row, plus attention's own workspace.

    Args:
        q: this rank's queries ``(batch, local_seqlen, nheads, headdim)``,
            float32/float16/bfloat16, as :func:`longattn.parallel.shard` cuts them.
        k, v: this rank's keys/values ``(batch, local_seqlen, nheads_k,
            headdim)``, same local length as q (one sequence, sharded alike).
        causal: causal over the GLOBAL sequence (equal q and k lengths, so
            bottom-right = top-left alignment).
        softmax_scale: defaults to ``headdim ** -0.5``.
        window_size: flash-attn's ``(left, right)`` over GLOBAL positions
            (with ``causal``, right must be -1 or 0).
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        layout: ``"zigzag"`` (default; local length even: two chunks) or
            ``"contiguous"``. Must match how the shards were cut. Ulysses'
            own work is balanced in either layout (every rank does all
            positions for its heads); the layout only says where rows live.
        process_group: the group (None = default group); any subgroup works.
        return_lse: also return ``lse (batch, nheads, local_seqlen)`` float32.
        check: first run one small ``all_gather`` of every rank's shapes,
            dtype and options (including whether q, k or v require grad, which
            decides whether the backward's collectives happen) so that ranks
            that disagree, or a rank with invalid input, make EVERY rank raise
            a named error instead of hanging. ``check=False`` skips it.

    Returns:
        ``out`` with q's shape and dtype (this rank's rows of full attention,
        in its local order), or ``(out, lse)``. A row that sees no key gets
        ``out = 0``, ``lse = -inf``. Differentiable in q, k, v (and through
        lse): ``backward`` is collective (two all-to-alls) and gives dq, dk,
        dv of this rank's shard in the inputs' dtypes.

    Raises:
        ShapeError: heads that do not fit the world size (rule above), local
            lengths that differ or (zigzag) are odd, or ranks whose shapes
            disagree. DTypeError / ArgumentError: bad dtype or options, or
            ranks that disagree on them (with ``check=True``, on every rank).
        RuntimeError: an all-to-all failed (a peer died or stalled past the
            group's timeout); the message names the rank and the stage.
    """
    facts = group_facts(process_group)
    heads: list[int] = []

    def heads_fit(opts: ShardedOptions) -> list[float]:
        heads.append(kv_heads_per_rank(q.shape[2], k.shape[2], facts.world_size))  # raises when they do not fit
        return [float(opts.return_lse)]  # lse travels back only when asked for: every rank must agree

    o = settle_sharded("ulysses_attention", facts, q, k, v, causal=causal, return_lse=return_lse,
                       softmax_scale=softmax_scale, window_size=window_size, softcap=softcap, layout=layout,
                       check=check, extra_fields=("return_lse",), extra_check=heads_fit)
    return _ulysses(q, k, v, facts, o, heads[0])


def _ulysses(q, k, v, facts: GroupFacts, s: ShardedOptions, hk: int):
    n, lay, want_lse = facts.world_size, s.layout, s.return_lse
    batch, seqlen, nheads, headdim = q.shape
    h = nheads // n
    timer = _BackwardTimer()

    # Per-destination blocks (N, B, L, heads, D): block j holds the heads rank j computes.
    q_send = q.reshape(batch, seqlen, n, h, headdim).permute(2, 0, 1, 3, 4)
    if hk * n != k.shape[2]:
        # replication: rank j's query heads all use kv head (j * h) // group, i.e. j // (N / nheads_k);
        # index_select's backward sums the replicas' gradients
        group = nheads // k.shape[2]
        index = torch.tensor([(j * h) // group for j in range(n)], device=k.device)
        k, v = k.index_select(2, index), v.index_select(2, index)
    k_send, v_send = (t.reshape(batch, seqlen, n, hk, headdim).permute(2, 0, 1, 3, 4) for t in (k, v))
    msg_in = (q_send, k_send, v_send)
    if s.grad:
        q_recv, k_recv, v_recv = _Exchange.apply(facts, "q/k/v", timer, False, *msg_in)
    else:
        q_recv, k_recv, v_recv = _exchange(facts, "q/k/v", msg_in)

    with compute():
        # received block i = rank i's sequence shard of this rank's heads -> (B, S, heads, D) in global order
        qg, kg, vg = (_to_global(t, lay) for t in (q_recv, k_recv, v_recv))
        out_g, lse_g = attention(qg, kg, vg, causal=s.causal, softmax_scale=s.scale, window_size=s.window,
                                 softcap=s.softcap, return_lse=True)
        out_send = _from_global(out_g, n, lay)  # (N, B, L, h, D): block j = rank j's rows of my heads
        msg_out = (out_send, _from_global(lse_g.transpose(1, 2), n, lay)) if want_lse else (out_send,)

    if s.grad:
        back = _Exchange.apply(facts, "out/lse" if want_lse else "out", timer, True, *msg_out)
    else:
        back = _exchange(facts, "out/lse" if want_lse else "out", msg_out)
    # received block i = head group i of my rows: (N, B, L, h, ...) -> (B, L, N*h, ...)
    out = back[0].permute(1, 2, 0, 3, 4).reshape(batch, seqlen, nheads, headdim)
    if not want_lse:
        return out
    lse = back[1].permute(1, 0, 3, 2).reshape(batch, nheads, seqlen)  # (N, B, L, h) -> (B, N*h, L)
    return out, lse


def _to_global(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``(N, B, L, ...)`` blocks, block ``i`` = rank ``i``'s local shard -> ``(B, N*L, ...)`` in global order.

    Zigzag: rank ``i`` holds chunks ``i`` and ``2N-1-i``, so the first halves
    in rank order are chunks ``0..N-1`` and the second halves in REVERSED rank
    order are chunks ``N..2N-1``.
    """
    n, batch, local = x.shape[:3]
    rest = x.shape[3:]
    if layout == "zigzag":
        halves = x.reshape(n, batch, 2, local // 2, *rest)
        x = torch.cat([halves[:, :, 0], halves[:, :, 1].flip(0)])  # (2N, B, L/2, ...) chunks in order
    return x.transpose(0, 1).reshape(batch, n * local, *rest)


def _from_global(x: torch.Tensor, n: int, layout: str) -> torch.Tensor:
    """The inverse of :func:`_to_global`: ``(B, S, ...)`` -> ``(N, B, S/N, ...)``, block ``j`` = rank ``j``'s rows."""
    batch, total = x.shape[:2]
    rest = x.shape[2:]
    if layout == "contiguous":
        return x.reshape(batch, n, total // n, *rest).transpose(0, 1)
    chunks = x.reshape(batch, 2 * n, total // (2 * n), *rest).transpose(0, 1)  # (2N, B, S/2N, ...)
    return torch.stack([chunks[:n], chunks[n:].flip(0)], dim=2).reshape(n, batch, total // n, *rest)


def _pack(blocks) -> torch.Tensor:
    """Tensors with a leading ``N`` (per-destination) dim -> one ``(N, total bytes)`` uint8 buffer."""
    n = blocks[0].shape[0]
    return torch.cat([b.contiguous().view(torch.uint8).reshape(n, -1) for b in blocks], dim=1)


def _unpack(buffer: torch.Tensor, like) -> tuple:
    """Split a ``(N, total bytes)`` buffer back into tensors shaped and typed like ``like``."""
    parts, start = [], 0
    for shape, dtype in like:
        nbytes = 1
        for d in shape[1:]:
            nbytes *= d
        nbytes *= torch.empty((), dtype=dtype).element_size()
        piece = buffer[:, start:start + nbytes].contiguous()
        parts.append(piece.view(dtype).reshape(shape))
        start += nbytes
    return tuple(parts)


def _exchange(facts: GroupFacts, stage: str, blocks) -> tuple:
    """All-to-all: block ``j`` of each tensor goes to group rank ``j``; block ``i``
    of each result came from group rank ``i``. One message for all tensors."""
    like = [(b.shape, b.dtype) for b in blocks]
    buffer = _pack(blocks)
    n = facts.world_size
    if n == 1:
        return _unpack(buffer, like)
    received = torch.empty_like(buffer)
    # this rank's payload that leaves it: the N-1 blocks for its peers
    sent(buffer[0].numel() * (n - 1), messages=n - 1)
    peers = [dist.get_global_rank(facts.group, r) for r in range(n) if r != facts.rank]
    name = f"ulysses_attention: group rank {facts.rank}: all-to-all of {stage} with global ranks {peers}"
    with naming_peer_failures(name):
        work = dist.all_to_all_single(received, buffer, group=facts.group, async_op=True)
    wait_for_peers([work], name)
    return _unpack(received, like)


class _BackwardTimer:
    """Counts the backward's local work as compute: started when the output
    exchange's backward is done, stopped when the input exchange's backward
    begins (autograd runs attention's backward, and the reorders, in between)."""

    def __init__(self) -> None:
        self.active = None

    def start(self) -> None:
        self.active = compute()
        self.active.__enter__()

    def stop(self) -> None:
        if self.active is not None:
            self.active.__exit__(None, None, None)
            self.active = None


class _Exchange(torch.autograd.Function):
    """:func:`_exchange` with autograd: all-to-all is linear and its own
    transpose, so the backward sends the gradients through the same exchange.
    One node for all the tensors of a message, so every rank runs exactly one
    backward all-to-all per forward one, whichever outputs its loss uses."""

    @staticmethod
    def forward(ctx, facts, stage, timer, is_output, *blocks):
        ctx.facts, ctx.stage, ctx.timer, ctx.is_output = facts, stage, timer, is_output
        ctx.like = [(b.shape, b.dtype) for b in blocks]
        ctx.device = blocks[0].device
        ctx.set_materialize_grads(False)  # a gradient a rank's loss does not reach stays None -> zeros below
        return _exchange(facts, stage, blocks)

    @staticmethod
    def backward(ctx, *grads):
        if not ctx.is_output:
            ctx.timer.stop()
        grads = tuple(torch.zeros(shape, dtype=dtype, device=ctx.device) if g is None else g.to(dtype)
                      for g, (shape, dtype) in zip(grads, ctx.like))
        back = _exchange(ctx.facts, ctx.stage + " backward", grads)
        if ctx.is_output:
            ctx.timer.start()
        return (None, None, None, None, *back)
