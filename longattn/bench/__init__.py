"""Benchmarks: ``longattn bench [GROUP]`` and the pytest-benchmark suite.

- :mod:`.scenarios`: the registry of groups and scenarios (shared with ``benchmarks/``)
- :mod:`.dense`: the ``dense`` group (causal prefill vs SDPA and FlexAttention)
- :mod:`.dense_bf16`: the ``dense-bf16`` group (bfloat16 causal prefill vs SDPA bf16, per machine kind)
- :mod:`.overhead`: the ``overhead`` group (per-call cost of small calls vs SDPA)
- :mod:`.auto`: the ``auto`` group (``backend="auto"`` vs every dense twin, per dtype)
- :mod:`.varlen`: the ``varlen`` group (packed sequences vs one dense call and padded SDPA)
- :mod:`.model`: the ``model`` group (a Llama-shaped transformers model: prefill + decode, sdpa vs longattn)
- :mod:`.timing`: interleaved warmup + repeats, median and min
- :mod:`.runner`: :func:`run_group`, one group end to end
- :mod:`.report`: table, JSON and plot; :mod:`.progress`: the stderr progress bar

Example::

    from longattn.bench import run_group
    results = run_group("dense", quick=True, out_dir="/tmp/bench")
"""

# Each group module registers itself on import; a new group is one more line here.
from longattn.bench import auto as _auto  # noqa: F401
from longattn.bench import decode as _decode  # noqa: F401
from longattn.bench import dense as _dense  # noqa: F401
from longattn.bench import dense_bf16 as _dense_bf16  # noqa: F401
from longattn.bench import duo as _duo  # noqa: F401
from longattn.bench import hip as _hip  # noqa: F401
from longattn.bench import hip_decode as _hip_decode  # noqa: F401
from longattn.bench import model as _model  # noqa: F401
from longattn.bench import overhead as _overhead  # noqa: F401
from longattn.bench import sparse_decode as _sparse_decode  # noqa: F401
from longattn.bench import streaming as _streaming  # noqa: F401
from longattn.bench import varlen as _varlen  # noqa: F401
from longattn.bench.runner import run_group
from longattn.bench.scenarios import get_group, group_names

__all__ = ["run_group", "get_group", "group_names"]
