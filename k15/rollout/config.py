"""The `rollout` section, and the shapes the RL loop and evaluation use.

`RolloutConfig.gen` (the sampler calls' shapes) and
`RolloutConfig.response_len` (the training rows' width) are what the run
uses to choose each jitted shape; the planner (`k15.tools.plan`) lists and
compiles the same ones.
"""

from __future__ import annotations

import dataclasses

from k15.rollout import buffer, generation

_POSITIVE = ("k", "prompts_per_iter", "prompt_len", "budget", "max_len",
             "gen_rows", "oversample")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How an RL iteration samples (PAPER.md §2.3, §4)."""

  k: int = 8  # samples per prompt
  prompts_per_iter: int = 32
  prompt_len: int = 32  # left-padded prompt bucket
  budget: int = 96  # new tokens per trajectory per iteration
  max_len: int = 128  # prompt + response tokens a trajectory may reach
  gen_rows: int = 256  # rows per sampler call
  # partial rollouts (PAPER.md §4): a trajectory cut by the budget continues
  # next iteration (else it is final, "cut by budget")
  partial: bool = False
  loss_segments: str = "all"  # all | current (only this policy's tokens)
  repeat_penalty: float = 0.0  # subtracted from the reward of REPEAT rows
  # > 0: continued trajectories are re-prefilled in blocks of this many rows
  # of their own, each at its own bucket (less left padding), and decoded
  # gen_rows at a time; 0: they share gen_rows calls with new prompts
  continue_rows: int = 0
  # > 1: dynamic sampling (not in the report; DAPO's): draw oversample x the
  # prompts, score every group, and train on prompts_per_iter groups, those
  # whose rewards differ first (a group whose k rewards are equal has zero
  # advantage under the mean baseline and moves nothing but the tau term).
  # Generation costs oversample x; the update, which dominates, does not.
  oversample: int = 1

  def __post_init__(self):
    for name in _POSITIVE:
      if getattr(self, name) < 1:
        raise ValueError(f"rollout.{name}={getattr(self, name)} must be >= 1")
    if self.continue_rows < 0:
      raise ValueError(
        f"rollout.continue_rows={self.continue_rows} must be >= 0"
      )
    if self.budget + self.prompt_len > self.max_len:
      raise ValueError(
        f"rollout.budget ({self.budget}) + rollout.prompt_len "
        f"({self.prompt_len}) exceeds rollout.max_len ({self.max_len})"
      )
    if self.loss_segments not in ("all", "current"):
      raise ValueError(
        f"rollout.loss_segments={self.loss_segments!r}; expected 'all' or "
        "'current'"
      )
    if self.repeat_penalty < 0:
      raise ValueError(
        f"rollout.repeat_penalty={self.repeat_penalty} must be >= 0 (it is "
        "subtracted from the reward)"
      )

  @property
  def gen(self) -> generation.GenConfig:
    """The sampler calls of RL and evaluation: one prompt bucket, a cache
    of bucket + budget per call, and with partial rollouts the buckets of
    continued trajectories."""
    cont = ()
    if self.partial:
      cont = generation.continue_buckets(
        self.prompt_len, self.budget, self.max_len
      )
    return generation.GenConfig(
      rows=self.gen_rows,
      prompt_buckets=(self.prompt_len,),
      budget=self.budget,
      cache_len=self.max_len,
      continue_buckets=cont,
      continue_rows=self.continue_rows,
    )

  @property
  def longest_response(self) -> int:
    """Response tokens a trained trajectory may hold: one segment, or with
    partial rollouts all it may take (max_len - prompt_len)."""
    if not self.partial:
      return self.budget
    return self.gen.max_response(self.prompt_len)

  def response_len(self, longest: int) -> int:
    """Width of the training rows for responses of up to `longest` tokens."""
    return buffer.response_len(
      longest, budget=self.budget, cap=self.max_len - self.prompt_len
    )

  def response_lens(self) -> tuple[int, ...]:
    """Every width `response_len` can give this run's trajectories."""
    return tuple(
      sorted(
        {self.response_len(n) for n in range(1, self.longest_response + 1)}
      )
    )
