"""pytest-benchmark suite over the same scenarios as ``longattn bench dense``.

Run: ``python -m pytest benchmarks/ --benchmark-only`` (add
``--benchmark-json=out.json`` to keep the numbers, and compare runs with
``pytest-benchmark compare``). Sizes default to the group's quick sizes plus
2048; ``LONGATTN_BENCH_SIZES=1024,8192`` picks others. Timings are reported,
never asserted; each attention method's output is checked once against the
scenario's reference, so a fast wrong answer fails (the `fma peak` yardstick
row computes no attention: it is timed only).
"""

from __future__ import annotations

import os
import time

import pytest

from longattn.bench import get_group
from longattn.bench.scenarios import max_abs_error, parse_sizes
from longattn.bench.timing import describe_exception

GROUP = get_group("dense")
SIZES = parse_sizes(os.environ.get("LONGATTN_BENCH_SIZES", "256,2048"), "LONGATTN_BENCH_SIZES")
SCENARIOS = GROUP.scenarios(SIZES)
CASES = [(s, name) for s in SCENARIOS for name in s.methods]


@pytest.mark.parametrize("scenario, method", CASES, ids=[f"{s.size}-{m}" for s, m in CASES])
def test_dense(benchmark, scenario, method):
    inputs = scenario.make_inputs(0)
    start = time.perf_counter()
    try:  # compiles happen here, outside the timed rounds
        fn = scenario.methods[method].build(inputs)
    except Exception as exc:  # no flex_attention, no compiler, ...: skipped with the reason, as in `longattn bench`
        pytest.skip(f"{method} unavailable here: {describe_exception(exc)}")
    setup_s = time.perf_counter() - start
    out = fn(inputs)
    error = against = None
    if scenario.methods[method].compare:  # not the yardstick rows (the FMA peak loop has no attention output)
        reference, against = scenario.reference(inputs, {method: out})
        error = max_abs_error(out, reference)
        assert error <= 1e-4, f"{method} max error {error:.2e} vs {against}"
    benchmark.group = scenario.name
    benchmark.extra_info.update(scenario.params, method=method, setup_s=setup_s, max_error=error, error_vs=against)
    benchmark.pedantic(fn, args=(inputs,), rounds=3, warmup_rounds=1)
