"""The ``model`` benchmark group: a Llama-shaped transformers model, prefill + greedy decode.

A small random Llama (default: 4 layers, hidden 1024, 8 heads of 128, 2 KV
heads, intermediate 2816, vocab 1000, float32, weights seeded by ``--seed``)
built from a config, no download. The case size is the prompt length
(default 4k and 16k; ``--sizes 32768`` for the issue's decode context, whose
SDPA prefill alone takes minutes on a 2-core CPU). Methods, each timed on its
own:

- ``sdpa prefill`` / ``longattn prefill``: one forward over the prompt
  (``attn_implementation="sdpa"`` vs ``"longattn"``), last position's logits;
- ``sdpa decode N tokens`` / ``longattn decode N tokens``: N greedy steps of
  one token each after the prompt. The prompt is prefilled in ``build`` (not
  timed); every timed call rewinds the cache to the prompt and decodes again.
  SDPA runs on transformers' default ``DynamicCache`` (what ``generate``
  uses); longattn on :class:`~longattn.integrations.transformers.LongAttnCache`
  (contiguous buffers, ``decode_attention`` appends in place). The output is
  the N steps' logits ``(N, vocab)``.
- ``longattn_hip``, ``longattn_streaming``, ``longattn_duo`` prefill and
  decode rows: the sparse variants at their defaults (``HiP()``,
  ``Streaming()``, Duo with every other kv head retrieval: see
  :func:`sparse_configs`), decoding through their ``LongAttnCache`` paths
  (HiP's decode state; Streaming/Duo's constant-memory caches, which cannot
  be rewound: each timed run continues where the last one stopped). Their
  decode starts from the dense prefill's K/V (the timing is the same; their
  logits are not compared).

Errors: the prefill methods against the SDPA prefill's logits; the decode
methods are not compared by the runner (their output has another shape): the
measurements under the table give the longattn decode's largest logit
difference from the SDPA decode and whether the greedy tokens are identical.

Targets (issue 11): longattn prefill >= 1.5x faster than SDPA (time ratio <=
0.67; the issue names 16k) and longattn decode >= 3x the tokens/s of SDPA
(ratio <= 0.33; the issue names 32k). Tokens/s of a decode row is
``N / median``; time to first token is the prefill row's median.

Other models: ``LONGATTN_BENCH_MODEL_CONFIG=/path/config.json`` (a
transformers config JSON, ``model_type`` defaults to ``llama``) replaces the
default config; weights are still random. Sizes below
:data:`TINY_MAX_CONTEXT` (what ``--quick`` runs: 64 and 128) use a tiny model
(2 layers, hidden 64) instead.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from longattn.bench.scenarios import Group, Method, Scenario, Target, register_group
from longattn.errors import ArgumentError

CONFIG_ENV = "LONGATTN_BENCH_MODEL_CONFIG"
NEW_TOKENS = 16
TINY_MAX_CONTEXT = 512  # cases up to this prompt length use TINY_CONFIG (the --quick cases)
PREFILL_MAX_RATIO = 1 / 1.5
DECODE_MAX_RATIO = 1 / 3

DEFAULT_CONFIG = dict(model_type="llama", vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                      max_position_embeddings=65536 + 1024, rope_theta=500000.0, tie_word_embeddings=False)
TINY_CONFIG = dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=176,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=1024, tie_word_embeddings=False)

IMPLS = ("sdpa", "longattn", "longattn_hip", "longattn_streaming", "longattn_duo")
DENSE_IMPLS = IMPLS[:2]  # compared with each other; the sparse variants only timed (and compared to sdpa)
# Room for decode runs of the store-based caches (Streaming/Duo evict tokens, so
# they cannot be rewound: each timed run continues where the last stopped).
STORE_ROUNDS = 64


def sparse_configs(cfg) -> dict[str, Any]:
    """``register()`` arguments of the sparse rows: HiP, Streaming and Duo at their
    defaults; Duo's pattern marks every other kv head of each layer retrieval
    (a fixed half/half split: the weights are random, there is nothing to
    calibrate; the cost depends only on the split)."""
    from longattn.sparse import HeadPattern, HiP, Streaming

    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    nheads_k = text.num_key_value_heads
    row = tuple(h % 2 == 0 for h in range(nheads_k))
    return dict(hip=HiP(), streaming=Streaming(), duo=HeadPattern(retrieval=(row,) * text.num_hidden_layers))


def _config_dict(context: int) -> dict[str, Any]:
    if context <= TINY_MAX_CONTEXT:
        return dict(TINY_CONFIG)
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return dict(DEFAULT_CONFIG)
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ArgumentError(f"{CONFIG_ENV} must name a readable transformers config JSON, got {path!r}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ArgumentError(f"{CONFIG_ENV} must hold a JSON object (a transformers config), got {type(cfg).__name__}")
    return cfg


@dataclass
class ModelInputs:
    model: Any  # a transformers *ForCausalLM, eval mode, float32
    ids: torch.Tensor  # (1, context) int64 prompt
    new_tokens: int
    cache_kwarg: str  # "cache" (transformers 5.x) or "past_key_values"
    prefilled: Any = None  # set by _shared_prefill: ([(k, v) per layer], first token (1, 1))


def _build_model(cfg_dict: dict[str, Any], seed: int):
    import transformers

    cfg_dict = dict(cfg_dict)
    model_type = cfg_dict.pop("model_type", "llama")
    cfg = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return model


def make_model_inputs(context: int, seed: int) -> ModelInputs:
    import longattn.integrations.transformers as lt

    model = _build_model(_config_dict(context), seed)
    lt.register(**sparse_configs(model.config))
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(seed + 1))
    params = inspect.signature(model.forward).parameters
    kw = "cache" if "cache" in params else "past_key_values"
    return ModelInputs(model, ids, NEW_TOKENS, kw)


def _forward(inputs: ModelInputs, impl: str, ids: torch.Tensor, cache=None) -> torch.Tensor:
    """One forward under ``impl``; the last position's logits ``(batch, vocab)``."""
    if inputs.model.config._attn_implementation != impl:
        inputs.model.set_attn_implementation(impl)
    kwargs = {"use_cache": cache is not None, "logits_to_keep": 1}
    if cache is not None:
        kwargs[inputs.cache_kwarg] = cache
    with torch.no_grad():
        return inputs.model(ids, **kwargs).logits[:, -1]


