"""The one reward entry point: `score(rows, responses, finished)` routes each
row by its `kind` and returns a `RewardBatch`.

RL, evaluation and curation all score through it, so a response earns the
same reward wherever it is judged. The backends that are slow or untrusted
run in other processes (math-verify in `WorkerPool` processes, programs in
sandboxes) and are held by a `RewardPool`, built once per run and reused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from k15.rewards import judge as judge_lib
from k15.rewards.base import (
  ERROR_CAUSES,
  STATUSES,
  TIMEOUT_CAUSES,
  RewardFn,
  RewardResult,
  VerifierReward,
  Verify,
)

# Built-in row kinds. Synthetic tasks add theirs (the task's name) through
# `RewardPool(verifiers=...)`; the reward models come in through `judges`.
KINDS = ("exact", "math", "code", *judge_lib.RM_KINDS)
# Kinds whose backend is another process: their groups run side by side.
_PARALLEL_KINDS = ("math", "code")


def get_reward_fn(kind: str, **cfg: Any) -> RewardFn:
  """The reward function of a built-in kind; `cfg` goes to its constructor
  (`MathReward` for exact/math, `CodeReward` for code, `judge=` a
  `judge.Judge` for cot_rm/scalar_rm)."""
  if kind == "exact":
    from k15.rewards import math as math_reward

    return math_reward.MathReward(exact_only=True, **cfg)
  if kind == "math":
    from k15.rewards import math as math_reward

    return math_reward.MathReward(**cfg)
  if kind == "code":
    from k15.rewards import code

    return code.CodeReward(**cfg)
  if kind in judge_lib.RM_KINDS:
    judge = cfg.pop("judge", None)
    if judge is None or cfg:
      raise ValueError(
        f"reward kind {kind!r} needs judge= (a loaded reward model, e.g. "
        f"k15.rm.load(DIR)) and nothing else; got {sorted(cfg)}"
      )
    return judge_lib.JudgeReward(judge)
  raise ValueError(f"unknown reward kind {kind!r}; known kinds: {KINDS}")


@dataclasses.dataclass(frozen=True)
class RewardBatch:
  """What `score` returns: one result per row, and batch metrics.

  results[i]: row i's RewardResult (score, correct, cause, info), its
    `status` one of base.STATUSES;
  kinds[i]: the kind that scored row i (the judge's when one was given);
  metrics: `reward_time` (seconds the call took), `reward/status/<s>`
    (counts, every status), `reward/<kind>/n`, `reward/<kind>/cause/<c>`
    (counts), and with a judge its agreement with the rows' own kinds
    (`reward/<judge>/accuracy`, ..., `reward/rule_accuracy`).
  """

  results: tuple[RewardResult, ...]
  kinds: tuple[str, ...]
  metrics: dict[str, float]

  def __len__(self) -> int:
    return len(self.results)

  @property
  def scores(self) -> np.ndarray:
    """[N] float32 rewards."""
    return np.array([r.score for r in self.results], np.float32)

  @property
  def correct(self) -> np.ndarray:
    """[N] bool."""
    return np.array([r.correct for r in self.results], bool)

  @property
  def statuses(self) -> tuple[str, ...]:
    return tuple(r.status for r in self.results)


class RewardPool:
  """The scoring backends of a run, by row kind; `score` routes a batch.

  cfg: constructor keywords of the built-in kinds, e.g.
    {"math": {"num_workers": 4}, "code": {"limits": ...}};
  verifiers: {kind: verify(response, answer) -> bool}, the synthetic tasks'
    exact rules under their task names (`tasks.verifiers()`);
  judges: {"cot_rm" | "scalar_rm": a `judge.Judge`}, reward models loaded
    by the caller (`k15.rm`), so this package never imports a model.
  Backends are built on first use and closed by `close`. `submit` scores
  in a background thread and returns a Future, so the trainer can dispatch
  device work before it needs the rewards.
  """

  def __init__(
    self,
    cfg: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    verifiers: Mapping[str, Verify] | None = None,
    judges: Mapping[str, judge_lib.Judge] | None = None,
    max_batches: int = 2,
  ):
    self.cfg = {k: dict(v) for k, v in (cfg or {}).items()}
    self.verifiers = dict(verifiers or {})
    self.judges = dict(judges or {})
    _check_backends(self.cfg, self.verifiers, self.judges)
    self._fns: dict[str, RewardFn] = {}
    self._lock = threading.Lock()
    self._counts: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter
    )
    self._executor = concurrent.futures.ThreadPoolExecutor(
      max_batches, thread_name_prefix="k15-reward"
    )
    self._kinds_executor = concurrent.futures.ThreadPoolExecutor(
      len(_PARALLEL_KINDS), thread_name_prefix="k15-reward-kind"
    )

  @property
  def kinds(self) -> tuple[str, ...]:
    """Every kind this pool can score."""
    rms = tuple(k for k in judge_lib.RM_KINDS if k in self.judges)
    return (*KINDS[:3], *rms, *self.verifiers)

  def fn(self, kind: str) -> RewardFn:
    """The reward function of `kind`, built on first use."""
    with self._lock:
      if kind not in self._fns:
        self._fns[kind] = self._build(kind)
      return self._fns[kind]

  def _build(self, kind: str) -> RewardFn:
    if kind in self.verifiers:
      return VerifierReward(self.verifiers[kind])
    if kind in judge_lib.RM_KINDS and kind not in self.judges:
      raise ValueError(
        f"reward kind {kind!r}: no reward model given; build the pool with "
        f"RewardPool(judges={{{kind!r}: k15.rm.load(DIR)}})"
      )
    if kind not in KINDS:
      raise ValueError(
        f"unknown reward kind {kind!r}; known kinds: {self.kinds}"
      )
    if kind in judge_lib.RM_KINDS:
      return judge_lib.JudgeReward(self.judges[kind])
    return get_reward_fn(kind, **self.cfg.get(kind, {}))

  def score(
    self,
    rows: Sequence[Mapping[str, Any]],
    responses: Sequence[str],
    finished: Sequence[bool],
    *,
    judge: str | None = None,
  ) -> RewardBatch:
    """Blocking: scores a batch (see `score`)."""
    if not len(rows) == len(responses) == len(finished):
      raise ValueError(
        f"reward: {len(rows)} rows, {len(responses)} responses and "
        f"{len(finished)} finished flags must have the same length"
      )
    t0 = time.perf_counter()
    rows = [dict(r) for r in rows]
    responses, finished = list(responses), [bool(f) for f in finished]
    groups = self._groups(rows)
    judge_fn = self.fn(judge) if judge else None  # checked before any work
    own = self._route(groups, rows, responses, finished)
    metrics = _cause_counts(own, [r["kind"] for r in rows])
    if judge_fn is not None:
      results = judge_fn(rows, responses, finished)
      rule = np.array([r.score for r in own], np.float32)
      metrics.update(
        judge_lib.agreement_metrics(results, rule, f"reward/{judge}/")
      )
      metrics.update(_cause_counts(results, [judge] * len(rows)))
      metrics["reward/rule_accuracy"] = float(rule.mean()) if len(rule) else 0.0
      self._count(judge, results)
      kinds = (judge,) * len(rows)
    else:
      results, kinds = own, tuple(r["kind"] for r in rows)
    for k, idx in groups.items():
      self._count(k, [own[i] for i in idx])
    status = collections.Counter(r.status for r in results)
    metrics.update({f"reward/status/{s}": float(status[s]) for s in STATUSES})
    metrics["reward_time"] = time.perf_counter() - t0
    return RewardBatch(tuple(results), kinds, metrics)

  def _groups(self, rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Row indices by kind; every kind is checked before any work."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
      kind = row.get("kind")
      if not kind:
        raise ValueError(f"reward: row {i} has no 'kind': {sorted(row)}")
      groups[kind].append(i)
    for kind in groups:
      self.fn(kind)
    return groups

  def _route(self, groups, rows, responses, finished) -> list[RewardResult]:
    """Each group through its kind's function; the process-backed kinds
    (math-verify workers, sandboxes) run side by side in threads, the rest
    (exact rules, reward models on the accelerator) in this thread."""

    def run(kind: str) -> list[RewardResult]:
      idx = groups[kind]
      return self.fn(kind)(
        [rows[i] for i in idx],
        [responses[i] for i in idx],
        [finished[i] for i in idx],
      )

    parallel = [k for k in groups if k in _PARALLEL_KINDS]
    if len(parallel) < 2:
      parallel = []
    futures = {k: self._kinds_executor.submit(run, k) for k in parallel}
    done = {k: run(k) for k in groups if k not in futures}
    done.update({k: f.result() for k, f in futures.items()})
    out: list[RewardResult | None] = [None] * len(rows)
    for kind, idx in groups.items():
      for i, r in zip(idx, done[kind], strict=True):
        out[i] = r
    return out  # type: ignore[return-value]

  def submit(
    self,
    rows: Sequence[Mapping[str, Any]],
    responses: Sequence[str],
    finished: Sequence[bool],
    *,
    judge: str | None = None,
  ) -> concurrent.futures.Future[RewardBatch]:
    """Non-blocking `score`: returns a Future of the RewardBatch."""
    return self._executor.submit(
      self.score, list(rows), list(responses), list(finished), judge=judge
    )

  def _count(self, kind: str, results: Sequence[RewardResult]) -> None:
    with self._lock:
      c = self._counts[kind]
      for r in results:
        c["n"] += 1
        c["correct"] += bool(r.correct)
        c["score"] += r.score
        c["timeouts"] += r.cause in TIMEOUT_CAUSES
        c["errors"] += r.cause in ERROR_CAUSES
        c["cause/" + r.cause] += 1

  def metrics(self, reset: bool = True) -> dict[str, float]:
    """{"reward/<kind>/accuracy", ".../score" (means), ".../timeouts",
    ".../errors", ".../n", ".../cause/<cause>" (counts)} over every batch
    since the last reset."""
    with self._lock:
      out = {}
      for kind, c in self._counts.items():
        n = c["n"]
        pre = f"reward/{kind}/"
        out[pre + "n"] = float(n)
        out[pre + "accuracy"] = c["correct"] / n if n else 0.0
        out[pre + "score"] = c["score"] / n if n else 0.0
        out[pre + "timeouts"] = float(c["timeouts"])
        out[pre + "errors"] = float(c["errors"])
        for key, v in c.items():
          if key.startswith("cause/"):
            out[pre + key] = float(v)
      if reset:
        self._counts.clear()
      return out

  def close(self) -> None:
    self._executor.shutdown(wait=True)
    self._kinds_executor.shutdown(wait=True)
    with self._lock:
      for fn in self._fns.values():
        close = getattr(fn, "close", None)
        if close is not None:
          close()
      self._fns.clear()

  def __enter__(self) -> RewardPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _check_backends(cfg, verifiers, judges) -> None:
  unknown = set(cfg) - {"exact", "math", "code"}
  if unknown:
    raise ValueError(
      f"RewardPool: cfg for unknown kinds {sorted(unknown)}; cfg configures "
      "exact, math and code (reward models come in through judges=)"
    )
  shadow = set(verifiers) & set(KINDS)
  if shadow:
    raise ValueError(
      f"RewardPool: verifiers {sorted(shadow)} would shadow built-in kinds"
    )
  for kind, j in judges.items():
    if kind not in judge_lib.RM_KINDS or getattr(j, "kind", kind) != kind:
      raise ValueError(
        f"RewardPool: judges[{kind!r}] must be a {judge_lib.RM_KINDS} model "
        f"of that kind (got {getattr(j, 'kind', None)!r})"
      )


def _cause_counts(
  results: Sequence[RewardResult], kinds: Sequence[str]
) -> dict[str, float]:
  """`reward/<kind>/n` and `reward/<kind>/cause/<cause>` counts."""
  c = collections.Counter()
  for r, k in zip(results, kinds, strict=True):
    c[f"reward/{k}/n"] += 1
    c[f"reward/{k}/cause/{r.cause}"] += 1
  return {k: float(v) for k, v in sorted(c.items())}


def score(
  rows: Sequence[Mapping[str, Any]],
  responses: Sequence[str],
  finished: Sequence[bool],
  *,
  pool: RewardPool | None = None,
  judge: str | None = None,
) -> RewardBatch:
  """Scores each response against its row, routed by `row["kind"]`.

  rows[i]: the task row of responses[i]: "kind" and what that kind needs
    ("answer" for a task's verifier, exact and math; "tests" and
    "entry_point" for code; "question"/"prompt" and "answer" for a reward
    model);
  finished[i]: whether response i ended by itself (a stop token); one that
    did not scores 0 with status "not_finished", whatever its text says;
  pool: the backends (worker pool, sandbox, task verifiers, reward models);
    a temporary pool of the built-in kinds when None;
  judge: a reward-model kind that scores every row instead of its own kind
    (config.reward); the rows' own kinds still score them, as the rule the
    judge's agreement metrics compare with.

  Routing: a task name in `pool.verifiers` -> that task's `verify`;
  "exact" -> answer extraction + exact comparison; "math" -> the same, then
  math-verify in worker processes; "code" -> the sandbox running the row's
  tests; "cot_rm" / "scalar_rm" -> the pool's judge of that kind.
  """
  if pool is not None:
    return pool.score(rows, responses, finished, judge=judge)
  with RewardPool() as tmp:
    return tmp.score(rows, responses, finished, judge=judge)
