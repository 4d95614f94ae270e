"""The result types every reward function returns (re-exported by rewards)."""

import dataclasses
from collections.abc import Callable
from typing import Any

# Causes counted as timeouts / errors in the per-kind metrics.
TIMEOUT_CAUSES = frozenset({"timeout"})
ERROR_CAUSES = frozenset({"error", "crash", "sandbox_error", "killed"})
# A response cut by the length limit (finished=False): every kind says so.
NOT_FINISHED_CAUSES = frozenset({"truncated"})
# The coarse outcome of a row, the same for every kind (see `status`).
STATUSES = ("correct", "wrong_answer", "not_finished", "timeout", "crash")


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

  @property
  def status(self) -> str:
    """One of STATUSES: the kind-specific `cause` folded into the few
    outcomes that every kind shares, so metrics keep stable names (an
    answer hedged, missing or misjudged is a "wrong_answer")."""
    if self.cause in NOT_FINISHED_CAUSES:
      return "not_finished"
    if self.correct:
      return "correct"
    if self.cause in TIMEOUT_CAUSES:
      return "timeout"
    if self.cause in ERROR_CAUSES:
      return "crash"
    return "wrong_answer"


RewardFn = Callable[
  [list[dict[str, Any]], list[str], list[bool]], list[RewardResult]
]
# A synthetic task's exact rule: verify(response, answer) -> bool.
Verify = Callable[[str, str], bool]


def check_lengths(items, responses, finished) -> None:
  if not len(items) == len(responses) == len(finished):
    raise ValueError(
      f"reward: {len(items)} items, {len(responses)} responses and "
      f"{len(finished)} finished flags must have the same length"
    )


class VerifierReward:
  """`fn(items, responses, finished)` over a task's `verify(response,
  answer)`: 1.0 when a finished response verifies, causes "ok",
  "wrong_answer" or "truncated". The synthetic tasks' rules are cheap
  regexes, so they run inline."""

  def __init__(self, verify: Verify):
    self.verify = verify

  def __call__(
    self,
    items: list[dict[str, Any]],
    responses: list[str],
    finished: list[bool],
  ) -> list[RewardResult]:
    check_lengths(items, responses, finished)
    out = []
    for item, response, done in zip(items, responses, finished, strict=True):
      if not done:
        out.append(RewardResult(0.0, False, "truncated"))
      elif self.verify(response, str(item["answer"])):
        out.append(RewardResult(1.0, True, "ok"))
      else:
        out.append(RewardResult(0.0, False, "wrong_answer"))
    return out
