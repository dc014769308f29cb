"""HiP decode in a generation loop, as a user runs it: a tiny decoder model
prefills a prompt, then generates greedily with one HiPDecodeState per layer.
With ``topk`` covering the whole context every step must be dense attention,
so the generated tokens are the dense model's (before keys leaving the
window between refreshes were carried, a run like this agreed on ~85% of
tokens)."""

from __future__ import annotations

import torch

import longattn
from longattn.sparse import HiP, HiPDecodeState

VOCAB, LAYERS, HEADS, HEADS_K, D = 61, 2, 4, 2, 16


class TinyDecoder(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        width = HEADS * D
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, width, generator=g))
        self.wq = torch.nn.Parameter(torch.randn(LAYERS, width, HEADS * D, generator=g) / width ** 0.5)
        self.wk = torch.nn.Parameter(torch.randn(LAYERS, width, HEADS_K * D, generator=g) / width ** 0.5)
        self.wv = torch.nn.Parameter(torch.randn(LAYERS, width, HEADS_K * D, generator=g) / width ** 0.5)
        self.wo = torch.nn.Parameter(torch.randn(LAYERS, HEADS * D, width, generator=g) / width ** 0.5)
        self.head = torch.nn.Parameter(torch.randn(width, VOCAB, generator=g) / width ** 0.5)

    def qkv(self, layer: int, h: torch.Tensor):
        batch, n, _ = h.shape
        return ((h @ self.wq[layer]).view(batch, n, HEADS, D) * 3,  # sharper attention than random
                (h @ self.wk[layer]).view(batch, n, HEADS_K, D), (h @ self.wv[layer]).view(batch, n, HEADS_K, D))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int, sparse: HiP | None) -> list[int]:
        batch, n = prompt.shape
        capacity = n + steps
        caches = [(torch.zeros(batch, capacity, HEADS_K, D), torch.zeros(batch, capacity, HEADS_K, D))
                  for _ in range(LAYERS)]
        h = self.embed[prompt]
        for layer in range(LAYERS):  # prefill
            q, k, v = self.qkv(layer, h)
            caches[layer][0][:, :n], caches[layer][1][:, :n] = k, v
            h = h + longattn.attention(q, k, v, causal=True).reshape(batch, n, -1) @ self.wo[layer]
        lens = torch.full((batch,), n, dtype=torch.int32)
        states = [HiPDecodeState() for _ in range(LAYERS)] if sparse is not None else [None] * LAYERS
        token = (h[:, -1] @ self.head).argmax(-1)
        tokens = [int(token)]
        for _ in range(steps - 1):
            h = self.embed[token][:, None]
            for layer in range(LAYERS):
                q, k, v = self.qkv(layer, h)
                out = longattn.decode_attention(q, *caches[layer], cache_seqlens=lens, k_new=k, v_new=v,
                                                sparse=sparse, state=states[layer])
                h = h + out.reshape(batch, 1, -1) @ self.wo[layer]
            lens += 1
            token = (h[:, -1] @ self.head).argmax(-1)
            tokens.append(int(token))
        return tokens


def test_greedy_generation_with_a_covering_topk_is_the_dense_models():
    model = TinyDecoder()
    prompt = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(1))
    steps = 90  # past many refreshes: keys leave the 8-token window between every two
    # topk covers every searchable key of the longest context (160 keys).
    hip = HiP(topk=256, block_q=16, block_k=2, query_stride=2, sink_size=4, recent_size=8, refresh_interval=5)
    dense_tokens = model.generate(prompt, steps, None)
    hip_tokens = model.generate(prompt, steps, hip)
    agree = sum(a == b for a, b in zip(hip_tokens, dense_tokens))
    assert hip_tokens == dense_tokens, f"{agree} of {steps} tokens agree"
