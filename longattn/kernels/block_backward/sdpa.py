"""Block backward through PyTorch's fused CPU flash-attention backward.

``aten::_scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v,
out, lse, ...)`` recomputes ``P = exp(S - lse)`` from the lse it is GIVEN and
``D = rowsum(dout * out)`` from the out it is given: handed the rows' FINAL
out and lse over every key, it returns exactly one block pair's share of the
gradient, which is the block-backward contract (no renormalisation). It is
PyTorch's own blocked kernel (oneDNN/ATen vectorised), about 1.7x faster than
the eager twin's chunked matmuls on a CPU.

It serves the calls whose semantics it can express without a dense mask:
float32 on a CPU (it returns gradients in the input dtype, so fp16/bf16
pieces would be rounded before the ring adds them up; the eager twin keeps
float32), no soft-cap, no window, no gradient into lse, and causal only on
a square pair (its ``is_causal`` is top-left aligned, longattn's bottom-right:
equal for ``seqlen_q == seqlen_k``). Those are every piece ring and TokenRing
attention compute without a window. GQA: the op pairs query head ``h`` with
kv head ``h // (nheads / nheads_k)`` itself, as longattn does.
"""

from __future__ import annotations

import torch


def op_available() -> bool:
    """Whether this torch build has the fused CPU backward (probed, not assumed)."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def call_reasons(q: torch.Tensor, k: torch.Tensor, causal: bool, softcap: float, window: tuple[int, int],
                 dlse: torch.Tensor | None) -> list[str]:
    """Why the fused op cannot serve this call (empty: it can)."""
    reasons = []
    if q.device.type != "cpu":
        reasons.append(f"the fused backward is PyTorch's CPU kernel; q is on {q.device}")
    if q.dtype != torch.float32:
        reasons.append(f"it returns gradients in the input dtype ({q.dtype}): blocks would be rounded before "
                       "they are summed; the eager twin keeps float32")
    if softcap > 0:
        reasons.append("no soft-cap in the fused backward")
    if window != (-1, -1):
        reasons.append(f"no sliding window in the fused backward (window_size={window})")
    if dlse is not None:
        reasons.append("no gradient into lse in the fused backward")
    if causal and q.shape[1] != k.shape[1]:
        reasons.append(f"its causal mask is top-left aligned: bottom-right only for a square pair "
                       f"(seqlen_q {q.shape[1]} != seqlen_k {k.shape[1]})")
    return reasons


def block_backward_sdpa(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` float32 of one block pair (module docstring for what it serves)."""
    # lse = -inf marks a row that saw no key anywhere: +inf makes exp(s - lse) exactly 0 (as the eager twin)
    lse_use = lse.masked_fill(torch.isneginf(lse), float("inf")).contiguous()
    heads_first = [t.transpose(1, 2) for t in (dout, q, k, v, out)]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *heads_first, lse_use, 0.0, causal, attn_mask=None, scale=scale
    )
    return tuple(g.transpose(1, 2).contiguous() for g in (dq, dk, dv))  # type: ignore[return-value]