def _prefill(impl: str):
    def build(inputs: ModelInputs):
        return lambda inp: _forward(inp, impl, inp.ids)[0]

    return build


def _new_cache(inputs: ModelInputs, impl: str):
    import longattn.integrations.transformers as lt

    if impl == "sdpa":
        return _dynamic_cache(inputs)
    rounds = STORE_ROUNDS if impl in ("longattn_streaming", "longattn_duo") else 1
    return lt.LongAttnCache(inputs.model.config, max_cache_len=inputs.ids.shape[1] + inputs.new_tokens * rounds)


def _dynamic_cache(inputs: ModelInputs):
    from transformers.cache_utils import DynamicCache

    try:
        return DynamicCache(config=inputs.model.config)
    except TypeError:  # transformers < 4.56 takes no config
        return DynamicCache()


def _rewind(cache, length: int) -> None:
    """Forget every token after the first ``length`` (the prompt): ``crop`` of
    DynamicCache and LongAttnCache alike (later appends overwrite in place).
    Streaming/Duo caches have evicted tokens and cannot go back: they go on
    from where they are (their step cost does not grow with the length: sinks
    + window, and 16 more retrieval-head tokens per run over a long prompt)."""
    if any(getattr(layer, "mode", None) == "store" for layer in cache.layers):
        return
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative: remove that many (transformers 5.x; older versions read it the same)


def _shared_prefill(inputs: ModelInputs):
    """The prompt's K/V per layer and the first greedy token, computed once per case (untimed).

    One ``"longattn"`` prefill into a ``DynamicCache``: both decode methods then
    start from identical caches, so their difference is the decode alone (and the
    case pays for one extra prefill, not two: at 16k a prefill takes about a minute here).
    """
    if inputs.prefilled is None:
        cache = _dynamic_cache(inputs)
        logits = _forward(inputs, "longattn", inputs.ids, cache)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        inputs.prefilled = (kv, logits.argmax(-1, keepdim=True))
    return inputs.prefilled


