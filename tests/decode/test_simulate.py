"""The decode schedule simulator (``longattn simulate lean``): its heuristics, its
accounting, and the published claims it is meant to reproduce in shape."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from longattn.cli import main
from longattn.decode.simulate import (
    Shape,
    get_gpu,
    run_sweep,
    simulate_fa2,
    simulate_shape,
    simulate_split_k,
    simulate_stream_k,
    split_k_num_splits,
    sweep_shapes,
)
from longattn.errors import ArgumentError

H100 = get_gpu("h100")
ONE_GIB = 1024  # MiB


@pytest.fixture(scope="module")
def quick_rows():
    return run_sweep(H100, quick=True)["shapes"]


def _no_latency(**overrides):
    """A GPU with every fixed cost zero and (practically) free partials: pure streaming."""
    return get_gpu(
        "h100", cta_prologue_us=0.0, segment_us=0.0, iteration_us=0.0, merge_us=0.0, kernel_gap_us=0.0,
        l2_bandwidth_gbs=1e12, **overrides,
    )


# --- the split-K heuristic -----------------------------------------------------

@pytest.mark.parametrize("tiles", [106, 132, 500, 2048])  # 0.8 * 132 = 105.6
@pytest.mark.parametrize("n_blocks", [1, 7, 4096])
def test_split_k_uses_one_split_when_tiles_fill_most_sms(tiles, n_blocks):
    assert split_k_num_splits(tiles, 132, n_blocks) == 1


def test_split_k_heuristic_hand_checked():
    # 8 tiles: s=14 -> 112/132 = 0.848 < 0.85 * 1.0 (best, s=33); s=15 -> 120/132 = 0.909.
    assert split_k_num_splits(8, 132, 4096) == 15
    # 1 tile, 16 blocks: efficiency s/132 grows, best 16/132; 85% of it is 13.6 -> 14.
    assert split_k_num_splits(1, 132, 16) == 14
    assert split_k_num_splits(105, 132, 4096) > 1  # just under 0.8 * 132
    assert split_k_num_splits(1, 132, 0) == 1  # nothing to split


# --- accounting ------------------------------------------------------------------

def test_fa2_single_tile_is_its_cta_time():
    shape = Shape((1000,), 1, 1000)
    blocks = math.ceil(1000 / H100.block_n)
    expected = H100.cta_prologue_us + H100.segment_us + blocks * H100.iteration_us + 1000 * H100.key_us
    assert simulate_fa2(shape, H100).makespan_us == pytest.approx(expected)


def test_pure_streaming_stream_k_is_fully_utilised_when_work_divides():
    gpu = _no_latency()
    shape = Shape((4096, 4096), 33, 4096)  # 2 * 33 * 16 = 1056 LeanTiles = 4 per worker
    result = simulate_stream_k(shape, gpu, block_n=256)
    assert result.utilisation == pytest.approx(1.0, abs=1e-5)
    # FA2's 66 CTAs fill half of the 132 SMs.
    assert simulate_fa2(shape, gpu).utilisation == pytest.approx(0.5)


def test_utilisation_is_a_fraction(quick_rows):
    for row in quick_rows:
        for name, sched in row["schedules"].items():
            assert 0.0 < sched["utilisation"] <= 1.0 + 1e-9, (row["label"], name)


def test_stream_k_uses_the_planner_worker_count():
    gpu = get_gpu("h100", num_sms=64, workers_per_sm=3)
    result = simulate_stream_k(Shape((50_000,) * 3, 8, 50_000), gpu)
    assert result.params["workers"] == gpu.num_workers == 192 and result.ctas == 192


def test_ragged_sweep_is_seeded_and_in_range():
    first, again = sweep_shapes(quick=True, seed=3), sweep_shapes(quick=True, seed=3)
    assert first == again and first != sweep_shapes(quick=True, seed=4)
    ragged = [s for s in first if s.ragged]
    assert ragged and all(s.context // 4 <= n <= s.context for s in ragged for n in s.seqlens)
    assert any(len(set(s.seqlens)) > 1 for s in ragged)


def test_bad_gpu_arguments_are_clear_errors():
    with pytest.raises(ArgumentError, match="gpu must be one of"):
        get_gpu("a100")
    with pytest.raises(ArgumentError, match="num_sms must be an int >= 1, got 0"):
        get_gpu("h100", num_sms=0)


# --- the claims ---------------------------------------------------------------------

def test_stream_k_never_slower_than_split_k_on_quick_sweep(quick_rows):
    for row in quick_rows:
        sched = row["schedules"]
        assert sched["stream_k"]["makespan_us"] <= sched["split_k"]["makespan_us"] * (1 + 1e-12), row["label"]
        assert sched["stream_k"]["makespan_us"] <= sched["fa2"]["makespan_us"] * (1 + 1e-12), row["label"]


def test_only_merging_partials_makes_stream_k_slower_than_split_k():
    # Where stream-K loses to split-K on a 1-2 tile shape, it is a tile merging
    # >= 64 partials; with free merges it never loses.
    for shape in sweep_shapes():
        if shape.batch * shape.nheads_k > 2 or shape.context < 16 << 10:
            continue
        row = simulate_shape(shape, H100)
        if row["speedup_vs_split_k"] < 1.0:
            assert row["schedules"]["stream_k"]["params"]["fan_in"] >= 64, row["label"]
    free_merges = get_gpu("h100", merge_us=0.0, l2_bandwidth_gbs=1e12)
    for shape in sweep_shapes():
        row = simulate_shape(shape, free_merges)
        assert row["speedup_vs_split_k"] >= 1.0 - 1e-12, row["label"]


def test_stream_k_utilisation_reaches_95_percent_on_large_shapes(quick_rows):
    large = [r for r in quick_rows if r["kv_mib"] > ONE_GIB]
    assert len(large) >= len(quick_rows) // 3
    for row in large:
        assert row["schedules"]["stream_k"]["utilisation"] >= 0.95, row["label"]


def test_speedup_over_fa2_grows_with_context_at_batch_1(quick_rows):
    for heads in (1, 8):
        series = sorted(
            (r["context"], r["speedup_vs_fa2"]) for r in quick_rows
            if r["batch"] == 1 and r["nheads_k"] == heads and not r["ragged"]
        )
        speedups = [s for _, s in series]
        assert len(speedups) >= 4 and all(b > a for a, b in zip(speedups, speedups[1:])), (heads, speedups)
    at_1m_h8 = [r for r in quick_rows if r["label"] == "b1 h8 1M uniform"][0]
    assert at_1m_h8["speedup_vs_fa2"] > 8.33  # the paper's best; the model has no bandwidth lending


def test_fa2_utilisation_is_poor_at_batch_1_long_context(quick_rows):
    for row in quick_rows:
        if row["batch"] == 1 and row["context"] >= 256 << 10:
            assert row["schedules"]["fa2"]["utilisation"] < 0.5, row["label"]
            assert row["schedules"]["stream_k"]["utilisation"] > 0.6, row["label"]


def test_split_k_table_path_uses_one_split_for_many_tiles():
    row = simulate_shape(Shape((8192,) * 16, 8, 8192), H100)  # 128 tiles >= 105.6
    assert row["schedules"]["split_k"]["params"]["splits"] == 1
    assert row["schedules"]["split_k"]["makespan_us"] == pytest.approx(row["schedules"]["fa2"]["makespan_us"])


def test_separate_merge_costs_a_kernel_gap():
    shape = Shape((65536,), 8, 65536)
    in_kernel = simulate_stream_k(shape, H100, block_n=64)
    separate = simulate_stream_k(shape, H100, block_n=64, separate_merge=True)
    assert separate.makespan_us > in_kernel.makespan_us
    assert simulate_split_k(shape, H100).params["splits"] > 1


# --- CLI ----------------------------------------------------------------------------

def test_cli_quick_run_writes_results(tmp_path, capsys):
    assert main(["simulate", "lean", "--quick", "--out", tmp_path, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "not a measurement" in out and "model assumptions" in out
    assert "paper mean 2.6x, max 8.33x" in out and "paper mean 1.73x, max 2.18x" in out
    assert "b1 h1 1k uniform  " not in out  # --quiet: no per-shape table
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["gpu"]["num_sms"] == 132 and results["gpu"]["num_workers"] == 264
    assert results["settings"]["quick"] is True and results["assumptions"]
    assert results["paper"]["max_speedup_vs_fa2"] == 8.33
    assert len(results["shapes"]) == len(sweep_shapes(quick=True))
    for row in results["shapes"]:
        assert {"label", "batch", "context", "nheads_k", "ragged", "seqlens", "speedup_vs_fa2",
                "speedup_vs_split_k"} <= row.keys()
        assert set(row["schedules"]) == {"fa2", "split_k", "stream_k"}
        for sched in row["schedules"].values():
            assert sched["makespan_us"] > 0 and 0 < sched["utilisation"] <= 1 + 1e-9
    summary = results["summary"]
    assert summary["mean_speedup_vs_fa2"] > 1 and summary["max_speedup_vs_split_k"]["speedup"] >= 1
    assert set(summary["batch1_by_context"]) == {"1k", "16k", "256k", "1M"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speedup.png").stat().st_size > 0


def test_cli_table_and_overrides(tmp_path, capsys):
    assert main(["simulate", "lean", "--quick", "--gpu", "h200", "--sms", "100", "--out", tmp_path]) == 0
    out = capsys.readouterr().out
    assert "H200 SXM, 100 SMs" in out and "stream-K G = 200" in out
    assert "b1 h1 1k uniform" in out and "util stream-K" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "lean", "--gpu", "a100"], "gpu must be one of ['h100', 'h200'], got 'a100'"),
        (["simulate", "lean", "--sms", "0"], "--sms must be a positive integer, got 0"),
        (["simulate", "lean", "--bandwidth", "-1"], "--bandwidth must be > 0 GB/s"),
        (["simulate", "fast"], "MODEL must be one of ['lean', 'parallel'], got 'fast'"),
    ],
)
def test_cli_bad_arguments_are_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
