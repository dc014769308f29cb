"""Finding DuoAttention's retrieval heads in a model whose attention calls longattn.

Two ways, both on synthetic data the functions make themselves (nothing is
downloaded), both deterministic for a seed:

- :func:`score_heads` (training-free): feed random token sequences repeated
  twice and, per kv head, measure how much attention the second copy's
  queries put on the previous occurrence of their token or the token after
  it (echo / induction, RazorAttention-style). Retrieval heads copy from far
  back and score high; local heads score near zero.
- :func:`optimise_gates` (DuoAttention's optimisation): freeze the model,
  give each (layer, kv head) a gate ``alpha`` in [0, 1], replace every
  attention output by ``alpha * full + (1 - alpha) * streaming`` and minimise
  the L2 distance between the mixed and the full model's final hidden states
  plus ``penalty * mean(alpha)``, on passkey-like data (random tokens with a
  needle span repeated at the end).

:func:`calibrate_duo` turns either score into a
:class:`~longattn.sparse.HeadPattern` (the lowest ``sparsity`` fraction
become streaming heads). The model is any ``nn.Module`` taking token ids
``(batch, seqlen)`` and returning hidden states ``(batch, seqlen, ...)``,
whose layers each call :func:`longattn.attention` once per forward, in layer
order, with causal=True: that call order is how layers are counted.

Calibration computes the attention each call asks for, from the call's
:class:`~longattn.hooks.AttentionCall`: its softmax scale, softcap and
(effective) window are honoured by the full-attention path and by the
streaming side of the mix (whose mask is the Lambda mask intersected with the
call's own window). A call it cannot reproduce is refused with
:class:`~longattn.errors.UnsupportedFeatureError` naming the option
(``sparse=`` already set, ``causal=False``) rather than calibrated as some
other attention.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.hooks import ATTENTION_HOOK, AttentionCall
from longattn.masking import dense_mask
from longattn.sparse.duo import HeadPattern
from longattn.sparse.streaming import lambda_mask

# Gate logits start here: sigmoid(2) ~ 0.88, near full attention, so the first
# steps move away from the dense model gradually.
INITIAL_GATE_LOGIT = 2.0


@contextlib.contextmanager
def _intercept(hook: Callable[[AttentionCall], torch.Tensor]) -> Iterator[None]:
    token = ATTENTION_HOOK.set(hook)
    try:
        yield
    finally:
        ATTENTION_HOOK.reset(token)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable float32 attention with an explicit ``(seqlen_q, seqlen_k)`` bool mask
    (True = seen): ``(out like q, probabilities (batch, nheads, seqlen_q, seqlen_k))``.

    Scores are ``q . k * scale``, then ``softcap * tanh(scores / softcap)`` if
    ``softcap > 0`` (as :func:`longattn.attention`). A row that sees no key gets
    ``out = 0`` and all-zero probabilities (the contract's empty rows), with
    finite gradients. GQA by repeating k/v. For calibration-sized inputs only
    (it forms every score).
    """
    group = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    # Softmax over a row of -inf is NaN (forward and backward): give empty rows
    # zeros to work on, then zero their probabilities.
    empty = ~mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype), probs


def check_reproducible(call: AttentionCall) -> None:
    """Refuse a call calibration cannot reproduce, naming the option.

    Raises:
        UnsupportedFeatureError: ``sparse=`` is set (the layer already runs a
            sparse method: calibrating its dense attention would calibrate
            something else), or ``causal=False`` (Duo's streaming heads use the
            causal Lambda mask; a non-causal layer has no Duo form).
    """
    if call.sparse is not None:
        raise UnsupportedFeatureError(
            f"a longattn.attention call passed sparse={type(call.sparse).__name__}(...) during calibration: "
            "calibration cannot reproduce a layer that already runs a sparse method (it would calibrate dense "
            "attention instead); calibrate the dense model, with sparse=None"
        )
    if not call.causal:
        raise UnsupportedFeatureError(
            "a longattn.attention call passed causal=False during calibration: Duo's streaming heads are "
            "causal (sinks + recent window), so a non-causal layer cannot be calibrated; use causal=True"
        )


