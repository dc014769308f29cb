"""Head identification on a tiny synthetic transformer with planted retrieval heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn.errors import ArgumentError
from longattn.sparse import HeadPattern
from longattn.sparse.calibrate import calibrate_duo, optimise_gates, score_heads

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
