"""One long sequence over several processes: ring, Ulysses and APB attention with torch.distributed.

Run under torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --nproc-per-node 2 examples/sequence_parallel.py

or plainly (``python examples/sequence_parallel.py [--tiny]``): it then starts
2 local ranks itself. Every rank builds the same full q, k, v (a fixed seed),
keeps its zigzag shard, and runs

- ``ring_attention`` forward and backward (the gradients of its shard),
- ``ulysses_attention`` forward,
- ``apb_attention`` (approximate) forward on contiguous blocks,

then rank 0 checks the gathered outputs and gradients against single-process
``longattn.attention`` on the full sequence and prints the result.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import longattn
from longattn.parallel import apb_attention, ring_attention, shard, ulysses_attention, unshard
from longattn.parallel.comm import free_port


def rank_main(tokens: int, nheads: int, headdim: int) -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, nheads, headdim, generator=gen) for _ in range(3))
    dout = torch.randn(1, tokens, nheads, headdim, generator=gen)

    # exact attention, differentiable: this rank's zigzag shard in, its shard of out and grads back
    leaves = [shard(t, "zigzag").requires_grad_() for t in (q, k, v)]
    out = ring_attention(*leaves, causal=True)
    out.backward(shard(dout, "zigzag"))
    ring_out = unshard(out.detach(), "zigzag")
    ring_grads = [unshard(t.grad, "zigzag") for t in leaves]

    uly_out = unshard(ulysses_attention(*(shard(t, "zigzag") for t in (q, k, v)), causal=True), "zigzag")

    block = tokens // world  # APB: contiguous blocks, anchor = block/4, passing = block/8
    apb_out = unshard(apb_attention(*(shard(t, "contiguous") for t in (q, k, v)),
                                    anchor_len=block // 4, passing_len=block // 8), "contiguous")
    if rank != 0:
        return True

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = longattn.attention(*full, causal=True)
    ref.backward(dout)
    errors = {"ring out": (ring_out - ref).abs().max().item(),
              "ulysses out": (uly_out - ref).abs().max().item()}
    errors.update({f"ring d{n}": (g - f.grad).abs().max().item() for n, g, f in zip("qkv", ring_grads, full)})
    apb_rel = ((apb_out - ref).norm() / ref.norm()).item()
    for name, err in errors.items():
        print(f"{name:12s} max |diff| vs single-process attention: {err:.2e}")
    print(f"APB (approximate) relative error on random data: {apb_rel:.3f} over {world} ranks")
    ok = all(err < 1e-4 for err in errors.values())
    print("OK: ring and Ulysses match single-process attention" if ok else "MISMATCH")
    return ok


def _spawned(rank: int, world: int, port: int, tokens: int, nheads: int, headdim: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ok = rank_main(tokens, nheads, headdim)
    finally:
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few-second run (512 tokens)")
    args = parser.parse_args()
    tokens, nheads, headdim = (512, 4, 32) if args.tiny else (8192, 8, 64)
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        try:
            ok = rank_main(tokens, nheads, headdim)
        finally:
            dist.destroy_process_group()
        return 0 if ok else 1
    port = free_port()
    torch.multiprocessing.spawn(_spawned, args=(2, port, tokens, nheads, headdim), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
