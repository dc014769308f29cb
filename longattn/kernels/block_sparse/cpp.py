"""Block-sparse attention, C++ CPU twin: the dense flash kernel
(:mod:`longattn.kernels.dense.cpp`) with listed key positions per query block,
a sink and a window. Serves ``layout.recent_size >= 1`` on a CPU where the
kernel builds."""

from __future__ import annotations

import torch

from longattn.kernels.dense.cpp import flash_forward_cpu


def block_sparse_forward_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_blocks: torch.Tensor, layout,
                             *, scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention (:mod:`longattn.kernels.block_sparse`'s rule,
    validated inputs, ``layout.recent_size >= 1``) on the kernel: listed key
    blocks become listed key positions per query block; the window is
    ``(window - 1, 0)`` causal or ``(window - 1, window - 1)`` otherwise."""
    w = layout.recent_size - 1
    listed = None
    if key_blocks.shape[-1]:
        offsets = torch.arange(layout.block_k, device=key_blocks.device)
        positions = (key_blocks.long()[..., None] * layout.block_k + offsets).flatten(-2)
        invalid = (key_blocks[..., None] < 0).expand(*key_blocks.shape, layout.block_k).flatten(-2)
        listed = torch.where(invalid | (positions >= layout.seqlen_k), -1, positions).to(torch.int32)
    return flash_forward_cpu(q, k, v, scale=scale, window=(w, 0 if layout.causal else w), softcap=softcap,
                             sink=layout.sink_size, causal=layout.causal, listed=listed, block_q=layout.block_q)
