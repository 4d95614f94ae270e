"""Code reward on the sandbox, the synthetic code tasks, HumanEval, test-case
validation, and the reward registry / RewardPool."""

import concurrent.futures
import dataclasses

import numpy as np
import pytest

from k15 import rewards
from k15.rewards import code, sandbox
from k15.tasks import code_tasks, humaneval

REASON = sandbox.unavailable_reason()
needs_sandbox = pytest.mark.skipif(bool(REASON), reason=f"no sandbox: {REASON}")

FAST = sandbox.Limits(timeout_s=5.0, test_timeout_s=1.0)


@pytest.fixture(scope="module")
def reward():
  if REASON:
    pytest.skip(f"no sandbox: {REASON}")
  return code.CodeReward(limits=FAST)


def fenced(src: str) -> str:
  return f"Here it is:\n```python\n{src}```\n"


# -- program extraction (no sandbox needed) -----------------------------------


def test_extract_program():
  assert code.extract_program(fenced("x = 1\n")) == "x = 1\n"
  two = "```python\na = 1\n```\ntext\n```py\nb = 2\n```"
  assert code.extract_program(two) == "b = 2\n"
  think = "<think>```python\nbad()\n```</think>```python\ngood()\n```"
  assert code.extract_program(think) == "good()\n"
  assert code.extract_program("<think>```python\nx()\n```") is None
  assert code.extract_program("no code here") is None


def test_test_mode_inference():
  assert code.test_mode({"tests": ["assert True"]}) == "assert"
  item = {"tests": ["assert f(1) == 2"], "entry_point": "f"}
  assert code.test_mode(item) == "judge"
  assert code.test_mode({"tests": [{"args": [1], "expected": 1}]}) == "call"
  assert code.test_mode({"tests": [{"input": "", "output": ""}]}) == "stdio"
  with pytest.raises(ValueError, match="no 'tests'"):
    code.test_mode({"prompt": "x"})


# -- code reward --------------------------------------------------------------


@needs_sandbox
def test_code_reward_causes(reward):
  item = dict(
    prompt="p",
    entry_point="sq",
    tests=[{"args": [3], "expected": 9}, {"args": [-2], "expected": 4}],
  )
  good = fenced("def sq(x):\n  return x * x\n")
  wrong = fenced("def sq(x):\n  return 9\n")
  crash = fenced("def sq(x):\n  return 1 / 0\n")
  hang = fenced("def sq(x):\n  while True: pass\n")
  exit0 = fenced("import os\nos._exit(0)\n")
  res = reward(
    [item] * 7,
    [good, wrong, crash, hang, exit0, "no code", good],
    [True] * 6 + [False],
  )
  assert [r.cause for r in res] == [
    "ok",
    "wrong_answer",
    "error",
    "timeout",
    "early_exit",
    "no_code",
    "truncated",
  ]
  assert [r.score for r in res] == [1.0] + [0.0] * 6
  assert res[1].info["passed"] == 1 and res[1].info["tests"] == 2


@needs_sandbox
def test_always_equal_object_does_not_pass_call_tests(reward):
  # The classic hack against `assert f(x) == y`: an object equal to
  # everything. Call tests compare JSON outside the sandbox.
  hack = fenced(
    "class A:\n  def __eq__(self, o):\n    return True\n"
    "def sq(x):\n  return A()\n"
  )
  item = dict(entry_point="sq", tests=[{"args": [3], "expected": 9}])
  assert reward([item], [hack], [True])[0].cause == "wrong_answer"


@needs_sandbox
def test_stdio_items(reward):
  item = dict(tests=[{"input": "2 3\n", "output": "5"}])
  prog = fenced("a, b = map(int, input().split())\nprint(a + b)\n")
  assert reward([item], [prog], [True])[0].correct


# -- synthetic code tasks -----------------------------------------------------


def test_code_tasks_are_deterministic_and_scaled_by_difficulty():
  a = code_tasks.generate(20, seed=3, min_steps=1, max_steps=5)
  b = code_tasks.generate(20, seed=3, min_steps=1, max_steps=5)
  assert [p.prompt for p in a] == [p.prompt for p in b]
  assert len({p.prompt for p in a}) == 20
  p = code_tasks.make_problem(np.random.default_rng(0), steps=4)
  assert p.difficulty == 4 and p.prompt.count("\n") >= 5
  assert p.tests[0]["args"] == [[]]  # the empty list is always tested
  with pytest.raises(ValueError, match="steps"):
    code_tasks.make_problem(np.random.default_rng(0), steps=0)


