"""Long2short DPO: the loss and its gradient against hand values, the pair
rule (ties, the 1.5x boundary, prompts with no correct response), the pair
batches, and DPO steps that move a real model the preferred way."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import data, objective, rejection, sharding, train
from k15 import model as model_lib
from k15.stages import dpo

# ----------------------------------------------------------------------------
# Two pairs + one padding pair (weight 0, -inf junk), B = 6, T = 3, beta 0.5:
#   pair 0: chosen   mask [1,1,0] logp [-1,-2]     s=-3 ref=-3.5 r=+0.25
#           rejected mask [1,1,1] logp [-1,-1,-1]  s=-3 ref=-2   r=-0.5
#           m0 = 0.75
#   pair 1: chosen   mask [1,0,0] logp [-2]        s=-2 ref=-1   r=-0.5
#           rejected mask [1,1,0] logp [-.5,-.5]   s=-1 ref=-2   r=+0.5
#           m1 = -1.0
# ----------------------------------------------------------------------------
BETA = 0.5
NEG = -jnp.inf


def _pairs_batch():
  logp = jnp.array(
    [
      [-1.0, -2.0, NEG],
      [-1.0, -1.0, -1.0],
      [-2.0, NEG, NEG],
      [-0.5, -0.5, NEG],
      [NEG, NEG, NEG],
      [NEG, NEG, NEG],
    ]
  )
  batch = dict(
    loss_mask_BxT=jnp.array(
      [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]],
      jnp.float32,
    ),
    ref_logp_B=jnp.array([-3.5, -2.0, -1.0, -2.0, jnp.nan, 0.0]),
    sample_weight_B=jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
  )
  return logp, batch


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_hand_value_and_metrics():
  logp, batch = _pairs_batch()
  cfg = objective.DPOConfig(beta=BETA)
  value, m = jax.jit(objective.dpo_loss, static_argnames="cfg")(
    logp, batch, cfg=cfg
  )
  want = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(1.0))) / 2
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(m["margin"], (0.75 - 1.0) / 2 / BETA, rtol=1e-6)
  np.testing.assert_allclose(m["pair_accuracy"], 0.5)
  np.testing.assert_allclose(m["chosen_reward"], (0.25 - 0.5) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["rejected_reward"], 0.0, atol=1e-7)


def test_dpo_gradient_hand_values():
  """d loss / d logp of a response token = -beta sigma(-m_p) / P on the
  chosen row of pair p, +beta sigma(-m_p) / P on its rejected row, 0 on
  masked and padding tokens (which hold -inf)."""
  logp, batch = _pairs_batch()
  cfg = objective.DPOConfig(beta=BETA)
  g = jax.grad(lambda x: objective.dpo_loss(x, batch, cfg=cfg)[0])(logp)
  g0 = BETA * _sigmoid(-0.75) / 2
  g1 = BETA * _sigmoid(1.0) / 2
  want = np.array(
    [
      [-g0, -g0, 0],
      [g0, g0, g0],
      [-g1, 0, 0],
      [g1, g1, 0],
      [0, 0, 0],
      [0, 0, 0],
    ]
  )
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-9)


def test_dpo_loss_equals_the_pairwise_formula_at_random():
  """The masked-sum layout against -log sigmoid(beta * delta) per pair."""
  rng = np.random.default_rng(0)
  logp = jnp.asarray(-rng.random((8, 5)), jnp.float32)
  mask = rng.random((8, 5)) < 0.7
  ref = rng.normal(size=8).astype(np.float32)
  batch = dict(loss_mask_BxT=jnp.asarray(mask), ref_logp_B=jnp.asarray(ref))
  value, _ = objective.dpo_loss(logp, batch, cfg=objective.DPOConfig(beta=2))
  s = np.where(mask, np.asarray(logp), 0).sum(1) - ref
  m = 2 * (s[0::2] - s[1::2])
  np.testing.assert_allclose(value, np.mean(np.log1p(np.exp(-m))), rtol=1e-5)


def test_dpo_config_is_validated():
  with pytest.raises(ValueError, match="dpo.beta"):
    objective.DPOConfig(beta=0.0)
  with pytest.raises(ValueError, match="dpo.ratio"):
    objective.DPOConfig(ratio=0.9)
  with pytest.raises(ValueError, match="dpo.n"):
    dpo.DPOStageConfig(n=0)


# ----------------------------------------------------------------------------
# The pair rule
# ----------------------------------------------------------------------------


def test_pairs_shortest_correct_over_longer_wrong_and_1_5x_correct():
  correct = [0, 1, 1, 0, 1, 0, 1]
  lengths = [30, 20, 35, 25, 20, 15, 29]
  # positive: index 1 (20 tokens; index 4 ties and was drawn later)
  # negatives: wrong and longer (0: 30, 3: 25; not 5: shorter), correct
  # and >= 1.5 x 20 = 30 (2: 35; not 4: a tie, not 6: 29 < 30)
  assert objective.dpo_pairs(correct, lengths, ratio=1.5) == [
    (1, 0),
    (1, 2),
    (1, 3),
  ]


def test_pairs_boundaries_and_ties():
  # a correct response exactly 1.5x the positive is a negative
  assert objective.dpo_pairs([1, 1], [20, 30], ratio=1.5) == [(0, 1)]
  # a wrong response as long as the positive is not longer: no pair
  assert objective.dpo_pairs([1, 0], [20, 20], ratio=1.5) == []
  # equally short correct responses: the first drawn is the positive, the
  # other pairs with nothing
  assert objective.dpo_pairs([0, 1, 1, 0], [9, 12, 12, 13], ratio=1.5) == [
    (1, 3)
  ]
  # ratio 2: 35 < 2 x 20 is not a negative any more
  assert objective.dpo_pairs([1, 1, 0], [20, 35, 21], ratio=2.0) == [(0, 2)]


def test_pairs_prompt_without_a_correct_response():
  assert objective.dpo_pairs([0, 0, 0], [10, 40, 20], ratio=1.5) == []
  assert objective.dpo_pairs([1, 1, 1], [10, 11, 14], ratio=1.5) == []


def test_make_pairs_from_sampled_groups():
  g = rejection.Group(
    "q",
    [5, 6],
    [[1, 2, 3, 2], [1, 2], [7, 7, 7, 7], [1, 2, 3]],
    np.array([True, True, False, False]),
    np.array([True, True, True, False]),
  )
  nothing = rejection.Group(
    "r", [5], [[1], [2, 2]], np.array([False, False]), np.array([True] * 2)
  )
  # positive [1, 2] (2 tokens); [1,2,3,2]: correct, 4 >= 3; the two
  # wrong ones are longer
  assert dpo.make_pairs([g, nothing], 1.5) == [
    ([5, 6], [1, 2], [1, 2, 3, 2]),
    ([5, 6], [1, 2], [7, 7, 7, 7]),
    ([5, 6], [1, 2], [1, 2, 3]),
  ]
  assert rejection.shortest_correct([g, nothing]) == [([5, 6], [1, 2])]


def test_pair_batches_keep_pairs_adjacent():
  pairs = [([3], [4, 5], [6], -1.0, -2.0), ([7, 8], [9], [10, 11], -3.0, -4.0)]
  ds = data.pair_dataset(
    pairs, batch_size=2, prompt_len=2, response_len=2, pad_id=0, seed=0
  )
  b = ds[0]
  assert b["tokens_BxT"].shape == (4, 4)
  for row in range(0, 4, 2):  # chosen then rejected of the same prompt
    assert (b["tokens_BxT"][row, :2] == b["tokens_BxT"][row + 1, :2]).all()
  got = {tuple(b["ref_logp_B"][r : r + 2]) for r in (0, 2)}
  assert got == {(-1.0, -2.0), (-3.0, -4.0)}


# ----------------------------------------------------------------------------
# DPO steps on a real (tiny) model
# ----------------------------------------------------------------------------


def test_dpo_steps_prefer_the_chosen_responses():
  """A few DPO steps on fixed pairs: every pair's margin grows from 0 (the
  policy starts as the reference) and the loss falls below log 2."""
  cfg = model_lib.ModelConfig(
    vocab_size=16, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1,
    head_dim=16, mlp_dim=64, max_len=16,
  )  # fmt: skip
  mesh = sharding.make_mesh(dict(data=-1))
  tx = train.make_optimizer(train.OptimConfig(lr=1e-2))
  state = train.init_state(jax.random.key(0), model=cfg, tx=tx, mesh=mesh)
  raw = [([3, 4], [5, 6, 2], [7, 8, 9, 10, 2]), ([4, 3], [6, 2], [9, 9, 2])]
  ref_state = jax.tree.map(jnp.copy, state)
  pairs = []
  for p, w, l in raw:
    b = data.pair_dataset(
      [(p, w, l, 0.0, 0.0)], batch_size=1, prompt_len=2, response_len=6,
      pad_id=0, seed=0,
    )[0]  # fmt: skip
    logp = train.score(
      ref_state.params, b["tokens_BxT"], b["seg_BxT"], model=cfg
    )
    s = np.where(b["loss_mask_BxT"], np.asarray(logp), 0).sum(1)
    pairs.append((p, w, l, float(s[0]), float(s[1])))
  ds = data.pair_dataset(
    pairs, batch_size=2, prompt_len=2, response_len=6, pad_id=0, seed=0
  )
  dcfg = objective.DPOConfig(beta=0.5)
  with sharding.mesh_context(mesh):
    _, m0 = train.dpo_step(
      jax.tree.map(jnp.copy, state), ds[0], model=cfg, tx=tx, cfg=dcfg
    )
    for i in range(20):
      state, m = train.dpo_step(state, ds[i], model=cfg, tx=tx, cfg=dcfg)
  np.testing.assert_allclose(m0["loss"], math.log(2), rtol=1e-5)
  np.testing.assert_allclose(m0["margin"], 0.0, atol=1e-5)
  assert float(m["loss"]) < 0.3
  assert float(m["pair_accuracy"]) == 1.0
  assert float(m["chosen_reward"]) > 0 > float(m["rejected_reward"])
