"""The benchmark's interleaved timing order (longattn.bench.timing)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from longattn.bench.timing import paired_ratios, round_order, time_interleaved


@given(n=st.integers(1, 9), rnd=st.integers(0, 200))
def test_each_round_runs_every_method_once(n, rnd):
    names = [f"m{i}" for i in range(n)]
    assert sorted(round_order(names, rnd)) == sorted(names)


@given(n=st.integers(1, 9), start=st.integers(0, 50))
def test_each_method_runs_first_once_per_rotation(n, start):
    names = [f"m{i}" for i in range(n)]
    firsts = [round_order(names, start * n + r)[0] for r in range(n)]
    assert sorted(firsts) == sorted(names)


@given(n=st.integers(3, 9))
def test_a_method_follows_both_cycle_neighbours_over_two_rotations(n):
    names = [f"m{i}" for i in range(n)]
    before = {name: set() for name in names}
    for rnd in range(2 * n):
        order = round_order(names, rnd)
        for prev, name in zip(order, order[1:]):
            before[name].add(prev)
    for i, name in enumerate(names):
        assert before[name] == {names[i - 1], names[(i + 1) % n]}


def test_time_interleaved_calls_in_round_order_and_times_after_warmup():
    calls_made = []
    calls = {name: (lambda name=name: calls_made.append(name) or name) for name in ("a", "b", "c")}
    result = time_interleaved(calls, warmup=1, repeats=6)
    expected = [name for rnd in range(7) for name in round_order(["a", "b", "c"], rnd)]
    assert calls_made == expected
    assert {name: len(s) for name, s in result.seconds.items()} == {"a": 6, "b": 6, "c": 6}
    assert result.first_output == {"a": "a", "b": "b", "c": "c"}


def test_round_order_of_nothing_is_empty():
    assert round_order([], 3) == []


@given(mine=st.lists(st.floats(1e-3, 1e3), max_size=12), base=st.lists(st.floats(1e-3, 1e3), max_size=12))
def test_paired_ratios_divide_round_by_round_over_the_rounds_both_ran(mine, base):
    ratios = paired_ratios(mine, base)
    assert len(ratios) == min(len(mine), len(base))
    assert ratios == [m / b for m, b in zip(mine, base)]


def test_a_method_that_left_the_rotation_pairs_with_the_baselines_first_rounds(monkeypatch):
    """_over_budget drops a slow method for good, so its times are the first
    rounds: they pair with the baseline's rounds of the same index."""
    import longattn.bench.timing as timing

    clock = {"t": 0.0}
    cost = {"slow": 3.0, "base": 1.0}
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))  # this module's clock only

    def call(name):
        clock["t"] += cost[name]

    calls = {name: (lambda name=name: call(name)) for name in cost}
    result = time_interleaved(calls, warmup=0, repeats=6, budget_s=7.0)
    assert result.seconds["slow"] == [3.0, 3.0] and result.seconds["base"] == [1.0] * 6
    assert paired_ratios(result.seconds["slow"], result.seconds["base"]) == [3.0, 3.0]


def test_steal_seconds_reads_the_cpu_line_of_proc_stat(tmp_path, monkeypatch):
    import os

    from longattn.bench import vm_steal

    stat = tmp_path / "stat"
    stat.write_text("cpu  9123099 47134 677968 4084362 38999 0 15380 755931 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    monkeypatch.setattr(vm_steal, "STAT_PATH", str(stat))
    assert vm_steal.steal_seconds() == 755931 / os.sysconf("SC_CLK_TCK")
    for text in ("cpu  1 2 3 4 5 6 7\n", "intr 5 6 7 8 9 10 11 12 13\n", "cpu  1 2 3 4 5 6 7 x 0 0\n", ""):
        stat.write_text(text)  # a kernel without the column, a strange first line
        assert vm_steal.steal_seconds() is None
    monkeypatch.setattr(vm_steal, "STAT_PATH", str(tmp_path / "missing"))  # not Linux
    assert vm_steal.steal_seconds() is None


def test_steal_fraction_is_the_share_of_every_cpus_time(monkeypatch):
    import os

    from longattn.bench import vm_steal

    monkeypatch.setattr(vm_steal.os, "cpu_count", lambda: 2)
    assert vm_steal.steal_fraction(10.0, 10.5, 1.0) == 0.25  # 0.5 s of 2 CPUs x 1 s
    assert vm_steal.steal_fraction(10.0, 10.0, 1.0) == 0.0
    assert vm_steal.steal_fraction(10.0, 13.0, 1.0) == 1.0  # tick rounding past the wall clock: clamped
    assert vm_steal.steal_fraction(None, 10.0, 1.0) is None and vm_steal.steal_fraction(1.0, 2.0, 0.0) is None
    # a span of fewer than MIN_TICKS ticks of both CPUs: one tick would move it by over 5 points
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    shortest = vm_steal.MIN_TICKS * tick / 2
    assert vm_steal.steal_fraction(10.0, 10.0 + tick, 0.99 * shortest) is None
    assert vm_steal.steal_fraction(10.0, 10.0 + tick, shortest) == pytest.approx(1 / vm_steal.MIN_TICKS)


def test_time_interleaved_records_the_steal_of_each_timed_call(monkeypatch):
    """Read around each call, outside the timed interval; one entry per timed
    round (warmup rounds not kept), none for a failed method, None where the
    machine has no count."""
    import longattn.bench.timing as timing
    from longattn.bench import vm_steal

    clock, stolen = {"t": 0.0}, {"s": 0.0}
    cost = {"a": (1.0, 0.5), "b": (2.0, 0.0)}  # (wall seconds, stolen CPU seconds) per call
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    monkeypatch.setattr(timing, "steal_seconds", lambda: stolen["s"])
    monkeypatch.setattr(vm_steal.os, "cpu_count", lambda: 2)

    def call(name):
        if name == "bad":
            raise RuntimeError("no")
        clock["t"] += cost[name][0]
        stolen["s"] += cost[name][1]

    calls = {name: (lambda name=name: call(name)) for name in ("a", "b", "bad")}
    result = time_interleaved(calls, warmup=1, repeats=3)
    assert result.steal == {"a": [0.25] * 3, "b": [0.0] * 3}
    assert result.seconds == {"a": [1.0] * 3, "b": [2.0] * 3}
    monkeypatch.setattr(timing, "steal_seconds", lambda: None)
    assert time_interleaved(calls, warmup=0, repeats=2).steal == {"a": [None] * 2, "b": [None] * 2}
