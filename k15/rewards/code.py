"""Code reward (program + tests -> 1/0) and test-case validation, both on the
sandbox (`k15.rewards.sandbox`); untrusted code never runs in this process.

Items carry `tests` and, for function tests, `entry_point`. The test mode is
`item["test_mode"]` or inferred from the tests:
- "judge": code strings (HumanEval's `check(candidate)`, `assert f(1) == 2`)
  run by the harness in a process the program cannot reach, after the
  item's trusted `setup` (for completion items: the prompt, which holds
  HumanEval's helper functions); `entry_point` calls into the program; pass
  = no exception. Inferred for code-string tests with an `entry_point`;
- "call": dicts {"args": [...], "expected": value}; `entry_point(*args)` is
  compared with `expected` outside the sandbox;
- "stdio": dicts {"input": str, "output": str}; the program's stdout is
  compared token-wise outside the sandbox;
- "assert": code strings run in the program's own namespace and process
  (inferred without an `entry_point`). The program can fake a pass there,
  so `CodeReward` refuses it unless built with `allow_fakeable=True` (for
  evaluation), and then marks each result `info["fakeable"]`.
The program is the last fenced code block of the response's final section
(after `</think>`), or, for completion items (`item["completion"]`, as in
HumanEval), `item["prompt"] + response`.
"""

import collections
import dataclasses
import hashlib
import json
import math
import threading
from collections.abc import Sequence
from typing import Any

from k15.rewards import sandbox
from k15.rewards.base import RewardResult, check_lengths

DEFAULT_LIMITS = sandbox.Limits()
# Per-test timeouts, so one slow reference solution keeps its other outputs.
VALIDATION_LIMITS = sandbox.Limits(timeout_s=30.0, test_timeout_s=2.0)

_LANGS = ("", "python", "python3", "py")


def extract_program(response: str) -> str | None:
  """The last fenced Python block after the reasoning; None if there is none
  (also when `<think>` is never closed: code only inside the reasoning).
  Linear time: a split on fences, no backtracking regex."""
  close = response.rfind("</think>")
  if close >= 0:
    response = response[close + len("</think>") :]
  elif "<think>" in response:
    return None
  parts = response.split("```")
  last = len(parts) - 2 if len(parts) % 2 else len(parts) - 3
  for k in range(last, 0, -2):  # odd k: inside a closed fence
    lang, newline, body = parts[k].partition("\n")
    if newline and lang.strip().lower() in _LANGS:
      return body
  return None


def test_mode(item: dict[str, Any]) -> str:
  if "test_mode" in item:
    return item["test_mode"]
  tests = item.get("tests")
  if not tests:
    raise ValueError(f"code reward: item has no 'tests': {sorted(item)}")
  first = tests[0]
  if isinstance(first, str):
    return "judge" if item.get("entry_point") else "assert"
  if isinstance(first, dict) and "args" in first:
    return "call"
  if isinstance(first, dict) and "input" in first:
    return "stdio"
  raise ValueError(f"code reward: cannot tell the test mode of {first!r:.80}")


def make_job(item: dict[str, Any], program: str) -> sandbox.Job:
  """The sandbox job that runs `program` against the item's tests."""
  mode = test_mode(item)
  tests = item["tests"]
  if mode == "assert":
    return sandbox.Job(program, "assert", tuple(tests))
  if mode == "judge":
    if not item.get("entry_point"):
      raise ValueError("code reward: judge tests need an 'entry_point'")
    setup = item.get("setup", "")
    if item.get("completion") and "setup" not in item:
      setup = item["prompt"]
    return sandbox.Job(
      program,
      "judge",
      tuple(tests),
      entry_point=item["entry_point"],
      setup=setup,
    )
  if mode == "call":
    if not item.get("entry_point"):
      raise ValueError("code reward: call tests need an 'entry_point'")
    return sandbox.Job(
      program,
      "call",
      tuple(tuple(t["args"]) for t in tests),
      entry_point=item["entry_point"],
      expected=tuple(t["expected"] for t in tests),
    )
  if mode == "stdio":
    return sandbox.Job(
      program,
      "stdio",
      tuple(t["input"] for t in tests),
      expected=tuple(t["output"] for t in tests),
    )
  raise ValueError(f"code reward: unknown test mode {mode!r}")


