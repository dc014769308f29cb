"""A decode call that raises changes nothing: for every kind of bad call, the
caches and cache_seqlens are bitwise what they were, and the error is the
right LongAttnError subclass. Every bad call below carries k_new/v_new, so a
write before the failing check would show."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.decode import plan_decode
from longattn.errors import (
    ArgumentError,
    BackendUnavailableError,
    DTypeError,
    LongAttnError,
    ShapeError,
    UnsupportedFeatureError,
)
from longattn.kernels.decode import cache as cache_module
from longattn.sparse import HiP, HiPDecodeState
from tests.decode.decode_cases import DecodeCase
from tests.tolerance import assert_close_to_oracle

HIP = HiP(topk=4, block_q=4, block_k=2, query_stride=1, sink_size=2, recent_size=4, refresh_interval=3)


def _paged(dtype=torch.float32, seqlen_q=1):
    """Two sequences (5 and 3 cached tokens), page_size 2, one new token each."""
    case = DecodeCase((5, 3), 1, seqlen_q, 2, 2, 16, dtype, 2, True, (-1, -1), 0.0, seed=3)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    return q, k_cache, v_cache, kwargs


def _contiguous(dtype=torch.float32):
    case = DecodeCase((5, 3), 1, 1, 2, 2, 16, dtype, None, True, (-1, -1), 0.0, seed=4)
    q, k_cache, v_cache, kwargs, _, _ = case.build()
    return q, k_cache, v_cache, kwargs


def _with(base, **changes):
    q, k_cache, v_cache, kwargs = base
    kwargs = {**kwargs, **changes}
    return q, k_cache, v_cache, kwargs


def _stale_hip_state():
    """A state filled by a step over other sequences (batch 1)."""
    state = HiPDecodeState()
    q, k_cache, v_cache, kwargs = _contiguous()
    one = {"cache_seqlens": kwargs["cache_seqlens"][:1]}
    longattn.decode_attention(q[:1], k_cache[:1], v_cache[:1], **one, sparse=HIP, state=state)
    return state


def _shared_page_table(kwargs, *, writer_reads_other: bool):
    """Sequence 1 appends at position 3 (its page 1); point that slot at a page
    sequence 0 reads (writer_reads_other) or also appends into."""
    table = kwargs["block_table"].clone()
    if writer_reads_other:
        table[1, 1] = table[0, 0]  # sequence 0 reads page table[0, 0] (positions 0-1)
    else:
        table[1, 1] = table[0, 2]  # sequence 0 appends at position 5: its page 2
    return table


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def _rotary(rows=16, half=4):
    angle = torch.rand(rows, half, generator=torch.Generator().manual_seed(9))
    return {"rotary_cos": angle.cos(), "rotary_sin": angle.sin()}


def _rows4():
    """_contiguous() with a 4-row cache (cache_batch_idx picks two)."""
    q, k_cache, v_cache, kwargs = _contiguous()
    return q, torch.cat([k_cache, k_cache.flip(0)]), torch.cat([v_cache, v_cache.flip(0)]), kwargs


BAD_CALLS = {
    # cache_batch_idx / cache_leftpad / rotary (flash-attn's extras)
    "cache_batch_idx out of range": (_rows4, {"cache_batch_idx": _i32(0, 4)}, ArgumentError),
    "cache_batch_idx negative": (_rows4, {"cache_batch_idx": _i32(-1, 0)}, ArgumentError),
    "cache_batch_idx repeated while appending": (_rows4, {"cache_batch_idx": _i32(2, 2)}, ArgumentError),
    "cache_batch_idx shape": (_rows4, {"cache_batch_idx": _i32(0, 1, 2)}, ShapeError),
    "cache_batch_idx dtype": (_rows4, {"cache_batch_idx": torch.tensor([0.0, 1.0])}, DTypeError),
    "cache_batch_idx missing": (_rows4, {}, ShapeError),
    "cache_batch_idx paged": (_paged, {"cache_batch_idx": _i32(0, 1)}, UnsupportedFeatureError),
    "cache_batch_idx overflow": (lambda: _with(_rows4(), cache_seqlens=_i32(5, 9)), {"cache_batch_idx": _i32(3, 1)},
                                 ArgumentError),
    "cache_leftpad past length": (_contiguous, {"cache_leftpad": _i32(0, 4)}, ArgumentError),
    "cache_leftpad negative": (_contiguous, {"cache_leftpad": _i32(-1, 0)}, ArgumentError),
    "cache_leftpad shape": (_contiguous, {"cache_leftpad": _i32(0)}, ShapeError),
    "cache_leftpad paged": (_paged, {"cache_leftpad": _i32(0, 1)}, UnsupportedFeatureError),
    "cache_leftpad overflow": (lambda: _with(_contiguous(), cache_seqlens=_i32(5, 9)), {"cache_leftpad": _i32(2, 2)},
                               ArgumentError),
    "cache_leftpad with sparse": (_contiguous, {"cache_leftpad": _i32(0, 0), "sparse": HIP}, UnsupportedFeatureError),
    "rotary_cos alone": (_contiguous, {"rotary_cos": _rotary()["rotary_cos"]}, ArgumentError),
    "rotary shapes differ": (_contiguous, {**_rotary(), "rotary_sin": torch.zeros(16, 3)}, ShapeError),
    "rotary_dim > headdim": (_contiguous, _rotary(half=9), ShapeError),
    "rotary table too short": (_contiguous, _rotary(rows=5), ShapeError),
    "rotary table dtype": (_contiguous, {**_rotary(), "rotary_cos": torch.zeros(16, 4, dtype=torch.int32)},
                           DTypeError),
    "rotary_interleaved type": (_contiguous, {**_rotary(), "rotary_interleaved": "yes"}, ArgumentError),
    "rotary with bad leftpad": (_contiguous, {**_rotary(), "cache_leftpad": _i32(6, 0)}, ArgumentError),
    "rotary with overflow": (lambda: _with(_contiguous(), cache_seqlens=_i32(5, 9)), _rotary(rows=32), ArgumentError),

    # shapes
    "k_new shape": (lambda: _with(_paged(), k_new=torch.randn(2, 1, 3, 16), v_new=torch.randn(2, 1, 3, 16)),
                    {}, ShapeError),
    "v_new shape": (lambda: _with(_paged(), v_new=torch.randn(2, 2, 2, 16)), {}, ShapeError),
    "q batch": (lambda: _with(_contiguous(), cache_seqlens=torch.tensor([5, 3, 1], dtype=torch.int32)),
                {}, ShapeError),
    "block_table shape": (lambda: _with(_paged(), block_table=torch.zeros(3, 4, dtype=torch.int32)), {}, ShapeError),
    "cache_seqlens shape": (lambda: _with(_paged(), cache_seqlens=torch.tensor([5], dtype=torch.int32)),
                            {}, ShapeError),
    # dtypes
    "k_new dtype": (lambda: _with(_paged(), k_new=torch.randn(2, 1, 2, 16, dtype=torch.float16)), {}, DTypeError),
    "cache_seqlens dtype": (lambda: _with(_paged(), cache_seqlens=torch.tensor([5.0, 3.0])), {}, DTypeError),
    "block_table dtype": (lambda: _with(_paged(), block_table=torch.zeros(2, 5)), {}, DTypeError),
    # data: lengths, overflow, table entries, shared pages
    "negative length": (lambda: _with(_paged(), cache_seqlens=torch.tensor([5, -1], dtype=torch.int32)),
                        {}, ArgumentError),
    "overflow paged": (lambda: _with(_paged(), cache_seqlens=torch.tensor([5, 10], dtype=torch.int32)),
                       {}, ArgumentError),
    "overflow contiguous": (lambda: _with(_contiguous(), cache_seqlens=torch.tensor([5, 9], dtype=torch.int32)),
                            {}, ArgumentError),
    "block_table out of range": (
        lambda: (lambda b: _with(b, block_table=b[3]["block_table"].index_fill(1, torch.tensor([1]), 999)))(_paged()),
        {}, ArgumentError),
    "block_table negative": (
        lambda: (lambda b: _with(b, block_table=b[3]["block_table"].index_fill(1, torch.tensor([2]), -1)))(_paged()),
        {}, ArgumentError),
    "shared page (writer and reader)": (
        lambda: (lambda b: _with(b, block_table=_shared_page_table(b[3], writer_reads_other=True)))(_paged()),
        {}, ArgumentError),
    "shared page (two writers)": (
        lambda: (lambda b: _with(b, block_table=_shared_page_table(b[3], writer_reads_other=False)))(_paged()),
        {}, ArgumentError),
    # plans
    "plan lengths": (_paged, {"plan": plan_decode([6, 5], nheads_k=2, num_workers=2)}, ArgumentError),
    "plan nheads_k": (_paged, {"plan": plan_decode([6, 4], nheads_k=1, num_workers=2)}, ArgumentError),
    "plan batch": (_paged, {"plan": plan_decode([6], nheads_k=2, num_workers=2)}, ArgumentError),
    "plan past capacity": (_paged, {"plan": plan_decode([6, 99], nheads_k=2, num_workers=2)}, ArgumentError),
    "plan type": (_paged, {"plan": "plan"}, ArgumentError),
    # backends
    "unknown backend": (_paged, {"backend": "fast"}, ArgumentError),
    "forced cuda": (_paged, {"backend": "cuda"}, BackendUnavailableError),
    "forced triton bf16": (lambda: _paged(torch.bfloat16), {"backend": "triton"}, BackendUnavailableError),
    # options
    "bad check": (_paged, {"check": "yes"}, ArgumentError),
    "bad window": (_paged, {"window_size": (2, 1)}, ArgumentError),
    "state without sparse": (_paged, {"state": HiPDecodeState()}, UnsupportedFeatureError),
    # sparse
    "sparse state type": (_paged, {"sparse": HIP, "state": object()}, ArgumentError),
    "sparse stale state": (_paged, {"sparse": HIP, "state": _stale_hip_state}, ArgumentError),
    "sparse with window": (_paged, {"sparse": HIP, "window_size": (3, 0)}, UnsupportedFeatureError),
    "sparse with plan": (_paged, {"sparse": HIP, "plan": plan_decode([6, 4], nheads_k=2, num_workers=2)},
                         UnsupportedFeatureError),
    "sparse backend": (_paged, {"sparse": HIP, "backend": "cpp"}, UnsupportedFeatureError),
    "sparse seqlen_q": (lambda: _paged(seqlen_q=5), {"sparse": HIP}, UnsupportedFeatureError),
    "sparse method": (_paged, {"sparse": "hip"}, UnsupportedFeatureError),
    "sparse overflow": (lambda: _with(_paged(), cache_seqlens=torch.tensor([5, 10], dtype=torch.int32)),
                        {"sparse": HIP}, ArgumentError),
    "sparse shared page": (
        lambda: (lambda b: _with(b, block_table=_shared_page_table(b[3], writer_reads_other=True)))(_paged()),
        {"sparse": HIP}, ArgumentError),
}


@pytest.mark.parametrize("table_check", ["python", "vectorised"])
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_a_call_that_raises_changes_nothing(name, table_check, monkeypatch):
    if table_check == "vectorised":
        monkeypatch.setattr(cache_module, "PYTHON_TABLE_CHECK_MAX", 0)  # the torch twin of the table checks
    build, options, error = BAD_CALLS[name]
    q, k_cache, v_cache, kwargs = build()
    options = {k: (v() if callable(v) and k == "state" else v) for k, v in options.items()}
    assert "k_new" in kwargs  # a premature write would be visible
    before = [t.clone() for t in (k_cache, v_cache, kwargs["cache_seqlens"])]
    with pytest.raises(error) as info:
        longattn.decode_attention(q, k_cache, v_cache, **kwargs, **options)
    assert isinstance(info.value, LongAttnError)
    after = (k_cache, v_cache, kwargs["cache_seqlens"])
    for old, new in zip(before, after):
        assert torch.equal(old, new) or (old.isnan().any() and torch.equal(old.nan_to_num(), new.nan_to_num()))


@pytest.mark.parametrize("check", [None, True])
def test_check_is_on_by_default_on_cpu(check):
    q, k_cache, v_cache, kwargs = _paged()
    kwargs["cache_seqlens"] = torch.tensor([5, 10], dtype=torch.int32)
    with pytest.raises(ArgumentError, match="cache overflow"):
        longattn.decode_attention(q, k_cache, v_cache, **kwargs, check=check)


@pytest.mark.parametrize("table_check", ["python", "vectorised"])
def test_shared_page_errors_name_both_entries(table_check, monkeypatch):
    if table_check == "vectorised":
        monkeypatch.setattr(cache_module, "PYTHON_TABLE_CHECK_MAX", 0)
    q, k_cache, v_cache, kwargs = _paged()
    table = _shared_page_table(kwargs, writer_reads_other=True)
    page = int(table[1, 1])
    with pytest.raises(ArgumentError, match=rf"block_table\[1, 1\] = {page} receives new tokens of sequence 1, "
                                            rf"but page {page} is also block_table\[0, 0\] \(sequence 0's visible"):
        longattn.decode_attention(q, k_cache, v_cache, **{**kwargs, "block_table": table})
    table = _shared_page_table(kwargs, writer_reads_other=False)
    page = int(table[1, 1])
    with pytest.raises(ArgumentError, match=rf"block_table\[0, 2\] = {page} receives new tokens of sequence 0, "
                                            rf"but page {page} is also block_table\[1, 1\] \(sequence 1's new"):
        longattn.decode_attention(q, k_cache, v_cache, **{**kwargs, "block_table": table})
    # The same page twice in one row, once written: the write would overwrite earlier tokens.
    table = kwargs["block_table"].clone()
    table[0, 2] = table[0, 0]
    with pytest.raises(ArgumentError, match=r"block_table\[0, 2\] .* is also block_table\[0, 0\]"):
        longattn.decode_attention(q, k_cache, v_cache, **{**kwargs, "block_table": table})
    with pytest.raises(ArgumentError, match=r"block_table\[0, 1\] = 999 is out of range"):
        longattn.decode_attention(q, k_cache, v_cache, **{**kwargs, "block_table": table.index_fill(1, torch.tensor([1]), 999)})


def test_read_only_shared_pages_are_allowed():
    """Two sequences sharing a prefix page they only read (no new tokens land in it)."""
    gen = torch.Generator().manual_seed(8)
    page_size, heads_k, dim = 4, 2, 16
    prefix = torch.randn(page_size, heads_k, 2, dim, generator=gen)  # one full page, (tokens, heads, k/v, dim)
    k_cache = torch.zeros(5, page_size, heads_k, dim)
    v_cache = torch.zeros_like(k_cache)
    k_cache[0], v_cache[0] = prefix[:, :, 0], prefix[:, :, 1]
    table = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)  # page 0 shared, pages 1 and 2 private
    lens = torch.tensor([4, 4], dtype=torch.int32)
    q = torch.randn(2, 1, 4, dim, generator=gen)
    k_new, v_new = torch.randn(2, 1, heads_k, dim, generator=gen), torch.randn(2, 1, heads_k, dim, generator=gen)
    out = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, k_new=k_new,
                                    v_new=v_new)
    for b, page in enumerate((1, 2)):
        assert torch.equal(k_cache[page, 0], k_new[b, 0]) and torch.equal(v_cache[page, 0], v_new[b, 0])
        k_seq = torch.cat([prefix[:, :, 0], k_new[b]])[None].double()
        v_seq = torch.cat([prefix[:, :, 1], v_new[b]])[None].double()
        ref, _ = longattn.reference.attention_ref(q[b : b + 1].double(), k_seq, v_seq, causal=True)
        assert_close_to_oracle(out[b : b + 1], ref, ref)


def test_check_false_gives_the_same_bits_on_valid_input():
    results = []
    for check in (None, True, False):
        q, k_cache, v_cache, kwargs = _paged()
        plan = plan_decode([6, 4], nheads_k=2, num_workers=3, block_n=2, heads_per_tile=None)
        results.append((longattn.decode_attention(q, k_cache, v_cache, **kwargs, check=check, plan=plan), k_cache))
        q, k_cache, v_cache, kwargs = _contiguous()
        results.append((longattn.decode_attention(q, k_cache, v_cache, **kwargs, check=check), k_cache))
    for (out, cache), (out0, cache0) in zip(results[2:], results[:2] * 2):
        assert torch.equal(out, out0) and torch.equal(cache.nan_to_num(), cache0.nan_to_num())
