"""Sequence parallelism over torch.distributed (gloo on CPU, NCCL on GPU).

Every function takes this rank's local shard in longattn's layout and a
``process_group`` (None = the default group; any subgroup works).

- :func:`shard` / :func:`unshard`: cut a full tensor into this rank's shard
  (``"zigzag"`` or ``"contiguous"``) and gather it back.
- :func:`ring_attention`: exact attention over the sharded sequence, with
  autograd (dk/dv accumulators travel the ring home; dq accumulates in
  float32) on both layouts; sliding windows.
- :func:`token_ring_attention`: exact; the queries travel, the KV stays, the
  partial outputs go straight home (both link directions at once); autograd.
- :func:`ulysses_attention`: exact; two all-to-alls turn sequence shards into
  head shards and back (needs ``nheads % world_size == 0``); autograd.
- :func:`apb_attention`: APPROXIMATE causal prefill (APB): each host attends
  to an anchor, the compressed passing blocks of earlier hosts (one
  all_gather) and its own block; :func:`apb_selection` / :func:`apb_mask`
  give its selection and mask for checking.
- :mod:`longattn.parallel.cost_model` / :mod:`longattn.parallel.simulate`:
  alpha-beta link and attention-throughput profiles, predicted step times
  (``longattn simulate parallel``).
- :mod:`longattn.parallel.stats`: per-rank compute time, waits and bytes sent
  of a call (what ``longattn bench parallel`` reports).
"""

from longattn.parallel.apb import apb_attention, apb_mask, apb_selection
from longattn.parallel.layout import LAYOUTS, local_positions, shard, unshard
from longattn.parallel.ring import ring_attention
from longattn.parallel.token_ring import token_ring_attention
from longattn.parallel.ulysses import ulysses_attention

__all__ = ["LAYOUTS", "apb_attention", "apb_mask", "apb_selection", "local_positions", "ring_attention", "shard", "token_ring_attention", "ulysses_attention",
           "unshard"]
