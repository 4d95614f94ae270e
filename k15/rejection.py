"""Rejection sampling: an SFT set made of a model's own verified responses.

The report builds its long-CoT warm-up this way ("accurately verified
reasoning paths", PAPER.md §0), and long2short's shortest rejection
sampling (§6) keeps the shortest correct of n samples. `rejection_sample`
samples n responses per problem, judges every one through the reward
entry point (`k15.rewards.score`, by each row's kind, exactly as RL would
reward it) and keeps, per problem, every distinct correct response
(keep="all") or the shortest one (keep="shortest"). The kept rows are
written in the prompt-file schema (`k15.tasks.jsonl`), the response as the
row's `trace`, so a run can train on them (`task.sft_files`).

  python -m k15.tools.rejection_sample --config experiments/mixed.py \\
      --workdir DIR --ckpt sft --output rs.jsonl --n 8 --keep shortest

The sampler is a `SampleFn` (formatted prompt texts -> one `Sample` each),
so callers can bring their own; `model_sample_fn` makes one from a
checkpoint's params with the jitted sampler.

Long2short works on token ids rather than text: `sample` draws n scored
responses per problem as `Group`s, `shortest_correct` is shortest
rejection sampling's SFT set, DPO builds its preference pairs from the same
groups (`objective.dpo_pairs`), and `write` / `read` keep a stage's sampled
set as JSONL so a resumed stage trains on what was sampled.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from k15 import rewards
from k15 import tokenizer as tokenizer_lib

if TYPE_CHECKING:
  import jax

  from k15 import rollout, sampler

KEEP = ("all", "shortest")


class Sample(NamedTuple):
  text: str  # the decoded response (without the prompt)
  finished: bool  # stopped by a stop token (not cut, not repeating)
  tokens: int = 0  # response tokens (0: unknown)


class SampleFn(Protocol):
  """One `Sample` per prompt text; deterministic for a seed; `max_tokens`
  None means the model's usual budget."""

  def __call__(
    self,
    prompts: list[str],
    *,
    seed: int,
    temperature: float,
    max_tokens: int | None,
  ) -> list[Sample]: ...


def model_sample_fn(
  params, *, tok, model, sampling, gen, shard_fn=None
) -> SampleFn:
  """A SampleFn over the jitted sampler (`rollout.generate`): `finished`
  is the sampler's STOPPED status (rows cut by the budget or the cache, or
  stopped for repeating, are unfinished). Chunks have `gen.rows` rows, so
  compiled programs are reused across calls with the same `max_tokens`."""
  # here, not at the top: host-side callers (curation's filters, stub
  # samplers) never load JAX
  import jax  # noqa: PLC0415

  from k15 import rollout, sampler  # noqa: PLC0415

  def fn(prompts, *, seed, temperature, max_tokens):
    g = gen
    if max_tokens is not None:
      g = dataclasses.replace(gen, budget=min(max_tokens, gen.budget))
    samp = dataclasses.replace(sampling, temperature=temperature)
    gens = rollout.generate(
      params,
      [tok.encode(p) for p in prompts],
      jax.random.key(seed),
      model=model,
      sampling=samp,
      gen=g,
      pad_id=tok.pad_id,
      shard_fn=shard_fn,
    )
    return [
      Sample(tok.decode(x.response), x.status == sampler.STOPPED,
             len(x.response))  # fmt: skip
      for x in gens
    ]

  return fn


@dataclasses.dataclass(frozen=True)
class RSResult:
  """rows: the SFT set (prompt-file rows, each with its kept `trace`), in
  problem order; report: counts (prompts, samples, correct, prompts with
  a correct sample, kept) and statuses, mean lengths."""

  rows: list[dict[str, Any]]
  report: dict[str, Any]


def sft_row(problem: Any, trace: str) -> dict[str, Any]:
  """A problem's row in the prompt-file schema, `trace` its response (the
  prompt under one name: `question`)."""
  item = dict(problem.to_item())
  if "question" in item:
    item.pop("prompt", None)
  item["trace"] = trace
  return item


def rejection_sample(
  problems: Sequence[Any],
  sample_fn: SampleFn,
  *,
  pool: rewards.RewardPool | None = None,
  n: int = 8,
  keep: str = "all",
  seed: int = 0,
  temperature: float = 1.0,
  length_fn: Callable[[Sample], int] | None = None,
) -> RSResult:
  """Samples n responses per problem, verifies them through the reward
  entry point and keeps the correct ones.

  problems: objects with `question` and `to_item()` (a task's problems or
    `k15.tasks.jsonl.Problem`s); the sampler sees
    `tokenizer.format_prompt(question)`;
  keep: "all" (every distinct correct response) or "shortest" (the
    shortest correct one, by `length_fn`: the Sample's token count when it
    has one, else its characters; ties go to the earlier sample);
  pool: the reward backends (a temporary pool of the built-in kinds when
    None; a synthetic task's rows need its verifiers).
  """
  if keep not in KEEP:
    raise ValueError(f"rejection sampling: keep={keep!r}; expected {KEEP}")
  if n < 1:
    raise ValueError(f"rejection sampling: n={n} must be >= 1")
  length_fn = length_fn or (lambda s: s.tokens or len(s.text))
  prompts = [tokenizer_lib.format_prompt(p.question) for p in problems]
  samples = sample_fn(
    [q for q in prompts for _ in range(n)], seed=seed,
    temperature=temperature, max_tokens=None,
  )  # fmt: skip
  if len(samples) != n * len(problems):
    raise ValueError(
      f"sample_fn returned {len(samples)} samples for {n * len(problems)}"
    )
  rows = [p.to_item() for p in problems for _ in range(n)]
  batch = rewards.score(
    rows, [s.text for s in samples], [s.finished for s in samples],
    pool=pool,
  )  # fmt: skip
  ok_PxN = batch.correct.reshape(len(problems), n)
  kept: list[dict[str, Any]] = []
  kept_len: list[int] = []
  for i, p in enumerate(problems):
    good = [samples[i * n + j] for j in range(n) if ok_PxN[i, j]]
    if keep == "shortest" and good:
      good = [min(good, key=length_fn)]  # min keeps the first of ties
    seen = set()
    for s in good:
      if s.text not in seen:
        seen.add(s.text)
        kept.append(sft_row(p, s.text))
        kept_len.append(length_fn(s))
  flat_ok = ok_PxN.reshape(-1)
  correct_len = [length_fn(samples[j]) for j in np.flatnonzero(flat_ok)]
  report = dict(
    prompts=len(problems),
    samples=len(samples),
    correct=int(ok_PxN.sum()),
    prompts_solved=int(ok_PxN.any(axis=1).sum()),
    kept=len(kept),
    keep=keep,
    n=n,
    statuses=dict(collections.Counter(batch.statuses)),
    mean_length_correct=float(np.mean(correct_len)) if correct_len else 0.0,
    mean_length_kept=float(np.mean(kept_len)) if kept_len else 0.0,
  )
  return RSResult(kept, report)


# -- groups of token ids (long2short: shortest rejection sampling, DPO) -------


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
  from k15 import rollout, sampler  # noqa: PLC0415 (see model_sample_fn)

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
  import jax  # noqa: PLC0415

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
