"""The ``sparse-decode`` benchmark group: Quest, Double Sparsity and TidalDecode steps.

Decode over a long cache is memory-bound; these methods read a query-chosen
part of it. One query token, batch 1, Hq=32, Hkv=8, D=128, token budget 2048,
on a structured workload (:func:`make_workload`: noise keys, a local decay
towards each head's query direction, needle spans aligned with it). Cases
(the group's size is a case number, like ``decode``'s):

1. ``step fp32`` / 2. ``step bf16`` at 256k context. Methods, each one layer's
   decode step over the same cache (the states are built from the prompt
   untimed; a step appends nothing, so every timed call is the same step):

   - ``quest``: ``decode_attention(sparse=Quest(2048, 16), state=...)``;
   - ``double sparsity``: ``DoubleSparsity(channels, 2048)`` with the 16
     channels of largest ``|q * k|`` per kv head (what calibration finds here);
   - ``tidal reuse layer``: a TidalDecode layer after a selection layer (the
     gather over the carried selection); ``tidal selection layer``: full
     attention + top-k;
   - ``quest selection only`` / ``double sparsity selection only``: the
     state's ``select`` alone (the selection time, reported separately);
   - ``gather 2048 (primitive)``: ``gather_decode`` over Quest's selection:
     the attention part alone;
   - ``longattn dense``: ``decode_attention`` over the whole cache;
   - ``sdpa``: SDPA decode, the baseline.

3. ``tidal 32 layers fp32`` at 256k: a 32-layer decode step (one cache
   shared by the layers: the cost per layer is what matters) as TidalDecode
   schedules it (2 dense, 2 selection, 28 reuse layers) against 32 dense
   layers.

4. ``quality``: at 32k fp32 on the ``hip`` group's structured workload
   (keys on a smooth random walk the query follows: similarity decaying with
   distance; needle spans along a direction every query of the group leans
   to; noise: :func:`longattn.bench.hip.make_hip_inputs`, the last position's
   query), measurements only: for budgets 1/64 .. 1/4 of the context, each
   method's recall of the true top-k tokens, the dense attention mass its
   selection keeps, and its output error against dense decode next to an
   oracle that keeps the true top-k tokens per query head at the same budget.

Targets (issue 12): each method's step >= 4x faster than longattn's dense
decode and >= 10x faster than SDPA; TidalDecode's 32-layer step >= 3x faster
than 32 dense layers; each method's error within 2x of the top-k oracle's at
budget 1/16 (reported under the table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import longattn
from longattn.bench.scenarios import Group, Method, Scenario, Target, no_setup, register_group

NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
BUDGET, PAGE_SIZE, CHANNELS = 2048, 16, 16
TIDAL_LAYERS, TIDAL_DENSE, TIDAL_SELECT = 32, (0, 1), (2, 16)
NEEDLES, NEEDLE_LEN = 16, 16
FASTER_THAN_DENSE, FASTER_THAN_SDPA, TIDAL_FASTER = 4.0, 10.0, 3.0
QUALITY_BUDGETS = (64, 16, 4)  # budget = context / this
METHODS = ("quest", "double sparsity", "tidal reuse layer")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "step", "tidal", "quality"
    context: int
    dtype: torch.dtype
    outliers: bool = False  # quality: plant outlier channels (what Double Sparsity relies on)


def _cases(long_ctx: int, quality_ctx: int) -> list[Case]:
    return [Case(f"step {long_ctx // 1024}k fp32", "step", long_ctx, torch.float32),
            Case(f"step {long_ctx // 1024}k bf16", "step", long_ctx, torch.bfloat16),
            Case(f"tidal {TIDAL_LAYERS} layers {long_ctx // 1024}k fp32", "tidal", long_ctx, torch.float32),
            Case(f"quality {quality_ctx // 1024}k fp32", "quality", quality_ctx, torch.float32),
            Case(f"quality {quality_ctx // 1024}k fp32 outlier channels", "quality", quality_ctx, torch.float32, True)]


FULL = _cases(262144, 32768)
QUICK = _cases(4096, 4096)
QUICK_OFFSET = 100


@dataclass
class Workload:
    q: torch.Tensor  # (1, 1, nheads, headdim)
    k: torch.Tensor  # (1, context, nheads_k, headdim)
    v: torch.Tensor
    lengths: torch.Tensor  # (1,) int32
    budget: int
    states: dict[str, Any] = field(default_factory=dict)


def make_workload(context: int, dtype: torch.dtype, seed: int, budget: int = BUDGET) -> Workload:
    """Noise keys (scaled score ~N(0, 2)); per kv head a direction ``g`` every
    query of its group leans to (``sqrt(D) g`` + noise); NEEDLES spans of
    NEEDLE_LEN keys along ``g`` (scaled score ~8) anywhere in the context; the
    last tokens drift towards ``g`` (score ~6 exp(-distance / 256)): a local
    decay. Values: noise."""
    gen = torch.Generator().manual_seed(seed)
    g = F.normalize(torch.randn(NHEADS_K, HEADDIM, generator=gen), dim=-1)
    k = torch.randn(context, NHEADS_K, HEADDIM, generator=gen)
    group = NHEADS // NHEADS_K
    q = HEADDIM ** 0.5 * g.repeat_interleave(group, dim=0) + torch.randn(NHEADS, HEADDIM, generator=gen)
    recent = min(context, 2048)
    decay = 6.0 * torch.exp(-torch.arange(recent, 0, -1, dtype=torch.float32) / 256.0)
    k[context - recent:] += decay[:, None, None] * g[None]
    for h in range(NHEADS_K):
        for start in torch.randint(0, max(1, context - NEEDLE_LEN), (NEEDLES,), generator=gen).tolist():
            k[start:start + NEEDLE_LEN, h] += 8.0 * g[h]
    v = torch.randn(context, NHEADS_K, HEADDIM, generator=gen)
    return Workload(q[None, None].to(dtype), k[None].to(dtype), v[None].to(dtype),
                    torch.tensor([context], dtype=torch.int32), budget)


OUTLIER_CHANNELS, OUTLIER_SCALE = 16, 2.0


def make_quality_workload(context: int, seed: int, outliers: bool = False) -> Workload:
    """The ``hip`` bench's structured workload (see the module docstring) at
    Hq=32, Hkv=8; the decode query is the last position's. ``outliers``:
    OUTLIER_CHANNELS channels per kv head of q and k scaled by OUTLIER_SCALE
    (the channel sparsity of real models' q/k that Double Sparsity exploits;
    the plain workload is isotropic, where no channel subset can rank tokens)."""
    from longattn.bench.hip import make_hip_inputs

    full = make_hip_inputs(context, seed, nheads=NHEADS, nheads_k=NHEADS_K)
    q, k = full.q[:, -1:].contiguous(), full.k
    if outliers:
        gen = torch.Generator().manual_seed(seed + 7)
        scale = torch.ones(NHEADS_K, HEADDIM)
        for h in range(NHEADS_K):
            scale[h, torch.randperm(HEADDIM, generator=gen)[:OUTLIER_CHANNELS]] = OUTLIER_SCALE
        # both sides scaled: the score q . k puts OUTLIER_SCALE^2 weight on those channels
        q = q * scale.repeat_interleave(NHEADS // NHEADS_K, dim=0)
        k = k * scale
    return Workload(q, k, full.v, torch.tensor([context], dtype=torch.int32), BUDGET)


def top_channels(w: Workload, r: int = CHANNELS) -> torch.Tensor:
    """``(nheads_k, r)``: per kv head the top r channels by
    :func:`longattn.sparse.calibrate_channels` (``"qk"``: mean ``|q_c k_c|``,
    no rotary) on this workload's query and a sample of its keys."""
    from longattn.sparse import calibrate_channels

    keys = w.k[0, :: max(1, w.k.shape[1] // 4096)].float()  # (tokens, nheads_k, d)
    queries = w.q[0].float().expand(keys.shape[0], -1, -1)  # the decode query against every sampled key
    return calibrate_channels(queries[None], keys[None], r, method="qk", rotary="none").layer(0)


# --- the methods' configs and states ------------------------------------------------

def quest_config(budget: int):
    from longattn.sparse import Quest

    return Quest(token_budget=budget, page_size=PAGE_SIZE)


def ds_config(w: Workload, budget: int):
    from longattn.sparse import DoubleSparsity

    return DoubleSparsity(top_channels(w), token_budget=budget)


def tidal(budget: int):
    from longattn.sparse import TidalDecode

    return TidalDecode(TIDAL_LAYERS, dense_layers=TIDAL_DENSE, selection_layers=TIDAL_SELECT, token_budget=budget)


def _decode(w: Workload, **kw):
    return longattn.decode_attention(w.q, w.k, w.v, cache_seqlens=w.lengths, **kw)


def new_state(name: str, w: Workload, budget: int):
    """(sparse config, state filled from the prompt) of ``name`` on ``w``."""
    from longattn.sparse import DoubleSparsityState, QuestState, TidalState

    if name == "quest":
        cfg = quest_config(budget)
        state = QuestState(cfg)
        state.prefill(w.k, w.lengths)
        return cfg, state
    if name == "double sparsity":
        cfg = ds_config(w, budget)
        state = DoubleSparsityState(cfg)
        state.prefill(w.k, w.lengths)
        return cfg, state
    if name == "tidal reuse layer":
        schedule = tidal(budget)
        state = TidalState()
        _decode(w, sparse=schedule.layer(TIDAL_SELECT[0]), state=state)  # the selection layer, untimed
        return schedule.layer(TIDAL_SELECT[0] + 1), state
    raise ValueError(name)


def _method_step(name: str):
    def build(w: Workload):
        cfg, state = new_state(name, w, w.budget)
        return lambda w: _decode(w, sparse=cfg, state=state)

    return build


def _selection_only(name: str):
    """The selection part of ``name``'s step alone (its state's ``select``), timed on its own."""
    def build(w: Workload):
        cfg, state = new_state(name, w, w.budget)
        scaled = w.q[:, 0].float() * HEADDIM ** -0.5

        def run(w: Workload) -> torch.Tensor:
            return state.select(scaled, cfg.token_budget)

        return run

    return build


def _tidal_selection(w: Workload):
    from longattn.sparse import TidalState

    layer = tidal(w.budget).layer(TIDAL_SELECT[0])
    return lambda w: _decode(w, sparse=layer, state=TidalState())


def _gather_primitive(w: Workload):
    from longattn.kernels.gather import gather_decode

    cfg, state = new_state("quest", w, w.budget)
    _, selection = _decode(w, sparse=cfg, state=state, return_selection=True)
    return lambda w: gather_decode(w.q[:, 0], w.k, w.v, selection)[0][:, None]


def run_sdpa(w: Workload) -> torch.Tensor:
    out = F.scaled_dot_product_attention(w.q.transpose(1, 2), w.k.transpose(1, 2), w.v.transpose(1, 2),
                                         enable_gqa=True)
    return out.transpose(1, 2)


def run_dense(w: Workload) -> torch.Tensor:
    return _decode(w)


def dense_reference(w: Workload, outputs: dict) -> tuple[torch.Tensor, str]:
    if "longattn dense" in outputs:
        return outputs["longattn dense"], "dense decode (its approximation for the sparse rows)"
    return run_dense(w), "dense decode (its approximation for the sparse rows)"


def step_bytes(w: Workload) -> dict[str, float]:
    """MB a step must read: dense (all K and V) against each method's metadata + selected rows."""
    n, e = w.k.shape[1], w.k.element_size()
    kv_row = NHEADS_K * HEADDIM * e  # one token's keys (or values), all kv heads
    selected = 2 * min(w.budget, n) * kv_row
    pages = -(-n // PAGE_SIZE)
    meta = 4  # the states keep their metadata in float32 whatever the cache dtype
    return {
        "dense MB read per step": 2 * n * kv_row / 1e6,
        "quest MB read per step (float32 min/max per page + selected K/V)":
            (2 * pages * NHEADS_K * HEADDIM * meta + selected) / 1e6,
        "double sparsity MB read per step (float32 label cache + selected K/V)":
            (n * NHEADS_K * CHANNELS * meta + selected) / 1e6,
    }


def step_measure(w: Workload, outputs: dict) -> dict[str, float]:
    figures = step_bytes(w)
    return figures


# --- TidalDecode over a 32-layer step ------------------------------------------------

def _tidal_layers(w: Workload):
    from longattn.sparse import TidalState

    schedule = tidal(w.budget)
    layers = [schedule.layer(i) for i in range(TIDAL_LAYERS)]

    def run(w: Workload) -> torch.Tensor:
        state = TidalState()  # one per decode step, shared by its layers
        out = None
        for layer in layers:
            out = _decode(w, sparse=layer, state=state)
        return out

    return run


def _dense_layers(w: Workload) -> torch.Tensor:
    out = None
    for _ in range(TIDAL_LAYERS):
        out = _decode(w)
    return out


# --- quality ---------------------------------------------------------------------------

def _relative_error(out: torch.Tensor, dense: torch.Tensor) -> float:
    """``||out - dense|| / ||dense||`` per query head (over headdim), averaged over heads."""
    diff = (out.reshape(-1, HEADDIM) - dense.reshape(-1, HEADDIM)).norm(dim=-1)
    return float((diff / dense.reshape(-1, HEADDIM).norm(dim=-1)).mean())


def quality_measure(w: Workload, outputs: dict) -> dict[str, float]:
    """Per budget (context / 64, / 16, / 4): recall of the true top-k, dense mass kept,
    output error vs dense decode (relative, :func:`_relative_error`), and the
    true-top-k oracle's error at that budget."""
    from longattn.kernels.gather import gather_decode

    n = w.k.shape[1]
    group = NHEADS // NHEADS_K
    scores = torch.einsum("hd,jhd->hj", w.q[0, 0].float(), w.k[0].float().repeat_interleave(group, dim=1))
    scores = scores * HEADDIM ** -0.5
    probs = torch.softmax(scores, dim=-1)  # (nheads, n)
    dense = run_dense(w).float()
    figures: dict[str, float] = {}
    for frac in QUALITY_BUDGETS:
        budget = n // frac
        true_top = scores.topk(budget, dim=-1).indices  # (nheads, budget) per query head
        oracle_out, _ = gather_decode(w.q[:, 0], w.k, w.v, true_top[None].to(torch.int32))
        oracle_err = _relative_error(oracle_out.float(), dense[:, 0])
        figures[f"1/{frac} top-k oracle error"] = oracle_err
        truth = torch.zeros(NHEADS, n, dtype=torch.bool)
        truth.scatter_(1, true_top, True)
        for name in METHODS:
            cfg, state = new_state(name, w, budget)
            out, selection = _decode(w, sparse=cfg, state=state, return_selection=True)
            picked = torch.zeros(NHEADS_K, n + 1, dtype=torch.bool)
            sel = selection[0].to(torch.long)
            picked.scatter_(1, torch.where(sel < 0, n, sel), True)
            picked = picked[:, :n].repeat_interleave(group, dim=0)  # (nheads, n)
            err = _relative_error(out.float(), dense)
            figures[f"1/{frac} {name} top-k recall"] = float((picked & truth).sum() / truth.sum())
            figures[f"1/{frac} {name} dense mass kept"] = float((probs * picked).sum(-1).mean())
            figures[f"1/{frac} {name} error"] = err
            if frac == 16:
                figures[f"1/16 {name} error / oracle's (target <= 2)"] = err / max(oracle_err, 1e-12)
    return figures


# --- scenarios -------------------------------------------------------------------------

def sparse_decode_scenario(index: int) -> Scenario:
    case = QUICK[index - QUICK_OFFSET - 1] if index > QUICK_OFFSET else FULL[index - 1]
    full_size = index <= QUICK_OFFSET
    params = {"context": case.context, "batch": 1, "nheads": NHEADS, "nheads_k": NHEADS_K, "headdim": HEADDIM,
              "dtype": str(case.dtype).removeprefix("torch."), "token_budget": BUDGET}
    make = lambda seed, c=case: make_workload(c.context, c.dtype, seed)  # noqa: E731
    if case.kind == "step":
        methods = [Method(name, _method_step(name), compare=False) for name in METHODS]
        methods += [Method(f"{name} selection only", _selection_only(name), compare=False)
                    for name in ("quest", "double sparsity")]
        methods += [Method("tidal selection layer", _tidal_selection),
                    Method("gather 2048 (primitive)", _gather_primitive, compare=False),
                    Method("longattn dense", no_setup(run_dense)), Method("sdpa", no_setup(run_sdpa))]
        targets = ()
        if full_size:
            targets = tuple(Target(name, 1 / FASTER_THAN_SDPA, f"issue target: >= {FASTER_THAN_SDPA:g}x faster "
                                   "than SDPA decode") for name in METHODS)
            targets += tuple(Target(name, 1 / FASTER_THAN_DENSE, f"issue target: >= {FASTER_THAN_DENSE:g}x faster "
                                    "than longattn's dense decode", baseline="longattn dense") for name in METHODS)
        return Scenario(name=case.name, group="sparse-decode", size=index, params=params, make_inputs=make,
                        methods={m.name: m for m in methods}, baseline="sdpa", reference=dense_reference,
                        targets=targets, measure=step_measure)
    if case.kind == "tidal":
        methods = [Method(f"tidal {TIDAL_LAYERS} layers", _tidal_layers, compare=False),
                   Method(f"dense {TIDAL_LAYERS} layers", no_setup(_dense_layers))]
        targets = (Target(f"tidal {TIDAL_LAYERS} layers", 1 / TIDAL_FASTER,
                          f"issue target: >= {TIDAL_FASTER:g}x faster than {TIDAL_LAYERS} dense layers"),) \
            if full_size else ()
        return Scenario(name=case.name, group="sparse-decode", size=index, params=params, make_inputs=make,
                        methods={m.name: m for m in methods}, baseline=f"dense {TIDAL_LAYERS} layers",
                        reference=lambda w, outputs: (outputs.get(f"dense {TIDAL_LAYERS} layers", run_dense(w)),
                                                      "dense decode"), targets=targets)
    methods = [Method("longattn dense", no_setup(run_dense))]
    make = lambda seed, c=case: make_quality_workload(c.context, seed, c.outliers)  # noqa: E731
    return Scenario(name=case.name, group="sparse-decode", size=index, params=params, make_inputs=make,
                    methods={m.name: m for m in methods}, baseline="longattn dense", reference=dense_reference,
                    measure=quality_measure)


SPARSE_DECODE = register_group(
    Group(
        name="sparse-decode",
        description=f"Quest / Double Sparsity / TidalDecode decode steps, budget {BUDGET}, batch 1, Hq={NHEADS}, "
                    f"Hkv={NHEADS_K}, D={HEADDIM}; targets >= {FASTER_THAN_DENSE:g}x dense decode, "
                    f">= {FASTER_THAN_SDPA:g}x SDPA, tidal {TIDAL_FASTER:g}x over {TIDAL_LAYERS} layers",
        size_name="case",
        sizes=tuple(range(1, len(FULL) + 1)),
        quick_sizes=tuple(range(QUICK_OFFSET + 1, QUICK_OFFSET + len(QUICK) + 1)),
        make_scenario=sparse_decode_scenario,
        plot=False,
    )
)