def check_mode_for_training(mode: str, where: str = "test_mode") -> None:
  """Raises ValueError, naming `where`, unless programs cannot fake a pass
  in `mode`: RL and curation search for exactly such holes."""
  if mode not in sandbox.SAFE_MODES:
    raise ValueError(
      f"{where}: test mode {mode!r} runs the tests inside the program's "
      "process, where it can fake a pass; training and curation need one "
      f"of {sandbox.SAFE_MODES} (code-string tests with an 'entry_point' "
      "run as 'judge')"
    )


def check_training_config(cfg: dict[str, Any], where: str = "reward.code"):
  """Raises ValueError, naming the field, when a code reward config for
  training allows fakeable results."""
  if cfg.get("allow_fakeable"):
    raise ValueError(
      f"{where}.allow_fakeable: fakeable test modes are for evaluation "
      "only; a training reward must not be fakeable"
    )


class CodeReward:
  """`fn(items, responses, finished) -> list[RewardResult]`: 1.0 iff every
  test passes in the sandbox. cause: the sandbox's (ok, wrong_answer, error,
  timeout, memory, output_limit, early_exit, killed), or truncated / no_code.

  allow_fakeable: also run "assert" items, whose pass a program can fake
  (evaluation only; each result then has `info["fakeable"] = True`).
  Without it such an item raises ValueError.
  memo: verdicts kept for repeated (program, tests) jobs (a policy samples
  the same program many times); only causes a rerun would repeat (ok,
  wrong_answer, error) are kept, never a timeout or a killed run, and such
  results carry `info["cached"] = True`. 0 turns it off.
  """

  def __init__(
    self,
    *,
    limits: sandbox.Limits = DEFAULT_LIMITS,
    workers: int | None = None,
    python: str = "/usr/bin/python3",
    allow_fakeable: bool = False,
    memo: int = 1 << 16,
  ):
    sandbox.check_available()  # refuse up front, never run unsandboxed
    self.sandbox = sandbox.Sandbox(python=python, limits=limits)
    self.workers = workers
    self.allow_fakeable = allow_fakeable
    self.memo = memo
    self._memo: dict[str, RewardResult] = {}
    self._lock = threading.Lock()

  def __call__(
    self,
    items: list[dict[str, Any]],
    responses: list[str],
    finished: list[bool],
  ) -> list[RewardResult]:
    check_lengths(items, responses, finished)
    results: list[RewardResult | None] = [None] * len(items)
    jobs, where = [], []
    for i, (item, response, done) in enumerate(
      zip(items, responses, finished, strict=True)
    ):
      if not self.allow_fakeable:
        check_mode_for_training(test_mode(item), f"code reward: item {i}")
      if not done:
        results[i] = RewardResult(0.0, False, "truncated")
        continue
      if item.get("completion"):
        program = item["prompt"] + response
      else:
        program = extract_program(response)
      if program is None:
        results[i] = RewardResult(0.0, False, "no_code")
        continue
      job = make_job(item, program)
      key = _job_key(job)
      with self._lock:
        hit = self._memo.get(key)
      if hit is not None:
        results[i] = dataclasses.replace(hit, info={**hit.info, "cached": True})
        continue
      jobs.append(job)
      where.append((i, key))
    # each distinct job runs once; its repeats in this batch share the run
    first: dict[str, int] = {}
    unique: list[sandbox.Job] = []
    for job, (_, key) in zip(jobs, where, strict=True):
      if key not in first:
        first[key] = len(unique)
        unique.append(job)
    runs = self.sandbox.run_many(unique, workers=self.workers)
    for i, key in where:
      res = runs[first[key]]
      info = dict(
        passed=res.num_passed,
        tests=len(res.tests),
        detail=res.detail[:500],
        stderr=res.stderr[-500:],
        wall_s=round(res.wall_s, 3),
      )
      if res.fakeable:
        info["fakeable"] = True
      results[i] = RewardResult(float(res.passed), res.passed, res.cause, info)
      if self.memo and res.cause in _MEMO_CAUSES:
        with self._lock:
          if len(self._memo) >= self.memo:
            self._memo.pop(next(iter(self._memo)))
          self._memo[key] = results[i]
    return results  # type: ignore[return-value]


