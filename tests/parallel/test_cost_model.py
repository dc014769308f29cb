"""The sequence-parallel cost model: closed forms vs counting, bytes, profiles, fits, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from longattn.cli import main
from longattn.errors import ArgumentError
from longattn.parallel.cost_model import (
    PRESETS, Link, Profile, _processor_sharing, bytes_sent, fit_line, fit_link, load_profile, predict,
    save_profile, scorer_pairs, step_pairs,
)

# --- counting pairs ------------------------------------------------------------------------------------------


def _positions(n: int, r: int, local: int, layout: str) -> list[int]:
    """Global positions of rank r's local tokens (contiguous: block r; zigzag: chunks r and 2n-1-r)."""
    if layout == "contiguous":
        return list(range(r * local, (r + 1) * local))
    half = local // 2
    return list(range(r * half, (r + 1) * half)) + list(range((2 * n - 1 - r) * half, (2 * n - r) * half))


def _visible(qpos: list[int], kpos: list[int], causal: bool) -> int:
    return sum(1 for p in qpos for t in kpos if not causal or t <= p)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ring_and_zigzag_pairs_equal_counting(n, causal):
    local = 6
    T = n * local
    for method, layout in (("ring", "contiguous"), ("zigzag", "zigzag")):
        for r in range(n):
            counted = [_visible(_positions(n, r, local, layout), _positions(n, (r - s) % n, local, layout), causal)
                       for s in range(n)]
            assert step_pairs(method, T, n, r, causal=causal) == counted, (method, r)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_token_ring_pairs_equal_counting(n):
    """Rank r at step t computes the q of owner (r - t) against its own KV."""
    local = 6
    for r in range(n):
        counted = [_visible(_positions(n, (r - t) % n, local, "zigzag"), _positions(n, r, local, "zigzag"), True)
                   for t in range(n)]
        assert step_pairs("token_ring", n * local, n, r) == counted


def test_ulysses_pairs_are_full_causal_attention():
    T = 12
    assert step_pairs("ulysses", T, 4, 0) == [_visible(list(range(T)), list(range(T)), True)]
    assert step_pairs("ulysses", T, 4, 0, causal=False) == [T * T]


@pytest.mark.parametrize("n,local,anchor,passing", [(1, 8, 2, 1), (2, 8, 2, 1), (4, 8, 2, 1), (3, 8, 0, 3),
                                                    (4, 8, 7, 3), (2, 8, 0, 0)])
def test_apb_pairs_equal_counting(n, local, anchor, passing):
    """Host h's queries see: the anchor (h > 0), the passing tokens of hosts < h
    (host 0 picks among its tokens past the anchor), their own block causally."""
    T = n * local
    for h in range(n):
        keys = list(range(anchor)) if h > 0 else []
        for g in range(h):
            eligible = list(range(g * local + (anchor if g == 0 else 0), (g + 1) * local))
            keys += eligible[-passing:] if passing else []  # any passing choice: all earlier than the block
        keys += list(range(h * local, (h + 1) * local))
        counted = _visible(list(range(h * local, (h + 1) * local)), keys, True)
        assert step_pairs("apb", T, n, h, anchor=anchor, passing=passing) == [counted], h


def test_zigzag_work_is_equal_on_every_rank():
    for n in (2, 3, 4, 8, 64):
        T = 2 * n * 1000
        totals = {sum(step_pairs(m, T, n, r)) for m in ("zigzag", "token_ring") for r in range(n)}
        assert totals == {T * (T + 1) / (2 * n)}
    ring = [sum(step_pairs("ring", 64, 4, r)) for r in range(4)]
    assert ring == sorted(ring) and ring[-1] == 16 * 17 / 2 + 3 * 16 * 16  # the last rank does N blocks


@pytest.mark.parametrize("n,ratio", [(2, 1.14), (4, 1.78), (8, 2.46)])
def test_apb_advantage_over_zigzag_by_counting(n, ratio):
    """design/parallel.md: zigzag / APB host N-1 pair work, anchor = block/4, passing = block/8."""
    T = 1 << 20
    zigzag = sum(step_pairs("zigzag", T, n, 0))
    apb = sum(step_pairs("apb", T, n, n - 1))
    assert round(zigzag / apb, 2) == ratio


def test_scorer_pairs():
    assert scorer_pairs(1024, 4, 0) == 64 * 256
    assert scorer_pairs(1024, 4, 3) == 0  # nobody reads the last host's passing block
    assert scorer_pairs(64, 2, 0) == 32 * 32


# --- bytes ---------------------------------------------------------------------------------------------------

def test_bytes_ring_and_zigzag_hand_counted():
    # N = 4, T = 8: L = 2; 3 KV blocks of 2 (k, v) x 2 tokens x 1 head x 2 dims x 2 bytes
    assert bytes_sent("ring", 8, 2, 1, 2, 4, 2) == 3 * 2 * 2 * 1 * 2 * 2 == 48
    assert bytes_sent("zigzag", 8, 2, 1, 2, 4, 2) == 48
    assert bytes_sent("zigzag", 8, 2, 1, 2, 1, 2) == 0  # alone: nothing travels


