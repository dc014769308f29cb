"""KV offload: a paged KV cache over three tiers (device, host memory, disk) with attention where the KV lives.

- :class:`TieredKVCache` (:mod:`longattn.offload.cache`): ``append`` /
  ``attend`` (``decode_attention``'s semantics) / ``drop`` / ``flush`` /
  ``close`` / ``open``; pages placed by :mod:`longattn.offload.policy` under
  byte budgets, each tier attended in place, partials merged by lse.
- :class:`PageStore` (:mod:`longattn.offload.disk`): the crash-safe on-disk
  page store (file format in :mod:`longattn.offload.format`; lock in
  :mod:`longattn.offload.locking`).

Sparse page fetch: ``TieredKVCache(..., selection=Quest(...) | DoubleSparsity(...))``
keeps the method's metadata per (layer, sequence) on the device, updated at
append time; ``attend(..., sparse=config)`` selects with it and reads only the
disk pages holding selected positions (:mod:`longattn.offload.selection`).
"""

from longattn.offload.cache import TieredKVCache
from longattn.offload.disk import PageStore

__all__ = ["PageStore", "TieredKVCache"]
