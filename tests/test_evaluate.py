"""Held-out metrics: the pass@k estimator and the lengths percentile."""

import math

import numpy as np
import pytest

from k15 import evaluate


def test_pass_at_k_matches_hand_values():
  # 4 samples per problem with 0, 1, 2 and 4 correct
  c_PxN = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_allclose(
    evaluate.pass_at_k(c_PxN, 1), [0, 0.25, 0.5, 1]
  )
  # pass@2 = 1 - C(n - c, 2) / C(4, 2): 1 - 6/6, 1 - 3/6, 1 - 1/6, 1
  np.testing.assert_allclose(
    evaluate.pass_at_k(c_PxN, 2), [0, 0.5, 5 / 6, 1]
  )
  np.testing.assert_allclose(evaluate.pass_at_k(c_PxN, 4), [0, 1, 1, 1])
  # k = 1 is the mean fraction correct, the pass@1 evaluate reports
  rng = np.random.default_rng(0)
  x = rng.random((50, 8)) < 0.3
  assert evaluate.pass_at_k(x, 1).mean() == pytest.approx(x.mean())
  # the estimator is the exact chance over draws without replacement
  row = np.array([[1, 0, 0, 1, 0, 0, 0, 0]])
  misses = math.comb(6, 3) / math.comb(8, 3)
  assert evaluate.pass_at_k(row, 3)[0] == pytest.approx(1 - misses)


def test_pass_at_k_needs_enough_samples():
  with pytest.raises(ValueError, match=r"pass@3 needs 1 <= k <= n=2"):
    evaluate.pass_at_k(np.zeros((1, 2)), 3)


def test_eval_config_names_bad_periodic_fields():
  with pytest.raises(ValueError, match="eval.every=-1"):
    evaluate.EvalConfig(every=-1)
  with pytest.raises(ValueError, match="eval.every_problems=-2"):
    evaluate.EvalConfig(every_problems=-2)