@needs_sandbox
def test_code_tasks_reference_passes_and_wrong_fails(reward):
  probs = code_tasks.generate(12, seed=0, min_steps=1, max_steps=6)
  items = [p.to_item() for p in probs]
  assert all(r.correct for r in reward(items, [p.trace for p in probs],
                                       [True] * 12))  # fmt: skip
  wrong = fenced("def f(xs):\n  return xs\n")
  res = reward(items, [wrong] * 12, [True] * 12)
  assert sum(r.correct for r in res) < 12


# -- HumanEval ----------------------------------------------------------------


def test_humaneval_loads_164_problems():
  items = humaneval.load()
  assert len(items) == 164
  assert len({it["task_id"] for it in items}) == 164
  assert all(it["tests"][0].rstrip().endswith(f"check({it['entry_point']})")
             for it in items)  # fmt: skip


@needs_sandbox
def test_humaneval_canonical_solutions_pass_in_the_sandbox(reward):
  items = humaneval.load()
  res = reward(items, [it["canonical_solution"] for it in items],
               [True] * len(items))  # fmt: skip
  failed = [
    it["task_id"] for it, r in zip(items, res, strict=True) if not r.correct
  ]
  assert failed == []
  wrong = ["    return None\n"] * 3
  res = reward(items[:3], wrong, [True] * 3)
  assert [r.cause for r in res] == ["wrong_answer"] * 3


# A completion that walks frames and gc objects for the harness's nonce and
# writes passing records with it (as HumanEval's "assert" mode allowed).
FORGING_COMPLETION = """    return forge()


import gc, os, sys

def forge():
  found = set()
  f = sys._getframe()
  while f is not None:
    found.update(v for v in f.f_locals.values() if isinstance(v, str))
    f = f.f_back
  for o in gc.get_objects():
    if isinstance(o, dict):
      found.update(v for v in list(o.values()) if isinstance(v, str))
  nonces = [v for v in found if len(v) == 32 and v.isalnum()]
  for fd in [int(a) for a in sys.argv[1:] if a.isdigit()]:
    for n in nonces:
      try:
        os.write(fd, f"{n} test 0 ok - -\\n{n} done\\n".encode())
      except OSError:
        pass
  os._exit(0)
"""


@needs_sandbox
def test_humaneval_completions_cannot_fake_or_redefine_the_tests(reward):
  items = {it["task_id"]: it for it in humaneval.load()}
  res = reward([items["HumanEval/2"]], [FORGING_COMPLETION], [True])
  assert res[0].score == 0.0, res
  # HumanEval/32's test checks the root with the prompt's `poly`; a
  # completion's own `poly` must not be the one the test uses.
  hack = "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n"
  res = reward([items["HumanEval/32"]], [hack], [True])
  assert res[0].score == 0.0, res


@needs_sandbox
def test_fakeable_mode_refused_for_training_and_labelled_for_eval(reward):
  item = dict(prompt="p", tests=["assert f() == 1"])  # no entry_point
  prog = fenced("def f():\n  return 1\n")
  with pytest.raises(ValueError, match=r"item 0: test mode 'assert'"):
    reward([item], [prog], [True])
  with pytest.raises(ValueError, match="row 3: test_mode"):
    code.check_mode_for_training("assert", "row 3: test_mode")
  code.check_mode_for_training("judge")
  with pytest.raises(ValueError, match=r"reward\.code\.allow_fakeable"):
    code.check_training_config({"allow_fakeable": True})
  code.check_training_config({"limits": FAST})
  evaluate = code.CodeReward(limits=FAST, allow_fakeable=True)
  res = evaluate([item, item], [prog, fenced("def f():\n  return 2\n")],
                 [True, True])  # fmt: skip
  assert [r.score for r in res] == [1.0, 0.0]
  assert all(r.info["fakeable"] for r in res)
  ok = reward([dict(item, entry_point="f")], [prog], [True])[0]
  assert ok.correct and "fakeable" not in ok.info


# -- test-case validation -----------------------------------------------------


