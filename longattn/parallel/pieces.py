"""Which (query rows, keys, mask) pieces a rank computes against one block of a sharded sequence.

Rank ``r`` holds its local queries; a block of keys (the shard of rank
``src``, same layout, same local length) is in hand. Both are one chunk
(contiguous layout) or two chunks (zigzag) of the global sequence. The global
mask is flash-attn's: query at position ``p`` sees key at ``t`` iff
``p - left <= t <= p + right`` (``-1`` = unbounded; causal is ``right = 0``).

A piece is ``(rows, keys, window)``: local row and key slices and the
``window_size`` to pass to :func:`longattn.attention` over ``q[:, rows]``,
``k[:, keys]`` so that its BOTTOM-RIGHT aligned window equals the global mask
on that rectangle. ``(-1, -1)`` = no mask. Rows and keys that see nothing are
trimmed away, so a piece never holds an empty row that would cost work.

The forward and the backward of every method follow the same pieces, so
they see the same pairs.

Derivation (one rectangle: rows start at global ``qs``, ``Lq`` of them; keys at
``ks``, ``Lk``; ``d = qs - ks``): global ``t - p`` in ``[-left, right]`` is local
``j - i`` in ``[d - left, d + right]``; attention's bottom-right window
``(wl, wr)`` allows ``j - i`` in ``[Lk - Lq - wl, Lk - Lq + wr]``, so
``wl = Lk - Lq - d + left`` and ``wr = d + right - (Lk - Lq)``. After trimming
the rows and keys nobody sees, both are >= 0 (or -1).
"""

from __future__ import annotations

from longattn.masking import effective_window

Piece = tuple[slice, slice, tuple[int, int]]
NO_MASK, CAUSAL = (-1, -1), (-1, 0)


def chunks(seqlen: int, n: int, rank: int, layout: str) -> list[tuple[int, int, int]]:
    """``(local start, global start, length)`` of each chunk rank ``rank`` holds
    (``seqlen`` = local length)."""
    if layout == "contiguous":
        return [(0, rank * seqlen, seqlen)]
    half = seqlen // 2
    return [(0, rank * half, half), (half, (2 * n - 1 - rank) * half, half)]


def band_piece(q_local: int, qs: int, lq: int, k_local: int, ks: int, lk: int,
               window: tuple[int, int]) -> Piece | None:
    """The piece of one (query chunk, key chunk) rectangle under the global
    ``window`` (module docstring), or None when no query sees any key."""
    left, right = window
    d = qs - ks
    # rows i that see something: i + d + right >= 0 and i + d - left <= lk - 1
    i0 = 0 if right == -1 else max(0, -(d + right))
    i1 = lq if left == -1 else min(lq, lk - d + left)
    # keys j seen by someone: j >= d - left (for row 0) and j <= lq - 1 + d + right
    j0 = 0 if left == -1 else max(0, d - left)
    j1 = lk if right == -1 else min(lk, lq + d + right)
    if i0 >= i1 or j0 >= j1:
        return None
    qs2, lq2, ks2, lk2 = qs + i0, i1 - i0, ks + j0, j1 - j0
    d2 = qs2 - ks2
    wl = -1 if left == -1 else lk2 - lq2 - d2 + left
    wr = -1 if right == -1 else d2 + right - (lk2 - lq2)
    # a bound that is already implied by the rectangle needs no mask
    if wl != -1 and d2 - left <= -(lq2 - 1):
        wl = -1
    if wr != -1 and d2 + right >= lk2 - 1:
        wr = -1
    assert wl >= -1 and wr >= -1, (qs, lq, ks, lk, window)
    return slice(q_local + i0, q_local + i1), slice(k_local + j0, k_local + j1), (wl, wr)


def block_pieces(n: int, r: int, src: int, seqlen: int, causal: bool, window_size: tuple[int, int],
                 layout: str) -> list[Piece]:
    """The pieces rank ``r`` computes against the block of rank ``src``.

    No mask and plain causal take the few large pieces below (zigzag: the
    block's first chunk for every local query when ``src < r``, the second
    local chunk against the whole block when ``src > r``: the same number of
    pairs on every rank); any other window goes chunk pair by chunk pair
    through :func:`band_piece`.
    """
    window = effective_window(causal, window_size)
    everything, half = slice(0, seqlen), seqlen // 2
    if window == NO_MASK:
        return [(everything, everything, NO_MASK)]
    if window == CAUSAL:
        if src == r:
            return [(everything, everything, CAUSAL)]
        if layout == "contiguous":
            return [(everything, everything, NO_MASK)] if src < r else []
        if src < r:
            return [(everything, slice(0, half), NO_MASK)]
        return [(slice(half, seqlen), everything, NO_MASK)]
    pieces = []
    for q_local, qs, lq in chunks(seqlen, n, r, layout):
        for k_local, ks, lk in chunks(seqlen, n, src, layout):
            piece = band_piece(q_local, qs, lq, k_local, ks, lk, window)
            if piece is not None:
                pieces.append(piece)
    return pieces


def forward_steps(n: int, seqlen: int, causal: bool, window_size: tuple[int, int], layout: str) -> int:
    """How many ring steps a forward pass needs: ``n``, except under a causal
    sliding window on the contiguous layout, where the block ``ceil(left /
    seqlen)`` ranks back is the oldest any query sees (later blocks never
    travel that far)."""
    left, right = effective_window(causal, window_size)
    if layout == "contiguous" and right == 0 and left != -1:
        return min(n, 1 + -(-left // seqlen))
    return n
