"""The sparse methods trace with torch.compile(fullgraph=True): attention(...,
sparse=HiP | Streaming | Duo) through the longattn::sparse_prefill custom op,
and one StreamingCache / DuoCache step (decode through longattn::decode_forward).
Compiled and eager calls give the same bits (and the same cache contents);
both match the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.decode import decode_forward_op
from longattn.reference import attention_ref
from longattn.sparse import (
    Duo,
    DuoCache,
    HeadPattern,
    HiP,
    HiPDecodeState,
    Streaming,
    StreamingCache,
    hip_select_blocks,
)
from longattn.sparse.compile_ops import method_spec, sparse_prefill_op
from longattn.sparse.streaming import lambda_mask
from tests.tolerance import assert_close_to_oracle

SINK, RECENT = 2, 5
HIP = HiP(topk=4, block_q=8, block_k=2, query_stride=2, sink_size=SINK, recent_size=RECENT)
PATTERN = HeadPattern(((True, False, False, True),), sink_size=SINK, recent_size=RECENT)  # split runs: gathers
METHODS = {"hip": HIP, "streaming": Streaming(SINK, RECENT), "duo": Duo(PATTERN, 0)}
NHEADS_K, GROUP, HEADDIM = 4, 2, 16


def _qkv(seqlen_q, seqlen_k, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen_q, NHEADS_K * GROUP, HEADDIM, generator=gen)
    k = torch.randn(2, seqlen_k, NHEADS_K, HEADDIM, generator=gen)
    v = torch.randn(2, seqlen_k, NHEADS_K, HEADDIM, generator=gen)
    return q, k, v


def _mask(name, q, k):
    """The keys the method lets each query see, as the oracle's boolean mask."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if name == "hip":  # the oracle restricted to HiP's own (deterministic) selection
        layout = BlockSparseLayout(seqlen_q, seqlen_k, HIP.block_q, HIP.block_k, SINK, RECENT, True)
        return layout.dense_mask(hip_select_blocks(q, k, HIP, causal=True))
    stream = lambda_mask(seqlen_q, seqlen_k, SINK, RECENT)
    if name == "streaming":
        return stream
    full = PATTERN.layer(0).repeat_interleave(GROUP)
    return torch.where(full[:, None, None], lambda_mask(seqlen_q, seqlen_k, 0, seqlen_k + seqlen_q + 1), stream)[None]


def _prefill(q, k, v, sparse, backend):
    return longattn.attention(q, k, v, causal=True, sparse=sparse, backend=backend, return_lse=True)


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("name", list(METHODS))
def test_sparse_prefill_fullgraph_matches_eager_and_oracle(name, backend):
    sparse = METHODS[name]
    q, k, v = _qkv(19, 23, seed=len(name))  # seqlen_q != seqlen_k, ragged blocks
    with torch.no_grad():
        eager_out, eager_lse = _prefill(q, k, v, sparse, backend)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(_prefill)(q, k, v, sparse, backend)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        out, lse = torch.compile(_prefill, fullgraph=True, backend="aot_eager")(q, k, v, sparse, backend)
    # The op runs the same prefill: the same bits.
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), mask=_mask(name, q, k))
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


def test_sparse_prefill_refusals_are_raised_while_tracing():
    """The checks that read no data run at the call while tracing: a compiled call
    refuses what an eager one refuses (fullgraph: dynamo reports the error it met;
    otherwise the error itself propagates)."""
    q, k, v = _qkv(8, 8, seed=0)

    def non_causal(q, k, v):
        return longattn.attention(q, k, v, causal=False, sparse=METHODS["duo"])

    with torch.no_grad():
        torch._dynamo.reset()
        with pytest.raises(Exception, match="defined for causal attention"):
            torch.compile(non_causal, fullgraph=True, backend="eager")(q, k, v)
        torch._dynamo.reset()
        with pytest.raises(longattn.errors.ArgumentError, match="defined for causal attention"):
            torch.compile(non_causal, backend="eager")(q, k, v)


@pytest.mark.parametrize("name", list(METHODS))
def test_opcheck_sparse_prefill(name):
    q, k, v = _qkv(11, 13, seed=3)
    method, spec = method_spec(METHODS[name])
    torch.library.opcheck(sparse_prefill_op, (q, k, v, method, spec, True, HEADDIM ** -0.5, 0.0, "auto"))