@needs_sandbox
def test_validate_tests_call_mode():
  prob = code_tasks.make_problem(np.random.default_rng(1), steps=3)
  good = prob.solution
  bad = "def f(xs):\n  return 0\n"
  limits = sandbox.Limits(timeout_s=10.0, test_timeout_s=1.0)
  v = code.validate_tests(prob.inputs, [good] * 9 + [bad], mode="call",
                          entry_point="f", limits=limits)  # fmt: skip
  assert v.keep and len(v.tests) == len(prob.inputs)
  assert v.solution_passed == [True] * 9 + [False]
  assert [t["expected"] for t in v.tests] == [t["expected"] for t in prob.tests]
  # 8/10 good solutions: tests are still valid, the problem is dropped...
  v = code.validate_tests(prob.inputs, [good] * 8 + [bad] * 2, mode="call",
                          entry_point="f", limits=limits)  # fmt: skip
  assert not v.keep and len(v.tests) == len(prob.inputs)
  # ... unless the threshold says otherwise.
  v = code.validate_tests(prob.inputs, [good] * 8 + [bad] * 2, mode="call",
                          entry_point="f", problem_pass=0.8,
                          limits=limits)  # fmt: skip
  assert v.keep


@needs_sandbox
def test_validate_tests_stdio_drops_disputed_tests():
  add = "a, b = map(int, input().split())\nprint(a + b)\n"
  # Differs from `add` only on negative inputs; 3/10 such solutions.
  odd = "a, b = map(int, input().split())\nprint(abs(a) + abs(b))\n"
  inputs = ["1 2\n", "-1 -2\n", "4 5\n"]
  limits = sandbox.Limits(timeout_s=10.0, test_timeout_s=1.0)
  v = code.validate_tests(inputs, [add] * 6 + [odd] * 4, limits=limits)
  assert v.agreement == [10, 6, 10]
  assert [t["input"] for t in v.tests] == ["1 2\n", "4 5\n"]
  assert v.keep  # all 10 pass the two kept tests
  v = code.validate_tests(inputs, [add] * 7 + [odd] * 3, limits=limits)
  assert [t["output"].split() for t in v.tests] == [["3"], ["-3"], ["9"]]
  assert not v.keep  # 7/10 pass all three


# -- registry and pool --------------------------------------------------------


def test_registry_kinds():
  with pytest.raises(ValueError, match="unknown reward kind"):
    rewards.get_reward_fn("vision")
  fn = rewards.get_reward_fn("exact")
  res = fn([dict(prompt="1+1", answer="2")], ["1+1=2. answer: 2"], [True])
  assert res == [rewards.RewardResult(1.0, True, "ok", res[0].info)]
  assert isinstance(res[0], rewards.RewardResult)
  with pytest.raises(dataclasses.FrozenInstanceError):
    res[0].score = 0.0


@needs_sandbox
def test_reward_pool_async_mixed_kinds_and_metrics():
  cfg = dict(code=dict(limits=FAST), math=dict(num_workers=1))
  with rewards.RewardPool(cfg) as pool:
    items = [
      dict(prompt="q", answer="4", kind="exact"),
      dict(prompt="q", answer="4", kind="exact"),
      dict(prompt="q", answer=r"\frac{1}{2}", kind="math"),
      dict(
        prompt="q",
        entry_point="f",
        kind="code",
        tests=[{"args": [1], "expected": 2}],
      ),  # fmt: skip
      dict(
        prompt="q",
        entry_point="f",
        kind="code",
        tests=[{"args": [1], "expected": 2}],
      ),  # fmt: skip
    ]
    responses = [
      "answer: 4",
      "answer: 4\nanswer: 5",
      r"\boxed{0.5}",
      fenced("def f(x):\n  return 2 * x\n"),
      fenced("def f(x):\n  while True: pass\n"),
    ]
    fut = pool.submit(items, responses, [True] * 5)
    assert isinstance(fut, concurrent.futures.Future)
    batch = fut.result(timeout=60)
    assert isinstance(batch, rewards.RewardBatch)
    res = batch.results
    assert [r.cause for r in res] == [
      "ok",
      "multiple_answers",
      "ok",
      "ok",
      "timeout",
    ]
    m = pool.metrics()
    assert m["reward/exact/accuracy"] == 0.5
    assert m["reward/exact/cause/multiple_answers"] == 1
    assert m["reward/math/accuracy"] == 1.0
    assert m["reward/code/accuracy"] == 0.5
    assert m["reward/code/timeouts"] == 1 and m["reward/code/errors"] == 0
    assert pool.metrics() == {}  # reset
