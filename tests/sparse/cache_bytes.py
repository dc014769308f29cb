"""Bytes a cache object really holds, counted from its tensors (not from a formula)."""

from __future__ import annotations

import torch


def float_storage_bytes(obj: object) -> int:
    """Total bytes of the distinct floating-point storages reachable from
    ``obj`` through attributes of longattn objects, dicts, lists and tuples
    (the K/V buffers a cache allocated; bool/int index tensors are not counted)."""
    seen_storages: set[int] = set()
    seen_objects: set[int] = set()
    total = 0

    def walk(x: object) -> None:
        nonlocal total
        if id(x) in seen_objects:
            return
        seen_objects.add(id(x))
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if x.is_floating_point() and storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, dict):
            for value in x.values():
                walk(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                walk(value)
        elif type(x).__module__.startswith("longattn") and hasattr(x, "__dict__"):
            for value in vars(x).values():
                walk(value)

    walk(obj)
    return total
