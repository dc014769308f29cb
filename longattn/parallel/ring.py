"""Ring attention over a process group, forward (contiguous and zigzag layouts).

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
"""

from __future__ import annotations

import torch

from longattn.api import attention
from longattn.errors import ShapeError, UnsupportedFeatureError
from longattn.kernels.merge import merge_two_in_place
from longattn.parallel.checks import DTYPE_CODES, agree
from longattn.parallel.comm import group_facts, post_ring_exchange, wait_all
from longattn.parallel.layout import check_layout
from longattn.validation import check_attention_options, check_flag, check_qkv, check_window

_FIELDS = (
    "q batch", "q local seqlen", "q nheads", "q headdim", "k local seqlen", "k nheads_k",
    "dtype (1=float32, 2=float16, 3=bfloat16)", "layout (0=zigzag, 1=contiguous)", "causal",
    "softmax_scale", "softcap",
)


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
    """Exact attention over a sequence sharded across the ranks of a group (forward only).

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
        window_size: only ``(-1, -1)`` (no window) in this increment; others
            raise :class:`~longattn.errors.UnsupportedFeatureError`.
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

    Raises:
        UnsupportedFeatureError: inputs require grad (the backward lands in a
            later increment) or a window is asked for.
        ShapeError / DTypeError / ArgumentError: bad local input, or ranks
            that disagree (with ``check=True``, on every rank).
    """
    check = check_flag("check", check)
    facts = group_facts(process_group)
    settled: dict = {}

    def local_check() -> list[float]:
        check_qkv(q, k, v)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise UnsupportedFeatureError(
                "ring_attention: q, k or v requires grad, but this is the forward-only increment; the backward "
                "lands in a later increment (run under torch.no_grad() or detach the inputs)"
            )
        is_causal, want_lse, scale, _, cap = check_attention_options(
            q.shape[3], causal, return_lse, softmax_scale, window_size, softcap
        )
        if check_window(window_size, is_causal) not in ((-1, -1), (-1, 0) if is_causal else (-1, -1)):
            raise UnsupportedFeatureError(
                f"ring_attention: window_size must be (-1, -1) in this increment (sliding windows are not "
                f"supported yet), got {window_size!r}"
            )
        lay = check_layout(layout)
        if k.shape[1] != q.shape[1]:
            raise ShapeError(f"ring_attention: k has local seqlen {k.shape[1]} but q has {q.shape[1]}; "
                             "ring attention shards q, k and v of one sequence alike")
        if lay == "zigzag" and q.shape[1] % 2:
            raise ShapeError(f"ring_attention: q has local seqlen {q.shape[1]}, which layout 'zigzag' needs to be "
                             "even (two equal chunks per rank); pad the full sequence to a multiple of "
                             "2 x world_size (see longattn.parallel.shard)")
        settled.update(causal=is_causal, return_lse=want_lse, scale=scale, softcap=cap, layout=lay)
        return [q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2], DTYPE_CODES[q.dtype],
                0 if lay == "zigzag" else 1, float(is_causal), scale, cap]

    if check:
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        agree(facts, "ring_attention", _FIELDS, local_check, device)
    else:
        local_check()
    out, lse = _ring_forward(q, k, v, facts, settled["causal"], settled["scale"], settled["softcap"],
                             settled["layout"])
    return (out, lse) if settled["return_lse"] else out


def _ring_forward(q, k, v, facts, causal: bool, scale: float, softcap: float, layout: str):
    n, r = facts.world_size, facts.rank
    batch, seqlen, nheads, headdim = q.shape
    half = seqlen // 2
    # float32 accumulators; lse kept (batch, seqlen, nheads) so row slices along dim 1 are views for the merge
    acc_out = torch.zeros(batch, seqlen, nheads, headdim, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((batch, seqlen, nheads), float("-inf"), dtype=torch.float32, device=q.device)

    def block(rows: slice, kb: torch.Tensor, vb: torch.Tensor, block_causal: bool) -> None:
        o, l = attention(q[:, rows], kb, vb, causal=block_causal, softmax_scale=scale, softcap=softcap,
                         return_lse=True)
        merge_two_in_place(acc_out[:, rows], acc_lse[:, rows], o.to(torch.float32), l.transpose(1, 2))

    everything = slice(0, seqlen)
    kv = torch.stack([k, v]).contiguous()  # one message per step: (2, batch, seqlen, nheads_k, headdim)
    for step in range(n):
        src = (r - step) % n
        works, incoming = None, None
        if step < n - 1:  # post the next exchange first: communication overlaps the compute below
            incoming = torch.empty_like(kv)
            works = post_ring_exchange(facts, kv, incoming)
        kb, vb = kv[0], kv[1]
        if not causal:
            block(everything, kb, vb, False)
        elif src == r:
            block(everything, kb, vb, True)
        elif layout == "contiguous":
            if src < r:
                block(everything, kb, vb, False)
        elif src < r:  # zigzag: every local query sees the block's first chunk, none its second
            block(everything, kb[:, :half], vb[:, :half], False)
        else:  # zigzag, src > r: only the second local chunk sees anything, and it sees the whole block
            block(slice(half, seqlen), kb, vb, False)
        if works is not None:
            try:
                wait_all(works)
            except RuntimeError as exc:  # a peer died or stalled past the group's timeout
                raise RuntimeError(
                    f"ring_attention: group rank {r}, step {step}: exchange with global ranks "
                    f"{facts.next_global} (send) / {facts.prev_global} (receive) failed: {exc}"
                ) from exc
            kv = incoming
    return acc_out.to(q.dtype), acc_lse.transpose(1, 2).contiguous()
