"""The reward entry point (k15.rewards.score): each row goes to the backend
of its kind, shown by counters on the real verifiers (the synthetic task's
verify, math-verify's worker pool, the sandbox); batch statuses and
metrics; math-verify's own time limit counted as a timeout; and the leaf
rule (k15/rewards/ imports nothing that trains or samples)."""

import ast
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from k15 import rewards, tasks
from k15.rewards import sandbox, workers
from k15.tasks import arithmetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = sandbox.unavailable_reason()
needs_sandbox = pytest.mark.skipif(bool(REASON), reason=f"no sandbox: {REASON}")


class Spy:
  """Wraps a real function: records each call's args and its thread and
  time span, then returns what the function returns."""

  def __init__(self, fn):
    self.fn, self.calls, self.spans = fn, [], []

  def __call__(self, *args, **kwargs):
    t0 = time.monotonic()
    self.calls.append(args)
    try:
      return self.fn(*args, **kwargs)
    finally:
      self.spans.append((threading.current_thread().name, t0, time.monotonic()))


@pytest.fixture
def spies(monkeypatch):
  """Counters on the synthetic task's verify, math-verify's worker pool
  (`WorkerPool.map`, which ships (gold, answer) pairs to math-verify) and
  the sandbox (`Sandbox.run_many`)."""
  out = dict(
    task=Spy(arithmetic.verify),
    math=Spy(workers.WorkerPool.map),
    code=Spy(sandbox.Sandbox.run_many),
  )
  monkeypatch.setattr(arithmetic, "verify", out["task"])
  monkeypatch.setattr(
    workers.WorkerPool, "map", lambda *a, **k: out["math"](*a, **k)
  )
  monkeypatch.setattr(
    sandbox.Sandbox, "run_many", lambda *a, **k: out["code"](*a, **k)
  )
  return out


def _pool(**cfg):
  return rewards.RewardPool(
    dict(math=dict(num_workers=1), **cfg), verifiers=tasks.verifiers()
  )


def test_each_row_goes_to_its_kinds_verifier(spies):
  """A task row to the task's verify, a math row that needs it to
  math-verify, an exact row to the exact comparator only; unfinished rows
  reach no backend and score 0."""
  p = arithmetic.make_problem(np.random.default_rng(0), 3)
  task_row = p.to_item()
  assert task_row["kind"] == "arithmetic"
  rows = [
    task_row,
    dict(kind="math", answer=r"\frac{1}{2}"),
    dict(kind="exact", answer="4"),
    dict(kind="math", answer="3"),
    task_row,
    dict(kind="math", answer="7"),
  ]
  responses = [
    p.trace,
    r"so \boxed{0.5}",
    "answer: 4",
    r"\boxed{4}",
    p.trace,
    r"\boxed{7}",
  ]
  finished = [True, True, True, True, False, False]
  with _pool() as pool:
    batch = rewards.score(rows, responses, finished, pool=pool)
  assert spies["task"].calls == [(p.trace, p.answer)]
  # one batched call to math-verify's workers: the two finished math rows
  # the exact fast path could not settle, as (gold, extracted answer)
  [(_, pairs, _)] = spies["math"].calls
  assert pairs == [(r"\frac{1}{2}", "0.5"), ("3", "4")]
  assert spies["code"].calls == []
  assert batch.statuses == (
    "correct",
    "correct",
    "correct",
    "wrong_answer",
    "not_finished",
    "not_finished",
  )
  np.testing.assert_array_equal(batch.scores, [1, 1, 1, 0, 0, 0])
  assert batch.results[1].info["by"] == "math_verify"
  assert batch.results[2].info["by"] == "exact"
  assert batch.kinds == tuple(r["kind"] for r in rows)
  m = batch.metrics
  assert (m["reward/status/correct"], m["reward/status/wrong_answer"]) == (3, 1)
  assert m["reward/status/not_finished"] == 2
  assert m["reward/status/timeout"] == m["reward/status/crash"] == 0
  assert m["reward/math/n"] == 3 and m["reward/math/cause/ok"] == 1
  assert m["reward/arithmetic/cause/truncated"] == 1
  assert m["reward_time"] > 0


@needs_sandbox
def test_code_rows_run_in_the_sandbox_beside_math_verify(spies):
  """A code row's program runs in the sandbox against its tests, in a
  thread of its own while math-verify checks the math row (the
  process-backed kinds run side by side)."""
  code_row = dict(
    kind="code",
    entry_point="f",
    tests=[{"args": [2], "expected": 4}, {"args": [3], "expected": 6}],
  )
  rows = [code_row, dict(kind="math", answer=r"\frac{1}{3}"), code_row]
  program = "def f(x):\n  return 2 * x\n"
  responses = [f"```python\n{program}```", r"\boxed{2/6}", "```python\n"]
  limits = sandbox.Limits(timeout_s=10.0, test_timeout_s=2.0)
  with _pool(code=dict(limits=limits)) as pool:
    batch = rewards.score(rows, responses, [True, True, False], pool=pool)
  [(_, jobs)] = spies["code"].calls
  assert [j.program for j in jobs] == [program]
  assert [j.tests for j in jobs] == [((2,), (3,))]
  assert batch.statuses == ("correct", "correct", "not_finished")
  assert batch.results[0].info["passed"] == 2
  (code_thread, c0, c1), (math_thread, m0, m1) = (
    spies["code"].spans + spies["math"].spans
  )
  assert code_thread != math_thread
  assert {code_thread, math_thread} != {threading.main_thread().name}
  assert c0 < m1 and m0 < c1, "the two kinds did not overlap"


