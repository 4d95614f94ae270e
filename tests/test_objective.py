"""k15.objective: losses against hand values, Eq. 3, length reward tables."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import objective

# ----------------------------------------------------------------------------
# A tiny batch: 2 real rows + 1 padding row (sample weight 0), T = 3.
#   row 0: mask [1, 1, 0], logp [-1, -2], ref [-1.5, -2]  -> s = -3,  rho = 0.5
#   row 1: mask [1, 1, 1], logp [-.5, -.5, -1], ref -1s   -> s = -2,  rho = 1
# Masked / padding positions hold junk (-inf) that must not leak.
# ----------------------------------------------------------------------------


def _tiny_batch(advantages_B):
  inf = -jnp.inf
  logp = jnp.array([[-1.0, -2.0, inf], [-0.5, -0.5, -1.0], [inf, inf, inf]])
  batch = dict(
    loss_mask_BxT=jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], jnp.float32),
    ref_logp_BxT=jnp.array([[-1.5, -2.0, inf], [-1.0, -1.0, -1.0], [0, 0, 0]]),
    behaviour_logp_BxT=jnp.array(
      [[-1.2, -2.0, inf], [-0.5, -0.2, -1.0], [0, 0, 0]]
    ),
    advantages_B=jnp.array(advantages_B, jnp.float32),
    sample_weight_B=jnp.array([1.0, 1.0, 0.0]),
  )
  return logp, batch


def _loss(logp, batch, kind="mirror_descent", **kw):
  fn = jax.jit(objective.loss, static_argnames="cfg")
  return fn(logp, batch, cfg=objective.LossConfig(loss=kind, **kw))


def test_mirror_descent_hand_value_and_metrics():
  logp, batch = _tiny_batch([1.0, -0.5, 7.0])
  value, m = _loss(logp, batch, kind="mirror_descent", tau=0.5)
  # (A - tau rho)^2 / (2 tau): (1 - .25)^2 / 1 and (-.5 - .5)^2 / 1.
  np.testing.assert_allclose(value, (0.5625 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["loss"], value)
  np.testing.assert_allclose(m["rho_abs"], 0.75, rtol=1e-6)
  np.testing.assert_allclose(m["rho_sq"], (0.25 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["advantage"], 0.25, rtol=1e-6)
  np.testing.assert_allclose(m["entropy_proxy"], 5.0 / 5, rtol=1e-6)
  np.testing.assert_allclose(m["token_frac"], 5.0 / 6, rtol=1e-6)


def test_mirror_descent_length_normalised_hand_value():
  logp, batch = _tiny_batch([1.0, -0.5, 7.0])
  value, m = _loss(
    logp, batch, kind="mirror_descent", tau=0.5, normalize_length=True
  )
  # Token means: rho0 = -1.5 - -1.75 = .25, rho1 = -2/3 - -1 = 1/3.
  expected = ((1 - 0.125) ** 2 + (-0.5 - 1 / 6) ** 2) / 2
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(m["rho_abs"], (0.25 + 1 / 3) / 2, rtol=1e-6)


def test_reinforce_hand_value():
  logp, batch = _tiny_batch([1.0, -0.5, 7.0])
  value, _ = _loss(logp, batch, kind="reinforce")
  np.testing.assert_allclose(value, (-1.0 * -3.0 + 0.5 * -2.0) / 2, rtol=1e-6)


def test_rest_hand_value_ignores_padding_and_negatives():
  # Row 0 selected; row 1 not; the padding row's weight 1 must not count.
  logp, batch = _tiny_batch([1.0, 0.0, 1.0])
  value, m = _loss(logp, batch, kind="rest")
  np.testing.assert_allclose(value, 3.0, rtol=1e-6)
  np.testing.assert_allclose(m["selected"], 1.0)
  # No selection at all: zero loss, zero gradient, no nan.
  logp, batch = _tiny_batch([0.0, 0.0, 1.0])
  g = jax.grad(lambda lp: _loss(lp, batch, kind="rest")[0])(logp)
  np.testing.assert_allclose(_loss(logp, batch, kind="rest")[0], 0.0)
  assert not np.isnan(np.asarray(g)).any()


def test_grpo_hand_value_clip_and_kl():
  logp, batch = _tiny_batch([1.0, -0.5, 7.0])
  value, m = _loss(logp, batch, kind="grpo", clip_eps=0.2)
  # Row 0 (A = 1): ratios e^.2 = 1.221 (clipped to 1.2) and 1 -> -(1.2+1)/2.
  # Row 1 (A = -.5): ratios 1, e^-.3 = .741 (min picks clip .8), 1
  #   -> (.5 + .4 + .5) / 3.
  row0, row1 = -(1.2 + 1.0) / 2, (0.5 + 0.4 + 0.5) / 3
  np.testing.assert_allclose(value, (row0 + row1) / 2, rtol=1e-5)
  np.testing.assert_allclose(m["clip_frac"], 2 / 5, rtol=1e-6)
  value_kl, _ = _loss(logp, batch, kind="grpo", clip_eps=0.2, kl_coef=0.1)
  k3 = math.exp(-0.5) + 0.5 - 1  # d = ref - logp = -.5
  kl = ((k3 + 0) / 2 + (k3 + k3 + 0) / 3) / 2
  np.testing.assert_allclose(value_kl, value + 0.1 * kl, rtol=1e-5)


def test_loss_and_grad_finite_with_junk_in_masked_positions():
  logp, batch = _tiny_batch([1.0, -0.5, 7.0])
  for kind in objective.KINDS:
    g = jax.grad(lambda lp, k=kind: _loss(lp, batch, kind=k, kl_coef=0.1)[0])(
      logp
    )
    assert np.isfinite(np.asarray(g)).all(), kind
    np.testing.assert_array_equal(np.asarray(g)[2], 0.0)  # padding row
    assert np.asarray(g)[0, 2] == 0.0  # masked token


def test_loss_config_rejects_bad_fields():
  with pytest.raises(ValueError, match=r"rl\.loss"):
    objective.LossConfig(loss="ppo")
  with pytest.raises(ValueError, match=r"rl\.tau"):
    objective.LossConfig(tau=0.0)
  with pytest.raises(ValueError, match=r"rl\.baseline"):
    objective.LossConfig(baseline="median")


# ----------------------------------------------------------------------------
# Eq. 3 on a tiny linear-softmax policy: token t of row b has logits
# phi[b, t] @ W, so grad_W log pi(y_b) = sum_t phi[b,t] (onehot(y_bt) - p_bt)^T
# in closed form, independent of the loss code.
# ----------------------------------------------------------------------------

P, K, T, D, V = 2, 3, 4, 3, 5


def _policy_problem():
  rng = np.random.default_rng(0)
  phi_BxTxD = rng.normal(size=(P * K, T, D)).astype(np.float32)
  tok_BxT = rng.integers(0, V, size=(P * K, T))
  mask_BxT = np.ones((P * K, T), np.float32)
  mask_BxT[0, 3] = mask_BxT[4, 2:] = 0.0  # ragged responses
  rewards_PxK = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  w0_DxV = rng.normal(size=(D, V)).astype(np.float32) * 0.5
  return phi_BxTxD, tok_BxT, mask_BxT, rewards_PxK, w0_DxV


def _logp(w_DxV, phi_BxTxD, tok_BxT):
  logits_BxTxV = jnp.einsum("btd,dv->btv", phi_BxTxD, w_DxV)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  return jnp.take_along_axis(logp_BxTxV, tok_BxT[..., None], -1)[..., 0]


def _eq3_by_hand(w_DxV, w_ref_DxV, phi, tok, mask, adv_B, tau):
  """Eq. 3 averaged over prompts, in float64 numpy, from closed forms."""
  w, w_ref = np.float64(w_DxV), np.float64(w_ref_DxV)

  def seq_logp_and_grad(w):
    logits = np.einsum("btd,dv->btv", phi, w)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(V)[tok]
    logp_tok = np.log(np.take_along_axis(p, tok[..., None], -1)[..., 0])
    grad_BxDxV = np.einsum("bt,btd,btv->bdv", mask, phi, onehot - p)
    return (mask * logp_tok).sum(-1), grad_BxDxV

  s_B, g_BxDxV = seq_logp_and_grad(w)
  s_ref_B, _ = seq_logp_and_grad(w_ref)
  rho_B = s_B - s_ref_B
  # (1/k) sum_j [ g_j A_j - (tau/2) grad rho_j^2 ], grad rho^2 = 2 rho g.
  per_sample = g_BxDxV * (adv_B - tau * rho_B)[:, None, None]
  eq3_PxDxV = per_sample.reshape(P, K, D, V).mean(axis=1)
  return eq3_PxDxV.mean(axis=0), rho_B


def _md_batch(w_ref, phi, tok, mask, adv_B):
  return dict(
    loss_mask_BxT=jnp.asarray(mask),
    ref_logp_BxT=_logp(w_ref, phi, tok),
    behaviour_logp_BxT=_logp(w_ref, phi, tok),
    advantages_B=jnp.asarray(adv_B),
  )


def test_mirror_descent_gradient_is_minus_eq3_after_several_steps():
  phi, tok, mask, rewards_PxK, w0 = _policy_problem()
  adv_PxK = objective.advantages(
    rewards_PxK,
    rewards_PxK > 0,
    np.ones_like(rewards_PxK),
    kind="mirror_descent",
  )
  np.testing.assert_allclose(
    adv_PxK, rewards_PxK - rewards_PxK.mean(1, keepdims=True), rtol=1e-6
  )
  adv_B = adv_PxK.reshape(-1)
  tau = 0.3
  cfg = objective.LossConfig(loss="mirror_descent", tau=tau)
  batch = _md_batch(w0, phi, tok, mask, adv_B)
  loss_fn = lambda w: objective.loss(_logp(w, phi, tok), batch, cfg=cfg)[0]
  grad_fn = jax.jit(jax.grad(loss_fn))
  w = jnp.asarray(w0)
  for step in range(4):
    g = grad_fn(w)
    eq3, rho_B = _eq3_by_hand(w, w0, phi, tok, mask, adv_B, tau)
    if step == 0:
      np.testing.assert_allclose(rho_B, 0.0, atol=1e-5)
    np.testing.assert_allclose(g, -eq3, rtol=2e-4, atol=2e-6)
    w = w - 0.5 * g
  assert np.abs(rho_B).max() > 0.05  # the tau term was really exercised


def test_first_step_mirror_descent_equals_reinforce_mean_baseline():
  phi, tok, mask, rewards_PxK, w0 = _policy_problem()
  adv_B = objective.advantages(
    rewards_PxK, rewards_PxK > 0, np.ones_like(rewards_PxK), kind="reinforce"
  ).reshape(-1)
  batch = _md_batch(w0, phi, tok, mask, adv_B)

  def grad(kind, **kw):
    cfg = objective.LossConfig(loss=kind, **kw)
    fn = lambda w: objective.loss(_logp(w, phi, tok), batch, cfg=cfg)[0]
    return jax.grad(fn)(jnp.asarray(w0))

  g_rf = grad(kind="reinforce")
  for tau in (0.01, 0.3, 5.0):
    np.testing.assert_allclose(
      grad(kind="mirror_descent", tau=tau), g_rf, rtol=1e-5, atol=1e-7
    )


# ----------------------------------------------------------------------------
# Advantages and baselines.
# ----------------------------------------------------------------------------


def test_logmeanexp_baseline_values_and_limits():
  r_PxK = np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
  b = objective.logmeanexp_baseline(r_PxK, tau=1.0)
  np.testing.assert_allclose(b, [math.log((1 + math.e) / 2), 0.0, 1.0])
  # tau -> inf: the mean (the report's justification for rbar).
  r_PxK = np.array([[0.0, 1.0, 1.0, 0.0, 1.0], [0.2, 0.0, 0.0, 0.0, 0.0]])
  for tau, tol in ((10.0, 2e-2), (1e3, 2e-4), (1e5, 2e-6)):
    b = objective.logmeanexp_baseline(r_PxK, tau=tau)
    np.testing.assert_allclose(b, r_PxK.mean(1), atol=tol)
  # tau -> 0: the max, without overflow.
  b = objective.logmeanexp_baseline(r_PxK, tau=1e-4)
  assert np.isfinite(b).all()
  np.testing.assert_allclose(b, r_PxK.max(1), atol=1e-3)
  adv = objective.advantages(
    r_PxK, r_PxK > 0, np.ones_like(r_PxK), kind="mirror_descent",
    baseline="logmeanexp", tau=1e4,
  )  # fmt: skip
  np.testing.assert_allclose(
    adv, r_PxK - r_PxK.mean(1, keepdims=True), atol=1e-4
  )


def test_grpo_advantages_hand_values():
  r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
  adv = objective.advantages(r, r > 0, np.ones_like(r), kind="grpo")
  # mean .5, std .5 -> +-1; a constant group -> 0.
  np.testing.assert_allclose(adv, [[1, -1, -1, 1], [0, 0, 0, 0]], atol=1e-5)


def test_rest_selects_best_correct_then_shortest_then_first():
  rewards = np.array(
    [
      [1.0, 1.0, 0.0, 1.0],  # tie on reward -> shortest (3) -> first of 1, 3
      [1.2, 1.1, 1.5, 0.9],  # sample 2 has the top reward but is wrong
      [0.0, 0.0, 0.0, 0.0],  # nothing correct
      [0.5, 0.7, 0.7, 0.1],  # shaped rewards: max wins over length
    ]
  )
  correct = np.array(
    [[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool
  )
  lengths = np.array([[5, 3, 2, 3], [9, 9, 1, 1], [1, 2, 3, 4], [1, 8, 6, 1]])
  w = objective.advantages(rewards, correct, lengths, kind="rest")
  np.testing.assert_array_equal(
    w, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
  )


def test_advantages_rejects_unknown_kind_and_baseline():
  r = np.zeros((1, 2))
  with pytest.raises(ValueError, match="kind"):
    objective.advantages(r, r, r, kind="ppo")
  with pytest.raises(ValueError, match="baseline"):
    objective.advantages(r, r, r, kind="reinforce", baseline="median")


# ----------------------------------------------------------------------------
# Length reward (PAPER.md §2) and its schedule.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "lengths, correct, expected",
  [
    # lambda = .5 - [0, .25, .5, 1]; wrong -> min(0, lambda).
    ([2, 4, 6, 10], [1, 1, 0, 0], [0.5, 0.25, 0.0, -0.5]),
    # ties in length share lambda.
    ([3, 3, 7, 7], [1, 0, 1, 0], [0.5, 0.0, -0.5, -0.5]),
    # all correct: +.5 shortest ... -.5 longest.
    ([1, 2, 3], [1, 1, 1], [0.5, 0.0, -0.5]),
    # all wrong: 0 up to the middle length, then down to -.5.
    ([1, 2, 3, 5], [0, 0, 0, 0], [0.0, 0.0, 0.0, -0.5]),
    # all lengths equal -> zeros, whatever the correctness.
    ([4, 4, 4], [1, 0, 1], [0.0, 0.0, 0.0]),
    # k = 1 -> zero.
    ([7], [1], [0.0]),
    ([7], [0], [0.0]),
  ],
)
def test_length_reward_tables(lengths, correct, expected):
  got = objective.length_reward(np.array([lengths]), np.array([correct]))
  assert got.shape == (1, len(lengths))
  np.testing.assert_allclose(got[0], expected, atol=1e-7)


def test_length_reward_is_per_prompt():
  lengths = np.array([[1, 3], [10, 30], [5, 5]])
  correct = np.array([[1, 1], [1, 0], [1, 0]])
  np.testing.assert_allclose(
    objective.length_reward(lengths, correct),
    [[0.5, -0.5], [0.5, -0.5], [0.0, 0.0]],
  )


def test_length_penalty_schedule_switches_exactly_at_warmup():
  w = lambda it, **kw: objective.length_penalty_weight(
    it, weight=0.2, warmup=5, **kw
  )
  assert [w(i, schedule="constant") for i in (0, 4, 5, 6, 100)] == [
    0.0, 0.0, 0.2, 0.2, 0.2,
  ]  # fmt: skip
  assert all(w(i, schedule="off") == 0.0 for i in range(10))
  ramp = [w(i, schedule="linear", ramp=4) for i in range(3, 11)]
  np.testing.assert_allclose(ramp, [0, 0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
  assert w(5, schedule="linear", ramp=0) == 0.2
  with pytest.raises(ValueError, match="schedule"):
    w(5, schedule="cosine")


def test_shaped_rewards_adds_weighted_length_reward_after_warmup():
  r = np.array([[1.0, 1.0, 0.0]])
  correct = r > 0
  lengths = np.array([[2, 6, 10]])
  kw = dict(schedule="constant", weight=0.1, warmup=3)
  np.testing.assert_array_equal(
    objective.shaped_rewards(r, correct, lengths, iteration=2, **kw), r
  )
  np.testing.assert_allclose(
    objective.shaped_rewards(r, correct, lengths, iteration=3, **kw),
    [[1.05, 1.0, -0.05]],
    rtol=1e-6,
  )
