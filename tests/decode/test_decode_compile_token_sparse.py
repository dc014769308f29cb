"""Quest / Double Sparsity / TidalDecode decode steps under torch.compile(fullgraph=True).

The step is one custom op (``longattn::token_sparse_step``) that steps the
caller's state through its handle: compiled steps must equal eager steps
bitwise (outputs, caches, states' selections), with no graph break.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.decode_api import token_sparse_step_op
from longattn.sparse import DoubleSparsity, DoubleSparsityState, Quest, QuestState, TidalDecode, TidalState

B, H, HK, D, CAP = 2, 8, 2, 16, 64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cache(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, CAP, HK, D, generator=g), torch.randn(B, CAP, HK, D, generator=g)


def _step(q, kc, vc, lens, kn, vn, cfg, st):
    return longattn.decode_attention(q, kc, vc, cache_seqlens=lens, k_new=kn, v_new=vn, sparse=cfg, state=st,
                                     return_lse=True, return_selection=True)


@pytest.mark.parametrize("method", ["quest", "double_sparsity"])
def test_compiled_steps_equal_eager_steps_bitwise(method):
    cfg = Quest(8, 4) if method == "quest" else DoubleSparsity(((0, 1, 2), (3, 4, 5)), 8)
    make = (lambda: QuestState(cfg)) if method == "quest" else (lambda: DoubleSparsityState(cfg))
    eager_state, compiled_state = make(), make()
    kc, vc = _cache()
    kc2, vc2 = kc.clone(), vc.clone()
    lens = torch.tensor([40, 33], dtype=torch.int32)
    compiled = torch.compile(_step, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        q = torch.randn(B, 1, H, D, generator=g)
        kn, vn = torch.randn(B, 1, HK, D, generator=g), torch.randn(B, 1, HK, D, generator=g)
        out, lse, sel = _step(q, kc, vc, lens, kn, vn, cfg, eager_state)
        out2, lse2, sel2 = compiled(q, kc2, vc2, lens, kn, vn, cfg, compiled_state)
        assert torch.equal(out, out2) and torch.equal(lse, lse2)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the op appended k_new exactly as eager
        assert torch.equal(sel2[..., :sel.shape[2]], sel) and bool((sel2[..., sel.shape[2]:] == -1).all())
        lens = lens + 1
    assert compiled_state.lengths == eager_state.lengths
    assert torch._dynamo.explain(_step)(q, kc2, vc2, lens, kn, vn, cfg, compiled_state).graph_break_count == 0


def test_compiled_tidal_layers_share_the_step_state():
    tidal = TidalDecode(3, dense_layers=(0,), selection_layers=(1,), token_budget=6)
    caches = [_cache(seed) for seed in range(3)]
    caches2 = [(k.clone(), v.clone()) for k, v in caches]
    lens = torch.tensor([30, 21], dtype=torch.int32)

    def layers(q, caches, lens, state):
        outs = []
        for i, (kc, vc) in enumerate(caches):
            outs.append(longattn.decode_attention(q, kc, vc, cache_seqlens=lens, sparse=tidal.layer(i), state=state))
        return torch.stack(outs)

    q = torch.randn(B, 1, H, D, generator=torch.Generator().manual_seed(2))
    eager_state, compiled_state = TidalState(), TidalState()
    expected = layers(q, caches, lens, eager_state)
    got = torch.compile(layers, fullgraph=True)(q, caches2, lens, compiled_state)
    assert torch.equal(expected, got)
    assert torch.equal(eager_state.selection, compiled_state.selection)


def test_opcheck_token_sparse_step():
    kc, vc = _cache()
    lens = torch.tensor([40, 33], dtype=torch.int32)
    q = torch.randn(B, 1, H, D)
    kn, vn = torch.randn(B, 1, HK, D), torch.randn(B, 1, HK, D)
    # handle -1: a throwaway state per call (opcheck runs the op several times)
    torch.library.opcheck(token_sparse_step_op, (q, kc, vc, lens, None, kn, vn, "quest", [8, 4], -1, 0.25, 0.0,
                                                 "auto", 12))
    torch.library.opcheck(token_sparse_step_op, (q, kc, vc, lens, None, None, None, "double_sparsity",
                                                 [8, 2, 3, 0, 1, 2, 3, 4, 5], -1, 0.25, 0.0, "auto", 8))