def test_bytes_ulysses_hand_counted():
    # N = 2, T = 8, H = 4, H_kv = 2, D = 2, fp32: L = 4; to the one peer: q 2 heads + k, v 1 head each
    # = 4 tokens x 4 heads x 2 dims x 4 B = 128; out 2 heads = 64 (+ lse 4 tokens x 2 heads x 4 B = 32)
    assert bytes_sent("ulysses", 8, 4, 2, 2, 2, 4) == 128 + 64
    assert bytes_sent("ulysses", 8, 4, 2, 2, 2, 4, return_lse=True) == 128 + 64 + 32
    # H_kv = 1 < N = 2: the kv head is replicated, each peer gets 1 kv head: 4 x (2 + 2) x 2 x 4 = 128
    assert bytes_sent("ulysses", 8, 4, 1, 2, 2, 4) == 128 + 64
    assert math.isnan(bytes_sent("ulysses", 8, 3, 3, 2, 2, 4))  # 3 heads over 2 ranks: n/a


def test_bytes_token_ring_hand_counted():
    # N = 2, T = 8, H = 1, D = 2, fp32: L = 4. q: 1 block of 4 x 1 x 2 x 4 = 32 B.
    # rank 0 holds KV before owner 1's queries: all 4 rows go home, each 1 head x (2 x 4 + 4) = 12 B
    assert bytes_sent("token_ring", 8, 1, 1, 2, 2, 4, rank=0) == 32 + 4 * 12
    # rank 1's KV comes after owner 0's first chunk: only its second-chunk rows (2) go home (zigzag)
    assert bytes_sent("token_ring", 8, 1, 1, 2, 2, 4, rank=1) == 32 + 2 * 12
    assert bytes_sent("token_ring", 8, 1, 1, 2, 2, 4, rank=1, layout="contiguous") == 32  # nothing visible
    assert bytes_sent("token_ring", 8, 1, 1, 2, 2, 4) == 32 + 4 * 12  # default: the most any rank sends


def test_bytes_apb_hand_counted():
    # N = 2, T = 16, L = 8, A = 2, P = 1, H_kv = 1, D = 2, fp32: 3 slots x (4 B position + 2 x 2 x 4 B k, v)
    assert bytes_sent("apb", 16, 2, 1, 2, 2, 4, anchor=2, passing=1) == 3 * (4 + 16)
    assert bytes_sent("apb", 16, 2, 1, 2, 2, 4, anchor=0, passing=0) == 0
    assert bytes_sent("apb", 16, 2, 1, 2, 2, 4, anchor=6, passing=5) == 8 * 20  # slots capped at L


def test_bytes_match_the_benchmark_shape():
    """T = 16384, H = 8, D = 128, fp32: the byte counts stats.sent reported for these methods on 2 ranks."""
    args = (16384, 8, 8, 128, 2, 4)
    assert bytes_sent("zigzag", *args) == 67108864
    assert bytes_sent("ulysses", *args) == 67108864
    assert bytes_sent("token_ring", *args, rank=0) == 67371008
    assert bytes_sent("token_ring", *args, rank=1) == 50462720
    assert bytes_sent("apb", *args) == 25264128


# --- profiles ------------------------------------------------------------------------------------------------

def _profile() -> Profile:
    return Profile(name="test", source="unit test", device="cpu", dtype="float32", headdim=128, overhead_s=1e-4,
                   pair_cost_s=5e-9, links={"gloo": Link(1e-4, 1 / 2e9, 2.0, ((4096.0, 1e-4, 2e-4),))}, cores=2,
                   comm_uses_cpu=True, isa=("avx2",), measured_at="2026-01-01T00:00:00+00:00",
                   attention_points=((1e6, 5e-3),))


def test_profile_round_trip(tmp_path):
    for profile in (_profile(), *PRESETS.values()):
        path = tmp_path / f"{profile.name}.json"
        save_profile(profile, path)
        assert load_profile(path) == profile


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["attention"].update(pair_cost_s=0), "attention.pair_cost_s"),
    (lambda d: d["attention"].update(pair_cost_s="fast"), "attention.pair_cost_s"),
    (lambda d: d["attention"].update(headdim=True), "attention.headdim"),
    (lambda d: d["links"]["gloo"].update(alpha_s=-1), "links.gloo.alpha_s"),
    (lambda d: d["links"]["gloo"].update(duplex_factor=0.5), "links.gloo.duplex_factor"),
    (lambda d: d["links"]["gloo"].update(beta_s_per_byte=float("nan")), "links.gloo.beta_s_per_byte"),
    (lambda d: d.update(links={}), "links"),
    (lambda d: d.update(cores=0), "cores"),
    (lambda d: d.update(comm_uses_cpu="yes"), "comm_uses_cpu"),
    (lambda d: d.update(attention=[]), "attention"),
])
def test_profile_validation_names_the_field(edit, field):
    data = _profile().to_dict()
    edit(data)
    with pytest.raises(ArgumentError, match=f"'{field}'"):
        Profile.from_dict(data)