def test_opcheck_decode_forward():
    q, k, v = _qkv(2, 9, seed=4)
    seqlens = torch.tensor([9, 5], dtype=torch.int32)
    torch.library.opcheck(decode_forward_op, (q, k, v, seqlens, None, 0.25, -1, 0, 0.0, [], "auto"))


# --- the decode caches ----------------------------------------------------------

def _step(cache, q, k_new, v_new):
    return cache.step(q, k_new, v_new)


def _make(kind, prompt_k, prompt_v):
    if kind == "streaming":
        cache = StreamingCache(Streaming(SINK, RECENT), 2, NHEADS_K, HEADDIM)
    else:
        cache = DuoCache(Duo(PATTERN, 0), 2, 32, NHEADS_K, HEADDIM)
    cache.append(prompt_k, prompt_v)
    return cache


def _cache_tensors(cache):
    if isinstance(cache, StreamingCache):
        return [cache.k, cache.v]
    return [cache.k_full, cache.v_full, cache.stream.k, cache.stream.v]


@pytest.mark.parametrize("n", [1, 3], ids=["decode", "chunk"])
@pytest.mark.parametrize("kind", ["streaming", "duo"])
def test_cache_steps_fullgraph_match_eager_and_oracle(kind, n, backend="aot_eager"):
    """Three compiled steps after a 6-token prompt (the ring wraps): each equals the
    eager step bit for bit, the caches hold the same bits and length, and the
    outputs match the oracle over the whole sequence."""
    prompt, steps = 6, 3
    total = prompt + steps * n
    q, k, v = _qkv(total, total, seed=7 + n)
    eager = _make(kind, k[:, :prompt], v[:, :prompt])
    cache = _make(kind, k[:, :prompt], v[:, :prompt])
    probe = _make(kind, k[:, :prompt], v[:, :prompt])
    torch._dynamo.reset()
    sl = slice(prompt, prompt + n)
    explained = torch._dynamo.explain(_step)(probe, q[:, sl], k[:, sl], v[:, sl])
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend=backend)  # may recompile on the int length
    mask = lambda_mask(total, total, SINK, RECENT)
    if kind == "duo":
        full = PATTERN.layer(0).repeat_interleave(GROUP)
        mask = torch.where(full[:, None, None], lambda_mask(total, total, 0, 2 * total + 1), mask)[None]
    ref, _ = attention_ref(q.double(), k.double(), v.double(), mask=mask)
    for at in range(prompt, total, n):
        sl = slice(at, at + n)
        out = compiled(cache, q[:, sl], k[:, sl], v[:, sl])
        assert torch.equal(out, _step(eager, q[:, sl], k[:, sl], v[:, sl]))
        assert cache.length == eager.length == at + n
        assert all(torch.equal(a, b) for a, b in zip(_cache_tensors(cache), _cache_tensors(eager)))
        assert_close_to_oracle(out, ref[:, sl], ref[:, sl])


def test_streaming_step_with_inductor():
    """The default backend (inductor) as a model compiles it: the writes into the
    cache's own tensors survive functionalization."""
    test_cache_steps_fullgraph_match_eager_and_oracle("streaming", 1, backend="inductor")


HIP_DECODE = HiP(topk=4, block_q=8, block_k=2, query_stride=2, sink_size=SINK, recent_size=3, refresh_interval=3)


def _hip_step(q, k_cache, v_cache, lens, k_new, v_new, state):
    return longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, k_new=k_new, v_new=v_new,
                                     sparse=HIP_DECODE, state=state, return_lse=True)


def _hip_steps(fn, q, k, v, prompt, steps, state):
    k_cache, v_cache = torch.zeros_like(k), torch.zeros_like(v)
    k_cache[:, :prompt], v_cache[:, :prompt] = k[:, :prompt], v[:, :prompt]
    results = []
    for t in range(prompt, prompt + steps):
        lens = torch.full((k.shape[0],), t, dtype=torch.int32)
        sl = slice(t, t + 1)
        results.append(fn(q[:, sl], k_cache, v_cache, lens, k[:, sl], v[:, sl], state))
    return results, k_cache, v_cache