# what a rerun of the same program on the same tests would repeat
_MEMO_CAUSES = frozenset({"ok", "wrong_answer", "error"})


def _job_key(job: sandbox.Job) -> str:
  return hashlib.sha256(repr(job).encode()).hexdigest()


# -- test-case validation (report §2.3.5, PAPER.md §5.4) ---------------------


@dataclasses.dataclass(frozen=True)
class Validation:
  """keep: the problem enters training; tests: the kept tests (the item's
  format, expected output = the majority output); agreement[t]: how many
  solutions produced test t's majority output (0 when none ran);
  solution_passed[s]: solution s passes every kept test."""

  keep: bool
  tests: list
  agreement: list[int]
  solution_passed: list[bool]


def _key(mode: str, output: Any) -> str:
  if mode == "stdio":
    return " ".join(str(output).split())
  return json.dumps(output, sort_keys=True)


def validate_tests(
  inputs: Sequence[Any],
  solutions: Sequence[str],
  *,
  mode: str = "stdio",
  entry_point: str = "",
  test_agreement: float = 0.7,
  problem_pass: float = 0.9,
  min_tests: int = 1,
  limits: sandbox.Limits = VALIDATION_LIMITS,
  box: sandbox.Sandbox | None = None,
) -> Validation:
  """Keeps generated test inputs on which the reference solutions agree.

  inputs: stdin strings ("stdio") or argument lists ("call");
  solutions: reference programs (the report samples 10).
  A test is kept when >= `test_agreement` of the solutions produce the same
  output (7/10 in the report); the problem is kept when it has at least
  `min_tests` kept tests and >= `problem_pass` of the solutions pass all of
  them (9/10).
  """
  if mode not in ("stdio", "call"):
    raise ValueError(f"validate_tests: mode must be stdio or call: {mode!r}")
  if not solutions:
    raise ValueError("validate_tests: no reference solutions")
  box = box or sandbox.Sandbox(limits=limits)
  tests = tuple(tuple(x) if mode == "call" else x for x in inputs)
  jobs = [
    sandbox.Job(s, mode, tests, entry_point=entry_point) for s in solutions
  ]
  runs = box.run_many(jobs, limits)
  n = len(solutions)
  need_agree = math.ceil(test_agreement * n - 1e-9)
  need_pass = math.ceil(problem_pass * n - 1e-9)
  kept, agreement, majority = [], [], []
  for t, test in enumerate(tests):
    outs = [r.tests[t] for r in runs]
    keys = [_key(mode, o.output) for o in outs if o.status == "ran"]
    if not keys:
      agreement.append(0)
      majority.append(None)
      continue
    key, count = collections.Counter(keys).most_common(1)[0]
    agreement.append(count)
    majority.append(key)
    if count >= need_agree:
      out = next(o.output for o in outs if o.status == "ran" and
                 _key(mode, o.output) == key)  # fmt: skip
      if mode == "stdio":
        kept.append({"input": test, "output": out})
      else:
        kept.append({"args": list(test), "expected": out})
  kept_idx = [t for t in range(len(tests)) if agreement[t] >= need_agree]
  passed = []
  for r in runs:
    ok = all(
      r.tests[t].status == "ran"
      and _key(mode, r.tests[t].output) == majority[t]
      for t in kept_idx
    )
    passed.append(ok and bool(kept_idx))
  keep = len(kept) >= min_tests and sum(passed) >= need_pass
  return Validation(keep, kept, agreement, passed)
