"""A packed (varlen) batch through longattn vs the same sequences padded through SDPA.

What it shows: a batch of sequences of very different lengths, packed end to
end with ``cu_seqlens`` (no padding), runs through one
``longattn.attention(q, k, v, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=,
max_seqlen_k=, causal=True)`` call. The usual alternative pads every sequence
to the longest one and calls ``torch.nn.functional.scaled_dot_product_attention``
with ``is_causal=True``; it computes the padded rows too. The script times
both (interleaved repeats after a warmup, median time per call), prints the
max difference on the real (non-padding) rows, and exits with status 1 if
they differ by more than the dtype's bound.

Run::

    python examples/packed_batch.py             # default sizes (~10-20 s on a 2-core CPU)
    python examples/packed_batch.py --tiny      # CI smoke sizes
    python examples/packed_batch.py --lengths 4000 100 100 100 --repeats 5

Layouts: packed q ``(total, nheads, headdim)``, k/v ``(total, nheads_k,
headdim)``, ``cu_seqlens (batch + 1,)`` int32 prefix sums of the lengths;
padded SDPA inputs ``(batch, nheads, max_len, headdim)``, right-padded. With
right padding and equal query/key lengths, SDPA's top-left causal mask agrees
with longattn's bottom-right one on every real row, and no real row sees a
padding key.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import longattn

# Max |packed - padded| on real rows, per dtype: both sides accumulate in float32.
BOUNDS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def pad(packed: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``(total, heads, headdim)`` -> ``(batch, heads, max_len, headdim)``, zero right padding (SDPA's layout)."""
    out = packed.new_zeros(len(lengths), max(lengths), packed.shape[1], packed.shape[2])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = packed[start:start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def unpad(padded: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``(batch, heads, max_len, headdim)`` -> the real rows, packed ``(total, heads, headdim)``."""
    return torch.cat([padded[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)], 0)


def median_times(calls: dict, repeats: int, min_sample_s: float = 0.02) -> dict[str, float]:
    """Median seconds per call. Warmup: each call once untimed (first-use
    costs), once timed to pick how many back-to-back calls make a sample of at
    least ``min_sample_s`` (one short call is mostly timer and scheduler
    noise). Then ``repeats`` rounds take one sample of every call, in rotating
    order, so drift on a shared machine lands on all calls alike."""
    names = list(calls)
    inner = {}
    for name in names:
        calls[name]()
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
    return {name: statistics.median(s) for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes for a CI smoke run")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: a skewed mix)")
    parser.add_argument("--nheads", type=int, default=16)
    parser.add_argument("--nheads-k", type=int, default=4, help="key/value heads (GQA when < nheads)")
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --tiny 2)")
    args = parser.parse_args(argv)
    lengths = args.lengths or ([40, 3, 97, 11] if args.tiny else [2048, 64, 300, 17, 1000, 130, 5, 700])
    repeats = args.repeats or (2 if args.tiny else 5)
    nheads, nheads_k, headdim = (4, 2, 32) if args.tiny else (args.nheads, args.nheads_k, args.headdim)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    total, longest = sum(lengths), max(lengths)
    q = torch.randn(total, nheads, headdim, dtype=dtype)
    k = torch.randn(total, nheads_k, headdim, dtype=dtype)
    v = torch.randn(total, nheads_k, headdim, dtype=dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    # SDPA gets its own layout, made before timing: only the attention call is timed
    qp, kp, vp = pad(q, lengths), pad(k, lengths), pad(v, lengths)

    def packed():
        return longattn.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                  max_seqlen_k=longest, causal=True)

    def padded():
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=nheads != nheads_k)

    diff = (packed().float() - unpad(padded(), lengths).float()).abs().max().item()
    times = median_times({"packed": packed, "padded": padded}, repeats)
    bound = BOUNDS[dtype]

    padded_rows = len(lengths) * longest
    print(f"{len(lengths)} sequences, lengths {lengths}: {total} real tokens, {padded_rows} when padded to "
          f"{longest} ({padded_rows / total:.1f}x); nheads {nheads}, nheads_k {nheads_k}, headdim {headdim}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"  longattn.attention, packed (varlen) : {times['packed'] * 1e3:9.2f} ms")
    print(f"  SDPA, padded                        : {times['padded'] * 1e3:9.2f} ms")
    print(f"  speedup (padded SDPA / packed)      : {times['padded'] / times['packed']:9.2f}x")
    print(f"  max difference on real rows         : {diff:9.2e} (bound {bound:g})")
    if not diff <= bound:  # also catches NaN
        print(f"FAILED: packed and padded results differ by {diff:.2e} > {bound:g}")
        return 1
    print("OK: packed and padded results match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
