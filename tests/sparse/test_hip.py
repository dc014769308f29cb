"""HiP prefill: exact properties against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.dense.cpp import AMX_EMULATE as AMX_EMULATED  # the tiles' software emulation (-D flag)
from longattn.reference import attention_ref
from longattn.sparse import HiP, hip_select_blocks
from longattn.sparse.hip_mask import searchable_blocks
from tests.tolerance import assert_close_to_oracle

NO_AMX = ("-mno-amx-tile",)  # an AMX CPU's build without tiles: the bf16 dot-product search


@st.composite
def hip_cases(draw):
    block_k = draw(st.integers(1, 4))
    config = HiP(
        topk=block_k * draw(st.integers(1, 6)), block_q=draw(st.integers(1, 16)), block_k=block_k,
        query_stride=1, sink_size=draw(st.integers(0, 8)), recent_size=draw(st.integers(0, 24)),
    )
    config = HiP(**{**config.__dict__, "query_stride": draw(st.integers(1, config.block_q))})
    return dict(
        config=config, seqlen_q=draw(st.integers(1, 80)), seqlen_k=draw(st.integers(1, 120)),
        nheads_k=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 4, 8])),
        causal=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(c, headdim=16):
    gen = torch.Generator().manual_seed(c["seed"])
    nheads = c["nheads_k"] * c["group"]
    q = torch.randn(1, c["seqlen_q"], nheads, headdim, generator=gen).to(c["dtype"])
    k = torch.randn(1, c["seqlen_k"], c["nheads_k"], headdim, generator=gen).to(c["dtype"])
    v = torch.randn(1, c["seqlen_k"], c["nheads_k"], headdim, generator=gen).to(c["dtype"])
    return q, k, v


def _layout(c):
    cfg = c["config"]
    return BlockSparseLayout(c["seqlen_q"], c["seqlen_k"], cfg.block_q, cfg.block_k, cfg.sink_size,
                             cfg.recent_size, c["causal"])


@given(hip_cases())
def test_equals_oracle_restricted_to_the_selection(c):
    q, k, v = _inputs(c)
    selected = hip_select_blocks(q, k, c["config"], causal=c["causal"])
    out, lse = longattn.attention(q, k, v, causal=c["causal"], sparse=c["config"], return_lse=True)
    ref_out, ref_lse = attention_ref(q, k, v, mask=_layout(c).dense_mask(selected))
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


@given(hip_cases())
def test_selection_is_distinct_ascending_and_inside_the_searchable_range(c):
    q, k, _ = _inputs(c)
    cfg = c["config"]
    selected = hip_select_blocks(q, k, cfg, causal=c["causal"])
    lo, count, _ = searchable_blocks(_layout(c), torch.device("cpu"))
    assert selected.shape == (1, q.shape[2], _layout(c).num_q_blocks, cfg.num_blocks)
    for qb in range(selected.shape[2]):
        rows = selected[0, :, qb]
        expected = min(int(count[qb]), cfg.num_blocks)
        for row in rows:
            valid = row[row >= 0]
            assert valid.numel() == expected  # the budget is always used in full
            assert torch.equal(row[: valid.numel()], valid)  # padding last
            assert bool((valid[1:] > valid[:-1]).all())
            assert bool(((valid >= lo[qb]) & (valid < lo[qb] + count[qb])).all())


@given(hip_cases())
def test_dense_when_topk_covers_the_searchable_range(c):
    cfg = c["config"]
    big = HiP(**{**cfg.__dict__, "topk": cfg.block_k * (c["seqlen_k"] // cfg.block_k + 2)})
    c = {**c, "config": big}
    q, k, v = _inputs(c)
    out, lse = longattn.attention(q, k, v, causal=c["causal"], sparse=big, return_lse=True)
    ref_out, ref_lse = attention_ref(q, k, v, causal=c["causal"])
    assert_close_to_oracle(out, ref_out, ref_out)
    assert_close_to_oracle(lse, ref_lse, ref_lse, name="lse")


@pytest.mark.parametrize("group", [1, 4, 8])
def test_planted_high_score_keys_are_found(group):
    # Every query leans towards u; keys [100, 164) (32 blocks, as many as the
    # budget) are u scaled up, the rest noise. A branch scores high iff its
    # centre block is planted, so at most 32 branches do and all survive each
    # round: every search group lying inside the run is selected whole, for
    # every head.
    torch.manual_seed(1)
    seqlen, nheads_k, headdim = 512, 2, 16
    cfg = HiP(topk=64, block_q=64, block_k=2, query_stride=2, sink_size=4, recent_size=16)
    u = torch.nn.functional.normalize(torch.randn(headdim), dim=0)
    q = 0.3 * torch.randn(1, seqlen, nheads_k * group, headdim) + u
    k = 0.3 * torch.randn(1, seqlen, nheads_k, headdim)
    k[:, 100:164] = 4 * u
    selected = hip_select_blocks(q, k, cfg, causal=True)
    layout = BlockSparseLayout(seqlen, seqlen, cfg.block_q, cfg.block_k, cfg.sink_size, cfg.recent_size, True)
    lo, count, _ = searchable_blocks(layout, torch.device("cpu"))
    checked = 0
    for qb in range(layout.num_q_blocks):
        n, nb = int(count[qb]), cfg.num_blocks
        bounds = [int(lo[qb]) + g * n // nb for g in range(nb + 1)]
        inside = [b for s, e in zip(bounds, bounds[1:]) if s >= 50 and e <= 82 for b in range(s, e)]
        for row in selected[0, :, qb]:
            assert set(inside) <= set(row.tolist())
        checked += len(inside)
    assert checked > 0  # the run does cover whole groups somewhere


def test_deterministic():
    torch.manual_seed(2)
    q, k = torch.randn(1, 300, 4, 32), torch.randn(1, 300, 2, 32)
    cfg = HiP(topk=16, block_q=16, block_k=2, sink_size=4, recent_size=8)
    assert torch.equal(hip_select_blocks(q, k, cfg), hip_select_blocks(q, k, cfg))


@pytest.mark.parametrize("kwargs,match", [
    ({"topk": 0}, "topk"), ({"topk": 5, "block_k": 2}, "multiple of block_k"), ({"block_q": True}, "block_q"),
    ({"query_stride": 9, "block_q": 8}, "query_stride"), ({"sink_size": -1}, "sink_size"),
    ({"recent_size": 2.0}, "recent_size"), ({"refresh_interval": 0}, "refresh_interval"),
])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        HiP(**kwargs)


def test_attention_rejects_what_hip_cannot_combine():
    q = k = v = torch.randn(1, 8, 1, 8)
    with pytest.raises(UnsupportedFeatureError, match="recent_size"):
        longattn.attention(q, k, v, causal=True, window_size=(4, 0), sparse=HiP())
    with pytest.raises(UnsupportedFeatureError, match="backend"):
        longattn.attention(q, k, v, causal=True, sparse=HiP(), backend="cuda")
    with pytest.raises(UnsupportedFeatureError, match="sparse"):
        longattn.attention(q, k, v, causal=True, sparse="hip")


def test_backends_select_the_same_blocks():
    torch.manual_seed(3)
    q, k = torch.randn(1, 700, 4, 64), torch.randn(1, 700, 2, 64)
    cfg = HiP(topk=32, block_q=32, block_k=2, sink_size=4, recent_size=40)
    assert torch.equal(hip_select_blocks(q, k, cfg, backend="eager"), hip_select_blocks(q, k, cfg, backend="cpp"))
    with pytest.raises(ArgumentError, match="backend"):
        hip_select_blocks(q, k, cfg, backend="gpu")


@pytest.mark.skipif(__import__("longattn.kernels.hip_score.cpp", fromlist=["x"]).score_unavailable_reason() is not None,
                    reason="the C++ HiP scorer does not build here")
@pytest.mark.parametrize("build_flags", [(), AMX_EMULATED, NO_AMX, ("-mno-avx512bf16",), ("-mno-avx512f",),
                                         ("-mno-avx512f", "-mno-avx2", "-mno-fma")])
@pytest.mark.parametrize("dtype, headdim", [(torch.float32, 40), (torch.bfloat16, 40), (torch.bfloat16, 41)])
def test_cpu_search_on_every_vector_path_selects_what_the_eager_search_selects(build_flags, dtype, headdim,
                                                                                monkeypatch):
    """bfloat16 runs the AMX search where the build has it (the default build
    on an AMX CPU; emulated tiles on any AVX512-BF16 CPU), the bf16
    dot-product search where it has AVX512-BF16 (the default build there, and
    -mno-amx-tile on an AMX CPU), float32 scoring of the same values elsewhere."""
    import longattn.kernels.hip_score.cpp as hsc

    real = hsc.search_blocks_cpu
    monkeypatch.setattr(hsc, "search_blocks_cpu", lambda *a, **kw: real(*a, **kw, build_flags=build_flags))
    torch.manual_seed(7)
    q, k = torch.randn(1, 400, 4, headdim).to(dtype), torch.randn(1, 400, 2, headdim).to(dtype)
    for causal in (True, False):
        cfg = HiP(topk=24, block_q=16, block_k=3, query_stride=3, sink_size=5, recent_size=20)
        assert torch.equal(hip_select_blocks(q, k, cfg, causal=causal, backend="cpp"),
                           hip_select_blocks(q, k, cfg, causal=causal, backend="eager"))


def plant_nans(q: torch.Tensor, k: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of q and k with NaN in a few elements (as an fp16 overflow
    upstream would leave them): a handful of keys, one query element, and
    every key of positions 30-32 (a whole block at block_k = 3)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = q.clone(), k.clone()
    k[:, 30:33] = float("nan")
    for _ in range(4):
        pos = int(torch.randint(k.shape[1], (1,), generator=gen))
        head = int(torch.randint(k.shape[2], (1,), generator=gen))
        dim = int(torch.randint(k.shape[3], (1,), generator=gen))
        k[0, pos, head, dim] = float("nan")
    q[0, int(torch.randint(q.shape[1], (1,), generator=gen)), 0, 0] = float("nan")
    return q, k


@pytest.mark.skipif(__import__("longattn.kernels.hip_score.cpp", fromlist=["x"]).score_unavailable_reason() is not None,
                    reason="the C++ HiP scorer does not build here")
@pytest.mark.parametrize("build_flags", [(), AMX_EMULATED, NO_AMX, ("-mno-avx512bf16",), ("-mno-avx512f",),
                                         ("-mno-avx512f", "-mno-avx2", "-mno-fma")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_dot_products_are_passed_over_alike_by_the_cpu_and_eager_searches(build_flags, dtype, monkeypatch):
    """A NaN in q or k makes some q . k NaN; every twin passes those over when
    it takes a block's max (the C++ vector max had kept or dropped a NaN by
    operand order, and its ranking had put NaN scores last where the eager
    twin's topk puts them first), so the selections stay equal."""
    import longattn.kernels.hip_score.cpp as hsc

    real = hsc.search_blocks_cpu
    monkeypatch.setattr(hsc, "search_blocks_cpu", lambda *a, **kw: real(*a, **kw, build_flags=build_flags))
    cfg = HiP(topk=24, block_q=16, block_k=3, query_stride=3, sink_size=5, recent_size=20)
    for seed in range(6):
        torch.manual_seed(seed)
        q, k = plant_nans(torch.randn(1, 400, 4, 40), torch.randn(1, 400, 2, 40), seed)
        q, k = q.to(dtype), k.to(dtype)
        for causal in (True, False):
            assert torch.equal(hip_select_blocks(q, k, cfg, causal=causal, backend="cpp"),
                               hip_select_blocks(q, k, cfg, causal=causal, backend="eager"))


