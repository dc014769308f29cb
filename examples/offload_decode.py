"""Decode over a KV cache bigger than its memory budgets: device, host and disk tiers.

``python examples/offload_decode.py [--tiny]``: a 2-layer cache whose device
and host budgets hold a fraction of the context; the oldest pages go to a
crash-safe store on disk. Each decode step appends one token per layer and
attends where the pages live; the output is checked against
``decode_attention`` over an ordinary in-memory cache. Then the cache is
closed, reopened from disk (as after a restart) and checked again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from longattn import decode_attention
from longattn.offload import TieredKVCache


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few-second run")
    args = parser.parse_args()
    layers, nheads, nheads_k, headdim, page = 2, 8, 2, 64, 64
    context, steps = (2048, 4) if args.tiny else (65536, 16)
    dtype = torch.bfloat16
    page_bytes = 2 * page * nheads_k * headdim * 2
    gen = torch.Generator().manual_seed(0)
    total = context + steps
    k = torch.randn(layers, total, nheads_k, headdim, generator=gen).to(dtype)
    v = torch.randn(layers, total, nheads_k, headdim, generator=gen).to(dtype)
    qs = torch.randn(steps, layers, 1, 1, nheads, headdim, generator=gen).to(dtype)

    def reference(layer: int, length: int, q: torch.Tensor) -> torch.Tensor:
        return decode_attention(q, k[layer, None, :length], v[layer, None, :length],
                                cache_seqlens=torch.tensor([length], dtype=torch.int32))

    worst = 0.0
    with tempfile.TemporaryDirectory() as disk_dir:
        # a quarter of the pages on the "device", a quarter in host memory, the rest on disk
        budget = (context // page // 4) * layers * page_bytes
        cache = TieredKVCache(layers, nheads_k, headdim, dtype, page, budget, budget, disk_dir=disk_dir)
        for layer in range(layers):
            cache.append(layer, 0, k[layer, :context], v[layer, :context])
        start = time.perf_counter()
        for step in range(steps):
            length = context + step + 1
            for layer in range(layers):
                cache.append(layer, 0, k[layer, length - 1:length], v[layer, length - 1:length])
                out = cache.attend(layer, 0, qs[step, layer])
                worst = max(worst, (out.float() - reference(layer, length, qs[step, layer]).float()).abs().max().item())
        elapsed = time.perf_counter() - start
        stats = cache.stats()
        print(f"{steps} steps x {layers} layers over {context} tokens: {elapsed * 1e3 / steps:.1f} ms per step; "
              f"pages device/host/disk {stats['device_pages']}/{stats['host_pages']}/{stats['disk_pages']}, "
              f"{stats['bytes_read'] / 2**20:.1f} MiB read from disk")
        cache.close()

        reopened = TieredKVCache.open(disk_dir, device_budget_bytes=budget, host_budget_bytes=budget)
        q = qs[-1, 0]
        out = reopened.attend(0, 0, q)
        worst = max(worst, (out.float() - reference(0, total, q).float()).abs().max().item())
        reopened.close()
    print(f"max |diff| vs decode_attention on an in-memory cache: {worst:.2e}")
    ok = worst < 2e-2  # bf16: each tier's part is rounded to bf16 before the merge
    print("OK: tiered decode matches in-memory decode, also after reopening" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