def test_load_profile_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArgumentError, match="not valid JSON"):
        load_profile(bad)
    with pytest.raises(ArgumentError, match="cannot be read"):
        load_profile(tmp_path / "missing.json")
    bad.write_text("[]")
    with pytest.raises(ArgumentError, match="'profile' must be a JSON object"):
        load_profile(bad)


# --- fitting -------------------------------------------------------------------------------------------------

def test_fit_recovers_alpha_beta_from_synthetic_timings():
    alpha, beta = 80e-6, 1 / 2.5e9
    sizes = [4096 << (2 * i) for i in range(8)]
    exact = [(s, alpha + beta * s, 2.0 * (alpha + beta * s)) for s in sizes]
    link = fit_link(exact)
    assert link.alpha_s == pytest.approx(alpha, rel=1e-9)
    assert link.beta_s_per_byte == pytest.approx(beta, rel=1e-9)
    assert link.duplex_factor == pytest.approx(2.0)
    noise = [1.05, 0.95, 1.03, 0.97, 1.04, 0.96, 1.02, 0.98]  # +-5% multiplicative
    noisy = fit_link([(s, t * f, x * f) for (s, t, x), f in zip(exact, noise)])
    assert noisy.alpha_s == pytest.approx(alpha, rel=0.1)
    assert noisy.beta_s_per_byte == pytest.approx(beta, rel=0.1)


def test_fit_line_clamps_a_negative_intercept_and_refuses_bad_input():
    a, b = fit_line([1, 2, 4], [0.9, 2.0, 4.1])
    assert a >= 0 and b == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ArgumentError, match="at least 2"):
        fit_line([1], [1.0])
    with pytest.raises(ArgumentError, match="> 0"):
        fit_line([1, 2], [1.0, 0.0])
    with pytest.raises(ArgumentError, match="do not grow"):
        fit_line([1, 2], [2.0, 1.0])


# --- predictions ---------------------------------------------------------------------------------------------

def test_gpu_zigzag_is_c_plus_n_minus_1_max_c_m():
    p = PRESETS["h100-ib"]
    T, N, H, D = 1 << 20, 8, 32, 128
    pred = predict(p, "zigzag", T, N, nheads=H, nheads_k=8, dtype_bytes=2)
    L = T / N
    link = p.links["nccl"]
    per_pair = p.pair_cost_s
    c = p.overhead_s + H * L * L / 2 * per_pair
    c0 = p.overhead_s + H * L * (L + 1) / 2 * per_pair
    m = link.exchange(2 * L * 8 * D * 2)
    assert pred.overlap and pred.time_s == pytest.approx(c0 + (N - 2) * max(c, m) + c, rel=1e-12)


def test_ulysses_is_na_when_heads_do_not_split():
    pred = predict(PRESETS["h100-nvlink"], "ulysses", 1 << 17, 16, nheads=8, nheads_k=8)
    assert pred.time_s is None and "n/a" in pred.reason


def test_ranks_beyond_the_cores_share_them():
    p = _profile()
    two = predict(p, "zigzag", 8192, 2, nheads=8)
    four = predict(p, "zigzag", 8192, 4, nheads=8)
    assert not two.overlap and two.time_s == pytest.approx(two.compute_cpu_s + two.comm_s)
    assert four.details["core_share"] == 0.5
    assert four.time_s == pytest.approx(2 * (four.compute_cpu_s + four.comm_s / 2))
    # ranks that finish early hand their share to the others
    assert _processor_sharing([1.0, 3.0], 1) == [2.0, 4.0]
    assert _processor_sharing([1.0, 1.0, 1.0, 1.0], 2) == [2.0, 2.0, 2.0, 2.0]
    assert _processor_sharing([1.0, 2.0], None) == [1.0, 2.0]


def test_predict_rejects_bad_arguments():
    p = _profile()
    with pytest.raises(ArgumentError, match="method"):
        predict(p, "star", 1024, 2)
    with pytest.raises(ArgumentError, match="N must be"):
        predict(p, "zigzag", 1024, 0)
    with pytest.raises(ArgumentError, match="backend"):
        predict(p, "zigzag", 1024, 2, backend="nccl")


# --- the CLI -------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_simulate_parallel_fit_quick(tmp_path, capsys):
    """The one test that spawns processes: a 2-rank gloo ping-pong and a tiny attention fit."""
    assert main(["simulate", "parallel", "--fit", "--quick", "--quiet", "--out", tmp_path]) == 0
    out = capsys.readouterr().out
    profile = load_profile(tmp_path / "profile.json")
    assert profile.name == "this-machine" and profile.links["gloo"].beta_s_per_byte > 0
    assert profile.cores >= 1 and profile.measured_at
    assert "profile 'this-machine'" in out and "measured by longattn simulate parallel --fit --quick" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [c["N"] for c in results["bench_setup"]] == [2, 4]
