"""Prompt sources. Each synthetic task module provides `splits(...)`,
`verify(response, answer)` and `tokenizer_corpus()`; `get(name)` finds it.
Its problems' reward rows have the task's name as their kind, and
`verifiers()` gives the reward pool every task's rule under that name."""

import importlib
from collections.abc import Callable
from types import ModuleType

TASKS = ("arithmetic", "chains")


def get(name: str) -> ModuleType:
  if name not in TASKS:
    raise ValueError(f"config: task.name={name!r}; known tasks: {TASKS}")
  return importlib.import_module(f"k15.tasks.{name}")


def verifiers() -> dict[str, Callable[[str, str], bool]]:
  """{task name: verify}, the `verifiers=` of `k15.rewards.RewardPool`."""
  return {name: get(name).verify for name in TASKS}