def test_math_verify_own_time_limit_is_a_timeout():
  """math-verify's own 3 s alarm (it would log and answer False) comes back
  as status "timeout", not "wrong_answer", without the outer limit firing
  (no worker is killed)."""
  rows = [
    dict(kind="math", answer="2^{2^{40}}"),
    dict(kind="math", answer="(x+1)^{2000}"),
    dict(kind="math", answer=r"\frac{1}{2}"),
    dict(kind="math", answer="5"),
  ]
  responses = [
    r"\boxed{2^{2^{41}}}",
    r"\boxed{(x+2)^{2000}}",
    r"\boxed{0.5}",
    r"\boxed{6}",
  ]
  cfg = dict(math=dict(num_workers=2, timeout_s=30.0))
  with rewards.RewardPool(cfg) as pool:
    batch = rewards.score(rows, responses, [True] * 4, pool=pool)
    assert pool.fn("math").pool.restarts == 0
  assert [r.cause for r in batch.results] == [
    "timeout",
    "timeout",
    "ok",
    "wrong_answer",
  ]
  assert batch.metrics["reward/status/timeout"] == 2
  assert batch.metrics["reward/math/cause/timeout"] == 2
  assert batch.metrics["reward/status/wrong_answer"] == 1
  assert "3 s limit" in batch.results[0].info["detail"]
  np.testing.assert_array_equal(batch.scores, [0, 0, 1, 0])


def test_bad_rows_and_backends_are_named():
  pool = rewards.RewardPool(verifiers={"arithmetic": arithmetic.verify})
  with pytest.raises(ValueError, match="row 1 has no 'kind'"):
    pool.score([dict(kind="arithmetic", answer="1"), {}], ["", ""], [1, 1])
  with pytest.raises(ValueError, match="unknown reward kind 'vision'"):
    pool.score([dict(kind="vision")], [""], [True])
  with pytest.raises(ValueError, match="no reward model given"):
    pool.score([dict(kind="cot_rm", answer="1")], [""], [True])
  with pytest.raises(ValueError, match="same length"):
    pool.score([dict(kind="arithmetic", answer="1")], ["", ""], [True])
  with pytest.raises(ValueError, match="shadow built-in kinds"):
    rewards.RewardPool(verifiers={"math": arithmetic.verify})
  with pytest.raises(ValueError, match="judges"):
    rewards.RewardPool(judges={"llm": object()})


def test_status_folds_causes():
  R = rewards.RewardResult
  got = [
    R(1.0, True, "ok").status,
    R(0.0, False, "truncated").status,
    R(0.0, False, "multiple_answers").status,
    R(0.0, False, "timeout").status,
    R(0.0, False, "killed").status,
    R(0.0, False, "malformed").status,
  ]
  assert got == [
    "correct",
    "not_finished",
    "wrong_answer",
    "timeout",
    "crash",
    "wrong_answer",
  ]
  assert set(got) == set(rewards.STATUSES)


# ---------------------------------------------------------------------------
# The leaf rule
# ---------------------------------------------------------------------------


def _k15_imports(path: str) -> list[str]:
  """Every k15 module a file imports (anywhere in it, as written)."""
  tree = ast.parse(open(path).read(), path)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        out.append("k15.rewards." + (node.module or ""))
      elif node.module == "k15":
        out += [f"k15.{a.name}" for a in node.names]
      else:
        out.append(node.module or "")
  return [m for m in out if m == "k15" or m.startswith("k15.")]


def test_rewards_is_a_leaf():
  """k15/rewards/ imports only itself from k15: no training, sampling,
  model or stage code (reward models come in through the Judge
  interface)."""
  pkg = os.path.join(ROOT, "k15", "rewards")
  bad = {}
  for name in sorted(os.listdir(pkg)):
    if name.endswith(".py"):
      found = _k15_imports(os.path.join(pkg, name))
      outside = [m for m in found if not m.startswith("k15.rewards")]
      if outside:
        bad[name] = outside
  assert bad == {}
  # the scan sees what it must: a file that imports train would fail it
  assert _k15_imports(os.path.join(ROOT, "k15", "rm.py")).count("k15.model")


def test_importing_rewards_loads_no_jax():
  code = "import sys, k15.rewards; print('jax' in sys.modules)"
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    timeout=120,
  )
  assert out.stdout.strip() == "False", out.stderr[-2000:]
