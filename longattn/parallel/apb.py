"""APB (arXiv 2502.12085): approximate causal prefill over a sequence split across hosts.

Layout: CONTIGUOUS only. Host (group rank) ``h`` of ``N`` holds block ``h`` of
the sequence, positions ``h*L .. h*L + L - 1``, with the same block length
``L`` on every host (pad the sequence at the end to a multiple of ``N``; see
:mod:`longattn.parallel.layout`). APB's point is that the work of host ``h``
does not grow like ``h * L`` keys (as contiguous ring attention's does), so
the zigzag layout's balancing has nothing to balance.

What host ``h`` computes for the queries of its block (``A = anchor_len``,
``P = passing_len``)::

    keys = [ anchor: tokens 0 .. A-1 of the sequence (host 0's block)     ]  h > 0 only
           [ passing block of host 0 (<= P tokens per kv head, >= A)       ]  h > 0 only
           [ passing blocks of hosts 1 .. h-1 (<= P tokens per kv head)     ]
           [ its own block, causally                                      ]

The block's queries are the last ``L`` positions of that key list, so one
bottom-right causal :func:`longattn.attention` call over the concatenated
keys is exactly "every prefix key, then the own block causally". Host 0 sees
plain causal attention over its block (its anchor is inside it).

In the paper every host ``h > 0`` also runs the anchor's queries (and keeps
their keys for later layers) and discards their outputs. This function is one
attention layer given q, k, v, so those outputs would only be thrown away: the
anchor's queries are not computed at all.

Passing blocks: each host except the last (whose block no later host reads)
scores the keys of its own block and keeps, per kv head, the ``P`` best
(``min(P, eligible)``; host 0's tokens inside the anchor are not eligible,
they travel as the anchor), sorted by position. The paper trains small
"retaining heads" to pick them; this training-free default scores a key by the
attention mass the block's last ``min(64, L)`` queries put on it (see
:func:`apb_selection`).

Communication: ONE ``all_gather`` (gloo needs equal message sizes), each
message a flat byte buffer of ``S = min(A + P, L)`` token slots per kv head:
positions (int32, ``-1`` for padding), then k, then v::

    bytes per message = batch * nheads_k * S * (4 + 2 * headdim * itemsize)

Host 0's message is the anchor then its passing block (exactly ``min(A + P,
L)`` tokens); other hosts send ``min(P, L)`` passing tokens and pad the rest
(so with ``A > 0`` they pay for the anchor's room too: the price of one
collective instead of a broadcast plus an all_gather). Every rank sends one
message and receives ``N - 1`` (``N`` in torch's output list, its own
included). World size 1, or ``A = P = 0``, sends nothing.

Counting (design/parallel.md): with ``T`` tokens, ``L = T/N``, ``A = L/4``,
``P = L/8``, host ``N - 1`` does ``L (A + (N-1) P) + L^2/2`` query-key pairs
against zigzag ring's ``T^2 / (2N)``: 1.14x less at ``N = 2``, 1.78x at 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from longattn.api import attention
from longattn.errors import ArgumentError, DTypeError, ShapeError, UnsupportedFeatureError
from longattn.parallel.checks import DTYPE_CODES, agree
from longattn.parallel.comm import group_facts, naming_peer_failures, wait_for_peers
from longattn.parallel.stats import compute, sent
from longattn.validation import check_flag, check_int, check_qkv, check_softcap, check_softmax_scale

SCORERS = ("last_queries", "key_norm")
LAST_QUERIES = 64  # the observation window of the "last_queries" scorer (SnapKV uses 32-64)

_FIELDS = (
    "q batch", "q local seqlen", "q nheads", "q headdim", "k local seqlen", "k nheads_k",
    "dtype (1=float32, 2=float16, 3=bfloat16)", "anchor_len", "passing_len",
    "scorer (0=last_queries, 1=key_norm, 2=a callable)", "softmax_scale", "softcap",
)

Scorer = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_len(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArgumentError(f"{name} must be an int >= 0 (0 disables it), got {value!r}")
    return int(value)


def _check_scorer(scorer: object) -> int:
    """The scorer's code for the metadata check: 0, 1 (the names) or 2 (a callable)."""
    if callable(scorer):
        return 2
    if isinstance(scorer, str) and scorer in SCORERS:
        return SCORERS.index(scorer)
    raise ArgumentError(f"scorer must be one of {', '.join(map(repr, SCORERS))} or a callable "
                        f"scorer(q_block, k_block) -> (batch, nheads_k, L) scores, got {scorer!r}")


