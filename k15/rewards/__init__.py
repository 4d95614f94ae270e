"""Rewards by task kind, and a pool that scores batches in the background.

`get_reward_fn(kind, **cfg)` returns `fn(items, responses, finished) ->
list[RewardResult]`:
- "exact": final-answer extraction + exact comparison (synthetic tasks);
- "math": the same rules, then `math-verify` equivalence in worker
  processes (`k15.rewards.math`);
- "code": programs run against tests in the sandbox (`k15.rewards.code`);
- "cot_rm" / "scalar_rm": a trained reward model's judgement
  (`k15.rewards.reward_model`; cfg `ckpt=` an RM directory).
Items carry `prompt` and `answer` (exact, math) or `tests` / `entry_point`
(code); `finished=False` (cut by the length limit) always scores 0.

`RewardPool.submit(...)` returns a `Future` at once, so the trainer can
dispatch the next device step before it needs this batch's rewards.
"""

import collections
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

from k15.rewards.base import (
  ERROR_CAUSES,
  TIMEOUT_CAUSES,
  RewardFn,
  RewardResult,
)

KINDS = ("exact", "math", "code", "cot_rm", "scalar_rm")

__all__ = ["KINDS", "RewardFn", "RewardPool", "RewardResult", "get_reward_fn"]


def get_reward_fn(kind: str, **cfg: Any) -> RewardFn:
  """The reward function of a task kind; `cfg` goes to its constructor
  (`MathReward` for exact/math, `CodeReward` for code,
  `reward_model.from_cfg` for cot_rm/scalar_rm)."""
  if kind == "exact":
    from k15.rewards import math as math_reward

    return math_reward.MathReward(exact_only=True, **cfg)
  if kind == "math":
    from k15.rewards import math as math_reward

    return math_reward.MathReward(**cfg)
  if kind == "code":
    from k15.rewards import code

    return code.CodeReward(**cfg)
  if kind in ("cot_rm", "scalar_rm"):
    from k15.rewards import reward_model

    return reward_model.from_cfg(kind, **cfg)
  raise ValueError(f"unknown reward kind {kind!r}; known kinds: {KINDS}")


class RewardPool:
  """Scores batches asynchronously, with per-kind metrics.

  The work that is slow or untrusted already runs in other processes
  (math-verify in `WorkerPool` processes, programs in sandboxes); what is
  left here (answer extraction, bookkeeping) is light, so batches are
  dispatched from `max_batches` background threads rather than pickled to
  yet another process pool. Reward functions are built lazily per kind from
  `cfg[kind]`.
  """

  def __init__(
    self,
    cfg: dict[str, dict[str, Any]] | None = None,
    *,
    max_batches: int = 2,
  ):
    self.cfg = dict(cfg or {})
    unknown = set(self.cfg) - set(KINDS)
    if unknown:
      raise ValueError(f"RewardPool: unknown kinds in cfg: {sorted(unknown)}")
    self._fns: dict[str, RewardFn] = {}
    self._lock = threading.Lock()
    self._counts: dict[str, collections.Counter] = collections.defaultdict(
      collections.Counter
    )
    self._executor = concurrent.futures.ThreadPoolExecutor(
      max_batches, thread_name_prefix="k15-reward"
    )

  def fn(self, kind: str) -> RewardFn:
    with self._lock:
      if kind not in self._fns:
        self._fns[kind] = get_reward_fn(kind, **self.cfg.get(kind, {}))
      return self._fns[kind]

  def score(
    self,
    items: Sequence[dict[str, Any]],
    responses: Sequence[str],
    finished: Sequence[bool],
    kind: str | None = None,
  ) -> list[RewardResult]:
    """Blocking: scores a batch; items of mixed kinds are grouped by their
    `kind` field unless `kind` is given."""
    if not len(items) == len(responses) == len(finished):
      raise ValueError(
        f"RewardPool: {len(items)} items, {len(responses)} responses, "
        f"{len(finished)} finished flags"
      )
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, item in enumerate(items):
      k = kind or item.get("kind")
      if k is None:
        raise ValueError(f"RewardPool: item {i} has no 'kind' and none given")
      groups[k].append(i)
    out: list[RewardResult | None] = [None] * len(items)
    for k, idx in groups.items():
      res = self.fn(k)(
        [items[i] for i in idx],
        [responses[i] for i in idx],
        [bool(finished[i]) for i in idx],
      )
      for i, r in zip(idx, res, strict=True):
        out[i] = r
      self._count(k, res)
    return out  # type: ignore[return-value]

  def submit(
    self,
    items: Sequence[dict[str, Any]],
    responses: Sequence[str],
    finished: Sequence[bool],
    kind: str | None = None,
  ) -> "concurrent.futures.Future[list[RewardResult]]":
    """Non-blocking `score`: returns a Future of the results."""
    return self._executor.submit(
      self.score, list(items), list(responses), list(finished), kind
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
    ".../errors", ".../n", ".../cause/<cause>" (counts)} since the last
    reset."""
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
    with self._lock:
      for fn in self._fns.values():
        close = getattr(fn, "close", None)
        if close is not None:
          close()
      self._fns.clear()

  def __enter__(self) -> "RewardPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
