"""The ``streaming`` benchmark group: StreamingLLM's sinks + window prefill vs dense.

Causal prefill, batch 1, H=8, D=128, float32, ``Streaming(sink_size=64,
recent_size=1024)`` (the Lambda mask). Methods:

- ``longattn streaming``: ``attention(..., sparse=Streaming(64, 1024))``
  (on CPU the C++ flash kernel over the sink and window tiles);
- ``longattn chunked (PyTorch)``: ``backend="sdpa"``, PyTorch's fused
  kernel over each chunk's window span (what runs without a compiler);
- ``flex (same mask)``: compiled FlexAttention with the sink + window
  mask_mod (up to 32k tokens; its BlockMask build evaluates every
  (query, key) pair);
- ``sdpa``: dense causal SDPA, the baseline;
- ``longattn streaming bf16`` / ``sdpa bf16``: the same two on bfloat16
  copies of the inputs (the kernel's native bf16 engine where the CPU has
  one); the bf16 target compares them with each other.

Errors are against the block-sparse twin run with no listed blocks (the
same Lambda mask through a different code path); for SDPA that is the
approximation error of dropping the middle of the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.scenarios import (
    Group, Method, MethodUnavailable, Scenario, Target, Timed, in_bfloat16, no_setup, register_group,
)
from longattn.kernels.block_sparse import BlockSparseLayout
from longattn.kernels.block_sparse.eager import block_sparse_forward_eager
from longattn.sparse import Streaming

NHEADS, HEADDIM = 8, 128
CONFIG = Streaming(sink_size=64, recent_size=1024)
FLEX_MAX_SEQLEN = 32768
SPEEDUP_VS_SDPA = {32768: 25.0}  # issue 15's target, float32 and bfloat16 alike


@dataclass(frozen=True)
class StreamingInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def make_inputs(seqlen: int, seed: int) -> StreamingInputs:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, seqlen, NHEADS, HEADDIM, generator=gen) for _ in range(3))
    return StreamingInputs(q, k, v)


def run_streaming(inputs: StreamingInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True, sparse=CONFIG)


def run_chunked(inputs: StreamingInputs) -> torch.Tensor:
    return longattn.attention(inputs.q, inputs.k, inputs.v, causal=True, sparse=CONFIG, backend="sdpa")


def run_sdpa(inputs: StreamingInputs) -> torch.Tensor:
    out = F.scaled_dot_product_attention(inputs.q.transpose(1, 2), inputs.k.transpose(1, 2),
                                         inputs.v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def build_flex(inputs: StreamingInputs) -> Timed:
    seqlen = inputs.q.shape[1]
    if seqlen > FLEX_MAX_SEQLEN:
        raise MethodUnavailable(f"skipped above {FLEX_MAX_SEQLEN} tokens: building its BlockMask evaluates "
                                "the mask on every (query, key) pair")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise MethodUnavailable(f"this torch has no flex_attention ({exc})") from None
    sink, window = CONFIG.sink_size, CONFIG.recent_size

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sink) | (kv_idx > q_idx - window))

    block_mask = create_block_mask(mask_mod, 1, 1, seqlen, seqlen, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(inputs: StreamingInputs) -> torch.Tensor:
        out = compiled(inputs.q.transpose(1, 2), inputs.k.transpose(1, 2), inputs.v.transpose(1, 2),
                       block_mask=block_mask)
        return out.transpose(1, 2)
    run(inputs)
    return run


def reference(inputs: StreamingInputs, outputs: dict) -> tuple[torch.Tensor, str]:
    seqlen = inputs.q.shape[1]
    layout = BlockSparseLayout(seqlen, seqlen, 64, 1, CONFIG.sink_size, CONFIG.recent_size, True)
    none = torch.empty(1, NHEADS, layout.num_q_blocks, 0, dtype=torch.long)
    out, _ = block_sparse_forward_eager(inputs.q, inputs.k, inputs.v, none, layout, scale=HEADDIM ** -0.5,
                                        softcap=0.0)
    return out, "block-sparse twin, same mask"


def streaming_scenario(seqlen: int) -> Scenario:
    methods = [
        Method("longattn streaming", no_setup(run_streaming)),
        Method("longattn chunked (PyTorch)", no_setup(run_chunked)),
        Method("flex (same mask)", build_flex, slow_setup=True),
        Method("sdpa", no_setup(run_sdpa)),
        Method("longattn streaming bf16", in_bfloat16(run_streaming)),
        Method("sdpa bf16", in_bfloat16(run_sdpa)),
    ]
    targets = ()
    if seqlen in SPEEDUP_VS_SDPA:
        x = SPEEDUP_VS_SDPA[seqlen]
        targets = (Target("longattn streaming", 1 / x, f"issue target: >= {x:g}x faster than SDPA at "
                          f"{seqlen // 1024}k"),
                   Target("longattn streaming bf16", 1 / x, f"issue target: >= {x:g}x faster than SDPA bf16 at "
                          f"{seqlen // 1024}k", baseline="sdpa bf16"))
    return Scenario(
        name=f"streaming {seqlen}",
        group="streaming",
        size=seqlen,
        params={"seqlen": seqlen, "nheads": NHEADS, "headdim": HEADDIM, "dtype": "float32", "causal": True,
                "sink_size": CONFIG.sink_size, "recent_size": CONFIG.recent_size},
        make_inputs=lambda seed: make_inputs(seqlen, seed),
        methods={m.name: m for m in methods},
        baseline="sdpa",
        reference=reference,
        targets=targets,
    )


STREAMING = register_group(
    Group(
        name="streaming",
        description=f"Streaming(sink {CONFIG.sink_size}, window {CONFIG.recent_size}) prefill, causal, fp32 and bf16, "
                    f"batch 1, H={NHEADS}, D={HEADDIM}; baseline SDPA",
        size_name="seqlen",
        sizes=(8192, 16384, 32768),
        quick_sizes=(1024, 2048),
        make_scenario=streaming_scenario,
        # 45 s per method and case: three rounds of the 13 s SDPA baseline at 32k
        # rather than one, so that one noisy round on a shared VM does not decide
        # a target that sits within 10% of the measured ratio.
        method_budget_s=45.0,
    )
)
