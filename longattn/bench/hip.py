"""The ``hip`` benchmark group: HiP sparse prefill against dense attention.

Causal prefill, batch 1, H=8, D=128, float32, HiP defaults (topk 512, block_q
64, block_k 2, query stride 2, 16 sinks, 256-token window), on a structured
synthetic workload: queries and keys that follow one smooth random walk per
head (so scores decay with distance), a few far "needle" spans every query
is drawn to, and noise. Methods:

- ``longattn hip``: ``attention(..., sparse=HiP())``, mask search + attention;
- ``block-sparse (given mask)``: the block-sparse primitive on HiP's
  selection, computed beforehand (not timed): the attention part alone;
- ``flex (same mask)``: compiled FlexAttention with a mask_mod that encodes
  the same selection + sinks + window (up to :data:`FLEX_MAX_SEQLEN`; above
  it building the BlockMask alone takes minutes here);
- ``sdpa``: dense causal SDPA, the baseline;
- ``longattn hip bf16`` / ``sdpa bf16``: the same two on bfloat16 copies of
  the inputs (the kernel's native bf16 engine where the CPU has one); the
  bf16 target compares them with each other.

The error column compares every output with the block-sparse primitive's
(same mask): for ``longattn hip`` and flex it checks they attend over the
same keys; for ``sdpa`` it is HiP's approximation error; for the bf16 rows
it holds both: the float32 selection is the reference, and the search on
bf16 inputs ranks near-equal blocks differently (the bf16 path's own
selection is checked against the eager twin's in the tests). Measured per case:
the mask search's own time (median of 3), the output's relative error
against dense attention, the share of the dense softmax mass the selected
keys hold (recall) on 64 sampled queries, and the fraction of (sampled
query, needle span) pairs where the query sees at least one of the span's keys.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.scenarios import (
    Group, Method, MethodUnavailable, Scenario, Target, Timed, in_bfloat16, no_setup, register_group,
)
from longattn.kernels.block_sparse import BlockSparseLayout, block_sparse_attention
from longattn.sparse import HiP, hip_select_blocks

NHEADS, HEADDIM = 8, 128
CONFIG = HiP()
FLEX_MAX_SEQLEN = 16384
SPEEDUP_VS_SDPA = {32768: 4.0, 65536: 10.0}  # issue 12's at 32k; issue 15's at 64k (fp32 and bf16)
NEEDLES = 4  # needle spans per head
SAMPLED_QUERIES = 64


@dataclass(frozen=True)
class HipInputs:
    q: torch.Tensor  # (1, seqlen, nheads, headdim)
    k: torch.Tensor
    v: torch.Tensor
    needles: torch.Tensor  # (nheads_k, NEEDLES) first key positions of the needle spans


LOGIT_PEAK = 12.0  # scaled score of a key at distance 0, and of a needle key
CORRELATION_LENGTH = 64  # tokens over which a key's similarity to the query falls by 1/e
NEEDLE_LEN = 32  # tokens per needle span


def smooth_walk(seqlen: int, width: int, length: float, gen: torch.Generator, chunk: int = 64) -> torch.Tensor:
    """``(seqlen, width)`` unit-variance AR(1) process, correlation ``rho^|i - j|`` with
    ``rho = 1 - 1 / length``: each chunk is one lower-triangular matmul, then the carry."""
    rho = 1.0 - 1.0 / length
    chunks = -(-seqlen // chunk)
    noise = torch.randn(chunks * chunk, width, generator=gen, dtype=torch.float64).view(chunks, chunk, width)
    t = torch.arange(chunk, dtype=torch.float64)
    decay = torch.tril(rho ** (t[:, None] - t[None, :]).clamp(min=0))  # decay[t, m] = rho^(t - m), m <= t
    local = decay @ (noise * (1 - rho * rho) ** 0.5)  # each chunk as if it started from 0
    carry = torch.randn(width, generator=gen, dtype=torch.float64)  # the value before the first: stationary start
    powers = rho ** (t + 1)
    for c in range(chunks):  # add the previous chunk's last value, decayed
        local[c] += powers[:, None] * carry
        carry = local[c, -1].clone()
    return local.reshape(-1, width)[:seqlen].to(torch.float32)


def make_hip_inputs(seqlen: int, seed: int, nheads: int = NHEADS, nheads_k: int = NHEADS) -> HipInputs:
    """Per kv head: keys and queries follow one smooth random walk (scaled score
    ~LOGIT_PEAK at distance 0, falling as exp(-distance / CORRELATION_LENGTH),
    about N(0, 1) far away); NEEDLES spans of NEEDLE_LEN keys point along a
    direction ``g`` every query of the group also leans to (score LOGIT_PEAK);
    noise. Query heads of a GQA group share their kv head's walk."""
    gen = torch.Generator().manual_seed(seed)
    group = nheads // nheads_k
    dot = LOGIT_PEAK * HEADDIM ** 0.5  # softmax_scale is headdim ** -0.5
    walk = smooth_walk(seqlen, nheads_k * HEADDIM, CORRELATION_LENGTH, gen).view(seqlen, nheads_k, HEADDIM)
    walk = walk * (dot / HEADDIM) ** 0.5  # |walk_j|^2 ~ dot
    g = F.normalize(torch.randn(nheads_k, HEADDIM, generator=gen), dim=-1)
    noise = 0.3
    q = (walk + g).repeat_interleave(group, dim=1) + noise * torch.randn(seqlen, nheads, HEADDIM, generator=gen)
    k = walk + noise * torch.randn(seqlen, nheads_k, HEADDIM, generator=gen)
    low = CONFIG.sink_size + CONFIG.recent_size
    high = max(low + 1, seqlen // 2 - NEEDLE_LEN)
    needles = torch.randint(low, high, (nheads_k, NEEDLES), generator=gen)
    for h in range(nheads_k):
        for start in needles[h].tolist():
            span = slice(start, min(start + NEEDLE_LEN, seqlen))
            k[span, h] = dot * g[h] + noise * torch.randn(k[span, h].shape, generator=gen)
    v = torch.randn(seqlen, nheads_k, HEADDIM, generator=gen)
    return HipInputs(q[None].contiguous(), k[None].contiguous(), v[None].contiguous(), needles)


def _layout(seqlen: int) -> BlockSparseLayout:
    return BlockSparseLayout(seqlen, seqlen, CONFIG.block_q, CONFIG.block_k, CONFIG.sink_size,
                             CONFIG.recent_size, True)


def run_hip(inputs: HipInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True, sparse=CONFIG)


def build_block_sparse(inputs: HipInputs) -> Timed:
    blocks = hip_select_blocks(inputs.q, inputs.k, CONFIG)

    def run(inputs: HipInputs) -> torch.Tensor:
        return block_sparse_attention(inputs.q, inputs.k, inputs.v, blocks, block_q=CONFIG.block_q,
                                      block_k=CONFIG.block_k, sink_size=CONFIG.sink_size,
                                      recent_size=CONFIG.recent_size, causal=True)
    return run


def build_flex(inputs: HipInputs) -> Timed:
    seqlen, nheads = inputs.q.shape[1], inputs.q.shape[2]
    if not flex_runs(seqlen, nheads):
        raise MethodUnavailable(f"skipped above {FLEX_MAX_SEQLEN} tokens at H={NHEADS} (the same number of "
                                "(head, query, key) triples at other H): building its BlockMask evaluates "
                                "the mask on every one")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise MethodUnavailable(f"this torch has no flex_attention ({exc})") from None
    layout = _layout(seqlen)
    listed = layout.selected_mask(hip_select_blocks(inputs.q, inputs.k, CONFIG))[0]  # (nheads, nqb, nkb)
    sink, window, bq, bk = CONFIG.sink_size, CONFIG.recent_size, CONFIG.block_q, CONFIG.block_k

    def mask_mod(b, h, q_idx, kv_idx):
        fixed = (kv_idx < sink) | (kv_idx > q_idx - window)
        chosen = listed[h, q_idx // bq, kv_idx // bk] & (kv_idx >= sink)
        return (kv_idx <= q_idx) & (fixed | chosen)

    block_mask = create_block_mask(mask_mod, 1, inputs.q.shape[2], seqlen, seqlen, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = inputs.q.shape[2] != inputs.k.shape[2]

    def run(inputs: HipInputs) -> torch.Tensor:
        out = compiled(inputs.q.transpose(1, 2), inputs.k.transpose(1, 2), inputs.v.transpose(1, 2),
                       block_mask=block_mask, enable_gqa=gqa)
        return out.transpose(1, 2)
    run(inputs)
    return run


def flex_runs(seqlen: int, nheads: int) -> bool:
    return seqlen * seqlen * nheads <= FLEX_MAX_SEQLEN * FLEX_MAX_SEQLEN * NHEADS


def run_sdpa(inputs: HipInputs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(inputs.q.transpose(1, 2), inputs.k.transpose(1, 2),
                                         inputs.v.transpose(1, 2), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def hip_reference(inputs: HipInputs, outputs: dict) -> tuple[torch.Tensor, str]:
    """HiP's selection through the eager block-sparse twin: a path independent
    of the C++ kernel the timed methods run on a CPU."""
    blocks = hip_select_blocks(inputs.q, inputs.k, CONFIG)
    out = block_sparse_attention(inputs.q, inputs.k, inputs.v, blocks, block_q=CONFIG.block_q,
                                 block_k=CONFIG.block_k, sink_size=CONFIG.sink_size,
                                 recent_size=CONFIG.recent_size, causal=True, backend="eager")
    return out, "eager twin, same mask"


def measure_quality(inputs: HipInputs, outputs: dict) -> dict[str, float]:
    """Mask search time, output error vs dense, attention-mass recall and needles seen."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        blocks = hip_select_blocks(inputs.q, inputs.k, CONFIG)
        times.append(time.perf_counter() - start)
    figures: dict[str, float] = {"mask search s": statistics.median(times)}
    hip_out = outputs.get("longattn hip")
    dense = outputs.get("sdpa")
    if hip_out is None or dense is None:
        dense = run_sdpa(inputs)
        hip_out = run_hip(inputs)
    figures["rel error vs dense"] = float((hip_out - dense).norm() / dense.norm())

    seqlen = inputs.q.shape[1]
    rows = torch.linspace(seqlen // 2, seqlen - 1, SAMPLED_QUERIES).long().unique()  # queries that can see needles
    seen = _layout(seqlen).dense_mask(blocks, rows)[0]  # (nheads, rows, seqlen)
    nheads, nheads_k = inputs.q.shape[2], inputs.k.shape[2]
    group = nheads // nheads_k
    q = inputs.q[0, rows].transpose(0, 1)  # (nheads, rows, headdim)
    k = inputs.k[0].repeat_interleave(group, dim=1)  # (seqlen, nheads, headdim)
    scores = torch.einsum("hrd,jhd->hrj", q, k) * HEADDIM ** -0.5
    scores = scores.masked_fill(torch.arange(seqlen)[None, None, :] > rows[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    figures["recall (dense mass kept)"] = float((probs * seen).sum(-1).mean())
    spans = inputs.needles[:, :, None] + torch.arange(NEEDLE_LEN)  # (nheads, NEEDLES, NEEDLE_LEN)
    spans = spans.clamp(max=seqlen - 1)
    needle_seen = torch.stack([seen[h][:, spans[h // group]].any(-1) for h in range(nheads)])  # (nheads, rows, NEEDLES)
    figures["needles seen"] = float(needle_seen.float().mean())
    return figures


def build_hip_bf16(inputs: HipInputs):
    """``longattn hip`` on bfloat16 copies (:func:`in_bfloat16`), its note
    naming the arithmetic of the C++ search and attention it runs here."""
    fn = in_bfloat16(run_hip)(inputs)
    from longattn.kernels.dense import cpp as flash_cpu
    from longattn.kernels.hip_score import cpp as hip_cpu

    parts = []
    if hip_cpu.score_unavailable_reason() is None:
        parts.append(f"search: {hip_cpu.bf16_search_arithmetic()}")
    if flash_cpu.flash_unavailable_reason() is None:
        parts.append(f"attention: {flash_cpu.choose_math(torch.bfloat16)}")
    if parts:
        fn.note = ", ".join(parts)
    return fn


def hip_scenario(seqlen: int, nheads: int = NHEADS, nheads_k: int = NHEADS, group: str = "hip") -> Scenario:
    methods = [
        Method("longattn hip", no_setup(run_hip)),
        Method("block-sparse (given mask)", build_block_sparse),
        Method("flex (same mask)", build_flex, slow_setup=True),
        Method("sdpa", no_setup(run_sdpa)),
        Method("longattn hip bf16", build_hip_bf16),
        Method("sdpa bf16", in_bfloat16(run_sdpa)),
    ]
    targets = []
    if seqlen in SPEEDUP_VS_SDPA:
        x = SPEEDUP_VS_SDPA[seqlen]
        targets.append(Target("longattn hip", 1 / x, f"issue target: >= {x:g}x faster than SDPA at {seqlen // 1024}k"))
        targets.append(Target("longattn hip bf16", 1 / x, f"issue target: >= {x:g}x faster than SDPA bf16 at "
                              f"{seqlen // 1024}k", baseline="sdpa bf16"))
    if seqlen >= 4096 and flex_runs(seqlen, nheads):
        targets.append(Target("block-sparse (given mask)", 1.0, "issue target: at least as fast as FlexAttention "
                              "on the same mask", baseline="flex (same mask)"))
    heads = f"H={nheads}" if nheads == nheads_k else f"H={nheads}/{nheads_k}"
    return Scenario(
        name=f"hip {heads} {seqlen}",
        group=group,
        size=seqlen,
        params={"seqlen": seqlen, "nheads": nheads, "nheads_k": nheads_k, "headdim": HEADDIM, "dtype": "float32",
                "causal": True, "hip": CONFIG.__dict__},
        make_inputs=lambda seed: make_hip_inputs(seqlen, seed, nheads, nheads_k),
        methods={m.name: m for m in methods},
        baseline="sdpa",
        reference=hip_reference,
        targets=tuple(targets),
        measure=measure_quality,
    )


HIP = register_group(
    Group(
        name="hip",
        description=f"HiP prefill (topk {CONFIG.topk}), causal, fp32, batch 1, H={NHEADS}, D={HEADDIM}; baseline SDPA",
        size_name="seqlen",
        sizes=(4096, 8192, 16384, 32768, 65536),
        quick_sizes=(1024, 2048),
        make_scenario=hip_scenario,
    )
)

GQA_HEADS = (32, 8)
HIP_GQA = register_group(
    Group(
        name="hip-gqa",
        description=f"HiP prefill (topk {CONFIG.topk}), causal, fp32, batch 1, GQA H={GQA_HEADS[0]}/{GQA_HEADS[1]}, "
                    f"D={HEADDIM}; baseline SDPA",
        size_name="seqlen",
        sizes=(8192, 16384, 32768),
        quick_sizes=(1024,),
        make_scenario=lambda seqlen: hip_scenario(seqlen, *GQA_HEADS, group="hip-gqa"),
    )
)
