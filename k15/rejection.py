"""Rejection sampling from a model: n responses per prompt, each scored by
the reward entry point, and the SFT set of the shortest correct ones.

  groups = sample(params, problems, rng, n=8, ...)   # n per prompt, scored
  examples = shortest_correct(groups)               # (prompt, response) ids

Long2short's shortest rejection sampling (PAPER.md §6) trains on
`shortest_correct`; its DPO builds preference pairs from the same groups
(`objective.dpo_pairs`). The sets are written as JSONL (`write` / `read`),
one row per prompt, so a resumed stage trains on what was sampled.

This module stands in for the rejection-sampling SFT builder of the
real-rewards work (issue #15: sample n per prompt from a checkpoint,
verify through the entry point, keep all correct or the shortest correct,
write an SFT set); when that lands, `sample` + `shortest_correct` are the
two calls to swap for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from k15 import rewards, rollout, sampler
from k15 import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Group:
  """One prompt's n samples, in the order they were drawn."""

  question: str
  prompt: list[int]  # the formatted prompt's ids
  responses: list[list[int]]  # ids, with the stop token when it stopped
  correct: np.ndarray  # [n] bool: the reward entry point's verdict
  finished: np.ndarray  # [n] bool: stopped by itself (not cut)

  @property
  def lengths(self) -> np.ndarray:
    """[n] response lengths in tokens (stop token included)."""
    return np.array([len(r) for r in self.responses], np.int64)

  def to_json(self) -> dict[str, Any]:
    return dict(question=self.question, prompt=self.prompt,
                responses=self.responses, correct=self.correct.tolist(),
                finished=self.finished.tolist())  # fmt: skip

  @classmethod
  def from_json(cls, row: dict[str, Any]) -> Group:
    return cls(row["question"], list(row["prompt"]),
               [list(r) for r in row["responses"]],
               np.array(row["correct"], bool),
               np.array(row["finished"], bool))  # fmt: skip


def sample(
  params,
  problems: Sequence[Any],
  rng: jax.Array,
  *,
  n: int,
  tok: tokenizer_lib.Tokenizer,
  model,
  sampling: sampler.SamplingConfig,
  gen: rollout.GenConfig,
  pool: rewards.RewardPool,
  shard_fn=None,
) -> list[Group]:
  """n responses per problem (deterministic in `rng`), each scored through
  `pool` by the problem's kind; a response that did not stop by itself
  (cut by the length limit or stopped for repeating) is never correct."""
  prompts = [
    tok.encode(tokenizer_lib.format_prompt(p.question)) for p in problems
  ]
  gens = rollout.generate(
    params,
    [q for q in prompts for _ in range(n)],
    rng,
    model=model,
    sampling=sampling,
    gen=gen,
    pad_id=tok.pad_id,
    shard_fn=shard_fn,
  )
  finished = np.array([g.status == sampler.STOPPED for g in gens])
  scored = rewards.score(
    [p.to_item() for p in problems for _ in range(n)],
    [tok.decode(g.response) for g in gens],
    finished.tolist(),
    pool=pool,
  )
  correct = scored.correct.reshape(len(problems), n)
  finished = finished.reshape(len(problems), n)
  return [
    Group(
      p.question,
      list(map(int, q)),
      [list(map(int, g.response)) for g in gens[i * n : (i + 1) * n]],
      correct[i] & finished[i],
      finished[i],
    )
    for i, (p, q) in enumerate(zip(problems, prompts, strict=True))
  ]


def shortest(group: Group) -> int | None:
  """Index of the group's shortest correct response (the first drawn among
  equally short ones), or None when none is correct."""
  (idx,) = np.nonzero(group.correct)
  if idx.size == 0:
    return None
  return int(idx[np.argmin(group.lengths[idx])])


def shortest_correct(
  groups: Sequence[Group],
) -> list[tuple[list[int], list[int]]]:
  """The SFT set of shortest rejection sampling: per prompt with at least
  one correct response, (prompt ids, its shortest correct response's ids);
  prompts with none contribute nothing."""
  out = []
  for g in groups:
    j = shortest(g)
    if j is not None:
      out.append((g.prompt, g.responses[j]))
  return out


def stats(groups: Sequence[Group]) -> dict[str, float]:
  """What a sampled set looks like: accuracy, lengths, how many prompts
  have a correct response, and the mean length of the shortest correct."""
  lengths = np.concatenate([g.lengths for g in groups])
  picked = [g.lengths[j] for g in groups if (j := shortest(g)) is not None]
  return dict(
    prompts=float(len(groups)),
    accuracy=float(np.mean(np.concatenate([g.correct for g in groups]))),
    finished=float(np.mean(np.concatenate([g.finished for g in groups]))),
    mean_length=float(lengths.mean()),
    prompts_with_correct=float(len(picked)),
    shortest_correct_length=float(np.mean(picked)) if picked else 0.0,
  )


def write(path: str, groups: Sequence[Group]) -> None:
  """The groups as JSONL (atomically; process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for g in groups:
      f.write(json.dumps(g.to_json()) + "\n")
  os.replace(path + ".tmp", path)


def read(path: str) -> list[Group]:
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path}: the sampled set of this stage is missing; move the stage's "
      "checkpoints aside to sample it again"
    )
  with open(path) as f:
    return [Group.from_json(json.loads(line)) for line in f if line.strip()]
