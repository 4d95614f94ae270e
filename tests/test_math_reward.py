"""Math reward: answer extraction, anti-hacking rules, math-verify in worker
processes with a hard timeout, and the worker pool itself."""

import os
import threading
import time

import pytest

from k15.rewards import math as mr
from k15.rewards import workers


@pytest.fixture(scope="module")
def reward():
  fn = mr.MathReward(num_workers=2, timeout_s=20.0)
  yield fn
  fn.close()


def score(fn, answer, response, finished=True):
  return fn([dict(prompt="q", answer=answer)], [response], [finished])[0]


# -- extraction ---------------------------------------------------------------


@pytest.mark.parametrize(
  "response,answer",
  [
    (r"so \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),
    (r"$\boxed{\{1, 2\}}$", r"\{1, 2\}"),
    (r"thus \boxed{{a}^{2}}", r"{a}^{2}"),
    (r"\boxed 5.", "5"),
    ("7+5=2, 2*3=6. answer: 6", "6"),
    ("Final Answer: **12**", "12"),
    ("#### 1,234", "1,234"),
    (r"answer: \boxed{4}", "4"),
    (r"Final answer: it is $\boxed{4}$.", "4"),
    (r"<think>try \boxed{3}?</think> It is \boxed{4}.", "4"),
    (r"\boxed{2} and so, again, \boxed{ 2 }", "2"),
  ],
)
def test_extract(response, answer):
  ex = mr.extract(response)
  assert (ex.cause, ex.answer) == ("ok", answer)


def test_extract_formats_are_selectable():
  assert mr.extract("answer: 3", formats=("boxed",)).cause == "no_answer"
  assert mr.extract(r"\boxed{3}", formats=("answer",)).cause == "no_answer"
  with pytest.raises(ValueError, match="unknown answer formats"):
    mr.extract("x", formats=("latex",))


def test_item_answer_formats_override(reward):
  item = dict(answer="3", answer_formats=["boxed"])
  res = reward([item], ["the answer: 4\nso \\boxed{3}"], [True])[0]
  assert res.cause == "ok"
  res = reward([dict(answer="3")], ["the answer: 4\nso \\boxed{3}"], [True])
  assert res[0].cause == "multiple_answers"


def test_hostile_inputs_are_parsed_in_linear_time():
  # Quadratic scans would take minutes here (these run in the trainer).
  assert mr.extract("\\boxed{" * 20000 + "x").cause == "no_answer"
  assert mr.extract("{" * 100000 + "\\boxed{3}").answer == "3"
  assert mr.extract("\\boxed" + " " * 10**6).cause == "no_answer"


def test_unbalanced_box_marks_nothing():
  assert mr.extract(r"\boxed{\frac{1}{2}").cause == "no_answer"


# -- anti-hacking -------------------------------------------------------------


def test_several_different_answers_score_zero(reward):
  for response in [
    r"\boxed{3} or maybe \boxed{4}",
    "answer: 3\nanswer: 4",
    "#### 3\n" r"\boxed{4}",
  ]:
    res = score(reward, "3", response)
    assert (res.score, res.cause) == (0.0, "multiple_answers"), response


def test_answer_only_in_reasoning_scores_zero(reward):
  for response in [
    r"<think>it is \boxed{3}</think> I am not sure.",
    r"<think>it is \boxed{3} and the budget ran out",
    r"\boxed{3}" + " and then more reasoning" * 30,
  ]:
    res = score(reward, "3", response)
    assert (res.score, res.cause) == (0.0, "answer_in_reasoning"), response


def test_truncated_scores_zero_even_when_right(reward):
  res = score(reward, "3", r"\boxed{3}", finished=False)
  assert (res.score, res.correct, res.cause) == (0.0, False, "truncated")


def test_no_answer(reward):
  assert score(reward, "3", "it is three").cause == "no_answer"


# -- comparison ---------------------------------------------------------------


@pytest.mark.parametrize(
  "gold,response",
  [
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    ("x^2-4", r"\boxed{(x-2)(x+2)}"),
    (r"\{1,2\}", r"\boxed{\{2, 1\}}"),
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}"),
    ("1000", "#### 1,000"),
    ("42", r"<think>long</think>The answer is $\boxed{42}$."),
  ],
)
def test_equivalent_answers(reward, gold, response):
  res = score(reward, gold, response)
  assert res.correct and res.score == 1.0 and res.cause == "ok", res


