"""flash-attn code running unchanged on longattn: swap one import line.

What it shows: three pieces of ordinary flash-attn 2.x code -- a causal GQA
prefill with ``flash_attn_func``, a packed batch of unequal sequences with
``flash_attn_varlen_func``, and a paged KV cache filled by a prompt and then
an append loop with ``flash_attn_with_kvcache`` -- written against flash-attn's
API and run through :mod:`longattn.integrations.flash_attn` (CPU or GPU, any
float dtype, any page size). Every result is compared with longattn's float64
oracle (:func:`longattn.reference.attention_ref` / ``attention_ref_varlen``);
the script prints the max error of each and exits with status 1 if one exceeds
the bound for the dtype.

Run::

    python examples/flash_attn_drop_in.py            # default sizes (a few seconds on a CPU)
    python examples/flash_attn_drop_in.py --tiny     # CI smoke sizes
    python examples/flash_attn_drop_in.py --dtype float16 --device cuda

Layouts are flash-attn's: q ``(batch, seqlen, nheads, headdim)``, packed q
``(total, nheads, headdim)`` with ``cu_seqlens (batch + 1,)`` int32, paged
cache ``(num_pages, page_size, nheads_k, headdim)`` with ``block_table
(batch, pages_per_seq)`` int32.
"""

from __future__ import annotations

import argparse
import sys

import torch

# from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from longattn.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from longattn.reference import attention_ref, attention_ref_varlen

# Max |out - oracle| allowed per dtype: a few ulps of an O(1) output, generous
# enough for any twin's accumulation order, far below what a wrong mask gives.
BOUNDS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


# --- user code, written for flash-attn ------------------------------------------

def prefill(q, k, v):
    """Causal self-attention, q ``(batch, seqlen, nheads, headdim)``, k/v with fewer heads (GQA)."""
    return flash_attn_func(q, k, v, causal=True)


def packed_prefill(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention over packed sequences (no padding)."""
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


def generate(q_prompt, k_prompt, v_prompt, q_steps, k_steps, v_steps, page_size):
    """A prompt written into a paged KV cache, then one token per step.

    Pages are handed out in a shuffled order, as a serving engine's page
    allocator would. Returns the prompt's output and each step's output
    ``(batch, 1, nheads, headdim)``."""
    batch, prompt_len, nheads_k, headdim = k_prompt.shape
    capacity = prompt_len + q_steps.shape[1]
    pages_per_seq = -(-capacity // page_size)
    num_pages = batch * pages_per_seq
    k_cache = k_prompt.new_zeros(num_pages, page_size, nheads_k, headdim)
    v_cache = torch.zeros_like(k_cache)
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(1))
    block_table = order.view(batch, pages_per_seq).to(torch.int32).to(k_prompt.device)
    cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=k_prompt.device)

    # prefill: the prompt's keys are written into the cache in the same call
    out_prompt = flash_attn_with_kvcache(q_prompt, k_cache, v_cache, k_prompt, v_prompt, cache_seqlens=cache_seqlens,
                                         block_table=block_table, causal=True)
    cache_seqlens += prompt_len
    outs = []
    for t in range(q_steps.shape[1]):  # decode: append one token, attend to everything so far
        out = flash_attn_with_kvcache(q_steps[:, t:t + 1], k_cache, v_cache, k_steps[:, t:t + 1], v_steps[:, t:t + 1],
                                      cache_seqlens=cache_seqlens, block_table=block_table, causal=True)
        cache_seqlens += 1
        outs.append(out)
    return out_prompt, outs


# --- the check against longattn's float64 oracle --------------------------------------

def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes for a CI smoke run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if args.tiny:
        batch, seqlen, nheads, nheads_k, headdim = 2, 48, 4, 2, 32
        lengths, prompt_len, steps, page_size = [37, 5, 64], 21, 6, 8
    else:
        batch, seqlen, nheads, nheads_k, headdim = 2, 512, 8, 2, 64
        lengths, prompt_len, steps, page_size = [300, 17, 512, 129], 700, 32, 256
    torch.manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    bound = BOUNDS[dtype]
    errors = {}

    q, k, v = randn(batch, seqlen, nheads, headdim), randn(batch, seqlen, nheads_k, headdim), \
        randn(batch, seqlen, nheads_k, headdim)
    errors["flash_attn_func (causal, GQA)"] = max_err(prefill(q, k, v), attention_ref(q, k, v, causal=True)[0])

    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    total = sum(lengths)
    q, k, v = randn(total, nheads, headdim), randn(total, nheads_k, headdim), randn(total, nheads_k, headdim)
    out = packed_prefill(q, k, v, cu, max(lengths))
    errors[f"flash_attn_varlen_func (lengths {lengths})"] = max_err(
        out, attention_ref_varlen(q, k, v, cu, cu, causal=True)[0])

    full = prompt_len + steps
    q_all, k_all, v_all = randn(batch, full, nheads, headdim), randn(batch, full, nheads_k, headdim), \
        randn(batch, full, nheads_k, headdim)
    out_prompt, outs = generate(q_all[:, :prompt_len], k_all[:, :prompt_len], v_all[:, :prompt_len],
                                q_all[:, prompt_len:], k_all[:, prompt_len:], v_all[:, prompt_len:], page_size)
    err = max_err(out_prompt, attention_ref(q_all[:, :prompt_len], k_all[:, :prompt_len], v_all[:, :prompt_len],
                                            causal=True)[0])
    for t, out in enumerate(outs):
        end = prompt_len + t + 1  # step t sees the prompt and tokens 0..t
        ref = attention_ref(q_all[:, end - 1:end], k_all[:, :end], v_all[:, :end], causal=True)[0]
        err = max(err, max_err(out, ref))
    errors[f"flash_attn_with_kvcache (paged, page_size {page_size}, prompt {prompt_len} + {steps} steps)"] = err

    print(f"device {device}, dtype {args.dtype}, bound {bound:g}")
    worst = 0.0
    for name, err in errors.items():
        worst = max(worst, err)
        print(f"  {name:<72} max error {err:.2e}  {'ok' if err <= bound else 'TOO LARGE'}")
    if not worst <= bound:  # also catches NaN
        print(f"FAILED: max error {worst:.2e} exceeds {bound:g}")
        return 1
    print(f"OK: flash-attn code matches the float64 oracle (max error {worst:.2e} <= {bound:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
