"""A Hugging Face transformers model on longattn, with one registration line.

Builds a small Llama-shaped model from a config (random weights: nothing is
downloaded), registers longattn's attention implementations, and generates
greedily with

- ``attn_implementation="sdpa"`` (transformers' default, the comparison),
- ``"longattn"`` (dense; decode steps through ``longattn.decode_attention``
  with a ``LongAttnCache``),
- ``"longattn_duo"`` (DuoAttention: half the kv heads of every layer are
  streaming heads; with the sequence shorter than sinks + window it is exact).

Checks that dense longattn generates sdpa's tokens and that Duo does too
while its budget covers the sequence; exits 1 otherwise.

Run: ``python examples/transformers_model.py`` (``--tiny`` for a few-second run).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import longattn.integrations.transformers as lt
from longattn.sparse import HeadPattern


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and a short prompt (CI)")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    tiny = args.tiny
    prompt_len = args.prompt_len or (24 if tiny else 512)
    new_tokens = args.new_tokens or (6 if tiny else 32)
    config = LlamaConfig(vocab_size=256, hidden_size=64 if tiny else 512, intermediate_size=128 if tiny else 1408,
                         num_hidden_layers=2 if tiny else 4, num_attention_heads=4 if tiny else 8,
                         num_key_value_heads=2, max_position_embeddings=4096)

    # Half of every layer's kv heads are streaming heads, with sinks + window
    # covering the whole run: Duo is then exactly dense attention.
    gates = torch.tensor([[1.0, 0.0] * (config.num_key_value_heads // 2)] * config.num_hidden_layers)
    pattern = HeadPattern.from_gates(gates, sparsity=0.5, sink_size=4, recent_size=prompt_len + new_tokens)
    names = lt.register(duo=pattern)  # the one line: "longattn", "longattn_duo"
    print(f"registered: {', '.join(names)}")

    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, prompt_len))
    results = {}
    for impl in ("sdpa", "longattn", "longattn_duo"):
        torch.manual_seed(0)  # the same random weights for every implementation
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
        kwargs = {}
        if impl == "longattn":
            cache = lt.LongAttnCache(model.config, max_cache_len=prompt_len + new_tokens)
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            kwargs[name] = cache
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)
        seconds = time.perf_counter() - start
        results[impl] = out[0, prompt_len:].tolist()
        print(f"{impl:14s} {seconds * 1e3:8.1f} ms  tokens {results[impl]}")

    ok = results["longattn"] == results["sdpa"] and results["longattn_duo"] == results["sdpa"]
    print("OK: longattn and longattn_duo generate sdpa's tokens" if ok else "MISMATCH with sdpa's tokens")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
