"""longattn.integrations.flash_attn: flash-attn 2.8.3's signatures, its conventions
(+inf lse of empty rows, causal with a right window, int cache_seqlens, tensor
windows, rotary, cache_batch_idx, cache_leftpad, ALiBi), each function against
the float64 oracle."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from longattn.errors import LongAttnError, UnsupportedFeatureError
from longattn.integrations import flash_attn as fa
from longattn.reference import attention_ref, attention_ref_varlen
from tests.tolerance import assert_close_to_oracle

_ = object()  # "no default" in the table below

# flash-attn 2.8.3, flash_attn/flash_attn_interface.py: (name, default) in positional order.
COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
          ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    "flash_attn_qkvpacked_func": [("qkv", _)] + COMMON,
    "flash_attn_kvpacked_func": [("q", _), ("kv", _)] + COMMON,
    "flash_attn_func": [("q", _), ("k", _), ("v", _)] + COMMON,
    "flash_attn_varlen_qkvpacked_func": [("qkv", _), ("cu_seqlens", _), ("max_seqlen", _)] + COMMON,
    "flash_attn_varlen_kvpacked_func": [("q", _), ("kv", _), ("cu_seqlens_q", _), ("cu_seqlens_k", _),
                                        ("max_seqlen_q", _), ("max_seqlen_k", _)] + COMMON,
    "flash_attn_varlen_func": [("q", _), ("k", _), ("v", _), ("cu_seqlens_q", _), ("cu_seqlens_k", _),
                               ("max_seqlen_q", _), ("max_seqlen_k", _)] + COMMON + [("block_table", None)],
    "flash_attn_with_kvcache": [
        ("q", _), ("k_cache", _), ("v_cache", _), ("k", None), ("v", None), ("rotary_cos", None),
        ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None), ("cache_leftpad", None),
        ("block_table", None), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
        ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False),
    ],
}


def fa_lse(lse: torch.Tensor) -> torch.Tensor:
    """The oracle's lse in flash-attn's convention (empty rows +inf)."""
    return torch.where(lse == float("-inf"), float("inf"), lse)


def check(actual, oracle, name="out"):
    assert_close_to_oracle(actual, oracle, oracle, name=name)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- signatures -----------------------------------------------------------------

EXTENSIONS = {"flash_attn_varlen_func": [("seqused_k", None)]}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_flash_attn_2_8_3(name):
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    # longattn's extensions come after flash-attn's parameters, keyword-only with a None default
    extras = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in extras] == EXTENSIONS.get(name, [])
    params = [p for p in params if p not in extras]
    got = [(p.name, _ if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert getattr(fa, name).__doc__.lstrip().startswith(("q ", "qkv "))  # docstrings open with the shapes


# --- fixed-length -----------------------------------------------------------------

CASES = [  # (seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, softcap)
    (5, 7, 4, 2, 16, True, (-1, -1), 0.0),
    (7, 7, 4, 4, 24, False, (2, 1), 0.0),
    (6, 3, 2, 1, 16, True, (1, -1), 5.0),  # seqlen_q > seqlen_k: empty rows
    (1, 9, 4, 1, 8, False, (-1, -1), 0.0),
]


@pytest.mark.parametrize("case", CASES)
def test_flash_attn_func_matches_oracle(case):
    sq, sk, h, hk, d, causal, window, softcap = case
    q, k, v = randn(2, sq, h, d, seed=1), randn(2, sk, hk, d, seed=2), randn(2, sk, hk, d, seed=3)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, 0.0, None, causal, window, softcap, None, False, True)
    ref_out, ref_lse = attention_ref(q, k, v, causal=causal, window_size=window, softcap=softcap)
    check(out, ref_out)
    check(lse, fa_lse(ref_lse), "lse")
    assert lse.shape == (2, h, sq) and lse.dtype == torch.float32
    assert s_dmask.numel() == 0  # flash-attn returns an empty S_dmask without dropout
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap), out)


def test_packed_variants_match_oracle():
    q, k, v = randn(2, 6, 4, 16, seed=4), randn(2, 6, 4, 16, seed=5), randn(2, 6, 4, 16, seed=6)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    out, lse, _s = fa.flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), causal=True, return_attn_probs=True)
    check(out, ref_out)
    check(lse, ref_lse, "lse")
    k2, v2 = randn(2, 9, 2, 16, seed=7), randn(2, 9, 2, 16, seed=8)
    out = fa.flash_attn_kvpacked_func(q, torch.stack([k2, v2], dim=2), 0.0, 0.3, False, (3, 2))
    check(out, attention_ref(q, k2, v2, softmax_scale=0.3, window_size=(3, 2))[0])


def test_empty_rows_have_lse_plus_inf_and_zero_out():
    q, k, v = randn(1, 5, 2, 8, seed=9), randn(1, 2, 2, 8, seed=10), randn(1, 2, 2, 8, seed=11)
    out, lse, _s = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.isposinf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))


def test_flash_attn_window_conventions():
    q, k, v = randn(1, 6, 2, 8, seed=12), randn(1, 6, 2, 8, seed=13), randn(1, 6, 2, 8, seed=14)
    base = fa.flash_attn_func(q, k, v, causal=True, window_size=(2, 0))
    # causal with a right window > 0: flash-attn sets the right window to 0
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=True, window_size=(2, 3)), base)
    # a list, a tensor, negative = unbounded
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=True, window_size=[2, 0]), base)
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=True, window_size=torch.tensor([2, 0])), base)
    assert torch.equal(fa.flash_attn_func(q, k, v, window_size=(-5, -2)), fa.flash_attn_func(q, k, v))
    # an edge >= seqlen_k is unbounded (it matters only when seqlen_q > 2 * seqlen_k)
    q2 = randn(1, 9, 2, 8, seed=15)
    k2, v2 = k[:, :3], v[:, :3]
    out = fa.flash_attn_func(q2, k2, v2, window_size=(0, 3))
    check(out, attention_ref(q2, k2, v2, window_size=(0, -1))[0])


def test_dropout_is_refused_by_name():
    q = randn(1, 4, 2, 8)
    with pytest.raises(UnsupportedFeatureError, match="dropout_p") as info:
        fa.flash_attn_func(q, q, q, 0.1)
    assert isinstance(info.value, RuntimeError)  # (NotImplementedError is one)
    with pytest.raises(UnsupportedFeatureError, match="dropout_p"):
        fa.flash_attn_varlen_qkvpacked_func(torch.stack([q[0]] * 3, 1), torch.tensor([0, 4], dtype=torch.int32), 4,
                                            dropout_p=0.5)
    # deterministic is accepted (longattn is always deterministic)
    assert torch.equal(fa.flash_attn_func(q, q, q, deterministic=True), fa.flash_attn_func(q, q, q))


def test_gradients_match_oracle():
    q, k, v = (randn(1, 5, 2, 8, seed=s).requires_grad_() for s in (16, 17, 18))
    grads = torch.autograd.grad(fa.flash_attn_func(q, k, v, causal=True).square().sum(), (q, k, v))
    ref = torch.autograd.grad(attention_ref(q, k, v, causal=True)[0].square().sum(), (q, k, v))
    for g, r in zip(grads, ref):
        assert (g - r).abs().max() < 1e-5


# --- ALiBi (PyTorch path) -----------------------------------------------------------

def alibi_ref(q, k, v, slopes, *, causal=False, window=(-1, -1), softcap=0.0):
    """float64 oracle with flash-attn's ALiBi bias, built by hand: out and the lse
    flash-attn returns (its causal kernel adds +slope * j, which shifts the lse by
    slope * (i + seqlen_k - seqlen_q) against -slope * |i + seqlen_k - seqlen_q - j|)."""
    b, sq, h, d = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(d)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(sq)[:, None] + sk - sq
    dist = pos - torch.arange(sk)[None, :]
    slopes = slopes.double().expand(b, h)
    scores = scores - slopes[:, :, None, None] * dist.abs()
    left, right = window[0], 0 if causal else window[1]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= dist <= left
    if right >= 0:
        visible &= dist >= -right
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v64)
    if left < 0 and right == 0:
        lse = lse + slopes[:, :, None] * pos[:, 0]
    return out, fa_lse(lse)


@pytest.mark.parametrize("causal,window,softcap,per_batch", [
    (False, (-1, -1), 0.0, False), (True, (-1, -1), 0.0, True), (True, (2, -1), 3.0, False), (False, (1, 2), 0.0, True),
])
def test_alibi_matches_hand_built_oracle(causal, window, softcap, per_batch):
    q, k, v = randn(2, 5, 4, 8, seed=20), randn(2, 7, 2, 8, seed=21), randn(2, 7, 2, 8, seed=22)
    slopes = torch.rand(2, 4) * 0.5 if per_batch else torch.rand(4) * 0.5
    out, lse, _s = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                      alibi_slopes=slopes, return_attn_probs=True)
    ref_out, ref_lse = alibi_ref(q, k, v, slopes, causal=causal, window=window, softcap=softcap)
    check(out, ref_out)
    check(lse, ref_lse.float(), "lse")


def test_alibi_zero_slopes_equal_plain_attention_and_chunks_agree(monkeypatch):
    q, k, v = randn(1, 9, 2, 8, seed=23), randn(1, 9, 2, 8, seed=24), randn(1, 9, 2, 8, seed=25)
    out = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=torch.zeros(2))
    check(out, attention_ref(q, k, v, causal=True)[0])
    slopes = torch.rand(2)
    whole = fa.flash_attn_func(q, k, v, alibi_slopes=slopes)
    from longattn.integrations import flash_attn_eager
    monkeypatch.setattr(flash_attn_eager, "CHUNK_ELEMENTS", 2 * 9 * 2)  # two query rows per chunk
    assert torch.allclose(fa.flash_attn_func(q, k, v, alibi_slopes=slopes), whole, atol=1e-6, rtol=0)


def test_alibi_bad_slopes_are_named():
    q = randn(1, 3, 4, 8)
    with pytest.raises(LongAttnError, match="alibi_slopes"):
        fa.flash_attn_func(q, q, q, alibi_slopes=torch.rand(3))
    with pytest.raises(LongAttnError, match="alibi_slopes"):
        fa.flash_attn_func(q, q, q, alibi_slopes=torch.rand(4, dtype=torch.float64))


# --- varlen ------------------------------------------------------------------------

def packed(lengths, nheads, d, seed):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return randn(int(cu[-1]), nheads, d, seed=seed), cu


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (2, 1)), (True, (1, 5))])
def test_varlen_matches_oracle_and_per_sequence_calls(causal, window):
    q, cu_q = packed([3, 1, 5], 4, 16, 30)
    k, cu_k = packed([4, 2, 5], 2, 16, 31)
    v, _c = packed([4, 2, 5], 2, 16, 32)
    out, lse, _s = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, 0.0, None, causal, window, 0.0, None, False,
                                             True)
    ref_out, ref_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal, window_size=(window[0], 0)
                                            if causal else window)
    check(out, ref_out)
    check(lse, fa_lse(ref_lse), "lse")
    assert lse.shape == (4, q.shape[0])
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(3):
        one = fa.flash_attn_func(q[None, bq[b]:bq[b + 1]], k[None, bk[b]:bk[b + 1]], v[None, bk[b]:bk[b + 1]],
                                 causal=causal, window_size=window)
        check(out[bq[b]:bq[b + 1]], one[0].double())


def test_varlen_packed_variants_and_alibi():
    qkv, cu = packed([3, 6], 3 * 2, 8, 33)
    qkv = qkv.view(-1, 3, 2, 8)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, causal=True)
    check(out, attention_ref_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, causal=True)[0])
    q, cu_q = packed([2, 4], 2, 8, 34)
    kv, cu_k = packed([5, 4], 2 * 2, 8, 35)
    kv = kv.view(-1, 2, 2, 8)
    slopes = torch.rand(2, 2)
    out, lse, _s = fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 4, 5, causal=True, alibi_slopes=slopes,
                                                      return_attn_probs=True)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(2):
        ref_out, ref_lse = alibi_ref(q[None, bq[b]:bq[b + 1]], kv[None, bk[b]:bk[b + 1], 0],
                                     kv[None, bk[b]:bk[b + 1], 1], slopes[b:b + 1], causal=True)
        check(out[bq[b]:bq[b + 1]], ref_out[0])
        check(lse[:, bq[b]:bq[b + 1]], ref_lse[0].float(), "lse")


def test_varlen_block_table_gathers_pages():
    q, cu_q = packed([2, 3], 2, 8, 36)
    k, cu_k = packed([5, 7], 2, 8, 37)
    v, _c = packed([5, 7], 2, 8, 38)
    page, pages = 4, torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)  # 2 pages per sequence, shuffled
    k_paged, v_paged = torch.full((5, page, 2, 8), float("nan")), torch.full((5, page, 2, 8), float("nan"))
    for b, (k0, k1) in enumerate(zip(cu_k.tolist(), cu_k.tolist()[1:])):
        for j in range(k1 - k0):
            k_paged[pages[b, j // page], j % page] = k[k0 + j]
            v_paged[pages[b, j // page], j % page] = v[k0 + j]
    out = fa.flash_attn_varlen_func(q, k_paged, v_paged, cu_q, cu_k, 3, 7, causal=True, block_table=pages)
    check(out, attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True)[0])


@pytest.mark.parametrize("alibi", [False, True])
def test_varlen_seqused_k_with_pages_and_alibi(alibi):
    # paged keys (block_table) + seqused_k: each sequence attends its first used keys only
    q, cu_q = packed([2, 3], 2, 8, 39)
    k, cu_k = packed([5, 7], 2, 8, 40)
    v, _c = packed([5, 7], 2, 8, 41)
    used = torch.tensor([4, 2], dtype=torch.int32)
    page, pages = 4, torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
    k_paged, v_paged = torch.full((5, page, 2, 8), float("nan")), torch.full((5, page, 2, 8), float("nan"))
    for b, (k0, k1) in enumerate(zip(cu_k.tolist(), cu_k.tolist()[1:])):
        for j in range(used[b]):  # unused slots stay NaN: never read
            k_paged[pages[b, j // page], j % page] = k[k0 + j]
            v_paged[pages[b, j // page], j % page] = v[k0 + j]
    slopes = torch.rand(2) if alibi else None
    out, lse, _s = fa.flash_attn_varlen_func(q, k_paged, v_paged, cu_q, cu_k, 3, 7, causal=True, alibi_slopes=slopes,
                                             return_attn_probs=True, block_table=pages, seqused_k=used)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(2):
        qb, kb, vb = q[None, bq[b]:bq[b + 1]], k[None, bk[b]:bk[b] + used[b]], v[None, bk[b]:bk[b] + used[b]]
        if alibi:
            ref_out, ref_lse = alibi_ref(qb, kb, vb, slopes[None].expand(1, 2), causal=True)
        else:
            ref_out, ref_lse = attention_ref(qb, kb, vb, causal=True)
        check(out[bq[b]:bq[b + 1]], ref_out[0])
        check(lse[:, bq[b]:bq[b + 1]], fa_lse(ref_lse[0]).float(), "lse")


def test_varlen_paged_decode_with_seqused_k_and_no_cu_seqlens_k():
    # vLLM's way: one query per sequence, lengths from seqused_k, keys on pages
    q, cu_q = packed([1, 1, 1], 4, 8, 42)
    lengths = [5, 1, 8]
    page, pages = 4, torch.tensor([[2, 0], [5, 1], [3, 4]], dtype=torch.int32)
    k_paged, v_paged = randn(6, page, 2, 8, seed=43), randn(6, page, 2, 8, seed=44)
    used = torch.tensor(lengths, dtype=torch.int32)
    out = fa.flash_attn_varlen_func(q, k_paged, v_paged, cu_q, None, 1, 8, causal=True, block_table=pages,
                                    seqused_k=used)
    for b, n in enumerate(lengths):
        slots = [(int(pages[b, j // page]), j % page) for j in range(n)]
        kb = torch.stack([k_paged[p, o] for p, o in slots])[None]
        vb = torch.stack([v_paged[p, o] for p, o in slots])[None]
        check(out[b:b + 1], attention_ref(q[None, b:b + 1], kb, vb, causal=True)[0][0])


# --- flash_attn_with_kvcache ------------------------------------------------------------

def rotary_ref(x, cos, sin, positions, interleaved):
    """float64 rotary by complex multiplication: channel pairs as complex numbers."""
    x = x.double().clone()
    r = 2 * cos.shape[1]
    angle = torch.atan2(sin.double(), cos.double())[positions]  # (b, s, r/2)
    rot = torch.polar(torch.ones_like(angle), angle)[:, :, None, :]
    if interleaved:
        pairs = torch.view_as_complex(x[..., :r].reshape(*x.shape[:-1], r // 2, 2).contiguous())
        x[..., :r] = torch.view_as_real(pairs * rot).flatten(-2)
    else:
        pairs = torch.complex(x[..., : r // 2], x[..., r // 2: r]) * rot
        x[..., : r // 2], x[..., r // 2: r] = pairs.real, pairs.imag
    return x


def kv_oracle(q, logical_k, logical_v, counts, **options):
    """Per-sequence float64 oracle over each sequence's logical keys; lse in flash-attn's convention."""
    outs, lses = [], []
    for b, n in enumerate(counts):
        o, l = attention_ref(q[b:b + 1], logical_k[b:b + 1, :n], logical_v[b:b + 1, :n], **options)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), fa_lse(torch.cat(lses))


def paged_copy(k_cache, page, seed):
    """The contiguous cache ``(batch, S, hk, d)`` as shuffled pages + block_table."""
    batch, S = k_cache.shape[:2]
    per = -(-S // page)
    order = torch.randperm(batch * per + 1, generator=torch.Generator().manual_seed(seed))
    table = order[: batch * per].view(batch, per).to(torch.int32)
    pages = torch.full((batch * per + 1, page) + k_cache.shape[2:], float("nan"))
    for b in range(batch):
        for j in range(S):
            pages[table[b, j // page], j % page] = k_cache[b, j]
    return pages, table


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (3, 2))])
def test_kvcache_append_matches_oracle(paged, causal, window):
    batch, S, h, hk, d, new, sq = 3, 12, 4, 2, 16, 2, 2
    k_cache, v_cache = randn(batch, S, hk, d, seed=40), randn(batch, S, hk, d, seed=41)
    k_new, v_new = randn(batch, new, hk, d, seed=42), randn(batch, new, hk, d, seed=43)
    q = randn(batch, sq, h, d, seed=44)
    lens = torch.tensor([0, 4, 10], dtype=torch.int32)
    logical_k, logical_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lens.tolist()):
        logical_k[b, n:n + new], logical_v[b, n:n + new] = k_new[b], v_new[b]
    kwargs = {}
    if paged:
        (k_cache, table), (v_cache, _t) = paged_copy(k_cache, 4, 1), paged_copy(v_cache, 4, 1)
        kwargs["block_table"] = table
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=causal,
                                          window_size=window, return_softmax_lse=True, **kwargs)
    ref_out, ref_lse = kv_oracle(q, logical_k, logical_v, [n + new for n in lens.tolist()], causal=causal,
                                 window_size=(window[0], 0) if causal else window)
    check(out, ref_out)
    check(lse, ref_lse, "lse")
    for b, n in enumerate(lens.tolist()):  # the new tokens were written in place
        for j in range(n, n + new):
            slot = (kwargs["block_table"][b, j // 4], j % 4) if paged else (b, j)
            assert torch.equal(k_cache[slot], k_new[b, j - n]) and torch.equal(v_cache[slot], v_new[b, j - n])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(interleaved, causal):
    batch, S, h, hk, d, new = 2, 10, 2, 1, 16, 3
    k_cache, v_cache = randn(batch, S, hk, d, seed=50), randn(batch, S, hk, d, seed=51)
    k_new, v_new, q = randn(batch, new, hk, d, seed=52), randn(batch, new, hk, d, seed=53), randn(batch, new, h, d,
                                                                                                  seed=54)
    angle = torch.rand(S, 4, generator=torch.Generator().manual_seed(55)) * 2 * math.pi  # rotary_dim 8 < headdim
    cos, sin = angle.cos(), angle.sin()
    lens = torch.tensor([2, 6], dtype=torch.int32)
    pos_k = lens[:, None].long() + torch.arange(new)
    pos_q = pos_k if causal else lens[:, None].long().expand(batch, new)
    k_rot = rotary_ref(k_new, cos, sin, pos_k, interleaved)
    q_rot = rotary_ref(q, cos, sin, pos_q, interleaved)
    logical_k, logical_v = k_cache.double().clone(), v_cache.double().clone()
    for b, n in enumerate(lens.tolist()):
        logical_k[b, n:n + new], logical_v[b, n:n + new] = k_rot[b], v_new[b].double()
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, lens, causal=causal,
                                     rotary_interleaved=interleaved)
    ref_out, _l = kv_oracle(q_rot, logical_k, logical_v, [n + new for n in lens.tolist()], causal=causal)
    assert (out.double() - ref_out).abs().max() < 1e-5
    assert (k_cache[0, 2:5].double() - k_rot[0]).abs().max() < 1e-6  # rotated keys were written


def test_kvcache_int_seqlens_tensor_window_causal_right_window_num_splits():
    batch, S, h, d = 2, 9, 2, 8
    k_cache, v_cache, q = randn(batch, S, h, d, seed=60), randn(batch, S, h, d, seed=61), randn(batch, 2, h, d, seed=62)
    lens = torch.full((batch,), 6, dtype=torch.int32)
    base = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True, window_size=(2, 0))
    assert torch.equal(fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, causal=True,
                                                  window_size=torch.tensor([2, 0])), base)
    assert torch.equal(fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, causal=True,
                                                  window_size=(2, 4), num_splits=3), base)
    check(base, kv_oracle(q, k_cache, v_cache, [6, 6], causal=True, window_size=(2, 0))[0])
    # cache_seqlens=None: every row full
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache)
    check(out, attention_ref(q, k_cache, v_cache)[0])


def test_kvcache_empty_sequence_has_lse_plus_inf():
    k_cache, q = randn(2, 4, 1, 8, seed=63), randn(2, 1, 2, 8, seed=64)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=torch.tensor([0, 3], dtype=torch.int32),
                                          return_softmax_lse=True)
    assert torch.isposinf(lse[0]).all() and torch.isfinite(lse[1]).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_overflow_is_a_runtime_error_naming_block_table_and_writes_nothing(paged):
    k_cache, v_cache, q = randn(2, 8, 1, 8, seed=65), randn(2, 8, 1, 8, seed=66), randn(2, 1, 1, 8, seed=67)
    kwargs = {}
    if paged:
        (k_cache, table), (v_cache, _t) = paged_copy(k_cache, 4, 2), paged_copy(v_cache, 4, 2)
        kwargs["block_table"] = table
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(RuntimeError, match="block_table") as info:
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, randn(2, 2, 1, 8), randn(2, 2, 1, 8),
                                   cache_seqlens=torch.tensor([3, 7], dtype=torch.int32), **kwargs)
    assert isinstance(info.value, fa.CacheOverflowError) and isinstance(info.value, LongAttnError)
    assert torch.equal(k_cache.nan_to_num(), before[0].nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), before[1].nan_to_num())


@pytest.mark.parametrize("layout", ["rows_back_to_back", "strided_rows"])
def test_kvcache_batch_idx_and_leftpad(layout):
    batch_cache, S, h, hk, d, new = 4, 10, 2, 1, 8, 2
    storage_k, storage_v = randn(batch_cache, S + 3, hk, d, seed=70), randn(batch_cache, S + 3, hk, d, seed=71)
    if layout == "strided_rows":  # each row a slice of a longer row: not one page-size-1 view (PyTorch path)
        k_cache, v_cache = storage_k[:, :S], storage_v[:, :S]
    else:
        k_cache, v_cache = storage_k[:, :S].contiguous(), storage_v[:, :S].contiguous()
    q, k_new, v_new = randn(2, 2, h, d, seed=72), randn(2, new, hk, d, seed=73), randn(2, new, hk, d, seed=74)
    idx = torch.tensor([3, 1], dtype=torch.int32)
    lens = torch.tensor([5, 2], dtype=torch.int32)
    pad = torch.tensor([2, 0], dtype=torch.int32)
    logical_k = [torch.cat([k_cache[r, p:n], k_new[b]]) for b, (r, p, n) in enumerate(zip(idx, pad, lens))]
    logical_v = [torch.cat([v_cache[r, p:n], v_new[b]]) for b, (r, p, n) in enumerate(zip(idx, pad, lens))]
    counts = [len(t) for t in logical_k]
    width = max(counts)
    lk = torch.stack([torch.cat([t, t.new_zeros(width - len(t), hk, d)]) for t in logical_k])
    lv = torch.stack([torch.cat([t, t.new_zeros(width - len(t), hk, d)]) for t in logical_v])
    untouched = [k_cache[0].clone(), k_cache[2].clone()]
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                          cache_batch_idx=idx, cache_leftpad=pad, causal=True,
                                          return_softmax_lse=True)
    ref_out, ref_lse = kv_oracle(q, lk, lv, counts, causal=True)
    check(out, ref_out)
    check(lse, ref_lse, "lse")
    assert torch.equal(k_cache[3, 5:7], k_new[0]) and torch.equal(k_cache[1, 2:4], k_new[1])
    assert torch.equal(v_cache[3, 5:7], v_new[0]) and torch.equal(v_cache[1, 2:4], v_new[1])
    assert torch.equal(k_cache[0], untouched[0]) and torch.equal(k_cache[2], untouched[1])
    # cache_batch_idx alone, no append
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, cache_batch_idx=idx)
    check(out, kv_oracle(q, k_cache[idx.long()], v_cache[idx.long()], lens.tolist())[0])


def test_kvcache_batch_idx_refusals():
    k_cache, q = randn(3, 6, 1, 8), randn(2, 1, 1, 8)
    with pytest.raises(LongAttnError, match="cache_batch_idx"):  # two sequences would write one row
        fa.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), randn(2, 1, 1, 8), randn(2, 1, 1, 8), cache_seqlens=2,
                                   cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(UnsupportedFeatureError, match="cache_batch_idx"):
        fa.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=2, block_table=torch.zeros(2, 1, dtype=torch.int32),
                                   cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_alibi(paged):
    batch, S, h, hk, d, new = 2, 8, 2, 1, 8, 1
    k_cache, v_cache = randn(batch, S, hk, d, seed=80), randn(batch, S, hk, d, seed=81)
    q, k_new, v_new = randn(batch, 2, h, d, seed=82), randn(batch, new, hk, d, seed=83), randn(batch, new, hk, d, seed=84)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    slopes = torch.rand(batch, h)
    logical_k, logical_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lens.tolist()):
        logical_k[b, n:n + new], logical_v[b, n:n + new] = k_new[b], v_new[b]
    kwargs = {}
    if paged:
        (k_cache, table), (v_cache, _t) = paged_copy(k_cache, 4, 3), paged_copy(v_cache, 4, 3)
        kwargs["block_table"] = table
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True,
                                          alibi_slopes=slopes, return_softmax_lse=True, **kwargs)
    for b, n in enumerate(lens.tolist()):
        ref_out, ref_lse = alibi_ref(q[b:b + 1], logical_k[b:b + 1, :n + new], logical_v[b:b + 1, :n + new],
                                     slopes[b:b + 1], causal=True)
        check(out[b:b + 1], ref_out)
        check(lse[b:b + 1], ref_lse.float(), "lse")
