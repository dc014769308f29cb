"""Double Sparsity channel calibration: planted outlier channels, rotary pairs, config files, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import longattn
from longattn.errors import ArgumentError, ShapeError, UnsupportedFeatureError
from longattn.kernels.decode.rotary import apply_rotary
from longattn.reference import attention_ref
from longattn.sparse import ChannelConfig, calibrate_channels
from longattn.sparse.channels import (
    calibrate_double_sparsity,
    capture_channel_scores,
    channel_scores,
    rank_channels,
    rotary_pairs,
)
from tests.tolerance import assert_close_to_oracle


def rope_tables(headdim: int, positions: int = 8192, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A real rotary embedding's cos/sin tables ``(positions, headdim / 2)`` (Llama's frequencies)."""
    inv_freq = base ** (-torch.arange(0, headdim, 2, dtype=torch.float64) / headdim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def planted_qk(layers_tokens, nheads, nheads_k, headdim, rotary, n_units, seed, *, scale=6.0):
    """Per layer ``(q (tokens, nheads, d), k (tokens, nheads_k, d))`` with Gaussian channels, plus
    ``n_units`` rotary pairs (or single channels for rotary="none") per kv head, different per head,
    scaled up in k and in the head's query group; with a rotary layout, every token is then rotated
    by a real rotary embedding at a random position. Returns (qs, ks, planted[layer][head] sets)."""
    gen = torch.Generator().manual_seed(seed)
    group = nheads // nheads_k
    units = rotary_pairs(headdim, rotary)
    cos, sin = rope_tables(headdim)
    qs, ks, planted = [], [], []
    for tokens in layers_tokens:
        q = torch.randn(tokens, nheads, headdim, generator=gen)
        k = torch.randn(tokens, nheads_k, headdim, generator=gen)
        layer_planted = []
        for h in range(nheads_k):
            chosen = torch.randperm(len(units), generator=gen)[:n_units].tolist()
            channels = [c for u in chosen for c in units[u]]
            layer_planted.append(set(channels))
            k[:, h, channels] *= scale
            q[:, h * group:(h + 1) * group, channels] *= scale
        if rotary != "none":
            pos = torch.randint(0, cos.shape[0], (1, tokens), generator=gen)
            q = apply_rotary(q[None], cos, sin, pos, rotary == "interleaved")[0]
            k = apply_rotary(k[None], cos, sin, pos, rotary == "interleaved")[0]
        qs.append(q)
        ks.append(k)
        planted.append(layer_planted)
    return qs, ks, planted


@pytest.mark.parametrize("rotary", ["half", "interleaved", "none"])
@pytest.mark.parametrize("method", ["qk", "q", "k"])
@pytest.mark.parametrize("nheads,nheads_k,headdim", [(8, 2, 32), (6, 6, 24), (4, 1, 16)])
def test_calibration_recovers_planted_outlier_channels(rotary, method, nheads, nheads_k, headdim):
    n_units = 2 if rotary != "none" else 3
    r = n_units * (2 if rotary != "none" else 1)
    # Token counts differ between layers (the list form).
    qs, ks, planted = planted_qk([300, 200, 257], nheads, nheads_k, headdim, rotary, n_units, seed=headdim + nheads)
    config = calibrate_channels(qs, ks, r, method=method, rotary=rotary)
    assert (config.num_layers, config.nheads_k, config.headdim, config.r) == (3, nheads_k, headdim, r)
    assert (config.rotary, config.method) == (rotary, method)
    for i in range(3):
        channels = config.layer(i)
        assert channels.shape == (nheads_k, r) and channels.dtype == torch.int64
        for h in range(nheads_k):
            assert set(channels[h].tolist()) == planted[i][h], (i, h)
    if nheads_k > 1:  # different per head, and found per head
        assert len({frozenset(p) for p in planted[0]}) > 1


def test_pair_scores_keep_rotated_outliers_that_single_channels_would_split():
    # One planted pair per kv head, rotated at random positions: its energy moves between the two
    # channels. Ranked by pairs, the top 2 is exactly that pair; ranked by single channels (a model
    # treated as rotary-free), the same scores still find it, but the pair layout guarantees whole pairs.
    headdim = 16
    for rotary in ("half", "interleaved"):
        qs, ks, planted = planted_qk([400], 4, 2, headdim, rotary, 1, seed=7, scale=5.0)
        config = calibrate_channels(qs, ks, 2, rotary=rotary)
        partner = {a: b for a, b in rotary_pairs(headdim, rotary)} | {b: a for a, b in rotary_pairs(headdim, rotary)}
        for h in range(2):
            assert set(config.layer(0)[h].tolist()) == planted[0][h]
            ranking = config.ranking[0][h]
            assert all(partner[ranking[j]] == ranking[j + 1] for j in range(0, headdim, 2))


def test_qk_pair_score_is_rotation_invariant():
    # For aligned q and k components in one pair, |q_a k_a| + |q_b k_b| = |Q K| (cos^2 + sin^2): the summed
    # qk score of a rotary pair does not depend on the positions at which it was rotated.
    headdim, tokens = 8, 64
    q = torch.zeros(tokens, 1, headdim, dtype=torch.float64)
    k = torch.zeros(tokens, 1, headdim, dtype=torch.float64)
    q[:, 0, 1], k[:, 0, 1] = 3.0, 2.0  # channel 1 pairs with 5 under "half"
    cos, sin = rope_tables(headdim)
    base = channel_scores(q, k, "qk")
    for seed in range(3):
        pos = torch.randint(0, cos.shape[0], (1, tokens), generator=torch.Generator().manual_seed(seed))
        qr = apply_rotary(q[None].float(), cos, sin, pos, False)[0].double()
        kr = apply_rotary(k[None].float(), cos, sin, pos, False)[0].double()
        s = channel_scores(qr, kr, "qk")
        assert math.isclose(float(s[0, 1] + s[0, 5]), float(base[0, 1]), rel_tol=1e-5)


def test_ranking_rules_pairs_and_ties():
    # headdim 8. Channel 0 alone scores 8 (its "half" partner 4 scores 0); channels 1 and 5 score 5 each
    # (pair sum 10, interleaved pair (0, 1) sums 13); everything else 1 (pairs sum 2: ties -> lower index).
    scores = torch.tensor([[8.0, 5.0, 1.0, 1.0, 0.0, 5.0, 1.0, 1.0]])
    assert rank_channels(scores, "none") == [[0, 1, 5, 2, 3, 6, 7, 4]]
    assert rank_channels(scores, "half") == [[1, 5, 0, 4, 2, 6, 3, 7]]
    assert rank_channels(scores, "interleaved") == [[0, 1, 5, 4, 2, 3, 6, 7]]
    config = ChannelConfig.from_scores(scores[None], 2, method="q", rotary="half")
    assert config.layer(0).tolist() == [[1, 5]]  # the whole pair, not the single loudest channel
    assert config.layer(0, r=4).tolist() == [[1, 5, 0, 4]]
    assert ChannelConfig.from_scores(scores[None], 1, rotary="none").layer(0).tolist() == [[0]]


def test_qk_scores_the_product_not_the_query_alone():
    # Channel 2 is loud in q but silent in k: "q" ranks it first, "qk" does not.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(100, 2, 8, generator=gen)
    k = torch.randn(100, 1, 8, generator=gen)
    q[:, :, 2] *= 20
    k[:, :, 2] = 0
    q[:, :, 6] *= 3
    k[:, :, 6] *= 3
    assert calibrate_channels([q], [k], 1, method="q", rotary="none").layer(0).tolist() == [[2]]
    assert calibrate_channels([q], [k], 1, method="qk", rotary="none").layer(0).tolist() == [[6]]
    assert calibrate_channels([q], [k], 1, method="k", rotary="none").layer(0).tolist() == [[6]]
    # The group mean: a kv head's score averages its query heads (q head 0 and 1 both belong to kv head 0).
    s = channel_scores(q, k, "q")
    assert torch.allclose(s[0], q.double().abs().mean(dim=(0, 1)))


def test_tensor_and_list_inputs_agree_and_are_deterministic():
    qs, ks, _ = planted_qk([128, 128], 4, 2, 16, "half", 2, seed=11)
    a = calibrate_channels(torch.stack(qs), torch.stack(ks), 4)
    b = calibrate_channels(qs, ks, 4)
    assert a == b and a == calibrate_channels(qs, ks, 4)
    half = calibrate_channels([x.half() for x in qs], [x.half() for x in ks], 4)
    assert half.layer(0).shape == (2, 4)


@pytest.mark.parametrize("bad,error,match", [
    (dict(r=0), ArgumentError, "r must be an int >= 1"),
    (dict(method="qkv"), ArgumentError, "method"),
    (dict(rotary="neox"), ArgumentError, "rotary"),
    (dict(r=3), ArgumentError, "even"),
    (dict(r=17), ArgumentError, "r must be an int in"),
    (dict(k=[torch.randn(5, 2, 16)] * 2), ShapeError, "layer 0: k must have q's tokens"),
    (dict(k=[torch.randn(10, 3, 16)] * 2), ShapeError, "not a multiple"),
    (dict(k=[torch.randn(10, 2, 16)]), ShapeError, "q has 2 layers but k has 1"),
    (dict(q=[torch.randn(10, 4, 16), torch.randn(10, 4, 8)], k=[torch.randn(10, 2, 16), torch.randn(10, 2, 8)]),
     ShapeError, "every layer"),
    (dict(q=[torch.full((10, 4, 16), float("nan"))] * 2), ArgumentError, "finite"),
    (dict(q="q"), longattn.errors.DTypeError, "q must be a tensor"),
    (dict(q=[]), ShapeError, "at least one layer"),
])
def test_bad_calibration_inputs_are_named_errors(bad, error, match):
    kwargs = dict(q=[torch.randn(10, 4, 16)] * 2, k=[torch.randn(10, 2, 16)] * 2, r=4, method="qk", rotary="half")
    kwargs.update(bad)
    with pytest.raises(error, match=match):
        calibrate_channels(**kwargs)


def test_rotary_layout_needs_an_even_headdim():
    with pytest.raises(ShapeError, match="headdim must be even"):
        calibrate_channels([torch.randn(4, 1, 5)], [torch.randn(4, 1, 5)], 2, rotary="half")
    assert calibrate_channels([torch.randn(4, 1, 5)], [torch.randn(4, 1, 5)], 3, rotary="none").layer(0).shape == (1, 3)


# --- the config -----------------------------------------------------------------------------------------------------

def small_config(rotary="half", r=2, scores=True) -> ChannelConfig:
    gen = torch.Generator().manual_seed(5)
    s = torch.rand(2, 3, 8, generator=gen, dtype=torch.float64)
    config = ChannelConfig.from_scores(s, r, method="qk", rotary=rotary)
    return config if scores else ChannelConfig(config.ranking, r, rotary, "qk")


@pytest.mark.parametrize("rotary", ["half", "interleaved", "none"])
@pytest.mark.parametrize("scores", [True, False])
def test_json_round_trip(tmp_path, rotary, scores):
    config = small_config(rotary, scores=scores)
    path = tmp_path / "channels.json"
    config.save(path)
    loaded = ChannelConfig.load(path, num_layers=2, nheads_k=3, headdim=8)
    assert loaded == config
    assert torch.equal(loaded.layer(1, r=4), config.layer(1, r=4))
    assert json.loads(path.read_text())["format"] == "longattn.ChannelConfig"  # JSON, not pickle


@pytest.mark.parametrize("which,value", [("num_layers", 3), ("nheads_k", 2), ("headdim", 16)])
def test_load_checks_the_model(tmp_path, which, value):
    path = tmp_path / "c.json"
    small_config().save(path)
    with pytest.raises(ShapeError, match=f"{which} = .*the model has {value}"):
        ChannelConfig.load(path, **{which: value})


def _mutations():
    """(name, edit of the JSON dict, field the error must name)."""
    def set_(key, value):
        return lambda d: d.__setitem__(key, value)

    def drop(key):
        return lambda d: d.pop(key)

    def rank(i, h, row):
        return lambda d: d["ranking"][i].__setitem__(h, row)

    def score(i, h, row):
        return lambda d: d["scores"][i].__setitem__(h, row)

    yield "wrong format", set_("format", "longattn.HeadPattern"), "format"
    yield "no format", drop("format"), "format"
    yield "future version", set_("version", 2), "version"
    yield "string version", set_("version", "1"), "version"
    yield "bool version", set_("version", True), "version"
    yield "float version", set_("version", 1.0), "version"
    for key in ("num_layers", "nheads_k", "headdim", "r", "rotary", "method", "ranking", "scores"):
        yield f"missing {key}", drop(key), key
    yield "unknown field", set_("channels", []), "channels"
    for key in ("num_layers", "nheads_k", "headdim"):
        yield f"{key} zero", set_(key, 0), key
        yield f"{key} string", set_(key, "2"), key
        yield f"{key} bool", set_(key, True), key
    yield "num_layers disagrees", set_("num_layers", 3), "num_layers"
    yield "nheads_k disagrees", set_("nheads_k", 2), "nheads_k"
    yield "headdim disagrees", set_("headdim", 6), "headdim"
    yield "r zero", set_("r", 0), "r"
    yield "r odd under a rotary layout", set_("r", 3), "r"
    yield "r above headdim", set_("r", 10), "r"
    yield "r float", set_("r", 2.0), "r"
    yield "r bool", set_("r", True), "r"
    yield "r string", set_("r", "2"), "r"
    yield "rotary unknown", set_("rotary", "neox"), "rotary"
    yield "rotary bool", set_("rotary", False), "rotary"
    yield "method unknown", set_("method", "qkv"), "method"
    yield "method null", set_("method", None), "method"
    yield "ranking not a list", set_("ranking", {"0": 1}), "ranking"
    yield "ranking layer not a list", lambda d: d["ranking"].__setitem__(0, 5), "ranking"
    yield "ranking head short", rank(0, 1, [0, 4, 1, 5]), "ranking"
    yield "ranking duplicate", rank(1, 2, [0, 4, 0, 4, 2, 6, 3, 7]), "ranking"
    yield "ranking out of range", rank(1, 0, [0, 4, 1, 5, 2, 6, 3, 8]), "ranking"
    yield "ranking bool", rank(0, 0, [False, 4, 1, 5, 2, 6, 3, 7]), "ranking"
    yield "ranking float", rank(0, 0, [0.0, 4, 1, 5, 2, 6, 3, 7]), "ranking"
    yield "ranking string", rank(0, 0, ["0", 4, 1, 5, 2, 6, 3, 7]), "ranking"
    yield "ranking splits a pair", rank(0, 0, [0, 1, 4, 5, 2, 6, 3, 7]), "ranking"
    yield "scores not a list", set_("scores", 1.0), "scores"
    yield "scores head short", score(0, 0, [1.0] * 7), "scores"
    yield "scores negative", score(0, 0, [1.0] * 7 + [-1.0]), "scores"
    yield "scores nan", score(1, 1, [float("nan")] * 8), "scores"
    yield "scores infinite", score(1, 1, [float("inf")] * 8), "scores"
    yield "scores string", score(1, 1, ["1"] * 8), "scores"
    yield "scores bool", score(1, 1, [True] * 8), "scores"


MUTATIONS = list(_mutations())


@pytest.mark.parametrize("name,edit,field", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_every_malformed_field_is_a_named_error(tmp_path, name, edit, field):
    path = tmp_path / "bad.json"
    data = small_config().to_json()
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ArgumentError) as info:
        ChannelConfig.load(path)
    message = str(info.value)
    assert str(path) in message and f'field "{field}"' in message, message


@pytest.mark.parametrize("content", [b"{not json", b"\x80\x04\x95pickle", b"[1, 2]", b"null"])
def test_not_a_config_file_is_a_named_error(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ArgumentError, match="not a ChannelConfig file"):
        ChannelConfig.load(path)
    with pytest.raises(ArgumentError, match="cannot read"):
        ChannelConfig.load(tmp_path / "missing.json")


def test_constructor_and_layer_checks():
    config = small_config()
    with pytest.raises(ArgumentError, match="layer_idx"):
        config.layer(2)
    with pytest.raises(ArgumentError, match="layer_idx"):
        config.layer(True)
    with pytest.raises(ArgumentError, match="even"):
        config.layer(0, r=3)
    with pytest.raises(ArgumentError, match=r"\[1, headdim=8\]"):
        config.layer(0, r=10)
    assert config.layer(0, r=8).shape == (3, 8)
    with pytest.raises(ArgumentError, match="\"ranking\" must be a non-empty tuple"):
        ChannelConfig([[list(range(8))]], 2)
    with pytest.raises(ShapeError, match="layer 1 has 1 kv heads"):
        ChannelConfig(((tuple(range(8)), tuple(range(8))), (tuple(range(8)),)), 2, "none")
    with pytest.raises(ArgumentError, match="splits a rotary pair"):
        ChannelConfig(((tuple(range(8)),),), 2, "half")
    assert ChannelConfig(((tuple(range(8)),),), 2, "interleaved").layer(0).tolist() == [[0, 1]]
    with pytest.raises(ShapeError, match="scores"):
        ChannelConfig(((tuple(range(8)),),), 2, "none", "qk", ((1.0,) * 8,))
    with pytest.raises(ArgumentError, match="ChannelConfig field \"method\""):
        ChannelConfig(((tuple(range(8)),),), 2, "none", "kq")


def test_for_layer_builds_double_sparsity():
    try:
        from longattn.sparse.double_sparsity import DoubleSparsity
    except ImportError as exc:
        pytest.skip(f"longattn.sparse.double_sparsity (DoubleSparsity, issue 12 item 4) is not importable yet: {exc}")
    config = small_config()
    ds = config.for_layer(1, token_budget=64, r=4)
    assert isinstance(ds, DoubleSparsity)
    assert torch.equal(torch.as_tensor(ds.channels), config.layer(1, 4))
    assert ds.token_budget == 64
    assert torch.equal(torch.as_tensor(config.for_layer(0).channels), config.layer(0))


# --- capture from a model, and the CLI ------------------------------------------------------------------------------

VOCAB, LAYERS, HEADS, KV_HEADS, D = 32, 2, 4, 2, 16
GROUP = HEADS // KV_HEADS
# Per (layer, kv head): the "half" rotary pair index i (channels i and i + D/2) made an outlier.
TINY_PLANTED = {(0, 0): (1, 6), (0, 1): (3, 0), (1, 0): (7, 2), (1, 1): (5, 4)}


class TinyRotaryModel(torch.nn.Module):
    """Embedding -> per layer q/k/v projections, a Llama-style ("half") rotary embedding of q and k, GQA
    attention through longattn. The q/k projections of each kv head (and its query group) amplify two
    planted rotary pairs; ``outputs`` keeps every attention output (to compare with the oracle)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        width = HEADS * D
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, width, generator=gen))
        self.wq = torch.nn.Parameter(torch.randn(LAYERS, width, HEADS, D, generator=gen) / width ** 0.5)
        self.wk = torch.nn.Parameter(torch.randn(LAYERS, width, KV_HEADS, D, generator=gen) / width ** 0.5)
        self.wv = torch.nn.Parameter(torch.randn(LAYERS, width, KV_HEADS, D, generator=gen) / width ** 0.5)
        with torch.no_grad():
            for (layer, h), pairs in TINY_PLANTED.items():
                channels = [c for p in pairs for c in (p, p + D // 2)]
                self.wk[layer, :, h, channels] *= 6
                self.wq[layer, :, h * GROUP:(h + 1) * GROUP, channels] *= 6
        cos, sin = rope_tables(D, 512)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.outputs: list[tuple[torch.Tensor, ...]] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, seqlen = tokens.shape
        pos = torch.arange(seqlen).expand(batch, -1)
        h = self.embed[tokens]
        for layer in range(LAYERS):
            q = apply_rotary(torch.einsum("bsw,whd->bshd", h, self.wq[layer]), self.cos, self.sin, pos, False)
            k = apply_rotary(torch.einsum("bsw,whd->bshd", h, self.wk[layer]), self.cos, self.sin, pos, False)
            v = torch.einsum("bsw,whd->bshd", h, self.wv[layer])
            out = longattn.attention(q, k, v, causal=True)
            self.outputs.append((q, k, v, out))
            h = h + out.reshape(batch, seqlen, -1)
        return h


def make_tiny_model() -> TinyRotaryModel:
    return TinyRotaryModel()


def _planted_channels(layer: int, h: int) -> set[int]:
    return {c for p in TINY_PLANTED[(layer, h)] for c in (p, p + D // 2)}


def test_capture_from_a_model_finds_the_planted_pairs_and_runs_it_unchanged():
    model = TinyRotaryModel()
    config = calibrate_double_sparsity(model, vocab_size=VOCAB, r=4, rotary="half", seqlen=48, batch=2, seed=1)
    assert (config.num_layers, config.nheads_k, config.headdim) == (LAYERS, KV_HEADS, D)
    for layer in range(LAYERS):
        for h in range(KV_HEADS):
            assert set(config.layer(layer)[h].tolist()) == _planted_channels(layer, h)
    # The calibration run's attention is the call's own (dense, causal) attention.
    assert len(model.outputs) == LAYERS
    for q, k, v, out in model.outputs:
        oracle = attention_ref(q, k, v, causal=True)
        oracle = oracle[0] if isinstance(oracle, tuple) else oracle
        assert_close_to_oracle(out, oracle, oracle)
    again = capture_channel_scores(TinyRotaryModel(), vocab_size=VOCAB, seqlen=48, batch=2, seed=1)
    assert torch.equal(torch.tensor(config.scores, dtype=torch.float64), again)  # deterministic for a seed


def test_capture_refuses_what_it_cannot_score():
    class NoAttention(torch.nn.Module):
        def forward(self, tokens):
            return tokens.float()

    class Sparse(torch.nn.Module):
        def forward(self, tokens):
            x = torch.randn(1, 8, 1, 8)
            return longattn.attention(x, x, x, causal=True, sparse=longattn.sparse.Streaming(1, 2))

    class MoreQueries(torch.nn.Module):
        def forward(self, tokens):
            return longattn.attention(torch.randn(1, 8, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))

    with pytest.raises(ArgumentError, match="never called longattn.attention"):
        capture_channel_scores(NoAttention(), vocab_size=4, seqlen=8)
    with pytest.raises(UnsupportedFeatureError, match="sparse=Streaming"):
        capture_channel_scores(Sparse(), vocab_size=4, seqlen=8)
    with pytest.raises(UnsupportedFeatureError, match="seqlen_q=8 > seqlen_k=4"):
        capture_channel_scores(MoreQueries(), vocab_size=4, seqlen=8)
    with pytest.raises(ArgumentError, match="vocab_size"):
        capture_channel_scores(NoAttention(), vocab_size=0)


def test_cli_writes_a_loadable_config(tmp_path, capsys):
    from longattn.cli import main

    out = tmp_path / "channels.json"
    args = ["calibrate", "double-sparsity", "--model", "tests.sparse.test_channels:make_tiny_model",
            "--vocab-size", str(VOCAB), "--r", "4", "--method", "qk", "--rotary", "half", "--seqlen", "48",
            "--batch", "2", "--seed", "1", "--out", out]
    assert main(args) == 0
    config = ChannelConfig.load(out, num_layers=LAYERS, nheads_k=KV_HEADS, headdim=D)
    assert (config.r, config.rotary, config.method) == (4, "half", "qk")
    for layer in range(LAYERS):
        assert config.layer(layer).shape == (KV_HEADS, 4)
        for h in range(KV_HEADS):
            assert set(config.layer(layer)[h].tolist()) == _planted_channels(layer, h)
    printed = capsys.readouterr().out
    assert "2 layers x 2 kv heads x headdim 16" in printed and str(out) in printed
    # Bad arguments are usage errors (exit status 2) with the library's message.
    bad_r = [a if a != "4" else "3" for a in args]
    assert main(bad_r) == 2
    assert "even" in capsys.readouterr().err
    assert main([a if a != "4" else "64" for a in args]) == 2
    assert main(["calibrate", "double-sparsity", "--model", "no.such:thing", "--vocab-size", "8", "--r", "2",
                 "--rotary", "none", "--out", out]) == 2
    with pytest.raises(SystemExit):  # argparse: the rotary layout must be given
        main(["calibrate", "double-sparsity", "--model", "x:y", "--vocab-size", "8", "--r", "2", "--out", out])
