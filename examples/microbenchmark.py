"""A small benchmark: longattn vs PyTorch's SDPA for causal prefill and one-query decode.

What it shows: how to time attention fairly and what longattn buys on this
machine. Causal prefill times ``longattn.attention(q, k, v, causal=True)``
(backend "auto") against ``torch.nn.functional.scaled_dot_product_attention
(..., is_causal=True)``; decode times ``longattn.decode_attention`` of one new
query over a KV cache against SDPA of that query over the cache's keys. Each
case runs both in interleaved rounds (rotating order, after a warmup; a
sample is enough back-to-back calls to last >= 20 ms) and reports the median
time per call, so drift on a shared machine lands on both alike; the ratio is
SDPA's time over longattn's (> 1: longattn is faster). The outputs are also
compared, and the script exits with status 1 if they disagree.

This is a compact version of ``longattn bench`` (``longattn bench dense``,
``longattn bench decode``), which has more cases, twins, JSON and plots.

Run::

    python examples/microbenchmark.py              # default sizes (~10-20 s on a 2-core CPU)
    python examples/microbenchmark.py --tiny       # CI smoke sizes
    python examples/microbenchmark.py --prefill 1024 4096 --decode 32768 --repeats 7

Layouts: longattn takes ``(batch, seqlen, nheads, headdim)``; SDPA gets
``(batch, nheads, seqlen, headdim)`` tensors made contiguous before timing, so
neither side pays for a transpose. Heads are grouped (GQA, ``--nheads`` query
heads over ``--nheads-k`` key/value heads; SDPA with ``enable_gqa=True``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import longattn

# Max |longattn - SDPA| per dtype: both accumulate in float32.
BOUNDS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def median_times(calls: dict, repeats: int, min_sample_s: float = 0.02) -> tuple[dict, dict]:
    """Median seconds per call and each call's first output.

    Warmup: each call runs once untimed (first-use costs: kernel build, plan
    caches) and once timed to pick how many back-to-back calls make one
    sample of at least ``min_sample_s`` (a single sub-millisecond call is
    mostly timer and scheduler noise). Then ``repeats`` rounds each take one
    sample of every call, in rotating order, so drift on a shared machine
    lands on all calls alike."""
    names = list(calls)
    outputs = {name: calls[name]() for name in names}
    inner = {}
    for name in names:
        start = time.perf_counter()
        calls[name]()
        inner[name] = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-6)))
    seconds = {name: [] for name in names}
    for rnd in range(repeats):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            call, n = calls[name], inner[name]
            start = time.perf_counter()
            for _ in range(n):
                call()
            seconds[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in seconds.items()}, outputs


def prefill_case(seqlen, args, dtype):
    shape_q = (args.batch, seqlen, args.nheads, args.headdim)
    shape_k = (args.batch, seqlen, args.nheads_k, args.headdim)
    q, k, v = torch.randn(shape_q, dtype=dtype), torch.randn(shape_k, dtype=dtype), torch.randn(shape_k, dtype=dtype)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    gqa = args.nheads != args.nheads_k
    calls = {
        "longattn": lambda: longattn.attention(q, k, v, causal=True),
        # seqlen_q == seqlen_k: SDPA's top-left causal mask equals longattn's bottom-right one
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa).transpose(1, 2),
    }
    return f"prefill causal  seqlen {seqlen}", calls


def decode_case(cache_len, args, dtype):
    q = torch.randn(args.batch, 1, args.nheads, args.headdim, dtype=dtype)
    k_cache = torch.randn(args.batch, cache_len, args.nheads_k, args.headdim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    lens = torch.full((args.batch,), cache_len, dtype=torch.int32)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k_cache, v_cache))
    gqa = args.nheads != args.nheads_k
    calls = {
        "longattn": lambda: longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens),
        # one query at the end of the sequence sees every key: no mask
        "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa).transpose(1, 2),
    }
    return f"decode 1 query  cache {cache_len}", calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes for a CI smoke run")
    parser.add_argument("--prefill", type=int, nargs="*", help="prefill sequence lengths (default 512 1024 2048)")
    parser.add_argument("--decode", type=int, nargs="*", help="decode cache lengths (default 4096 16384 65536)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--nheads", type=int, default=16)
    parser.add_argument("--nheads-k", type=int, default=4)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 7, --tiny 3)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.nheads, args.nheads_k, args.headdim = 4, 2, 32
    prefill = args.prefill if args.prefill is not None else ([64, 256] if args.tiny else [512, 1024, 2048])
    decode = args.decode if args.decode is not None else ([512, 4096] if args.tiny else [4096, 16384, 65536])
    repeats = args.repeats or (3 if args.tiny else 7)
    dtype = getattr(torch, args.dtype)
    bound = BOUNDS[dtype]
    torch.manual_seed(0)

    print(f"batch {args.batch}, nheads {args.nheads}, nheads_k {args.nheads_k}, headdim {args.headdim}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, median of {repeats} interleaved repeats")
    header = f"{'case':<30} {'longattn ms':>12} {'sdpa ms':>10} {'sdpa/longattn':>14} {'max diff':>10}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    cases = [prefill_case(n, args, dtype) for n in prefill] + [decode_case(n, args, dtype) for n in decode]
    for name, calls in cases:
        times, outs = median_times(calls, repeats)
        diff = (outs["longattn"].float() - outs["sdpa"].float()).abs().max().item()
        worst = diff if not diff <= worst else worst  # keeps a NaN
        print(f"{name:<30} {times['longattn'] * 1e3:12.3f} {times['sdpa'] * 1e3:10.3f} "
              f"{times['sdpa'] / times['longattn']:13.2f}x {diff:10.1e}")
    if not worst <= bound:
        print(f"FAILED: longattn and SDPA differ by {worst:.2e} > {bound:g}")
        return 1
    print(f"OK: all cases match SDPA (max diff {worst:.1e} <= {bound:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
