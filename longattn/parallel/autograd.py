"""Autograd for the sequence-parallel attentions whose backward is its own collective pass.

Ring and TokenRing attention compute the forward with a hand-written
exchange and the backward with another (the gradient of each block given the
rows' final out and lse); this Function ties the two together. The backward
is collective like the forward: every rank of the group must run it (the
metadata check makes every rank agree on whether grad is needed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ShardedAttention(torch.autograd.Function):
    """``apply(q, k, v, forward, backward, options) -> (out, lse)``.

    ``forward(q, k, v, *options) -> (out, lse)`` and ``backward(dout, dlse,
    q, k, v, out, lse, *options) -> (dq, dk, dv)``; ``dout`` is zeros when
    only lse is used, ``dlse`` None when lse is not used.
    """

    @staticmethod
    def forward(ctx, q, k, v, forward: Callable, backward: Callable, options: tuple):
        out, lse = forward(q, k, v, *options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backward_pass, ctx.options = backward, options
        ctx.set_materialize_grads(False)  # lse's gradient stays None when lse is not used
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ctx.backward_pass(dout, dlse, q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None
