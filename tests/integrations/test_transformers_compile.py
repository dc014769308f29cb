"""torch.compile(model, fullgraph=True) with longattn's attention implementations, prefill and LongAttnCache steps.

Each compile of even a tiny model takes seconds here, so each test compiles
once and runs a prefill plus a few decode steps through it. The compiled
logits are checked against the float64 oracle with the uncompiled run as the
baseline of the tolerance rule; dynamo's ``explain`` must report no graph break.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tolerance import assert_close_to_oracle

transformers = pytest.importorskip("transformers", minversion="4.51", reason="the transformers integration needs transformers>=4.51")

import longattn.integrations.transformers as lt  # noqa: E402
from tests.integrations.test_transformers import _build, _cache_kwarg, _inputs  # noqa: E402
from tests.integrations.test_transformers_cache import _extra, _steps, register_methods_and_oracles  # noqa: E402

ORACLES = {"longattn": "ref64", "longattn_hip": "ref64", "longattn_streaming": "ref64_streaming",
           "longattn_duo": "ref64_duo"}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_methods_and_oracles()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_unmasked_steps(model, ids, extra, cache):
    """Last-position logits of a compiled (fullgraph) prefill and one step per column of ``extra``."""
    compiled_model = torch.compile(model, fullgraph=True)
    kw = {_cache_kwarg(model): cache}
    outs = []
    with torch.no_grad():  # fullgraph=True: any graph break raises here
        outs.append(compiled_model(ids, use_cache=True, **kw).logits[:, -1])
        for t in range(extra.shape[1]):
            outs.append(compiled_model(extra[:, t:t + 1], use_cache=True, **kw).logits[:, -1])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("impl", list(ORACLES))
def test_compiled_model_prefill_and_cache_steps(impl):
    model, _ = _build("llama")
    ids, _ = _inputs(left_padding=False)
    extra = _extra(3)
    model.set_attn_implementation(impl)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    expected = _steps(copy.deepcopy(model).double(), ORACLES[impl], ids, extra)
    eager = _steps(model, impl, ids, extra, cache=lt.LongAttnCache(model.config, max_cache_len=32))
    cache = lt.LongAttnCache(model.config, max_cache_len=32)
    ours = _compiled_unmasked_steps(model, ids, extra, cache)
    assert_close_to_oracle(ours, expected, eager, name=f"compiled {impl} logits")
    assert cache.get_seq_length() == ids.shape[1] + extra.shape[1]


def test_compiled_packed_position_ids_still_raise():
    # sequences packed by position_ids alone cannot be honoured: compiled, an async assert raises at run time
    model, _ = _build("llama")
    model.set_attn_implementation("longattn")
    ids, _ = _inputs(left_padding=False)
    positions = torch.cat([torch.arange(6), torch.arange(6)])[None].expand(2, -1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="position_ids restart inside a row"):
        torch.compile(model, fullgraph=True)(ids, position_ids=positions)


def _compiled_steps(model, ids, extra, mask, cache):
    compiled_model = torch.compile(model, fullgraph=True)
    kw = {_cache_kwarg(model): cache}
    outs = []
    with torch.no_grad():
        outs.append(compiled_model(ids, attention_mask=mask, use_cache=True, **kw).logits[:, -1])
        for t in range(extra.shape[1]):
            m = torch.cat([mask, torch.ones_like(extra[:, :t + 1])], dim=1)
            outs.append(compiled_model(extra[:, t:t + 1], attention_mask=m, use_cache=True, **kw).logits[:, -1])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("impl, left_padding", [("longattn", True), ("longattn_streaming", False)])
def test_compiled_model_with_a_mask(impl, left_padding):
    # A mask reaches a compiled model (generate always passes one): never read on the
    # host; dense takes it as left padding (decode via cache_leftpad), sparse as no padding.
    model, _ = _build("llama")
    ids, mask = _inputs(left_padding=left_padding)
    extra = _extra(2)
    model.set_attn_implementation(impl)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(ids, attention_mask=mask)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    oracle_mask = mask if left_padding else None
    expected = _steps(copy.deepcopy(model).double(), ORACLES[impl], ids, extra, mask=oracle_mask)
    eager = _steps(model, impl, ids, extra, mask=mask, cache=lt.LongAttnCache(model.config, max_cache_len=32))
    ours = _compiled_steps(model, ids, extra, mask, lt.LongAttnCache(model.config, max_cache_len=32))
    # (the last position, whose logits these are, is valid in every row)
    assert_close_to_oracle(ours, expected, eager, name=f"compiled {impl} logits with a mask")


def test_compiled_right_padding_raises_when_the_graph_runs():
    model, _ = _build("llama")
    model.set_attn_implementation("longattn")
    ids, _ = _inputs(left_padding=False)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad(), pytest.raises(RuntimeError, match="must be left-padded"):
        torch.compile(model, fullgraph=True)(ids, attention_mask=mask, use_cache=True,
                                             **{_cache_kwarg(model): lt.LongAttnCache(model.config, max_cache_len=32)})


@pytest.mark.parametrize("impl", ["longattn_quest", "longattn_double_sparsity", "longattn_tidal"])
def test_compiled_decode_time_methods(impl):
    # budgets covering the context: the selected steps equal dense attention (the float64 oracle)
    from tests.integrations.test_transformers_cache import _register_decode_time

    _register_decode_time(budget=64)
    model, _ = _build("llama")
    ids, _ = _inputs(left_padding=False)
    extra = _extra(3)
    model.set_attn_implementation(impl)
    expected = _steps(copy.deepcopy(model).double(), "ref64", ids, extra)
    eager = _steps(model, impl, ids, extra, cache=lt.LongAttnCache(model.config, max_cache_len=32))
    ours = _compiled_unmasked_steps(model, ids, extra, lt.LongAttnCache(model.config, max_cache_len=32))
    assert_close_to_oracle(ours, expected, eager, name=f"compiled {impl} logits")
    register_methods_and_oracles()
