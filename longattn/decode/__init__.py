"""Decode attention's stream-K (LeanAttention) schedule and its simulation.

- :func:`plan_decode` / :class:`DecodePlan`: the stream-K planner (pure,
  deterministic) and the fixed merge order of partial results; they live
  with the decode primitive (:mod:`longattn.kernels.decode.plan`) and are
  re-exported here, where users look for them.
- :mod:`.simulate`: a model of FA2 vs split-K vs stream-K on GPUs
  (``longattn simulate lean``).
"""

from longattn.kernels.decode.plan import DecodePlan, Segment, plan_decode

__all__ = ["DecodePlan", "Segment", "plan_decode"]
