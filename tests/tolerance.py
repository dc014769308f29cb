"""The tolerance rule of ARCHITECTURE.md, shared by every test.

A kernel's max error against the float64 oracle must be at most twice the
error of the eager PyTorch twin run in the same low-precision dtype, plus a
small rounding floor (scaled by the magnitude of the values compared). -inf
entries (lse of empty rows) must sit in exactly the same places.
"""

from __future__ import annotations

import torch

# Rounding floor per dtype of the tensor under test, relative to max(1, |oracle|).
# The oracle is fed the same (already rounded) half-precision inputs, so what
# is left for a float32-accumulating kernel is rounding its output once: half
# an ulp, 2**-8 relative for bfloat16 and 2**-11 for float16, plus float32
# noise. Measured for the eager twin over 400 hypothesis cases (every head dim,
# GQA, windows, softcap; AMD EPYC): max 3.72e-3 (bf16) and 3.94e-4 (fp16) of
# max(1, |oracle|). The floors sit ~13% above the half-ulp bounds.
ROUNDING_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 5.5e-4,
    torch.bfloat16: 4.4e-3,
}


def max_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """Max absolute difference in float64, treating equal infinities as equal.

    Raises AssertionError if the shapes differ, any value is NaN, or the
    infinities do not line up.
    """
    assert actual.shape == oracle.shape, f"shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    o = oracle.detach().to(torch.float64).cpu()
    assert not torch.isnan(a).any(), "result contains NaN"
    inf_a, inf_o = torch.isinf(a), torch.isinf(o)
    assert torch.equal(inf_a, inf_o), "infinite entries (empty rows) differ from the oracle"
    assert torch.equal(a[inf_a], o[inf_o]), "infinities of opposite sign"
    finite = ~inf_o
    if not finite.any():
        return 0.0
    return float((a[finite] - o[finite]).abs().max())


def assert_close_to_oracle(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor,
    *,
    name: str = "out",
) -> None:
    """``actual`` is within 2x ``baseline``'s error against ``oracle``, plus a floor.

    ``baseline`` is the eager twin's result for the same inputs in the same
    dtype (pass the oracle itself to compare against the floor only).
    """
    floor = ROUNDING_FLOOR[actual.dtype]
    finite = oracle.detach()[~torch.isinf(oracle.detach())]
    magnitude = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    err = max_error(actual, oracle)
    base = max_error(baseline, oracle)
    bound = 2 * base + floor * magnitude
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (eager twin error {base:.3e})"
