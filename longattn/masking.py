"""Which keys a query sees: causal alignment and sliding windows.

One rule, used by the oracle, the eager twin and (re-derived in-kernel) the
Triton twin. Queries are aligned to the *end* of the keys (bottom-right, as in
flash-attn): with ``offset = seqlen_k - seqlen_q``, query ``i`` sits at key
position ``i + offset``. Query ``i`` sees key ``j`` iff

    (left  < 0 or j >= i + offset - left)  and
    (right < 0 or j <= i + offset + right)

where ``(left, right) = window_size`` and ``causal=True`` means ``right = 0``.
Example, seqlen_q=3, seqlen_k=5, causal (offset 2)::

    keys   0 1 2 3 4
    q0     x x x . .
    q1     x x x x .
    q2     x x x x x

With seqlen_q > seqlen_k the first rows see nothing (empty rows: out 0,
lse -inf).
"""

from __future__ import annotations

import torch


def effective_window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    """Fold ``causal`` into the window: causal is a window whose right edge is 0.

    Returns ``(left, right)`` with -1 meaning unbounded. Callers validate
    first (a causal call with ``right > 0`` is rejected, not overridden).
    """
    left, right = window_size
    if causal:
        right = 0
    return left, right


def visible_key_range(
    row_start: int,
    row_end: int,
    seqlen_q: int,
    seqlen_k: int,
    window: tuple[int, int],
) -> tuple[int, int]:
    """Half-open key range ``[lo, hi)`` that covers every key any query row in
    ``[row_start, row_end)`` can see; ``lo >= hi`` means the rows see nothing.

    Kernels iterate only over this range, which is what makes causal and
    windowed attention cost proportional to the visible area.
    """
    left, right = window
    offset = seqlen_k - seqlen_q
    lo = 0 if left < 0 else max(0, row_start + offset - left)
    hi = seqlen_k if right < 0 else min(seqlen_k, row_end - 1 + offset + right + 1)
    return lo, hi


def block_fully_visible(
    row_start: int,
    row_end: int,
    key_start: int,
    key_end: int,
    seqlen_q: int,
    seqlen_k: int,
    window: tuple[int, int],
) -> bool:
    """True when every query row in ``[row_start, row_end)`` sees every key in
    ``[key_start, key_end)`` (so no mask is needed). Pure integer arithmetic:
    kernels decide this without reading a mask back from the device."""
    left, right = window
    if row_start >= row_end or key_start >= key_end:
        return True
    offset = seqlen_k - seqlen_q
    # The tightest constraints come from the last row (left edge) and the first row (right edge).
    if left >= 0 and key_start < row_end - 1 + offset - left:
        return False
    if right >= 0 and key_end - 1 > row_start + offset + right:
        return False
    return True


def visibility_mask(
    rows: torch.Tensor,
    cols: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    window: tuple[int, int],
) -> torch.Tensor | None:
    """Boolean ``(len(rows), len(cols))`` mask, True where the query sees the key.

    ``rows``/``cols`` are absolute query/key indices (int64 1-D). Returns None
    when nothing is masked (no window, not causal), so callers can skip the
    masking pass.
    """
    left, right = window
    if left < 0 and right < 0:
        return None
    diag = rows[:, None] + (seqlen_k - seqlen_q)  # key position of each query
    c = cols[None, :]
    mask = torch.ones(rows.numel(), cols.numel(), dtype=torch.bool, device=rows.device)
    if left >= 0:
        mask &= c >= diag - left
    if right >= 0:
        mask &= c <= diag + right
    return mask


def dense_mask(
    seqlen_q: int,
    seqlen_k: int,
    window: tuple[int, int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The full ``(seqlen_q, seqlen_k)`` boolean visibility mask (True = seen)."""
    rows = torch.arange(seqlen_q, device=device)
    cols = torch.arange(seqlen_k, device=device)
    mask = visibility_mask(rows, cols, seqlen_q, seqlen_k, window)
    if mask is None:
        mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    return mask
