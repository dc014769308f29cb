"""Block backward, eager PyTorch twin: flash-attention's backward for one
(query block, key block) pair given the FINAL ``(out, lse)`` of the rows.

Shapes (longattn layout): dout/q/out ``(batch, seqlen_q, nheads, headdim)``,
k/v ``(batch, seqlen_k, nheads_k, headdim)``, lse/dlse ``(batch, nheads,
seqlen_q)`` float32 natural log. Returns float32 ``dq`` like q and ``dk``,
``dv`` like k (GQA: summed over each kv head's query group).

Math, per row ``i`` and key ``j`` of the block (``s`` = scaled, possibly
soft-capped score; masked pairs have ``s = -inf``):

    P_ij  = exp(s_ij - lse_i)             (NOT renormalised: lse covers all keys)
    D_i   = sum_d dout_i * out_i - dlse_i
    dS_ij = P_ij * (dout_i . v_j - D_i) * (1 - tanh^2 if softcap) * scale
    dq_i  = sum_j dS_ij k_j,  dk_j = sum_i dS_ij q_i,  dv_j = sum_i P_ij dout_i

Because nothing is renormalised, the gradients of a row split over disjoint
key blocks add up: summing this over a partition of the keys (each block
with its own alignment) gives the full gradient. That is what a ring step
needs. Rows with ``lse = -inf`` (saw no key anywhere) contribute nothing.

The score, folding and chunking pieces are dense attention's
(:mod:`longattn.kernels.dense.eager`); only the normalisation differs from
:func:`~longattn.kernels.dense.eager.dense_backward_eager`, which renormalises
each row over the keys it was given (correct only when those are all keys).
"""

from __future__ import annotations

import torch

from longattn.kernels.dense.eager import attention_grads
from longattn.masking import effective_window


def block_backward_eager(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    softcap: float = 0.0,
    dlse: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` float32 of one block pair (module docstring); causal and
    ``window_size`` are bottom-right aligned within the pair, as :func:`longattn.attention`."""
    window = effective_window(causal, window_size)
    # lse = -inf marks a row that saw no key in the whole sequence: +inf there
    # makes exp(s - lse) exactly 0 for every s (finite or -inf). No
    # renormalisation: lse covers keys beyond this block.
    lse_use = lse.to(torch.float32).masked_fill(torch.isneginf(lse), float("inf"))
    dq, dk, dv = attention_grads(dout, q, k, v, out, lse_use, dlse, scale=scale, window=window, softcap=softcap,
                                 renormalise=False)
    return dq, dk.permute(0, 2, 1, 3).contiguous(), dv.permute(0, 2, 1, 3).contiguous()