@pytest.mark.skipif(__import__("longattn.kernels.hip_score.cpp", fromlist=["x"]).score_unavailable_reason() is not None,
                    reason="the C++ HiP scorer does not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_search_reads_strided_queries_of_a_view_at_their_aligned_rows(dtype):
    """The C++ search reads each row's strided queries from q in place: q a
    non-contiguous view (heads of a (batch, heads, seqlen, dim) tensor),
    batch 2, fewer queries than keys (bottom-right alignment: query row i is
    key position i + 260 - 190) and a short last query block."""
    torch.manual_seed(5)
    q = torch.randn(2, 6, 190, 32).to(dtype).transpose(1, 2)[:, :, 1:5]  # (2, 190, 4, 32), strided
    k = torch.randn(2, 260, 2, 32).to(dtype)
    assert not q.is_contiguous()
    cfg = HiP(topk=16, block_q=16, block_k=2, query_stride=2, sink_size=4, recent_size=24)
    for causal in (True, False):
        assert torch.equal(hip_select_blocks(q, k, cfg, causal=causal, backend="cpp"),
                           hip_select_blocks(q.contiguous(), k, cfg, causal=causal, backend="eager"))


@pytest.mark.skipif(__import__("longattn.kernels.hip_score.cpp", fromlist=["x"]).score_unavailable_reason() is not None,
                    reason="the C++ HiP scorer does not build here")
def test_cpu_search_with_many_groups_per_row_selects_what_the_eager_search_selects():
    """nb = 4096 groups per row: the C++ search takes rows 5 at a time (its
    groups of rows are capped by memory), not 8, and 94 rows end in a partial group."""
    torch.manual_seed(11)
    q, k = torch.randn(1, 12000, 2, 16), torch.randn(1, 12000, 2, 16)
    cfg = HiP(topk=8192, block_q=256, block_k=2, query_stride=8, sink_size=4, recent_size=256)
    assert torch.equal(hip_select_blocks(q, k, cfg, backend="cpp"), hip_select_blocks(q, k, cfg, backend="eager"))


@pytest.mark.skipif(__import__("longattn.kernels.hip_score.cpp", fromlist=["x"]).score_unavailable_reason() is not None,
                    reason="the C++ HiP scorer does not build here")
@pytest.mark.parametrize("build_flags", [(), AMX_EMULATED])
@pytest.mark.parametrize("block_q, query_stride, block_k, headdim", [
    (16, 1, 2, 128),   # the default shape: 16 lanes, 8 two-key blocks per batch
    (160, 2, 3, 40),   # 80 lanes: five C tiles, two passes of up to four; 5 blocks of 3 keys a batch; D padded to 64
    (32, 2, 20, 72),   # a block of 20 keys: two pieces of 16 rows; D padded to 96
    (48, 3, 1, 34),    # one-key blocks, D padded to 64 (34 = 32 + one pair)
])
def test_amx_search_selects_what_the_eager_search_selects_at_awkward_shapes(build_flags, block_q, query_stride,
                                                                           block_k, headdim, monkeypatch):
    """The AMX search's own edges: more query lanes than four C tiles hold,
    blocks longer than a tile's 16 key rows, head dims padded to 32-dim steps.
    On emulated tiles wherever the CPU has AVX512-BF16 (the emulation aborts
    on any tile misuse), on real ones where it has AMX."""
    import longattn.kernels.hip_score.cpp as hsc

    if not hsc.bf16_search_uses_amx(build_flags):
        pytest.skip(f"no AMX search in this build ({build_flags or 'default'}): the CPU lacks "
                    f"{'AVX512-BF16' if build_flags else 'AMX-TILE/AMX-BF16 (or the OS grants no AMX state)'}")
    real = hsc.search_blocks_cpu
    monkeypatch.setattr(hsc, "search_blocks_cpu", lambda *a, **kw: real(*a, **kw, build_flags=build_flags))
    gen = torch.Generator().manual_seed(block_q + headdim)
    q = torch.randn(1, 700, 4, headdim, generator=gen).bfloat16()
    k = torch.randn(1, 700, 2, headdim, generator=gen).bfloat16()
    for causal in (True, False):
        cfg = HiP(topk=8 * block_k, block_q=block_q, block_k=block_k, query_stride=query_stride, sink_size=3,
                  recent_size=2 * block_q)
        assert torch.equal(hip_select_blocks(q, k, cfg, causal=causal, backend="cpp"),
                           hip_select_blocks(q, k, cfg, causal=causal, backend="eager"))


def test_the_bf16_search_is_built_where_the_cpu_has_avx512_bf16():
    from longattn.kernels.hip_score.cpp import has_bf16_search, score_unavailable_reason
    from longattn.kernels.support.cpp_build import cpu_features

    if score_unavailable_reason() is not None:
        pytest.skip(f"the C++ HiP search does not build here: {score_unavailable_reason()}")
    assert has_bf16_search() == ({"avx512f", "avx512_bf16"} <= cpu_features())
    assert not has_bf16_search(("-mno-avx512bf16",))


def test_the_bf16_search_runs_on_amx_tiles_where_the_cpu_has_them():
    from longattn.kernels.hip_score.cpp import bf16_search_uses_amx, has_bf16_search, score_unavailable_reason
    from longattn.kernels.support.cpp_build import cpu_features

    if score_unavailable_reason() is not None:
        pytest.skip(f"the C++ HiP search does not build here: {score_unavailable_reason()}")
    amx = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"} <= cpu_features()
    # (a kernel that refuses AMX state to the process would make this False on an AMX CPU: not these machines)
    assert bf16_search_uses_amx() == amx
    assert not bf16_search_uses_amx(NO_AMX) and has_bf16_search(NO_AMX) == has_bf16_search()
    assert bf16_search_uses_amx(AMX_EMULATED) == has_bf16_search()  # emulated tiles on any AVX512-BF16 build
    from longattn.kernels.hip_score.cpp import bf16_search_arithmetic

    assert bf16_search_arithmetic() == ("amx" if amx else "bf16-dot" if has_bf16_search() else "fp32")
    assert bf16_search_arithmetic(NO_AMX) == ("bf16-dot" if has_bf16_search() else "fp32")


@pytest.mark.skipif(__import__("longattn.kernels.dense.cpp", fromlist=["x"]).flash_unavailable_reason() is not None,
                    reason="the C++ flash kernel does not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hip_attention_with_a_nan_key_is_nan_in_the_same_rows_on_cpp_and_eager(dtype):
    """The user's path with a NaN key: the C++ twin (search and kernel) and the
    eager twin select alike and make NaN exactly the same rows (those whose
    window, sinks or selected blocks hold the key), some but not all."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 300, 4, 32), torch.randn(1, 300, 2, 32), torch.randn(1, 300, 2, 32)
    k[0, 100, 1, 5] = float("nan")
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    cfg = HiP(topk=16, block_q=16, block_k=2, sink_size=4, recent_size=24)
    cpp = longattn.attention(q, k, v, causal=True, sparse=cfg, backend="cpp")
    eager = longattn.attention(q, k, v, causal=True, sparse=cfg, backend="eager")
    rows = eager.float().isnan().any(-1)
    assert rows.any() and not rows.all()
    assert torch.equal(cpp.float().isnan().any(-1), rows)
    assert not rows[0, :100].any()  # rows before the key never see it


@pytest.mark.skipif(__import__("longattn.kernels.dense.cpp", fromlist=["x"]).flash_unavailable_reason() is not None,
                    reason="the C++ flash kernel does not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hip_attention_reads_k_from_the_search_copy_with_the_same_bits(dtype):
    """HiP's prefill hands the search's head-major key copy to the attention
    (no second copy of K); the result is bitwise what the user's k gives, and
    the copy holds exactly the user's keys."""
    from longattn.kernels.block_sparse import block_sparse_forward
    from longattn.kernels.block_sparse.eager import KeyRows
    from longattn.sparse.hip_mask import select_blocks_and_key_copy

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 300, 4, 32, generator=gen).to(dtype)
    k, v = (torch.randn(1, 300, 2, 32, generator=gen).to(dtype) for _ in range(2))
    cfg = HiP(topk=16, block_q=16, block_k=2, sink_size=4, recent_size=24)
    selected, copy = select_blocks_and_key_copy(q, KeyRows.dense(k, k), 300, cfg, causal=True, backend="cpp")
    if copy is not None:  # float32 always; bf16 where the search scores bf16 natively
        assert torch.equal(copy, k) and copy.stride(1) == 32  # each head's keys adjacent
    assert dtype != torch.float32 or copy is not None
    out = longattn.attention(q, k, v, causal=True, sparse=cfg, backend="cpp")
    layout = BlockSparseLayout(300, 300, 16, 2, 4, 24, True)
    direct = block_sparse_forward(q, k, v, selected, layout, scale=32 ** -0.5, softcap=0.0, backend="cpp")[0]
    assert torch.equal(out, direct)