def _decode(impl: str):
    def build(inputs: ModelInputs):
        kv, first = _shared_prefill(inputs)
        cache = _new_cache(inputs, impl)
        if inputs.model.config._attn_implementation != impl:
            inputs.model.set_attn_implementation(impl)  # LongAttnCache.update checks the model's implementation
        for idx, (k, v) in enumerate(kv):  # (batch, nheads_k, prompt_len, headdim), through the public Cache API
            cache.update(k, v, idx)
        prompt_len = inputs.ids.shape[1]

        def run(inp: ModelInputs) -> torch.Tensor:
            _rewind(cache, prompt_len)
            token, logits = first, []
            for _ in range(inp.new_tokens):
                step = _forward(inp, impl, token, cache)
                logits.append(step[0])
                token = step.argmax(-1, keepdim=True)  # greedy
            return torch.stack(logits)

        return run

    return build


def _prefill_name(impl: str) -> str:
    return f"{impl} prefill"


def _decode_name(impl: str) -> str:
    return f"{impl} decode {NEW_TOKENS} tokens"


def model_reference(inputs: ModelInputs, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, str]:
    if not any(_prefill_name(impl) in outputs for impl in IMPLS):
        return None, "none (no prefill method ran)"  # decode rows are checked by model_measure
    out = outputs.get(_prefill_name("sdpa"))
    if out is None:
        out = _forward(inputs, "sdpa", inputs.ids)[0]
    return out, "sdpa prefill's last-position logits (float32)"


def model_measure(inputs: ModelInputs, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Decode agreement with SDPA (first outputs): largest logit difference, identical greedy tokens (1/0)."""
    base = outputs.get(_decode_name("sdpa"))
    figures: dict[str, float] = {}
    for impl in DENSE_IMPLS[1:]:
        ours = outputs.get(_decode_name(impl))
        if base is None or ours is None:
            continue
        figures[f"{impl} decode max logit error vs sdpa decode"] = float((ours.double() - base.double()).abs().max())
        figures[f"{impl} decode greedy tokens equal sdpa's"] = float(torch.equal(ours.argmax(-1), base.argmax(-1)))
    return figures


def _targets(context: int) -> tuple[Target, ...]:
    """The issue's targets, each at the context it names (prefill 16k, decode 32k and longer)."""
    targets = []
    if context == 16384:
        targets.append(Target(_prefill_name("longattn"), PREFILL_MAX_RATIO,
                              "issue target (at 16k): prefill >= 1.5x faster than sdpa"))
    if context >= 32768:
        targets.append(Target(_decode_name("longattn"), DECODE_MAX_RATIO,
                              "issue target (at 32k): decode tokens/s >= 3x sdpa's", baseline=_decode_name("sdpa")))
    return tuple(targets)


def model_scenario(context: int) -> Scenario:
    tiny = context <= TINY_MAX_CONTEXT
    cfg = _config_dict(context)
    methods = [Method(_prefill_name(impl), _prefill(impl)) for impl in IMPLS]
    methods += [Method(_decode_name(impl), _decode(impl), compare=False) for impl in IMPLS]
    methods.sort(key=lambda m: (IMPLS.index(m.name.split()[0]) >= len(DENSE_IMPLS), "decode" in m.name))
    desc = "tiny Llama" if tiny else ("Llama" if not os.environ.get(CONFIG_ENV) else os.environ[CONFIG_ENV])
    return Scenario(
        name=f"{desc} prefill {context} + decode {NEW_TOKENS}",
        group="model",
        size=context,
        params={"context": context, "new_tokens": NEW_TOKENS, "dtype": "float32", "batch": 1,
                **{k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                           "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}},
        make_inputs=lambda seed: make_model_inputs(context, seed),
        methods={m.name: m for m in methods},
        baseline=_prefill_name("sdpa"),
        reference=model_reference,
        targets=_targets(context),
        measure=model_measure,
    )


MODEL = register_group(
    Group(
        name="model",
        description=f"Llama-shaped transformers model (random weights, fp32): prefill + {NEW_TOKENS} greedy decode "
        "steps, attn_implementation sdpa vs longattn; targets: prefill >= 1.5x faster (16k), "
        "decode >= 3x tokens/s (32k: --sizes 32768)",
        size_name="context",
        sizes=(4096, 16384),
        quick_sizes=(64, 128),
        make_scenario=model_scenario,
        default_repeats=2,
        method_budget_s=30.0,
        plot=True,
    )
)
