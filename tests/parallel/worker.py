"""One rank of a gloo process group spawned by :mod:`tests.parallel.launch`.

Run as ``python -m tests.parallel.worker SPEC[,SPEC...] RANK WORLD_SIZE PORT``
where a SPEC is ``CASES_MODULE[:TABLE]``. The rank joins one group and runs,
spec after spec, every case of ``CASES_MODULE.TABLE`` (default ``CASES``; name ->
``(minimum world size, run(rank, world))``) that applies to its world size, in
that one group (process start-up dominates, so one group serves them all),
then prints one line ``RESULTS <json>`` mapping ``"SPEC NAME"`` of each case
to ``"ok"`` or the traceback. A case passes when every rank reports ``"ok"``.

A case may end the process itself (the dying-rank case does); then that rank
reports nothing and the launcher says so.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

GROUP_TIMEOUT = datetime.timedelta(seconds=30)


def main() -> None:
    specs = sys.argv[1].split(",")
    rank, world, port = (int(a) for a in sys.argv[2:5])
    cases = {}
    for spec in specs:
        module, _, table = spec.partition(":")
        for name, case in getattr(importlib.import_module(module), table or "CASES").items():
            cases[f"{spec} {name}"] = case
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=GROUP_TIMEOUT)
    results = {}
    try:
        for name, (min_world, case) in cases.items():
            if world < min_world:
                continue
            try:
                case(rank, world)
                results[name] = "ok"
            except Exception:  # reported to the parent, which fails that case
                results[name] = traceback.format_exc()
    finally:
        print("RESULTS " + json.dumps(results), flush=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
