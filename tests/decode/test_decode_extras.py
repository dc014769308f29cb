"""flash-attn's ``flash_attn_with_kvcache`` extras on :func:`longattn.decode_attention`:
``cache_batch_idx``, ``cache_leftpad`` and rotary embedding, each against the
float64 oracle on the gathered / shifted / rotated keys, with the ``cpp`` and
``eager`` twins (and ``triton`` on a small case: its interpreter is slow)."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn.reference import attention_ref
from tests.tolerance import assert_close_to_oracle

BACKENDS = ["cpp", "eager"]
NAN = float("nan")


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _cache(rows, width, nheads_k, headdim, dtype, gen, fill_from=None):
    """Random rows; slots at and past ``fill_from[r]`` (if given) hold NaN, so a
    kernel that reads a slot it should not shows it."""
    k = torch.randn(rows, width, nheads_k, headdim, generator=gen).to(dtype)
    v = torch.randn(rows, width, nheads_k, headdim, generator=gen).to(dtype)
    if fill_from is not None:
        for r, n in enumerate(fill_from):
            k[r, n:] = NAN
            v[r, n:] = NAN
    return k, v


def _oracle(q, keys, values, **options):
    """float64 (out, lse), one sequence at a time over its own key list."""
    outs, lses = [], []
    for b, (kb, vb) in enumerate(zip(keys, values)):
        o, l = attention_ref(q[b : b + 1], kb[None], vb[None], **options)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _check(out, lse, ref_out, ref_lse):
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


# --- cache_batch_idx ----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [[2, 0, 3, 1], [3, 1], [4]], ids=["permutation", "subset", "one-row"])
@pytest.mark.parametrize("seqlen_new", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_batch_idx(backend, rows, seqlen_new, dtype):
    gen = torch.Generator().manual_seed(11 + len(rows) + seqlen_new)
    n_rows, width, nheads_k, group, headdim = 5, 12, 2, 2, 16
    lens = [7, 3, 0, 9, 5][: len(rows)]
    batch = len(rows)
    k_cache, v_cache = _cache(n_rows, width, nheads_k, headdim, dtype, gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, 2, nheads_k * group, headdim, generator=gen).to(dtype)
    extra = {}
    if seqlen_new:
        extra = {"k_new": torch.randn(batch, seqlen_new, nheads_k, headdim, generator=gen).to(dtype),
                 "v_new": torch.randn(batch, seqlen_new, nheads_k, headdim, generator=gen).to(dtype)}
    out, lse = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=_i32(lens), cache_batch_idx=_i32(rows),
                                         **extra, causal=True, backend=backend, return_lse=True)
    keys, values = [], []
    for b, (r, n) in enumerate(zip(rows, lens)):
        kb, vb = before_k[r, :n], before_v[r, :n]
        if seqlen_new:
            kb, vb = torch.cat([kb, extra["k_new"][b]]), torch.cat([vb, extra["v_new"][b]])
        keys.append(kb)
        values.append(vb)
    _check(out, lse, *_oracle(q, keys, values, causal=True))
    # The new tokens landed in the selected rows only; every other slot is untouched.
    expect_k, expect_v = before_k.clone(), before_v.clone()
    for b, (r, n) in enumerate(zip(rows, lens)):
        if seqlen_new:
            expect_k[r, n : n + seqlen_new] = extra["k_new"][b]
            expect_v[r, n : n + seqlen_new] = extra["v_new"][b]
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


def test_cache_batch_idx_may_repeat_rows_when_only_reading():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = _cache(2, 8, 1, 16, torch.float32, gen)
    q = torch.randn(3, 1, 2, 16, generator=gen)
    rows, lens = [1, 1, 0], [8, 4, 6]
    out = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=_i32(lens), cache_batch_idx=_i32(rows))
    ref, _ = _oracle(q, [k_cache[r, :n] for r, n in zip(rows, lens)], [v_cache[r, :n] for r, n in zip(rows, lens)],
                     causal=True)
    assert_close_to_oracle(out, ref, ref)


# --- cache_leftpad ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen_new", [0, 3])
@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "sliced-cache"])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (2, 0))])
def test_cache_leftpad(backend, seqlen_new, with_rows, strided, causal, window):
    """Sequence b holds slots leftpad[b] .. cache_seqlens[b] - 1 of its row (the
    slots before are NaN: never read); new tokens go to cache_seqlens[b] ...;
    the attended length is cache_seqlens - leftpad + seqlen_new."""
    gen = torch.Generator().manual_seed(21 + seqlen_new + 2 * with_rows + 4 * strided)
    nheads_k, group, headdim, seqlen_q = 1, 4, 24, 3
    lens, pads = [9, 4, 6, 5], [3, 0, 6, 2]  # sequence 2 is empty (leftpad == length)
    batch = len(lens)
    rows = [3, 0, 2, 1] if with_rows else list(range(batch))
    width = 12
    # A slice of a wider cache: rows are not back to back in memory (stride(0) != width * stride(1)).
    full_width = width + 5 if strided else width
    k_full, v_full = _cache(batch, full_width, nheads_k, headdim, torch.float32, gen)
    k_cache, v_cache = k_full[:, :width], v_full[:, :width]
    for b, (r, p) in enumerate(zip(rows, pads)):
        k_cache[r, :p] = NAN
        v_cache[r, :p] = NAN
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, seqlen_q, nheads_k * group, headdim, generator=gen)
    extra = {}
    if seqlen_new:
        extra = {"k_new": torch.randn(batch, seqlen_new, nheads_k, headdim, generator=gen),
                 "v_new": torch.randn(batch, seqlen_new, nheads_k, headdim, generator=gen)}
    if with_rows:
        extra["cache_batch_idx"] = _i32(rows)
    out, lse = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=_i32(lens), cache_leftpad=_i32(pads),
                                         **extra, causal=causal, window_size=window, backend=backend, return_lse=True)
    keys, values = [], []
    for b, (r, n, p) in enumerate(zip(rows, lens, pads)):
        kb, vb = before_k[r, p:n], before_v[r, p:n]
        if seqlen_new:
            kb, vb = torch.cat([kb, extra["k_new"][b]]), torch.cat([vb, extra["v_new"][b]])
        keys.append(kb)
        values.append(vb)
    _check(out, lse, *_oracle(q, keys, values, causal=causal, window_size=window))
    if seqlen_new:
        for b, (r, n) in enumerate(zip(rows, lens)):
            assert torch.equal(k_cache[r, n : n + seqlen_new], extra["k_new"][b])
            assert torch.equal(v_cache[r, n : n + seqlen_new], extra["v_new"][b])
    if strided:  # the columns past the slice are another tensor's memory: untouched
        assert not k_full[:, width:].isnan().any()


def test_cache_leftpad_triton():
    """The triton twin reads the same page-size-1 view (interpreter: one small case)."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = _cache(2, 8, 1, 16, torch.float32, gen)
    k_cache[0, :2] = NAN
    v_cache[0, :2] = NAN
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(2, 1, 2, 16, generator=gen)
    k_new, v_new = torch.randn(2, 1, 1, 16, generator=gen), torch.randn(2, 1, 1, 16, generator=gen)
    lens, pads = [6, 3], [2, 0]
    out, lse = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=_i32(lens), cache_leftpad=_i32(pads),
                                         k_new=k_new, v_new=v_new, backend="triton", return_lse=True)
    keys = [torch.cat([before_k[b, p:n], k_new[b]]) for b, (n, p) in enumerate(zip(lens, pads))]
    values = [torch.cat([before_v[b, p:n], v_new[b]]) for b, (n, p) in enumerate(zip(lens, pads))]
    _check(out, lse, *_oracle(q, keys, values, causal=True))


