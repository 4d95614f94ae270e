"""The result type every reward function returns (re-exported by rewards)."""

import dataclasses
from collections.abc import Callable
from typing import Any

# Causes counted as timeouts / errors in the per-kind metrics.
TIMEOUT_CAUSES = frozenset({"timeout"})
ERROR_CAUSES = frozenset({"error", "crash", "sandbox_error", "killed"})


@dataclasses.dataclass(frozen=True)
class RewardResult:
  """Score of one response.

  score: the reward (1.0 / 0.0 for verifiable rewards);
  correct: whether the response solves the task (accuracy metrics);
  cause: why, e.g. "ok", "wrong_answer", "truncated", "multiple_answers",
    "timeout", "error" (see the reward modules);
  info: details for logs (extracted answer, per-test results, ...).
  """

  score: float
  correct: bool
  cause: str
  info: dict = dataclasses.field(default_factory=dict)


RewardFn = Callable[
  [list[dict[str, Any]], list[str], list[bool]], list[RewardResult]
]


def check_lengths(items, responses, finished) -> None:
  if not len(items) == len(responses) == len(finished):
    raise ValueError(
      f"reward: {len(items)} items, {len(responses)} responses and "
      f"{len(finished)} finished flags must have the same length"
    )
