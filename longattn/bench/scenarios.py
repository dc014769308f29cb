"""The scenario registry shared by ``longattn bench`` and ``benchmarks/``.

A *scenario* is one named case: how to make its inputs from a seed, the
methods to time on it, which method is the baseline of the speed ratio, and
what its outputs are checked against. A *group* is a family of scenarios that
differ in one size (the x axis of the plot), e.g. causal dense attention at
seqlen 1k..8k. The CLI and the pytest-benchmark suite both read this registry,
so their numbers come from identical cases.

Adding a group is one call::

    register_group(Group(name="decode", description=..., size_name="seqlen_k",
                         sizes=(...), quick_sizes=(...), make_scenario=decode_scenario))

in a module that :mod:`longattn.bench` imports.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from longattn.errors import ArgumentError

# A timed callable: takes the scenario's inputs, returns the output tensor.
Timed = Callable[[Any], torch.Tensor]


class MethodUnavailable(Exception):
    """Raised by :attr:`Method.build` when a method cannot run here; the
    message is the reason shown next to the skipped method."""


@dataclass(frozen=True)
class Method:
    """One way to compute a scenario's output.

    ``build(inputs)`` does the one-off work that must not be timed (compiling,
    building masks) and returns the callable to time, ``fn(inputs) -> out``;
    a ``note`` attribute on it (e.g. which engine runs) goes to the report.
    It raises :class:`MethodUnavailable` (or anything else) to be skipped with
    a reason. ``slow_setup`` marks builds that take tens of seconds
    (``torch.compile``), which ``--quick`` skips.
    """

    name: str
    build: Callable[[Any], Timed]
    slow_setup: bool = False
    # False for a method that computes a different output on purpose (a
    # same-cost yardstick): timed, but not checked against the reference.
    compare: bool = True


def no_setup(fn: Timed) -> Callable[[Any], Timed]:
    """A ``build`` for methods that need no preparation."""
    return lambda inputs: fn


def in_bfloat16(fn: Timed, fields: tuple[str, ...] = ("q", "k", "v")) -> Callable[[Any], Timed]:
    """A ``build`` that runs ``fn`` on a bfloat16 copy of the inputs'
    ``fields`` (a dataclass; the copy is made once, not timed): the same case
    in the dtype models run in. Its error is then measured against the
    scenario's float32 reference, so it includes bf16's own rounding."""

    def build(inputs: Any) -> Timed:
        half = dataclasses.replace(inputs, **{f: getattr(inputs, f).to(torch.bfloat16) for f in fields})
        return lambda _inputs: fn(half)

    return build


@dataclass(frozen=True)
class Target:
    """A speed target for ``method``: its median time within ``max_ratio`` x the
    median of ``baseline`` (default: the scenario's baseline), and/or at least
    ``min_bandwidth_fraction`` of the memory read bandwidth measured in the
    same run (memory-bound scenarios), and/or at least ``min_peak_fraction``
    of the fp32 FMA peak measured in the same run (compute-bound scenarios
    with a FLOP count)."""

    method: str
    max_ratio: float | None
    note: str
    min_bandwidth_fraction: float | None = None
    baseline: str | None = None
    min_peak_fraction: float | None = None


# reference(inputs, outputs) -> (expected output, what it is). ``outputs``
# maps method names to outputs already computed, so a reference that is one
# of the methods (SDPA at sizes the oracle cannot hold) costs nothing extra.
Reference = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, str]]


@dataclass(frozen=True)
class Scenario:
    """One benchmark case; ``methods`` are in table order."""

    name: str
    group: str
    size: int
    params: dict[str, Any]
    make_inputs: Callable[[int], Any]
    methods: dict[str, Method]
    baseline: str
    reference: Reference
    targets: tuple[Target, ...] = ()
    # bytes_read(inputs): bytes every method must read at least (the KV cache
    # for decode); gives GB/s and the fraction of the machine's read bandwidth.
    bytes_read: Callable[[Any], int] | None = None
    # A method of this scenario whose GB/s in this case is the read-bandwidth
    # limit ("% of bw" divides by it): a streaming read of the same bytes,
    # timed in the same interleaved rounds, so the limit and the kernel see
    # the same memory system at the same moments (a shared VM's bandwidth
    # swings by 2x within seconds). Without it, or when it did not run, the
    # run-level probe is the limit.
    bandwidth_method: str | None = None
    # flops(inputs): floating-point operations of the exact computation (compute-bound
    # cases); gives GFLOP/s and the fraction of the machine's FMA peak measured in the run.
    flops: Callable[[Any], float] | None = None
    # A method of this scenario whose GFLOP/s in this case is the FMA peak
    # ("% of peak" divides by it): the register-only FMA loop run for the
    # case's flops in the same interleaved rounds (machine.fma_peak_method),
    # as bandwidth_method is for bytes. Without it, or when it did not run,
    # the run-level probe (best of three at the start) is the peak.
    peak_method: str | None = None
    # measure(inputs, outputs) -> {name: value}: figures other than speed taken
    # once per case after timing (a sparse method's recall, a time split);
    # printed under the table and stored with the case.
    measure: Callable[[Any, dict[str, torch.Tensor]], dict[str, float]] | None = None


@dataclass(frozen=True)
class Group:
    """A family of scenarios indexed by one size (``size_name``, e.g. seqlen).

    ``sizes`` is what ``longattn bench GROUP`` runs; ``quick_sizes`` what
    ``--quick`` runs (a few seconds in total). By default each method gets
    ``default_repeats`` timed rounds, fewer if they would take its timed total
    past ``method_budget_s`` seconds in a case (see
    :func:`longattn.bench.timing.time_interleaved`).
    """

    name: str
    description: str
    size_name: str
    sizes: tuple[int, ...]
    quick_sizes: tuple[int, ...]
    make_scenario: Callable[[int], Scenario]
    default_repeats: int = 5
    method_budget_s: float | None = 5.0
    plot: bool = True  # False when the sizes are case numbers, not a sweep
    # cross_checks(cases) -> [{"what", "value", "limit", "met", "note"}]: targets
    # that compare cases with each other (decode: paged vs contiguous), stored
    # as results["checks"] and printed as target lines.
    cross_checks: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None

    def scenarios(self, sizes: Sequence[int] | None = None) -> list[Scenario]:
        return [self.make_scenario(size) for size in (self.sizes if sizes is None else sizes)]


_GROUPS: dict[str, Group] = {}


def register_group(group: Group) -> Group:
    """Make ``group`` available to ``longattn bench`` and ``benchmarks/``."""
    if group.name in _GROUPS:
        raise ArgumentError(f"benchmark group {group.name!r} is already registered")
    _GROUPS[group.name] = group
    return group


def group_names() -> list[str]:
    return list(_GROUPS)


def get_group(name: str) -> Group:
    """The registered group ``name``; the error lists the valid ones."""
    if name not in _GROUPS:
        raise ArgumentError(f"group must be one of {group_names()}, got {name!r}")
    return _GROUPS[name]


def parse_sizes(text: str, what: str = "sizes") -> tuple[int, ...]:
    """``"1024,2048"`` -> ``(1024, 2048)``; every size a positive integer."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ArgumentError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ArgumentError(f"{what} must be comma-separated positive integers, got {text!r}")
    return sizes


def max_abs_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64 (NaN anywhere gives NaN)."""
    diff = (out.detach().to(torch.float64) - reference.detach().to(torch.float64)).abs()
    if torch.isnan(diff).any():
        return float("nan")
    return float(diff.max()) if diff.numel() else 0.0
