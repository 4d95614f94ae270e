"""Prompt sources. Each synthetic task module provides `splits(...)`,
`verify(response, answer)` and `tokenizer_corpus()`; `get(name)` finds it.
Its problems' reward rows have the task's name as their kind, and
`verifiers()` gives the reward pool every task's rule under that name.

`task.name="jsonl"` reads prompt files instead (`k15.tasks.jsonl`, one
schema for math and code rows and for the RL, SFT and held-out sets): its
rows carry their own reward kinds ("math", "code", "exact", ...), mixed
by file weights. `task.make` names generators (`k15.tasks.make_data`) that
write such files when they are missing.

`task.name="visual"` mixes text and image problems (`visual.VisualConfig`
is its `task.visual` section)."""

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from k15.tasks.visual import VisualConfig

TASKS = ("arithmetic", "chains", "visual")  # the generators
NAMES = (*TASKS, "jsonl")
SPLITS = ("sft", "rl", "eval")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The `task` section: which generator and its difficulty knobs, or
  (name="jsonl") which prompt files.

  jsonl fields: `rl_files`, `sft_files`, `eval_files` (paths; relative ones
  are under `data_dir`, "" = WORKDIR/data); `rl_weights`, one per RL file
  (the share of RL prompts drawn from it; () = by row count);
  `default_kind` of rows without a `kind`; `on_error` ("fail" | "skip");
  `difficulty` ("auto" | "label" | "pass_rate", `jsonl.load_problems`);
  `make`: recipes of `k15.tasks.make_data` that write their files into
  data_dir when missing, from the generator fields below (num_*,
  min_steps, max_steps, max_operand, sft_noise, seed).
  """

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
  # > 0: the long-CoT warm-up format, each trace with min_checks..checks
  # verification passes that restate its chain (arithmetic.with_checks);
  # 0: short. min_checks >= 1: no warm-up trace is in the short format
  checks: int = 0
  min_checks: int = 0
  seed: int = 0
  # name="jsonl"
  rl_files: tuple[str, ...] = ()
  rl_weights: tuple[float, ...] = ()
  sft_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()
  data_dir: str = ""
  make: tuple[str, ...] = ()
  default_kind: str = "math"
  on_error: str = "fail"
  difficulty: str = "auto"
  visual: VisualConfig | None = None  # task.name="visual": the mix

  def __post_init__(self):
    if self.name not in NAMES:
      raise ValueError(f"task.name={self.name!r}; known tasks: {NAMES}")
    for field in ("num_sft", "num_rl", "num_eval"):
      if getattr(self, field) < 0:
        raise ValueError(f"task.{field}={getattr(self, field)} must be >= 0")
    if not 0 <= self.sft_noise <= 1:
      raise ValueError(f"task.sft_noise={self.sft_noise} must be in [0, 1]")
    if self.checks < 0:
      raise ValueError(f"task.checks={self.checks} must be >= 0")
    if not 0 <= self.min_checks <= self.checks:
      raise ValueError(
        f"task.min_checks={self.min_checks} must be in 0..task.checks "
        f"({self.checks}): the fewest verification passes of a long trace"
      )
    if self.checks and self.name not in ("arithmetic", "chains"):
      raise ValueError(
        f"task.checks={self.checks}: the long-CoT check format exists for "
        f"the arithmetic and chains tasks, not task.name={self.name!r}"
      )
    if self.name == "jsonl":
      self._check_jsonl()

  def _check_jsonl(self) -> None:
    from k15.tasks import jsonl, make_data  # noqa: PLC0415

    for field in ("rl_files", "eval_files"):
      if not getattr(self, field):
        raise ValueError(f"task.{field}: task.name='jsonl' needs files")
    if self.rl_weights and len(self.rl_weights) != len(self.rl_files):
      raise ValueError(
        f"task.rl_weights={self.rl_weights}: one weight per file of "
        f"task.rl_files ({len(self.rl_files)})"
      )
    if any(not w > 0 for w in self.rl_weights):
      raise ValueError(f"task.rl_weights={self.rl_weights} must be > 0")
    for recipe in self.make:
      if recipe not in make_data.RECIPES:
        raise ValueError(
          f"task.make: unknown recipe {recipe!r}; known {make_data.RECIPES}"
        )
    if self.default_kind not in jsonl.KINDS:
      raise ValueError(
        f"task.default_kind={self.default_kind!r}; expected one of "
        f"{jsonl.KINDS}"
      )
    if self.on_error not in jsonl.ON_ERROR:
      raise ValueError(
        f"task.on_error={self.on_error!r}; expected one of {jsonl.ON_ERROR}"
      )
    if self.difficulty not in jsonl.DIFFICULTY:
      raise ValueError(
        f"task.difficulty={self.difficulty!r}; expected one of "
        f"{jsonl.DIFFICULTY}"
      )

  @property
  def default_reward_kind(self) -> str:
    """The reward kind of a prompt row that names none (curation)."""
    return self.default_kind if self.name == "jsonl" else self.name

  def files(self, workdir: str = "") -> dict[str, tuple[str, ...]]:
    """{split: resolved paths} of a jsonl task."""
    root = self.data_dir or os.path.join(workdir, "data")
    return {
      split: tuple(os.path.join(root, p) for p in getattr(self, f"{split}_"
                                                          "files"))
      for split in SPLITS
    }  # fmt: skip

  def splits(self, workdir: str = "") -> dict[str, list]:
    """The sft / rl / eval problem sets (deterministic in `seed`); for a
    jsonl task, read from its files (written first by `make`), every row
    checked: a bad one raises `jsonl.JsonlError` naming file:line."""
    if self.name == "jsonl":
      return self._jsonl_splits(workdir)
    return get(self.name).splits(
      seed=self.seed, num_sft=self.num_sft, num_rl=self.num_rl,
      num_eval=self.num_eval, min_steps=self.min_steps,
      max_steps=self.max_steps, ops=self.ops,
      sft_max_steps=self.sft_max_steps, max_operand=self.max_operand,
      sft_noise=self.sft_noise,
      **({"visual": self.visual or VisualConfig()}
         if self.name == "visual" else
         {"checks": self.checks, "min_checks": self.min_checks}),
    )  # fmt: skip

  def _jsonl_splits(self, workdir: str) -> dict[str, list]:
    from k15.tasks import jsonl, make_data  # noqa: PLC0415

    if self.make:
      make_data.ensure(
        self.make, self.data_dir or os.path.join(workdir, "data"),
        seed=self.seed, num_sft=self.num_sft, num_rl=self.num_rl,
        num_eval=self.num_eval, min_steps=self.min_steps,
        max_steps=self.max_steps, max_operand=self.max_operand,
        sft_noise=self.sft_noise,
      )  # fmt: skip
    paths = self.files(workdir)
    kw = dict(default_kind=self.default_kind, on_error=self.on_error,
              difficulty=self.difficulty)  # fmt: skip
    return {
      "sft": jsonl.load_problems(paths["sft"], **kw),
      "rl": jsonl.load_problems(paths["rl"], weights=self.rl_weights, **kw),
      "eval": jsonl.load_problems(paths["eval"], **kw),
    }

  def tokenizer_corpus(self, problems: dict[str, Sequence[Any]]) -> list[str]:
    """Text a task's sentencepiece model is trained on: the generator's
    own corpus, or a jsonl task's warm-up and RL prompts and traces."""
    if self.name != "jsonl":
      return list(get(self.name).tokenizer_corpus())
    from k15 import tokenizer  # noqa: PLC0415
    from k15.tasks import jsonl  # noqa: PLC0415

    # image markers are never encoded (`images.encode_prompt` cuts the
    # prompt at them), so they are no text to learn pieces of
    return [
      tokenizer.format_prompt(p.question.replace(jsonl.IMAGE_MARKER, ""))
      + p.trace
      for split in ("sft", "rl")
      for p in problems[split]
    ]

  def tokenizer_options(self) -> dict[str, Any]:
    """sentencepiece options: the synthetic tasks' (one token per
    character); BPE for prompt files."""
    if self.name != "jsonl":
      return dict(getattr(get(self.name), "TOKENIZER", {}))
    return {}


def get(name: str) -> ModuleType:
  if name not in TASKS:
    raise ValueError(f"config: task.name={name!r}; known tasks: {TASKS}")
  return importlib.import_module(f"k15.tasks.{name}")


def verifiers() -> dict[str, Callable[[str, str], bool]]:
  """{task name: verify}, the `verifiers=` of `k15.rewards.RewardPool`."""
  return {name: get(name).verify for name in TASKS}
