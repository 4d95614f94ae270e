"""Prompt sources. Each synthetic task module provides `splits(...)`,
`verify(response, answer)` and `tokenizer_corpus()`; `get(name)` finds it.
Its problems' reward rows have the task's name as their kind, and
`verifiers()` gives the reward pool every task's rule under that name.
`visual` mixes text and image problems (`visual.VisualConfig` is its
`task.visual` section)."""

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType

from k15.tasks.visual import VisualConfig

TASKS = ("arithmetic", "chains", "visual")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The `task` section: which generator and its difficulty knobs."""

  name: str = "arithmetic"
  min_steps: int = 2
  max_steps: int = 5
  ops: str = "+-*"
  num_sft: int = 256
  num_rl: int = 4096
  num_eval: int = 256
  sft_max_steps: int = 0  # > 0: warm-up traces only up to this difficulty
  max_operand: int = 9  # arithmetic: operands 1..max_operand
  # fraction of warm-up traces with a wrong final answer (unverified data)
  sft_noise: float = 0.0
  seed: int = 0
  visual: VisualConfig | None = None  # task.name="visual": the mix

  def __post_init__(self):
    if self.name not in TASKS:
      raise ValueError(f"task.name={self.name!r}; known tasks: {TASKS}")
    for field in ("num_sft", "num_rl", "num_eval"):
      if getattr(self, field) < 0:
        raise ValueError(f"task.{field}={getattr(self, field)} must be >= 0")
    if not 0 <= self.sft_noise <= 1:
      raise ValueError(f"task.sft_noise={self.sft_noise} must be in [0, 1]")

  def splits(self) -> dict[str, list]:
    """The sft / rl / eval problem sets (deterministic in `seed`)."""
    return get(self.name).splits(
      seed=self.seed, num_sft=self.num_sft, num_rl=self.num_rl,
      num_eval=self.num_eval, min_steps=self.min_steps,
      max_steps=self.max_steps, ops=self.ops,
      sft_max_steps=self.sft_max_steps, max_operand=self.max_operand,
      sft_noise=self.sft_noise,
      **({"visual": self.visual or VisualConfig()}
         if self.name == "visual" else {}),
    )  # fmt: skip


def get(name: str) -> ModuleType:
  if name not in TASKS:
    raise ValueError(f"config: task.name={name!r}; known tasks: {TASKS}")
  return importlib.import_module(f"k15.tasks.{name}")


def verifiers() -> dict[str, Callable[[str, str], bool]]:
  """{task name: verify}, the `verifiers=` of `k15.rewards.RewardPool`."""
  return {name: get(name).verify for name in TASKS}
