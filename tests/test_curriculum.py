"""k15.curriculum: draw frequencies, curriculum switch, determinism, state."""

import numpy as np
import pytest

from k15 import curriculum
from k15.curriculum import PromptSampler, SamplerConfig


def _chi2(counts_N: np.ndarray, expected_N: np.ndarray) -> float:
  keep = expected_N > 0
  assert counts_N[~keep].sum() == 0, "drew an item with probability 0"
  return float(((counts_N - expected_N)[keep] ** 2 / expected_N[keep]).sum())


def _chi2_bound(df: int) -> float:
  # mean df, sd sqrt(2 df): 5 sd is far beyond p = 1e-4 for these df.
  return df + 5 * np.sqrt(2 * df)


def _counts(sampler, iterations, n):
  counts_N = np.zeros(sampler.num_problems)
  for it in iterations:
    idx = sampler.sample(it, n)
    assert idx.shape == (n,)
    if n <= (sampler.probabilities(it) > 0).sum():
      assert len(set(idx.tolist())) == n, "repeat within a batch"
    np.add.at(counts_N, idx, 1)
  return counts_N


def _prioritized_sampler(strategy="prioritized", **kw):
  # s = [0, .25, .5, 1 (solved), unseen (prior .5), 1/3]
  difficulty = np.array([0, 0, 1, 1, 2, 2])
  s = PromptSampler(difficulty, SamplerConfig(strategy=strategy, **kw), 7)
  s.update(
    np.array([0, 1, 2, 3, 5]),
    [[0, 0], [1, 0, 0, 0], [1, 0], [1, 1, 1], [0, 1, 0]],
  )
  return s


def test_uniform_frequencies_and_no_repeats():
  s = PromptSampler(np.zeros(10, int), SamplerConfig(), seed=3)
  counts = _counts(s, range(3000), 4)
  assert _chi2(counts, np.full(10, 3000 * 4 / 10)) < _chi2_bound(9)


def test_success_rates_running_mean_with_prior():
  s = _prioritized_sampler()
  np.testing.assert_allclose(s.success_rates(), [0, 0.25, 0.5, 1, 0.5, 1 / 3])
  s.update(np.array([0]), [np.array([1.0, 1.0])])  # 2 of 4 now
  assert s.success_rates()[0] == 0.5


def test_success_rates_ema():
  s = PromptSampler(np.zeros(3, int), SamplerConfig(ema=0.5, prior=0.2), 0)
  s.update(np.array([0, 0]), [[1, 1, 0], [0, 0, 0]])
  # first group sets 2/3; then .5 * 2/3 + .5 * 0.
  np.testing.assert_allclose(s.success_rates(), [1 / 3, 0.2, 0.2])


def test_prioritized_target_distribution():
  s = _prioritized_sampler(floor=0.05)
  # max(1 - s, floor) = [1, .75, .5, .05, .5, 2/3]
  w = np.array([1, 0.75, 0.5, 0.05, 0.5, 2 / 3])
  np.testing.assert_allclose(s.probabilities(0), w / w.sum())
  counts = _counts(s, range(20000), 1)
  assert _chi2(counts, 20000 * w / w.sum()) < _chi2_bound(5)
  assert counts[3] > 0  # solved problems are still revisited


def test_prioritized_batches_without_replacement_hit_inclusion_probs():
  s = _prioritized_sampler(floor=0.05)
  n, draws = 3, 8000
  pi = curriculum.inclusion_probs(s.probabilities(0), n)
  np.testing.assert_allclose(pi.sum(), n)
  assert pi.max() <= 1.0
  counts = _counts(s, range(draws), n)
  # Each item is Bernoulli(pi_i) per draw: standardised error small.
  z = (counts - draws * pi) / np.sqrt(draws * pi * (1 - pi) + 1e-9)
  assert np.abs(z).max() < 4.5, z


def test_inclusion_probs_cap_at_one():
  pi = curriculum.inclusion_probs(np.array([0.7, 0.1, 0.1, 0.1]), 2)
  np.testing.assert_allclose(pi, [1, 1 / 3, 1 / 3, 1 / 3])
  pi = curriculum.inclusion_probs(np.array([0.5, 0.3, 0.2, 0.0]), 3)
  np.testing.assert_allclose(pi, [1, 1, 1, 0])


def test_curriculum_switches_at_transition_iter():
  difficulty = np.array([0, 0, 0, 1, 1, 2])
  cfg = SamplerConfig(strategy="curriculum", transition_iter=24, hard_min=1)
  s = PromptSampler(difficulty, cfg, seed=0)
  assert s.eligible(23).all()
  np.testing.assert_array_equal(s.eligible(24), difficulty >= 1)
  before = np.concatenate([s.sample(it, 3) for it in range(24)])
  assert (difficulty[before] == 0).any()
  after = np.concatenate([s.sample(it, 3) for it in range(24, 44)])
  assert (difficulty[after] >= 1).all()
  # Exactly the hard set, each once, when n equals its size.
  assert sorted(s.sample(30, 3).tolist()) == [3, 4, 5]
  assert s.metrics()["eligible"] == 3 and s.metrics()["hard_frac"] == 1.0


