"""Decode attention: stream-K (LeanAttention) scheduling and its simulation.

- :mod:`.plan`: the stream-K planner (pure, deterministic) and the fixed
  merge order of partial results.
"""

from longattn.decode.plan import DecodePlan, Segment, plan_decode

__all__ = ["DecodePlan", "Segment", "plan_decode"]