def _check_anchor(anchor_len: object, block: int) -> int:
    anchor = _check_len("anchor_len", anchor_len)
    if anchor >= block:
        raise ArgumentError(f"anchor_len must be < the block length L = {block} (the anchor is a prefix of "
                            f"host 0's block), got {anchor}")
    return anchor


def _passing_counts(anchor: int, passing: int, block: int) -> tuple[int, int]:
    """(tokens host 0 passes, tokens every other host passes) per kv head."""
    return min(passing, block - anchor), min(passing, block)


def _score_last_queries(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Attention mass of the block's last ``min(64, L)`` queries on each key of the block, summed over those
    queries and over the q heads of each kv head's group; float32 ``(batch, nheads_k, L)``."""
    batch, block, nheads, headdim = q.shape
    nheads_k = k.shape[2]
    w = min(LAST_QUERIES, block)
    qw = q[:, block - w:].to(torch.float32).reshape(batch, w, nheads_k, nheads // nheads_k, headdim)
    s = torch.einsum("bqngd,bknd->bngqk", qw, k.to(torch.float32)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    # within the block, query L-w+i sees keys 0 .. L-w+i (the observation queries' own causal rows)
    rows = torch.arange(block - w, block, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(block, device=q.device)[None, :] > rows, float("-inf"))
    return torch.softmax(s, dim=-1).sum(dim=(2, 3))


def _scores(q: torch.Tensor, k: torch.Tensor, scorer: Scorer, scale: float, softcap: float) -> torch.Tensor:
    batch, block, nheads_k = k.shape[0], k.shape[1], k.shape[2]
    if scorer == "last_queries":
        return _score_last_queries(q, k, scale, softcap)
    if scorer == "key_norm":
        return torch.linalg.vector_norm(k.to(torch.float32), dim=-1).transpose(1, 2)
    scores = scorer(q, k)  # type: ignore[operator]
    want = (batch, nheads_k, block)
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise DTypeError(f"scorer must return a floating tensor of shape {want}, got "
                         f"{getattr(scores, 'dtype', type(scores).__name__)}")
    if tuple(scores.shape) != want:
        raise ShapeError(f"scorer must return scores of shape (batch, nheads_k, L) = {want}, "
                         f"got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ArgumentError("scorer returned NaN scores; scores must be comparable (inf is allowed)")
    return scores.to(torch.float32)


def apb_selection(
    q_block: torch.Tensor,
    k_block: torch.Tensor,
    *,
    host: int,
    passing_len: int,
    anchor_len: int,
    scorer: Scorer = "last_queries",
    softmax_scale: float | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The passing block host ``host`` picks from its block: global positions per kv head. No process group.

    Args:
        q_block: ``(batch, L, nheads, headdim)``, the host's queries.
        k_block: ``(batch, L, nheads_k, headdim)``, the host's keys
            (``nheads % nheads_k == 0``).
        host: the host's index ``h`` (its block starts at global position ``h * L``).
        passing_len: tokens to keep per kv head (>= 0).
        anchor_len: the anchor's length; on host 0 positions ``< anchor_len``
            are not eligible (they travel as the anchor).
        scorer: ``"last_queries"`` (default): the softmax attention mass the
            block's last ``min(64, L)`` queries (each over its causal keys in
            the block, with ``softmax_scale`` and ``softcap``) put on each key,
            summed over those queries and the q heads of the kv head's group.
            Like SnapKV's observation window: the later hosts' queries are
            what the passing block serves, and the block's last queries are
            the nearest stand-in for them we hold (the paper trains retaining
            heads for this; we cannot). Cost ``64 x L`` scores per q head,
            small against the block's ``L^2 / 2``.
            ``"key_norm"``: largest ``||k||`` (a cheap baseline).
            A callable ``scorer(q_block, k_block) -> (batch, nheads_k, L)``
            floating scores (no NaN): higher is kept.
        softmax_scale: used by ``"last_queries"``; defaults to ``headdim ** -0.5``.
        softcap: used by ``"last_queries"`` (as in attention).

    Returns:
        int64 ``(batch, nheads_k, n_sel)`` global positions (local + ``host *
        L``), ascending per head; ``n_sel = min(passing_len, eligible)`` with
        ``eligible = L - anchor_len`` on host 0, ``L`` elsewhere. Ties in
        score go to the lower position (deterministic).

    Raises:
        ShapeError / DTypeError: bad blocks or scorer output; ArgumentError: bad lengths, host or scorer.
    """
    check_qkv(q_block, k_block, k_block)
    block = k_block.shape[1]
    if q_block.shape[1] != block:
        raise ShapeError(f"k_block has {block} positions but q_block has {q_block.shape[1]}; "
                         "a host's q and k cover the same block")
    if isinstance(host, bool) or not isinstance(host, int) or host < 0:
        raise ArgumentError(f"host must be an int >= 0, got {host!r}")
    passing = _check_len("passing_len", passing_len)
    anchor = _check_anchor(anchor_len, block) if block else _check_len("anchor_len", anchor_len)
    _check_scorer(scorer)
    scale = check_softmax_scale(softmax_scale, q_block.shape[3])
    cap = check_softcap(softcap)
    return _select(q_block, k_block, host, passing, anchor, scorer, scale, cap)


def _select(q, k, host: int, passing: int, anchor: int, scorer: Scorer, scale: float, softcap: float) -> torch.Tensor:
    batch, block, nheads_k = k.shape[0], k.shape[1], k.shape[2]
    start = anchor if host == 0 else 0
    count = min(passing, block - start)
    if count == 0:
        return torch.empty(batch, nheads_k, 0, dtype=torch.int64, device=k.device)
    scores = _scores(q, k, scorer, scale, softcap)[..., start:]
    # a stable descending sort keeps equal scores in position order: ties go to the lower position
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    return torch.sort(order, dim=-1).values + (start + host * block)


def apb_mask(
    seqlen: int,
    world_size: int,
    anchor_len: int,
    selections: Sequence[torch.Tensor],
    nheads: int,
) -> torch.Tensor:
    """Which key each query sees under APB, as the bool mask of the full sequence. No process group.

    Args:
        seqlen: ``T``, divisible by ``world_size`` (block length ``L = T / N``).
        world_size: ``N``.
        anchor_len: ``A``, ``0 <= A < L``.
        selections: the passing blocks, ``selections[g]`` = :func:`apb_selection`
            of host ``g`` (int ``(batch, nheads_k, n_g)`` global positions
            inside block ``g``), for at least hosts ``0 .. N-2`` (a last
            entry for host ``N-1`` is ignored: no host reads it).
        nheads: the number of q heads (a multiple of ``nheads_k``; q head
            ``i`` reads kv head ``i // (nheads / nheads_k)``).

    Returns:
        bool ``(batch, nheads, T, T)``: row ``t`` of block ``h`` sees, for
        ``h = 0``, keys ``0 .. t`` (plain causal); for ``h > 0``, the anchor
        (keys ``< A``), the selected keys of hosts ``0 .. h-1`` and keys
        ``h*L .. t``. The anchor's own queries on hosts ``h > 0`` are not
        rows of APB's output (their outputs are discarded), so they have no
        rows here. ``attention_ref(q, k, v, mask=apb_mask(...))`` is the
        oracle of :func:`apb_attention`.
    """
    world = check_int("world_size", world_size, 1)
    total = check_int("seqlen", seqlen, 1)
    if total % world:
        raise ArgumentError(f"seqlen {total} must be divisible by world_size {world} (equal blocks)")
    block = total // world
    anchor = _check_anchor(anchor_len, block)
    if not isinstance(selections, Sequence) or len(selections) < world - 1:
        raise ArgumentError(f"selections must be a sequence of at least world_size - 1 = {world - 1} position "
                            f"tensors (hosts 0 .. N-2), got {selections!r}")
    if world == 1:
        batch, nheads_k, device = None, None, torch.device("cpu")
    for g in range(world - 1):
        sel = selections[g]
        if not isinstance(sel, torch.Tensor) or sel.dim() != 3 or sel.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"selections[{g}] must be an int32/int64 tensor (batch, nheads_k, n), got "
                             f"{getattr(sel, 'shape', type(sel).__name__)} {getattr(sel, 'dtype', '')}")
        if g == 0:
            batch, nheads_k, device = sel.shape[0], sel.shape[1], sel.device
        elif sel.shape[:2] != (batch, nheads_k):
            raise ShapeError(f"selections[{g}] has (batch, nheads_k) {tuple(sel.shape[:2])} but selections[0] "
                             f"has {(batch, nheads_k)}")
        low = g * block + (anchor if g == 0 else 0)
        if sel.numel() and (sel.min() < low or sel.max() >= (g + 1) * block):
            raise ArgumentError(f"selections[{g}] must hold positions in [{low}, {(g + 1) * block}) (host {g}'s "
                                f"block{', past the anchor' if g == 0 else ''}), got {sel.min()}..{sel.max()}")
    nheads = check_int("nheads", nheads, 1)
    if batch is None:  # world 1: no selection gives the batch; plain causal, broadcast over batch
        batch, nheads_k = 1, 1
    if nheads % nheads_k:
        raise ArgumentError(f"nheads must be a multiple of nheads_k {nheads_k}, got {nheads}")
    mask = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    mask = mask.expand(batch, nheads, total, total).clone()
    prefix = torch.zeros(batch, nheads_k, total, dtype=torch.bool, device=device)  # keys seen before block h
    prefix[..., :anchor] = True
    for h in range(1, world):
        prefix.scatter_(2, selections[h - 1].to(device=device, dtype=torch.int64), True)
        seen = prefix[..., : h * block].repeat_interleave(nheads // nheads_k, dim=1)
        mask[:, :, h * block:(h + 1) * block, : h * block] = seen[:, :, None, :]
    return mask


def apb_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    anchor_len: int,
    passing_len: int,
    scorer: Scorer = "last_queries",
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    process_group: object = None,
    return_lse: bool = False,
    check: bool = True,
    return_selection: bool = False,
):
    """APB approximate causal prefill attention over a contiguously sharded sequence (forward only).

    Collective: every rank of ``process_group`` calls it with its block (see
    the module docstring for what each host sees and what is sent).

    Args:
        q: this host's queries ``(batch, L, nheads, headdim)`` = positions
            ``h*L .. h*L + L - 1`` (CONTIGUOUS layout: ``shard(x,
            "contiguous")``; equal ``L`` on every host), float32/float16/bfloat16.
        k, v: this host's keys/values ``(batch, L, nheads_k, headdim)``;
            GQA/MQA supported (passing blocks are chosen per kv head and sent
            un-repeated).
        anchor_len: ``A``, ``0 <= A < L``: the first ``A`` tokens of the
            sequence, which every host ``h > 0`` attends to (0 = no anchor).
            The paper uses ``L / 4``.
        passing_len: ``P >= 0``: tokens per kv head each host passes on
            (0 = none; ``P >= L`` passes whole blocks, and APB is then exact
            causal attention). The paper uses ``L / 8``.
        scorer: how passing tokens are picked: ``"last_queries"`` (default),
            ``"key_norm"``, or a callable ``scorer(q_block, k_block) ->
            (batch, nheads_k, L)``; see :func:`apb_selection`. The metadata
            check compares scorer NAMES; two ranks' callables are not compared.
            The last host does not score (nobody reads its passing block).
        softmax_scale: defaults to ``headdim ** -0.5``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        process_group: the group (None = default group); host index = group rank.
        return_lse: also return ``lse (batch, nheads, L)`` float32.
        check: first one small ``all_gather`` of every rank's shapes, dtype
            and options (:func:`~longattn.parallel.checks.agree`) so that
            ranks that disagree, or a rank whose inputs (or scorer) fail,
            make EVERY rank raise a named error instead of hanging.
            ``check=False`` skips it; a rank that then fails its local checks
            leaves its peers in the all_gather until the group's timeout.
        return_selection: also return the passing blocks this rank received:
            a list of ``N - 1`` int64 ``(batch, nheads_k, n_g)`` global
            positions (hosts ``0 .. N-2``; :func:`apb_mask` takes it as is).

    Returns:
        ``out`` with q's shape and dtype (the APB rows of this block), then
        ``lse`` if ``return_lse``, then the selections if ``return_selection``
        (a tuple when more than ``out``). Equals ``attention_ref(q_full,
        k_full, v_full, mask=apb_mask(...))`` sliced to this block. Every row
        sees at least its own token, so no row is empty.

    Raises:
        UnsupportedFeatureError: q, k or v requires grad (APB is a prefill
            method; there is no backward).
        ShapeError / DTypeError / ArgumentError: bad local input or options,
            or ranks that disagree (with ``check=True``, on every rank).
    """
    check = check_flag("check", check)
    facts = group_facts(process_group)
    settled: dict = {}

    def local_check() -> list[float]:
        check_qkv(q, k, v)
        want_lse = check_flag("return_lse", return_lse)
        want_sel = check_flag("return_selection", return_selection)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise UnsupportedFeatureError("apb_attention: q, k or v requires grad, but APB is an approximate "
                                          "prefill method with no backward; run it under torch.no_grad() or "
                                          "detach the inputs (use ring_attention to train)")
        block = q.shape[1]
        if k.shape[1] != block:
            raise ShapeError(f"apb_attention: k has local seqlen {k.shape[1]} but q has {block}; a host's q, "
                             "k and v cover the same block")
        if block == 0:
            raise ShapeError("apb_attention: q has local seqlen 0; every host needs a non-empty block")
        anchor = _check_anchor(anchor_len, block)
        passing = _check_len("passing_len", passing_len)
        code = _check_scorer(scorer)
        scale = check_softmax_scale(softmax_scale, q.shape[3])
        cap = check_softcap(softcap)
        # the selection runs here, inside the metadata check, so a scorer that fails on one rank
        # makes every rank raise instead of leaving the others in the all_gather
        selection = None
        if facts.rank < facts.world_size - 1:  # the last host's passing block is read by nobody
            with compute():
                selection = _select(q, k, facts.rank, passing, anchor, scorer, scale, cap)
        settled.update(anchor=anchor, passing=passing, scale=scale, softcap=cap, selection=selection,
                       return_lse=want_lse, return_selection=want_sel)
        return [q.shape[0], block, q.shape[2], q.shape[3], k.shape[1], k.shape[2], DTYPE_CODES[q.dtype],
                anchor, passing, code, scale, cap]

    if check:
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        agree(facts, "apb_attention", _FIELDS, local_check, device)
    else:
        local_check()
    with torch.no_grad():
        out, lse, received = _apb_forward(q, k, v, facts, settled)
    result = (out,) + ((lse,) if settled["return_lse"] else ()) + ((received,) if settled["return_selection"] else ())
    return result[0] if len(result) == 1 else result


def _pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.contiguous().view(torch.uint8).reshape(-1) for p in parts])


def _unpack(buf: torch.Tensor, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    out, at = [], 0
    for dtype, shape in specs:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(buf[at:at + n].clone().view(dtype).reshape(shape))  # clone: a fresh, aligned storage
        at += n
    return out


def _gather_rows(x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Rows of ``x (batch, L, nheads_k, d)`` at per-head local positions
    ``(batch, nheads_k, n)``, as ``(batch, n, nheads_k, d)``."""
    index = local.transpose(1, 2)[..., None].expand(-1, -1, -1, x.shape[3])
    return torch.gather(x, 1, index)


def _apb_forward(q, k, v, facts, settled: dict):
    n, rank = facts.world_size, facts.rank
    batch, block, nheads, headdim = q.shape
    nheads_k = k.shape[2]
    anchor, passing = settled["anchor"], settled["passing"]
    n0, others = _passing_counts(anchor, passing, block)
    slots = min(anchor + passing, block)  # host 0's content; the others pad up to it
    received: list[torch.Tensor] = []
    prefix_k, prefix_v = [], []
    if n > 1 and slots > 0:
        pos = torch.full((batch, nheads_k, slots), -1, dtype=torch.int32, device=q.device)
        ks = torch.zeros(batch, slots, nheads_k, headdim, dtype=k.dtype, device=k.device)
        vs = torch.zeros_like(ks)
        sel = settled["selection"]
        at = 0
        if rank == 0 and anchor:  # the anchor leads host 0's message
            pos[..., :anchor] = torch.arange(anchor, dtype=torch.int32, device=q.device)
            ks[:, :anchor], vs[:, :anchor] = k[:, :anchor], v[:, :anchor]
            at = anchor
        if sel is not None and sel.shape[2]:
            local = sel - rank * block
            pos[..., at:at + sel.shape[2]] = sel.to(torch.int32)
            ks[:, at:at + sel.shape[2]] = _gather_rows(k, local)
            vs[:, at:at + sel.shape[2]] = _gather_rows(v, local)
        message = _pack([pos, ks, vs])
        table = [torch.empty_like(message) for _ in range(n)]
        sent(message.numel())
        name = f"apb_attention: group rank {rank}: the all_gather of passing blocks over {n} ranks"
        with naming_peer_failures(name):
            work = dist.all_gather(table, message, group=facts.group, async_op=True)
        wait_for_peers([work], name)
        specs = [(torch.int32, (batch, nheads_k, slots)), (k.dtype, (batch, slots, nheads_k, headdim)),
                 (k.dtype, (batch, slots, nheads_k, headdim))]
        for g in range(n - 1):
            gpos, gk, gv = _unpack(table[g], specs)
            first, count = (anchor, n0) if g == 0 else (0, others)
            if g == 0 and anchor and rank > 0:
                prefix_k.append(gk[:, :anchor])
                prefix_v.append(gv[:, :anchor])
            received.append(gpos[..., first:first + count].to(torch.int64))
            if g < rank:
                prefix_k.append(gk[:, first:first + count])
                prefix_v.append(gv[:, first:first + count])
    elif n > 1:
        received = [torch.empty(batch, nheads_k, 0, dtype=torch.int64, device=q.device) for _ in range(n - 1)]
    keys = torch.cat(prefix_k + [k], dim=1) if prefix_k else k
    values = torch.cat(prefix_v + [v], dim=1) if prefix_v else v
    with compute():
        # the block's queries are the last L positions of the key list: bottom-right causal = every prefix
        # key (anchor, passing blocks) plus the own block causally
        out, lse = attention(q, keys, values, causal=True, softmax_scale=settled["scale"],
                             softcap=settled["softcap"], return_lse=True)
    return out, lse, received