def test_wrong_answer(reward):
  res = score(reward, r"\frac{1}{2}", r"\boxed{0.25}")
  assert (res.score, res.cause) == (0.0, "wrong_answer")
  assert res.info["by"] == "math_verify"


def test_exact_fast_path_skips_the_pool():
  fn = mr.MathReward(exact_only=True)
  out = fn(
    [dict(answer="8"), dict(answer=r"\frac{1}{2}"), dict(answer="3")],
    ["answer: 8", r"\boxed{0.5}", r"\boxed{3.0}"],
    [True, True, True],
  )
  assert [r.cause for r in out] == ["ok", "wrong_answer", "ok"]
  assert fn._pool is None  # no worker was ever started


def test_works_from_a_thread(reward):
  # math-verify's signal.alarm fails off the main thread; ours runs it in
  # worker processes, so a trainer thread gets real verdicts.
  from math_verify import parse, verify

  errors = []

  def in_thread():
    try:
      verify(parse("$1/2$"), parse("$0.5$"))
    except ValueError as e:
      errors.append(e)

  t = threading.Thread(target=in_thread)
  t.start()
  t.join()
  assert errors and "thread" in str(errors[0])

  out = []
  t = threading.Thread(
    target=lambda: out.append(score(reward, "1/2", "#### 0.5"))
  )
  t.start()
  t.join()
  assert out[0].correct


def test_verifier_timeout_scores_zero_and_batch_goes_on():
  fn = mr.MathReward(num_workers=2, timeout_s=1.0)
  try:
    t0 = time.monotonic()
    out = fn(
      [dict(answer="9^{9^{9^{9}}}"), dict(answer=r"\frac{1}{3}")],
      [r"\boxed{9^{9^{9^{10}}}}", r"\boxed{2/6}"],
      [True, True],
    )
    assert time.monotonic() - t0 < 15
    assert [r.cause for r in out] == ["timeout", "ok"]
    assert out[0].score == 0.0
    assert fn.pool.restarts == 1
    # The replaced worker serves the next batch.
    assert fn([dict(answer="2")], [r"\boxed{4/2}"], [True])[0].correct
  finally:
    fn.close()


def test_length_mismatch_is_an_error(reward):
  with pytest.raises(ValueError, match="same length"):
    reward([dict(answer="1")], ["a", "b"], [True, True])


# -- worker pool --------------------------------------------------------------


def test_worker_pool_timeout_crash_error():
  with workers.WorkerPool(time.sleep, 2) as pool:
    t0 = time.monotonic()
    out = pool.map([0.0, 60.0, 0.0, 0.0], timeout_s=1.0)
    assert [o.cause for o in out] == ["ok", "timeout", "ok", "ok"]
    assert time.monotonic() - t0 < 10
  with workers.WorkerPool(os._exit, 1) as pool:
    assert [o.cause for o in pool.map([3, 4], timeout_s=5.0)] == [
      "crash",
      "crash",
    ]
  with workers.WorkerPool(int, 1) as pool:
    out = pool.map(["12", "x"], timeout_s=5.0)
    assert out[0].value == 12 and out[1].cause == "error"
    assert "ValueError" in out[1].detail


def test_worker_pool_rejects_unpicklable_fn():
  with pytest.raises(Exception, match="pickle|local"):
    workers.WorkerPool(lambda x: x)


def test_worker_pool_reports_workers_that_cannot_start():
  with workers.WorkerPool(int, 1, preload=["k15_no_such_module"]) as pool:
    with pytest.raises(RuntimeError, match="start-up"):
      pool.map(["1"], timeout_s=5.0)