def full_attention(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention ``call`` asks for (causal, window, softcap, scale), differentiable:
    ``(out like call.q, probabilities (batch, nheads, seqlen_q, seqlen_k))``."""
    check_reproducible(call)
    mask = dense_mask(call.q.shape[1], call.k.shape[1], call.window, device=call.q.device)
    return masked_attention(call.q, call.k, call.v, mask, call.scale, call.softcap)


def streaming_attention(call: AttentionCall, sink_size: int, recent_size: int) -> torch.Tensor:
    """What a Duo streaming head computes for ``call``: the Lambda mask (``sink_size``
    sinks + ``recent_size`` recent keys, bottom-right aligned) intersected with the
    call's own window, with its scale and softcap. ``out`` like ``call.q``."""
    check_reproducible(call)
    seqlen_q, seqlen_k, device = call.q.shape[1], call.k.shape[1], call.q.device
    mask = lambda_mask(seqlen_q, seqlen_k, sink_size, recent_size, device)
    mask &= dense_mask(seqlen_q, seqlen_k, call.window, device=device)
    return masked_attention(call.q, call.k, call.v, mask, call.scale, call.softcap)[0]


def _hidden(out: object) -> torch.Tensor:
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, torch.Tensor):
        raise ArgumentError(f"the model must return hidden states (a tensor, or a tuple starting with one), got "
                            f"{type(out).__name__}")
    return hidden