# --- rotary -------------------------------------------------------------------

def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool):
    """float64 rotary as complex multiplication of channel pairs by exp(i * angle)."""
    half = cos.shape[1]
    xd = x.double()
    angle = torch.atan2(sin.double(), cos.double())[positions][:, :, None, :]  # (batch, seqlen, 1, half)
    turn = torch.polar(torch.ones_like(angle), angle)
    if interleaved:
        pairs = torch.complex(xd[..., 0 : 2 * half : 2], xd[..., 1 : 2 * half : 2]) * turn
        rotated = torch.stack([pairs.real, pairs.imag], dim=-1).flatten(-2)
    else:
        pairs = torch.complex(xd[..., :half], xd[..., half : 2 * half]) * turn
        rotated = torch.cat([pairs.real, pairs.imag], dim=-1)
    return torch.cat([rotated, xd[..., 2 * half :]], dim=-1)


def _tables(rows: int, half: int, seed: int):
    angle = torch.rand(rows, half, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    return angle.cos(), angle.sin()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "paged", "leftpad"])
@pytest.mark.parametrize("rotary_half", [8, 5], ids=["full", "partial"])
def test_rotary(backend, interleaved, causal, layout, rotary_half):
    """k_new rotated at cache_seqlens + i before it is written; q at cache_seqlens + i
    when causal, else every query at cache_seqlens (flash-attn's rule)."""
    gen = torch.Generator().manual_seed(31 + interleaved + 2 * causal)
    nheads_k, group, headdim, seqlen_q, seqlen_new = 2, 2, 16, 3, 3
    lens = [5, 2, 7]
    pads = [2, 0, 4] if layout == "leftpad" else [0, 0, 0]
    batch, width = len(lens), 12
    cos, sin = _tables(width, rotary_half, seed=7)
    k_cache, v_cache = _cache(batch, width, nheads_k, headdim, torch.float32, gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, seqlen_q, nheads_k * group, headdim, generator=gen)
    k_new = torch.randn(batch, seqlen_new, nheads_k, headdim, generator=gen)
    v_new = torch.randn(batch, seqlen_new, nheads_k, headdim, generator=gen)
    kwargs = {}
    if layout == "paged":  # page_size 4, pages in reverse order
        page, pages_per_seq = 4, width // 4
        table = torch.arange(batch * pages_per_seq - 1, -1, -1, dtype=torch.int32).view(batch, pages_per_seq)
        pk = torch.empty(batch * pages_per_seq, page, nheads_k, headdim)
        pv = torch.empty_like(pk)
        for b in range(batch):
            for j in range(pages_per_seq):
                pk[table[b, j]] = k_cache[b, j * page : (j + 1) * page]
                pv[table[b, j]] = v_cache[b, j * page : (j + 1) * page]
        cache_k, cache_v, kwargs["block_table"] = pk, pv, table
    else:
        cache_k, cache_v = k_cache, v_cache
        if layout == "leftpad":
            kwargs["cache_leftpad"] = _i32(pads)
    out, lse = longattn.decode_attention(q, cache_k, cache_v, cache_seqlens=_i32(lens), k_new=k_new, v_new=v_new,
                                         rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved,
                                         causal=causal, backend=backend, return_lse=True, **kwargs)
    base = torch.tensor(lens)[:, None]
    pos_k = base + torch.arange(seqlen_new)
    pos_q = base + (torch.arange(seqlen_q) if causal else torch.zeros(seqlen_q, dtype=torch.int64))
    k_rot, q_rot = rotary_ref(k_new, cos, sin, pos_k, interleaved), rotary_ref(q, cos, sin, pos_q, interleaved)
    keys = [torch.cat([before_k[b, p:n].double(), k_rot[b]]) for b, (n, p) in enumerate(zip(lens, pads))]
    values = [torch.cat([before_v[b, p:n].double(), v_new[b].double()]) for b, (n, p) in enumerate(zip(lens, pads))]
    _check(out, lse, *_oracle(q_rot, keys, values, causal=causal))
    # The cache holds the rotated keys (float32 math against the float64 rotation).
    for b, n in enumerate(lens):
        if layout == "paged":
            written = torch.stack([cache_k[table[b, p // 4], p % 4] for p in range(n, n + seqlen_new)])
        else:
            written = cache_k[b, n : n + seqlen_new]
        torch.testing.assert_close(written.double(), k_rot[b], rtol=0, atol=1e-5)
        if rotary_half < headdim // 2:  # channels past rotary_dim pass through bit for bit
            assert torch.equal(written[..., 2 * rotary_half :], k_new[b, ..., 2 * rotary_half :])


def test_rotary_with_cache_batch_idx_uses_the_sequences_positions():
    """Positions come from cache_seqlens of the sequence, not of the cache row index."""
    gen = torch.Generator().manual_seed(41)
    cos, sin = _tables(16, 4, seed=2)
    k_cache, v_cache = _cache(3, 16, 1, 8, torch.float32, gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(2, 1, 2, 8, generator=gen)
    k_new, v_new = torch.randn(2, 1, 1, 8, generator=gen), torch.randn(2, 1, 1, 8, generator=gen)
    rows, lens = [2, 0], [9, 3]
    out = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=_i32(lens), cache_batch_idx=_i32(rows),
                                    k_new=k_new, v_new=v_new, rotary_cos=cos, rotary_sin=sin,
                                    rotary_interleaved=False)
    pos = torch.tensor(lens)[:, None]
    k_rot, q_rot = rotary_ref(k_new, cos, sin, pos, False), rotary_ref(q, cos, sin, pos, False)
    keys = [torch.cat([before_k[r, :n].double(), k_rot[b]]) for b, (r, n) in enumerate(zip(rows, lens))]
    values = [torch.cat([before_v[r, :n].double(), v_new[b].double()]) for b, (r, n) in enumerate(zip(rows, lens))]
    ref, _ = _oracle(q_rot, keys, values, causal=True)
    assert_close_to_oracle(out, ref, ref)


def test_extras_match_the_plain_call_bit_for_bit():
    """cache_batch_idx = arange and cache_leftpad = 0 are the plain call: same bits (cpp)."""
    gen = torch.Generator().manual_seed(51)
    lens = _i32([6, 2, 9])
    q = torch.randn(3, 1, 4, 32, generator=gen)
    k_new, v_new = torch.randn(3, 1, 2, 32, generator=gen), torch.randn(3, 1, 2, 32, generator=gen)
    results = []
    for extra in ({}, {"cache_batch_idx": _i32([0, 1, 2])}, {"cache_leftpad": _i32([0, 0, 0])}):
        k_cache, v_cache = _cache(3, 10, 2, 32, torch.float32, torch.Generator().manual_seed(52))
        out = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens, k_new=k_new, v_new=v_new,
                                        backend="cpp", **extra)
        results.append((out, k_cache))
    for out, cache in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(cache, results[0][1])
