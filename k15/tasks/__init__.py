"""Prompt sources. Each synthetic task module provides `splits(...)`,
`verify(response, answer)` and `tokenizer_corpus()`; `get(name)` finds it."""

import importlib
from types import ModuleType

TASKS = ("arithmetic", "chains")


def get(name: str) -> ModuleType:
  if name not in TASKS:
    raise ValueError(f"config: task.name={name!r}; known tasks: {TASKS}")
  return importlib.import_module(f"k15.tasks.{name}")