def score_heads(model: torch.nn.Module, *, vocab_size: int, seqlen: int = 256, batch: int = 4,
                seed: int = 0) -> torch.Tensor:
    """Echo/induction score per ``(layer, kv head)``: ``(num_layers, nheads_k)`` in [0, 1].

    Sequences of ``seqlen // 2`` random tokens repeated twice; for each query
    in the second copy, the attention mass on the previous occurrence of its
    token (echo) plus the one after it (induction), averaged; a kv head gets
    the highest score of its query heads.
    """
    if vocab_size < 2:
        raise ArgumentError(f"vocab_size must be >= 2, got {vocab_size}")
    half = seqlen // 2
    if half < 2:
        raise ArgumentError(f"seqlen must be >= 4, got {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab_size, (batch, half), generator=gen)
    tokens = torch.cat([first, first], dim=1)
    scores: list[torch.Tensor] = []

    def hook(call: AttentionCall) -> torch.Tensor:
        q, k = call.q, call.k
        check_reproducible(call)
        if q.shape[1] != 2 * half or k.shape[1] != 2 * half:
            # The score reads the attention of query i on key i - half: positions must be the tokens'.
            raise UnsupportedFeatureError(
                f"score_heads needs attention over the {2 * half} calibration tokens (seqlen_q = seqlen_k = "
                f"{2 * half}), got a call with seqlen_q={q.shape[1]}, seqlen_k={k.shape[1]}; use method='optimise'"
            )
        out, probs = full_attention(call)
        rows = torch.arange(half, 2 * half)
        echo = probs[:, :, rows, rows - half]
        induction = probs[:, :, rows[:-1], rows[:-1] - half + 1]
        per_head = echo.mean(dim=(0, 2)) + induction.mean(dim=(0, 2))  # (nheads,)
        group = q.shape[2] // k.shape[2]
        scores.append(per_head.view(k.shape[2], group).amax(dim=1))
        return out

    with torch.no_grad(), _intercept(hook):
        model(tokens)
    if not scores:
        raise ArgumentError("the model never called longattn.attention; its attention must go through longattn")
    return torch.stack(scores).clamp(0.0, 1.0)


def passkey_batch(vocab_size: int, seqlen: int, batch: int, gen: torch.Generator, needle_len: int = 8) -> torch.Tensor:
    """Random tokens with a needle span copied from the first quarter to the end:
    heads that fetch it from far back matter to the final positions."""
    tokens = torch.randint(0, vocab_size, (batch, seqlen), generator=gen)
    start = torch.randint(0, max(1, seqlen // 4 - needle_len), (batch,), generator=gen)
    for b in range(batch):
        tokens[b, seqlen - needle_len:] = tokens[b, start[b]: start[b] + needle_len]
    return tokens


def optimise_gates(model: torch.nn.Module, *, vocab_size: int, sink_size: int = 4, recent_size: int = 16,
                   seqlen: int = 256, batch: int = 2, steps: int = 100, lr: float = 0.02, penalty: float = 0.05,
                   seed: int = 0, progress: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """DuoAttention's gate optimisation: ``(num_layers, nheads_k)`` gates in [0, 1].

    The model's parameters are not changed (no gradient is taken for them);
    ``progress(step, loss)`` is called after every step.
    """
    gen = torch.Generator().manual_seed(seed)
    layer = {"i": 0}
    gates_holder: dict[str, torch.Tensor] = {}

    def full_hook(call: AttentionCall) -> torch.Tensor:
        layer["i"] += 1
        return full_attention(call)[0]

    def mixed_hook(call: AttentionCall) -> torch.Tensor:
        i = layer["i"]
        layer["i"] += 1
        full = full_attention(call)[0]
        stream = streaming_attention(call, sink_size, recent_size)
        alpha = gates_holder["alpha"][i].repeat_interleave(call.q.shape[2] // call.k.shape[2])  # per query head
        alpha = alpha.to(full.dtype)[None, None, :, None]
        return alpha * full + (1 - alpha) * stream

    # Count the layers (and check the model calls longattn, reproducibly) with one probe pass.
    probe = passkey_batch(vocab_size, seqlen, 1, torch.Generator().manual_seed(seed))
    heads: list[int] = []

    def count_hook(call: AttentionCall) -> torch.Tensor:
        heads.append(call.k.shape[2])
        return full_attention(call)[0]

    with torch.no_grad(), _intercept(count_hook):
        model(probe)
    if not heads:
        raise ArgumentError("the model never called longattn.attention; its attention must go through longattn")
    if len(set(heads)) != 1:
        raise ArgumentError(f"every layer must have the same number of kv heads, got {heads}")
    logits = torch.full((len(heads), heads[0]), INITIAL_GATE_LOGIT, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for step in range(steps):
            tokens = passkey_batch(vocab_size, seqlen, batch, gen)
            layer["i"] = 0
            with torch.no_grad(), _intercept(full_hook):
                target = _hidden(model(tokens)).float()
            layer["i"] = 0
            gates_holder["alpha"] = torch.sigmoid(logits)
            with _intercept(mixed_hook):
                mixed = _hidden(model(tokens)).float()
            loss = (mixed - target).pow(2).mean() + penalty * gates_holder["alpha"].mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if progress is not None:
                progress(step, float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(True)
    return torch.sigmoid(logits).detach()


def calibrate_duo(model: torch.nn.Module, *, vocab_size: int, method: str = "scores", sparsity: float = 0.5,
                  sink_size: int = 64, recent_size: int = 256, seed: int = 0, **kwargs) -> HeadPattern:
    """A :class:`HeadPattern` for ``model``: ``method="scores"`` (:func:`score_heads`)
    or ``"optimise"`` (:func:`optimise_gates`, which ``kwargs`` configure; its
    streaming heads during training use ``sink_size``/``recent_size`` capped
    to fit the calibration sequences)."""
    if method == "scores":
        gates = score_heads(model, vocab_size=vocab_size, seed=seed, **kwargs)
    elif method == "optimise":
        seqlen = kwargs.pop("seqlen", 256)
        gates = optimise_gates(model, vocab_size=vocab_size, seed=seed, seqlen=seqlen,
                               sink_size=min(sink_size, max(1, seqlen // 16)),
                               recent_size=min(recent_size, max(1, seqlen // 8)), **kwargs)
    else:
        raise ArgumentError(f"method must be 'scores' or 'optimise', got {method!r}")
    if not math.isfinite(float(gates.sum())):
        raise ArgumentError("calibration produced non-finite gates")
    return HeadPattern.from_gates(gates, sparsity, sink_size=sink_size, recent_size=recent_size)
