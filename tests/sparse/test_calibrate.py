"""Head identification on a tiny synthetic transformer with planted retrieval heads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.hooks import ATTENTION_HOOK, AttentionCall
from longattn.reference import attention_ref
from longattn.sparse import HeadPattern, Streaming
from longattn.sparse.calibrate import (
    INITIAL_GATE_LOGIT,
    calibrate_duo,
    full_attention,
    optimise_gates,
    score_heads,
    streaming_attention,
)
from longattn.sparse.streaming import lambda_mask
from tests.tolerance import assert_close_to_oracle, max_error

VOCAB, LAYERS, HEADS, D = 64, 3, 4, 16
PLANTED = {(0, 1), (1, 3), (2, 0)}  # (layer, kv head) retrieval heads; the others are local


class TinyModel(torch.nn.Module):
    """Retrieval heads are induction heads (query: the current token; key: the
    previous token), which copy from wherever the current token last appeared;
    local heads attend by position to the last few tokens. Values carry the
    hidden state, so a head's choice reaches the output."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tok = torch.nn.Parameter(F.normalize(torch.randn(VOCAB, D, generator=gen), dim=-1) * 4)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, HEADS * D, generator=gen) * 0.5)
        angles = torch.arange(4096)[:, None] * (0.3 / (1 + torch.arange(D // 2)))[None, :]
        self.register_buffer("pos", torch.cat([angles.cos(), angles.sin()], dim=1) * 1.5)
        self.mix = torch.nn.Parameter(torch.randn(LAYERS, HEADS * D, HEADS * D, generator=gen) * 0.2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, seqlen = tokens.shape
        h = self.embed[tokens]
        prev = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)
        for layer in range(LAYERS):
            qs, ks = [], []
            for head in range(HEADS):
                if (layer, head) in PLANTED:
                    qs.append(self.tok[tokens] * 4)
                    ks.append(self.tok[prev])
                else:
                    qs.append(self.pos[:seqlen].expand(batch, -1, -1) * 3)
                    ks.append(self.pos[:seqlen].expand(batch, -1, -1))
            q, k = torch.stack(qs, dim=2), torch.stack(ks, dim=2)
            v = h.view(batch, seqlen, HEADS, D)
            out = longattn.attention(q, k, v, causal=True)
            h = h + torch.tanh(out.reshape(batch, seqlen, -1) @ self.mix[layer])
        return h


def _top(scores: torch.Tensor, n: int) -> set[tuple[int, int]]:
    flat = scores.flatten().argsort(descending=True)[:n].tolist()
    return {(i // HEADS, i % HEADS) for i in flat}


def test_training_free_scores_rank_the_planted_heads_first():
    scores = score_heads(TinyModel(), vocab_size=VOCAB, seqlen=128, seed=1)
    assert scores.shape == (LAYERS, HEADS)
    assert _top(scores, len(PLANTED)) == PLANTED
    assert torch.equal(scores, score_heads(TinyModel(), vocab_size=VOCAB, seqlen=128, seed=1))  # deterministic


def test_gate_optimisation_ranks_the_planted_heads_first():
    model = TinyModel()
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    gates = optimise_gates(model, vocab_size=VOCAB, seqlen=128, sink_size=2, recent_size=8, steps=40, lr=0.05,
                           seed=2, progress=lambda step, loss: losses.append(loss))
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert _top(gates, len(PLANTED)) == PLANTED
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is not trained
    assert all(p.requires_grad for p in model.parameters())


def test_calibrate_duo_writes_a_pattern_with_the_planted_heads_as_retrieval(tmp_path):
    pattern = calibrate_duo(TinyModel(), vocab_size=VOCAB, method="scores", sparsity=0.75, sink_size=4,
                            recent_size=16, seed=1, seqlen=128)
    retrieval = {(layer, head) for layer in range(LAYERS) for head in range(HEADS) if pattern.retrieval[layer][head]}
    assert retrieval == PLANTED
    pattern.save(tmp_path / "p.json")
    assert HeadPattern.load(tmp_path / "p.json", num_layers=LAYERS, nheads_k=HEADS) == pattern


def test_a_model_that_does_not_call_longattn_is_a_clear_error():
    class NoAttention(torch.nn.Module):
        def forward(self, tokens):
            return tokens.float()[..., None]

    with pytest.raises(ArgumentError, match="never called longattn.attention"):
        score_heads(NoAttention(), vocab_size=8, seqlen=16)
    with pytest.raises(ArgumentError, match="method"):
        calibrate_duo(NoAttention(), vocab_size=8, method="guess")


def make_tiny_model() -> TinyModel:
    return TinyModel()


@pytest.mark.parametrize("how", ["scores", "optimise"])
def test_cli_writes_a_pattern(tmp_path, capsys, how):
    from longattn.cli import main

    out = tmp_path / "pattern.json"
    args = ["calibrate", "duo", "--model", "tests.sparse.test_calibrate:make_tiny_model", "--vocab-size", str(VOCAB),
            "--how", how, "--sparsity", "0.75", "--sink-size", "2", "--window-size", "8", "--seqlen", "128",
            "--steps", "40", "--seed", "2", "--out", out]
    assert main(args) == 0
    pattern = HeadPattern.load(out, num_layers=LAYERS, nheads_k=HEADS)
    retrieval = {(layer, head) for layer in range(LAYERS) for head in range(HEADS) if pattern.retrieval[layer][head]}
    assert retrieval == PLANTED
    assert "25% retrieval" in capsys.readouterr().out
    assert main(["calibrate", "duo", "--model", "no.such:thing", "--vocab-size", "8", "--out", out]) == 2
    capsys.readouterr()
    missing = str(tmp_path / "no-such-dir" / "p.json")
    assert main(["calibrate", "duo", "--model", "tests.sparse.test_calibrate:make_tiny_model", "--vocab-size",
                 str(VOCAB), "--out", missing]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- calibration computes the attention the model's calls ask for -------------------------------------------------

OPT_HEADS, OPT_KV, OPT_D, OPT_SEQ = 4, 2, 16, 32
# Per layer, the options of its longattn.attention call: a sliding window with a softcap and a custom scale, then
# a softcap with another scale (GQA, 2 query heads per kv head, in both).
LAYER_OPTIONS = [
    {"window_size": (9, 0), "softcap": 3.0, "softmax_scale": 0.7},
    {"softcap": 2.0, "softmax_scale": 1.3},
]
SINK, RECENT = 2, 4  # streaming side: the Lambda mask cuts into layer 0's window and into layer 1's full rows


class OptionsModel(torch.nn.Module):
    """Layers that call ``longattn.attention`` with a window / softcap / scale,
    recording ``(layer, q, k, v, out)`` of every call (``out`` is what the call
    returned, i.e. what calibration's hook computed)."""

    def __init__(self, *, causal: bool = True, sparse: object | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        width = OPT_HEADS * OPT_D
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, width, generator=gen))
        self.wq = torch.nn.Parameter(torch.randn(len(LAYER_OPTIONS), width, width, generator=gen) * 0.4)
        self.wk = torch.nn.Parameter(torch.randn(len(LAYER_OPTIONS), width, OPT_KV * OPT_D, generator=gen) * 0.4)
        self.wv = torch.nn.Parameter(torch.randn(len(LAYER_OPTIONS), width, OPT_KV * OPT_D, generator=gen) * 0.2)
        self.wo = torch.nn.Parameter(torch.randn(len(LAYER_OPTIONS), width, width, generator=gen) * 0.1)
        self.causal, self.sparse = causal, sparse
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, seqlen = tokens.shape
        h = self.embed[tokens]
        for layer, options in enumerate(LAYER_OPTIONS):
            q = (h @ self.wq[layer]).view(batch, seqlen, OPT_HEADS, OPT_D)
            k = (h @ self.wk[layer]).view(batch, seqlen, OPT_KV, OPT_D)
            v = (h @ self.wv[layer]).view(batch, seqlen, OPT_KV, OPT_D)
            out = longattn.attention(q, k, v, causal=self.causal, sparse=self.sparse, **options)
            self.calls.append((layer, q.detach(), k.detach(), v.detach(), out.detach()))
            h = h + out.reshape(batch, seqlen, -1) @ self.wo[layer]
        return h


def _assert_full_attention_of_the_call(layer, q, k, v, out):
    """``out`` is the attention the layer's call asks for (oracle), as close as the eager twin
    of longattn.attention gets; and it differs from plain causal attention (so the options matter)."""
    options = LAYER_OPTIONS[layer]
    oracle, _ = attention_ref(q, k, v, causal=True, **options)
    eager = longattn.attention(q, k, v, causal=True, backend="eager", **options)
    assert_close_to_oracle(out, oracle, eager, name=f"layer {layer}")
    plain, _ = attention_ref(q, k, v, causal=True)
    assert max_error(out, plain) > 1e-2, f"layer {layer}: its options do not change the attention; test is vacuous"


def test_score_heads_computes_the_attention_each_call_asks_for():
    model = OptionsModel()
    scores = score_heads(model, vocab_size=VOCAB, seqlen=OPT_SEQ, batch=2, seed=0)
    assert scores.shape == (len(LAYER_OPTIONS), OPT_KV)
    assert [c[0] for c in model.calls] == [0, 1]
    for call in model.calls:
        _assert_full_attention_of_the_call(*call)


def test_gate_optimisation_full_and_streaming_sides_honour_the_call_options():
    model = OptionsModel()
    optimise_gates(model, vocab_size=VOCAB, seqlen=OPT_SEQ, batch=2, sink_size=SINK, recent_size=RECENT, steps=1,
                   seed=0)
    layers = len(LAYER_OPTIONS)
    # One probe pass and the full-attention target pass, then the mixed pass of the single step.
    assert [c[0] for c in model.calls] == list(range(layers)) * 3
    for call in model.calls[: 2 * layers]:
        _assert_full_attention_of_the_call(*call)
    alpha = torch.sigmoid(torch.tensor(INITIAL_GATE_LOGIT, dtype=torch.float64))  # every gate, before the step
    for layer, q, k, v, out in model.calls[2 * layers:]:
        options = LAYER_OPTIONS[layer]
        full, _ = attention_ref(q, k, v, causal=True, **options)
        # the streaming side: the Lambda mask intersected with the layer's own window, same softcap and scale
        stream, _ = attention_ref(q, k, v, causal=True, mask=lambda_mask(OPT_SEQ, OPT_SEQ, SINK, RECENT), **options)
        assert max_error(stream, full) > 1e-2, f"layer {layer}: the Lambda mask cuts nothing; test is vacuous"
        expected = alpha * full + (1 - alpha) * stream
        assert_close_to_oracle(out, expected, expected, name=f"mixed layer {layer}")


def test_the_hook_sees_every_option_of_the_call():
    seen: list[AttentionCall] = []

    def hook(call: AttentionCall) -> torch.Tensor:
        seen.append(call)
        return torch.zeros_like(call.q)

    q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    streaming = Streaming(sink_size=1, recent_size=2)
    token = ATTENTION_HOOK.set(hook)
    try:
        longattn.attention(q, k, v, causal=True, softmax_scale=0.5, window_size=(3, -1), softcap=4.0, backend="eager")
        longattn.attention(q, k, v, sparse=streaming)
    finally:
        ATTENTION_HOOK.reset(token)
    first, second = seen
    assert first.q is q and first.k is k and first.v is v
    assert (first.causal, first.scale, first.window, first.softcap, first.sparse, first.backend) == (
        True, 0.5, (3, 0), 4.0, None, "eager")  # the effective window: causal folded in
    assert (second.causal, second.scale, second.window, second.softcap, second.sparse, second.backend) == (
        False, 8 ** -0.5, (-1, -1), 0.0, streaming, "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.softcap = 0.0


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(6, 6), (3, 9), (9, 4)])  # (9, 4): the first rows see nothing
def test_full_and_streaming_attention_match_the_oracle_for_any_alignment(seqlen_q, seqlen_k):
    gen = torch.Generator().manual_seed(seqlen_q * 10 + seqlen_k)
    q = torch.randn(2, seqlen_q, 4, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, seqlen_k, 1, 8, generator=gen)
    v = torch.randn(2, seqlen_k, 1, 8, generator=gen)
    call = AttentionCall(q, k, v, causal=True, scale=0.9, window=(2, 0), softcap=1.5)
    out, probs = full_attention(call)
    oracle, _ = attention_ref(q, k, v, causal=True, window_size=(2, 0), softcap=1.5, softmax_scale=0.9)
    assert_close_to_oracle(out, oracle, oracle)
    stream = streaming_attention(call, 1, 2)
    mask = lambda_mask(seqlen_q, seqlen_k, 1, 2)
    stream_oracle, _ = attention_ref(q, k, v, causal=True, window_size=(2, 0), softcap=1.5, softmax_scale=0.9,
                                     mask=mask)
    assert_close_to_oracle(stream, stream_oracle, stream_oracle)
    (out.sum() + stream.sum()).backward()
    assert torch.isfinite(q.grad).all()  # empty rows give zeros, not NaN, in both directions
    assert torch.isfinite(probs).all()


def test_a_layer_that_already_runs_a_sparse_method_is_refused():
    model = OptionsModel(sparse=Streaming(sink_size=2, recent_size=8))
    with pytest.raises(UnsupportedFeatureError, match=r"sparse=Streaming"):
        score_heads(model, vocab_size=VOCAB, seqlen=OPT_SEQ)
    with pytest.raises(UnsupportedFeatureError, match=r"sparse=Streaming"):
        optimise_gates(model, vocab_size=VOCAB, seqlen=OPT_SEQ, steps=1)
    with pytest.raises(UnsupportedFeatureError, match=r"sparse=Streaming"):
        calibrate_duo(model, vocab_size=VOCAB, method="optimise", seqlen=OPT_SEQ, steps=1)


def test_a_non_causal_layer_is_refused():
    model = OptionsModel(causal=False)
    with pytest.raises(UnsupportedFeatureError, match=r"causal=False"):
        score_heads(model, vocab_size=VOCAB, seqlen=OPT_SEQ)
    with pytest.raises(UnsupportedFeatureError, match=r"causal=False"):
        optimise_gates(model, vocab_size=VOCAB, seqlen=OPT_SEQ, steps=1)


def test_score_heads_refuses_attention_not_over_the_calibration_tokens():
    class Prefixed(torch.nn.Module):  # attends over 3 extra memory keys: positions are not the tokens'
        def forward(self, tokens):
            q = torch.randn(tokens.shape[0], tokens.shape[1], 2, 8)
            k = torch.randn(tokens.shape[0], tokens.shape[1] + 3, 2, 8)
            return longattn.attention(q, k, k, causal=True)

    with pytest.raises(UnsupportedFeatureError, match="seqlen_k=19"):
        score_heads(Prefixed(), vocab_size=8, seqlen=16)