def test_hip_decode_with_state_fullgraph_matches_eager_and_oracle():
    """Seven compiled steps (refreshes at 1, 4, 7, reuse with carried blocks between)
    equal the eager steps bit for bit, write the same cache, leave the same
    state; each matches the oracle restricted to the blocks the step listed."""
    q, k, v = _qkv(20, 20, seed=5)
    prompt, steps = 12, 7
    eager_state, state = HiPDecodeState(), HiPDecodeState()
    torch._dynamo.reset()
    sl = slice(prompt, prompt + 1)
    lens = torch.full((2,), prompt, dtype=torch.int32)
    explained = torch._dynamo.explain(_hip_step)(q[:, sl], k.clone(), v.clone(), lens, k[:, sl], v[:, sl],
                                                 HiPDecodeState())
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(_hip_step, fullgraph=True, backend="aot_eager")
    got, k_cache, v_cache = _hip_steps(compiled, q, k, v, prompt, steps, state)
    step_blocks = []

    def eager_step(*args):
        result = _hip_step(*args)
        step_blocks.append(eager_state.step_blocks)
        return result

    want, eager_k, eager_v = _hip_steps(eager_step, q, k, v, prompt, steps, eager_state)
    assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)
    for t, ((out, lse), (e_out, e_lse), blocks) in enumerate(zip(got, want, step_blocks)):
        assert torch.equal(out, e_out) and torch.equal(lse, e_lse)
        n = prompt + t + 1
        for b in range(2):
            layout = BlockSparseLayout(1, n, 1, HIP_DECODE.block_k, SINK, HIP_DECODE.recent_size, True)
            mask = layout.dense_mask(blocks[b])
            ref_out, ref_lse = attention_ref(q[b : b + 1, n - 1 : n].double(), k[b : b + 1, :n].double(),
                                             v[b : b + 1, :n].double(), mask=mask)
            assert_close_to_oracle(out[b : b + 1], ref_out, ref_out)
            assert_close_to_oracle(lse[b : b + 1], ref_lse, ref_lse, name="lse")
    # The compiled state lives in its tensors: loaded, it is the eager state.
    state.load_tensors(*state.compiled)
    counters = (state.refreshes, state.steps_since_refresh)
    assert counters == (eager_state.refreshes, eager_state.steps_since_refresh) == (3, 1)
    assert (state.lengths, state.carry_from) == (eager_state.lengths, eager_state.carry_from)
    assert all(torch.equal(a, b) for a, b in zip(state.key_blocks, eager_state.key_blocks))
    # An uncompiled step continues from the tensors (and keeps them current).
    t = prompt + steps
    lens = torch.full((2,), t, dtype=torch.int32)
    sl = slice(t, t + 1)
    out, _ = _hip_step(q[:, sl], k_cache, v_cache, lens, k[:, sl], v[:, sl], state)
    e_out, _ = _hip_step(q[:, sl], eager_k, eager_v, lens, k[:, sl], v[:, sl], eager_state)
    assert torch.equal(out, e_out) and int(state.compiled[2][0]) == eager_state.steps_since_refresh == 2


def test_opcheck_hip_decode_step():
    from longattn.decode_api import hip_decode_step_op

    q, k, v = _qkv(1, 16, seed=6)
    lens = torch.tensor([13, 9], dtype=torch.int32)
    k_new, v_new = torch.randn(2, 1, NHEADS_K, HEADDIM), torch.randn(2, 1, NHEADS_K, HEADDIM)
    spec = [4, 8, 2, 2, SINK, 3, 3]
    for filled in (False, True):
        state = HiPDecodeState()
        if filled:  # a state after one eager step over the same cache
            longattn.decode_attention(q, k.clone(), v.clone(), cache_seqlens=lens, sparse=HIP_DECODE, state=state)
        blocks, info, counts = state.as_tensors(2, q.shape[2], HIP_DECODE, q.device)
        torch.library.opcheck(hip_decode_step_op, (q, k, v, lens, None, k_new, v_new, blocks, info, counts, spec,
                                                   HEADDIM ** -0.5, 0.0, True))
