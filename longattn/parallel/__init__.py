"""Sequence parallelism over torch.distributed (gloo on CPU, NCCL on GPU).

Every function takes this rank's local shard in longattn's layout and a
``process_group`` (None = the default group; any subgroup works).

- :func:`shard` / :func:`unshard`: cut a full tensor into this rank's shard
  (``"zigzag"`` or ``"contiguous"``) and gather it back.
- :func:`ring_attention`: exact attention over the sharded sequence, with
  autograd (dk/dv accumulators travel the ring home; dq accumulates in
  float32) on both layouts.
"""

from longattn.parallel.layout import LAYOUTS, local_positions, shard, unshard
from longattn.parallel.ring import ring_attention

__all__ = ["LAYOUTS", "local_positions", "ring_attention", "shard", "unshard"]
