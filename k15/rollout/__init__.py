"""Rollouts: fixed-shape sampler calls (`generation`), the partial-rollout
buffer and training rows (`buffer`), and the `rollout` config section with
the shapes the run compiles (`config`).

The names below are the floor's interface; import them from here.
"""

from k15.rollout.buffer import (
  Group,
  RolloutBuffer,
  Trajectory,
  place_per_token,
  response_len,
  to_batch,
  training_batch,
)
from k15.rollout.config import RolloutConfig
from k15.rollout.generation import (
  Block,
  GenConfig,
  Generation,
  Request,
  call_shapes,
  continue_buckets,
  generate,
  generate_segments,
  merged_rows,
  plan_calls,
)

__all__ = [
  "Block",
  "GenConfig",
  "Generation",
  "Group",
  "Request",
  "RolloutBuffer",
  "RolloutConfig",
  "Trajectory",
  "call_shapes",
  "continue_buckets",
  "generate",
  "generate_segments",
  "merged_rows",
  "place_per_token",
  "plan_calls",
  "response_len",
  "to_batch",
  "training_batch",
]
