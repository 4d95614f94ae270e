"""Rewards: one entry point, `score(rows, responses, finished)`, routing
each row by its `kind`.

- a synthetic task's name ("arithmetic", "chains"): the task's exact
  `verify(response, answer)`, given to the pool as `verifiers=`;
- "exact": final-answer extraction + exact comparison (`rewards.math`);
- "math": the same rules, then `math-verify` equivalence in worker
  processes (`rewards.math`, `rewards.workers`);
- "code": programs run against the row's tests in the sandbox
  (`rewards.code`, `rewards.sandbox`);
- "cot_rm" / "scalar_rm": a reward model's judgement through the `Judge`
  interface (`rewards.judge`); the model is loaded outside this package
  (`k15.rm`) and given to the pool as `judges=`.

A response that did not finish scores 0. `RewardPool` holds the backends
of a run (worker processes, sandbox, verifiers, judges); `RewardBatch` is
what `score` returns: per-row results and statuses, and metrics.

This package is a leaf: it imports nothing that trains or samples
(tests/test_rewards.py checks its imports).
"""

from k15.rewards.base import STATUSES, RewardFn, RewardResult
from k15.rewards.judge import Judge
from k15.rewards.router import (
  KINDS,
  RewardBatch,
  RewardPool,
  get_reward_fn,
  score,
)

__all__ = [
  "KINDS",
  "STATUSES",
  "Judge",
  "RewardBatch",
  "RewardFn",
  "RewardPool",
  "RewardResult",
  "get_reward_fn",
  "score",
]