def test_curriculum_before_switch_is_uniform_over_mixed_set():
  difficulty = np.array([0, 0, 0, 1, 1, 2])
  cfg = SamplerConfig(strategy="curriculum", transition_iter=10**6)
  s = PromptSampler(difficulty, cfg, seed=1)
  counts = _counts(s, range(4000), 2)
  assert _chi2(counts, np.full(6, 4000 * 2 / 6)) < _chi2_bound(5)


def test_multistage_schedule():
  difficulty = np.array([0, 1, 2, 3])
  stages = ((5, 0), (10, 1), (20, 3))
  s = PromptSampler(
    difficulty, SamplerConfig(strategy="curriculum", stages=stages), 0
  )
  assert s.eligible(4).all()  # whole set before the first stage
  for it, cap in ((5, 0), (9, 0), (10, 1), (19, 1), (20, 3), (99, 3)):
    np.testing.assert_array_equal(s.eligible(it), difficulty <= cap)
  assert (difficulty[s.sample(12, 2)] <= 1).all()


def test_curriculum_plus_prioritized_weights_within_eligible_set():
  s = _prioritized_sampler(
    "curriculum+prioritized", transition_iter=5, hard_min=1, floor=0.05
  )
  w = np.array([1, 0.75, 0.5, 0.05, 0.5, 2 / 3])
  np.testing.assert_allclose(s.probabilities(0), w / w.sum())
  hard = np.array([0, 0, 1, 1, 1, 1.0])
  np.testing.assert_allclose(s.probabilities(5), w * hard / (w * hard).sum())
  counts = _counts(s, range(5, 15005), 1)
  expected = 15000 * w * hard / (w * hard).sum()
  assert _chi2(counts, expected) < _chi2_bound(3)


def test_more_draws_than_eligible_fall_back_to_replacement():
  difficulty = np.array([0, 0, 1])
  cfg = SamplerConfig(strategy="curriculum", transition_iter=0)
  idx = PromptSampler(difficulty, cfg, 0).sample(3, 5)
  assert idx.shape == (5,) and (idx == 2).all()


def test_deterministic_per_seed_and_iteration():
  a, b = _prioritized_sampler(), _prioritized_sampler()
  for it in (0, 1, 17):
    np.testing.assert_array_equal(a.sample(it, 3), b.sample(it, 3))
  # Order of calls does not matter: the rng comes from (seed, iteration).
  np.testing.assert_array_equal(a.sample(17, 3), b.sample(17, 3))
  draws = {tuple(a.sample(it, 3)) for it in range(20)}
  assert len(draws) > 5
  # A second draw within one iteration uses its own stream.
  np.testing.assert_array_equal(
    a.sample(3, 3, stream=1), b.sample(3, 3, stream=1)
  )
  assert any(
    (a.sample(it, 3, stream=1) != a.sample(it, 3)).any() for it in range(10)
  )
  other = PromptSampler(a.difficulty_N, a.cfg, seed=8)
  other.load_state_dict(a.state_dict())
  assert any((other.sample(it, 3) != a.sample(it, 3)).any() for it in range(10))


def test_state_round_trip_resumes_identical_draws():
  a = _prioritized_sampler(ema=0.3)
  state = a.state_dict()
  b = PromptSampler(a.difficulty_N, a.cfg, seed=7)
  b.load_state_dict({k: v.copy() for k, v in state.items()})
  np.testing.assert_array_equal(a.success_rates(), b.success_rates())
  for it in range(5):
    np.testing.assert_array_equal(a.sample(it, 4), b.sample(it, 4))
  # state_dict is a copy: mutating it does not touch the sampler.
  state["count_N"][:] = 0
  assert a.state_dict()["count_N"].sum() > 0
  assert a.metrics()["seen_frac"] == pytest.approx(5 / 6)


def test_bad_state_and_config_are_named():
  s = _prioritized_sampler()
  bad = s.state_dict()
  bad["success_N"] = np.zeros(3)
  with pytest.raises(ValueError, match="success_N"):
    s.load_state_dict(bad)
  with pytest.raises(KeyError, match="ema_N"):
    s.load_state_dict({"count_N": bad["count_N"], "success_N": np.zeros(6)})
  with pytest.raises(ValueError, match="strategy"):
    SamplerConfig(strategy="hardest")
  with pytest.raises(ValueError, match="stages"):
    SamplerConfig(stages=((10, 1), (5, 2)))
  with pytest.raises(ValueError, match="no problem is eligible"):
    PromptSampler(np.zeros(4, int), SamplerConfig(strategy="curriculum"), 0)
  with pytest.raises(ValueError, match="reward"):
    s.update(np.array([0, 1]), [[1]])


def test_balance_draws_every_difficulty_equally_often():
  # 1 problem of difficulty 0, 3 of 1, 6 of 2: each label gets 1/3
  difficulty = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
  s = PromptSampler(difficulty, SamplerConfig(balance=True), seed=0)
  want = np.array([1 / 3] + [1 / 9] * 3 + [1 / 18] * 6)
  np.testing.assert_allclose(s.probabilities(0), want)
  counts = _counts(s, range(6000), 2)
  assert _chi2(counts, 6000 * 2 * want) < _chi2_bound(9)
  # within a curriculum's eligible set: labels 1 and 2 get half each
  s = PromptSampler(
    difficulty,
    SamplerConfig(strategy="curriculum", transition_iter=0, hard_min=1,
                  balance=True),
    seed=0,
  )
  np.testing.assert_allclose(
    s.probabilities(0), [0] + [1 / 6] * 3 + [1 / 12] * 6
  )
