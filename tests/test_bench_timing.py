"""The benchmark's interleaved timing order (longattn.bench.timing)."""

from __future__ import annotations

from types import SimpleNamespace

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
