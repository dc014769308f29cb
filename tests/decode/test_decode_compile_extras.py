"""decode_attention's flash-attn extras (cache_batch_idx, cache_leftpad, rotary)
trace with torch.compile(fullgraph=True): the data-dependent work is inside
the longattn::decode_step_extras(_append) custom ops. Compiled and eager calls
give the same bits and write the caches identically; both match the oracle."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.decode_api import decode_step_extras_append_op, decode_step_extras_op
from longattn.errors import ArgumentError
from tests.decode.test_decode_extras import _oracle, _tables, rotary_ref
from tests.tolerance import assert_close_to_oracle

NAN = float("nan")

# (cache_batch_idx, cache_leftpad, rotary) per case; rotary needs new tokens.
CASES = {
    "rows": (True, False, False),
    "leftpad": (False, True, False),
    "rows+leftpad": (True, True, False),
    "rotary": (False, False, True),
    "rotary+rows+leftpad": (True, True, True),
}


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _build(rows_on, pads_on, rotary_on, seqlen_new, seed=3):
    """(q, k_cache, v_cache, kwargs, keys(b) -> logical keys/values, positions) of a
    small GQA case: 3 sequences in a 4-row cache of 12 slots, NaN where no
    kernel may read (before each leftpad)."""
    gen = torch.Generator().manual_seed(seed)
    nheads_k, group, headdim, seqlen_q = 2, 2, 16, 2
    lens, pads = [7, 3, 5], ([2, 0, 5] if pads_on else [0, 0, 0])  # sequence 2 empty with a leftpad
    rows = [3, 0, 1] if rows_on else [0, 1, 2]
    n_rows = 4 if rows_on else 3
    k_cache = torch.randn(n_rows, 12, nheads_k, headdim, generator=gen)
    v_cache = torch.randn(n_rows, 12, nheads_k, headdim, generator=gen)
    for r, p in zip(rows, pads):
        k_cache[r, :p] = NAN
        v_cache[r, :p] = NAN
    q = torch.randn(3, seqlen_q, nheads_k * group, headdim, generator=gen)
    kwargs = {"cache_seqlens": _i32(lens)}
    if seqlen_new:
        kwargs["k_new"] = torch.randn(3, seqlen_new, nheads_k, headdim, generator=gen)
        kwargs["v_new"] = torch.randn(3, seqlen_new, nheads_k, headdim, generator=gen)
    if rows_on:
        kwargs["cache_batch_idx"] = _i32(rows)
    if pads_on:
        kwargs["cache_leftpad"] = _i32(pads)
    if rotary_on:
        kwargs["rotary_cos"], kwargs["rotary_sin"] = _tables(12, 6, seed=9)  # partial rotary (12 of 16 channels)
        kwargs["rotary_interleaved"] = False
    return q, k_cache, v_cache, kwargs, rows, lens, pads


def _step(q, k_cache, v_cache, kwargs):
    return longattn.decode_attention(q, k_cache, v_cache, **kwargs, causal=True, return_lse=True)


def _oracle_of(q, before_k, before_v, kwargs, rows, lens, pads):
    k_new, v_new = kwargs.get("k_new"), kwargs.get("v_new")
    if "rotary_cos" in kwargs:
        cos, sin = kwargs["rotary_cos"], kwargs["rotary_sin"]
        base = torch.tensor(lens)[:, None]
        k_new = rotary_ref(k_new, cos, sin, base + torch.arange(k_new.shape[1]), False)
        q = rotary_ref(q, cos, sin, base + torch.arange(q.shape[1]), False)
    keys, values = [], []
    q = q.double()
    for b, (r, n, p) in enumerate(zip(rows, lens, pads)):
        kb, vb = before_k[r, p:n].double(), before_v[r, p:n].double()
        if k_new is not None:
            kb, vb = torch.cat([kb, k_new[b].double()]), torch.cat([vb, v_new[b].double()])
        keys.append(kb)
        values.append(vb)
    return _oracle(q, keys, values, causal=True)


def _same(a, b):
    return torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("case,seqlen_new", [(c, n) for c in CASES for n in (0, 2) if n or not CASES[c][2]])
def test_extras_fullgraph_match_eager_and_oracle(case, seqlen_new, backend="aot_eager"):
    rows_on, pads_on, rotary_on = CASES[case]
    q, k_cache, v_cache, kwargs, rows, lens, pads = _build(rows_on, pads_on, rotary_on, seqlen_new)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    eager_out, eager_lse = _step(q, eager_k, eager_v, kwargs)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(_step)(q, k_cache.clone(), v_cache.clone(), kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    # aot_eager functionalizes the mutating op: the cache writes must still land in k_cache, v_cache.
    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    out, lse = compiled(q, k_cache, v_cache, kwargs)
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    assert _same(k_cache, eager_k) and _same(v_cache, eager_v)
    if not seqlen_new:
        assert _same(k_cache, before_k) and _same(v_cache, before_v)
    ref_out, ref_lse = _oracle_of(q, before_k, before_v, kwargs, rows, lens, pads)
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_extras_with_inductor():
    """The default backend, as torch.compile(model) uses it: the op's cache writes survive."""
    test_extras_fullgraph_match_eager_and_oracle("rotary+rows+leftpad", 2, backend="inductor")


def test_extras_data_checks_run_inside_the_op_and_write_nothing():
    """A leftpad past cache_seqlens is found by the op's data checks (CPU default):
    the compiled call raises like the eager one and leaves the cache as it was."""
    q, k_cache, v_cache, kwargs, *_ = _build(True, True, False, 2)
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    compiled(q, k_cache.clone(), v_cache.clone(), kwargs)  # compile with good data
    bad = dict(kwargs, cache_leftpad=_i32([2, 4, 5]))  # sequence 1: leftpad 4 > cache_seqlens 3
    before = k_cache.clone()
    with pytest.raises(ArgumentError, match="cache_leftpad"):
        compiled(q, k_cache, v_cache, bad)
    assert _same(before, k_cache)


def test_opcheck_decode_step_extras_ops():
    q, k_cache, v_cache, kwargs, *_ = _build(True, True, True, 2)
    common = (16 ** -0.5, -1, 0, 0.0, [], "auto", -1)
    extras = (kwargs["cache_batch_idx"], kwargs["cache_leftpad"], kwargs["rotary_cos"], kwargs["rotary_sin"], False)
    torch.library.opcheck(
        decode_step_extras_append_op,
        (q, k_cache, v_cache, kwargs["cache_seqlens"], None, kwargs["k_new"], kwargs["v_new"], *extras, *common),
    )
    # Read only (no rotary without new tokens): the rows and the leftpad.
    torch.library.opcheck(
        decode_step_extras_op,
        (q, k_cache, v_cache, kwargs["cache_seqlens"] + 2, None, kwargs["cache_batch_idx"], kwargs["cache_leftpad"],
         None, None, True, *common),
    )
