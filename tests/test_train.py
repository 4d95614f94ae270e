"""k15.train: optimizer reset, RL and SFT steps, NaN guard, sharded state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import objective, sharding, train
from k15.model import ModelConfig

CFG = ModelConfig(
  vocab_size=32,
  num_layers=1,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  max_len=32,
  emb_init_scale=0.3,
)
LOSS = objective.LossConfig(loss="mirror_descent", tau=0.1)
B, PL, RL = 8, 4, 8  # rows, prompt and response lengths
T = PL + RL


# One optimizer object for the module: `tx` is a static jit argument, so a new
# one would recompile every step function.
TX = train.make_optimizer(train.OptimConfig(lr=1e-2))


def _mesh1():
  return sharding.make_mesh(
    dict(data=1, fsdp=1, tensor=1, context=1), devices=jax.devices()[:1]
  )


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _tokens(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  mask = np.zeros((B, T), bool)
  mask[:, PL:] = True
  # left-padded prompts and right-padded responses in some rows
  for b, (lp, rp) in enumerate([(0, 0), (2, 0), (0, 3), (1, 5)] * 2):
    seg[b, :lp] = 0
    tokens[b, :lp] = 0
    if rp:
      seg[b, -rp:] = 0
      tokens[b, -rp:] = 0
      mask[b, -rp:] = False
  return tokens, seg, mask


def _rl_batch(params, seed=0):
  tokens, seg, mask = _tokens(seed)
  ref = np.asarray(train.score(params, tokens, seg, model=CFG))
  adv = np.array([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.25, 0.0], np.float32)
  return dict(
    tokens_BxT=tokens,
    seg_BxT=seg,
    loss_mask_BxT=mask,
    ref_logp_BxT=ref,
    behaviour_logp_BxT=ref,
    advantages_B=adv,
    sample_weight_B=np.ones(B, np.float32),
  )


@pytest.fixture(scope="module")
def state0():
  """A fresh 1-device state; tests take copies (steps donate their input)."""
  return train.init_state(jax.random.key(0), model=CFG, tx=TX, mesh=_mesh1())


@pytest.fixture(scope="module")
def batch0(state0):
  return _rl_batch(state0.params)


def _copy(state):
  return jax.tree.map(jnp.copy, state)


def _step(state, batch, tx=TX):
  batch = sharding.shard_batch(batch, _mesh1())
  return train.update_step(state, batch, model=CFG, tx=tx, loss_cfg=LOSS)


def _moments(opt_state):
  """{"mu": [...], "nu": [...], "count": [...]} leaves of the optimizer."""
  out = {"mu": [], "nu": [], "count": []}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    key = jax.tree_util.keystr(path)
    for name in out:
      if f".{name}" in key:
        out[name].append(np.asarray(leaf))
  return out


def test_reset_optimizer_zeroes_moments_every_iteration(state0, batch0):
  tx = train.make_optimizer(train.OptimConfig(lr=1e-2, warmup_steps=3))
  state = _copy(state0).replace(opt_state=tx.init(state0.params))
  m = _moments(state.opt_state)
  assert m["mu"] and m["nu"] and len(m["count"]) == 2  # adam + schedule
  for it in range(3):
    for _ in range(2):
      state, _ = _step(state, batch0, tx)
    m = _moments(state.opt_state)
    assert all(int(c) == 2 for c in m["count"])
    assert any(np.abs(x).max() > 0 for x in m["mu"])
    assert any(np.abs(x).max() > 0 for x in m["nu"])
    params = _host(state.params)
    state = train.reset_optimizer(state, tx=tx)
    m = _moments(state.opt_state)
    assert all(int(c) == 0 for c in m["count"]), f"iteration {it}"
    assert all((x == 0).all() for x in m["mu"] + m["nu"]), f"iteration {it}"
    # params and the global step survive the reset
    jax.tree.map(np.testing.assert_array_equal, _host(state.params), params)
    assert int(state.step) == 2 * (it + 1)


def test_step_after_reset_equals_step_with_a_fresh_optimizer(state0, batch0):
  state = _copy(state0)
  for _ in range(3):
    state, _ = _step(state, batch0)
  fresh = _copy(state).replace(opt_state=TX.init(state.params))
  fresh = jax.device_put(fresh, jax.tree.map(lambda x: x.sharding, state))
  reset = train.reset_optimizer(state, tx=TX)
  a, _ = _step(reset, batch0)
  b, _ = _step(fresh, batch0)
  jax.tree.map(np.testing.assert_array_equal, _host(a.params), _host(b.params))
  # without the reset the step differs (the moments carry history)
  c = _copy(state0)
  for _ in range(4):
    c, _ = _step(c, batch0)
  assert not np.allclose(
    np.asarray(c.params["params"]["embedding"]),
    np.asarray(a.params["params"]["embedding"]),
  )


def test_update_step_lowers_the_loss_on_a_fixed_batch(state0, batch0):
  state = _copy(state0)
  losses, rho = [], []
  old = state.params["params"]["embedding"]
  for _ in range(8):
    state, m = _step(state, batch0)
    assert m["skipped"] == 0
    losses.append(float(m["loss"]))
    rho.append(float(m["rho_abs"]))
  assert old.is_deleted(), "update_step should donate the state"
  assert int(state.step) == 8
  # at the reference the loss is mean(A^2) / (2 tau)
  adv = batch0["advantages_B"]
  np.testing.assert_allclose(
    losses[0], np.mean(adv**2) / (2 * LOSS.tau), rtol=1e-5
  )
  assert rho[0] < 1e-5
  assert losses[-1] < 0.6 * losses[0], losses
  assert rho[-1] > 0.1
  # the policy moved the way the advantages point
  lp = np.asarray(
    train.score(
      state.params, batch0["tokens_BxT"], batch0["seg_BxT"], model=CFG
    )
  )
  mask = batch0["loss_mask_BxT"]
  rho_B = (
    np.where(mask, lp, 0) - np.where(mask, batch0["ref_logp_BxT"], 0)
  ).sum(1)
  pos, neg = adv > 0, adv < 0
  assert (rho_B[pos] > 0).all() and (rho_B[neg] < 0).all(), rho_B


@pytest.mark.parametrize("where", ["advantages_B", "ref_logp_BxT"])
def test_non_finite_batch_skips_the_step(state0, batch0, where):
  state, _ = _step(_copy(state0), batch0)
  before = _host(state)
  bad = {k: v.copy() for k, v in batch0.items()}
  if where == "advantages_B":
    bad[where][:] = np.nan
  else:
    bad[where][2, PL + 1] = np.nan  # one token inside the loss mask
  state, m = _step(state, bad)
  assert float(m["skipped"]) == 1.0
  assert not np.isfinite(float(m["loss"]))
  after = _host(state)
  assert int(after.step) == int(before.step) == 1
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  # the next good batch trains normally
  state, m = _step(state, batch0)
  assert float(m["skipped"]) == 0.0 and int(state.step) == 2
  assert not np.array_equal(
    np.asarray(state.params["params"]["embedding"]),
    before.params["params"]["embedding"],
  )


def test_junk_in_a_padding_row_does_not_skip_the_step(state0, batch0):
  """Rows with sample_weight 0 are padding; they may hold NaN / -inf."""
  clean = {k: v.copy() for k, v in batch0.items()}
  clean["sample_weight_B"][-1] = 0.0
  junk = {k: v.copy() for k, v in clean.items()}
  junk["advantages_B"][-1] = np.nan
  junk["ref_logp_BxT"][-1] = -np.inf
  s1, m1 = _step(_copy(state0), clean)
  s2, m2 = _step(_copy(state0), junk)
  assert float(m2["skipped"]) == 0.0
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
  jax.tree.map(
    np.testing.assert_array_equal, _host(s2.params), _host(s1.params)
  )


def test_sft_step_learns_a_fixed_sequence(state0):
  state = _copy(state0)
  seq = np.array(
    [
      [3, 7, 1, 9, 4, 4, 12, 30, 2, 5, 6, 8],
      [0, 0, 11, 9, 21, 4, 17, 17, 3, 1, 2, 0],
    ],
    np.int32,
  )
  seg = (seq != 0).astype(np.int32)
  mask = np.zeros_like(seq, bool)
  mask[:, 4:] = seg[:, 4:] == 1
  batch = dict(tokens_BxT=seq, seg_BxT=seg, loss_mask_BxT=mask)
  losses = []
  for _ in range(40):
    state, m = train.sft_step(state, batch, model=CFG, tx=TX)
    losses.append(float(m["loss"]))
  assert float(m["tokens"]) == mask.sum()
  assert losses[0] > 2.0  # ~log(32) at init
  assert losses[-1] < 0.1, losses
  lp = np.asarray(train.score(state.params, seq, seg, model=CFG))
  assert (lp[mask] > np.log(0.8)).all()


def _spec(x):
  s = tuple(x.sharding.spec)
  return s + (None,) * (x.ndim - len(s))


@pytest.fixture(scope="module")
def state8():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, context=1))
  return train.init_state(jax.random.key(0), model=CFG, tx=TX, mesh=mesh)


def test_init_state_is_born_sharded(state8):
  mesh = state8.step.sharding.mesh
  assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=2, context=1)
  p = state8.params["params"]
  want = {
    "embedding": ("tensor", "fsdp"),  # (vocab, embed)
    "final_norm/scale": ("fsdp",),
    "layers/q": (None, "fsdp", "tensor", None),
    "layers/k": (None, "fsdp", "tensor", None),
    "layers/o": (None, "tensor", None, "fsdp"),
    "layers/gate": (None, "fsdp", "tensor"),
    "layers/down": (None, "tensor", "fsdp"),
    "layers/attn_norm/scale": (None, "fsdp"),
  }
  for name, spec in want.items():
    x = p
    for k in name.split("/"):
      x = x[k]
    assert _spec(x) == spec, name
    # each device holds its 1/(fsdp * tensor) (or 1/fsdp) block
    split = [mesh.shape[a] if a else 1 for a in spec]
    shard = x.addressable_shards[0].data.shape
    assert shard == tuple(n // s for n, s in zip(x.shape, split, strict=True))
  # the Adam moments are sharded like their params; the step is replicated
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state8.opt_state)[0]:
    key = jax.tree_util.keystr(path)
    if (".mu" in key or ".nu" in key) and "'embedding'" in key:
      assert _spec(leaf) == ("tensor", "fsdp"), key
      checked += 1
    if "'layers'" in key and "'q'" in key:
      assert _spec(leaf) == (None, "fsdp", "tensor", None), key
      checked += 1
  assert checked == 4
  assert _spec(state8.step) == ()


def test_update_step_sharded_equals_single_device(state0, state8, batch0):
  mesh8 = state8.step.sharding.mesh
  runs = {}
  for name, state, mesh in (
    ("one", _copy(state0), _mesh1()),
    ("dp_fsdp_tp", _copy(state8), mesh8),
  ):
    init = _host(state.params)
    losses = []
    for _ in range(3):
      state, m = train.update_step(
        state,
        sharding.shard_batch(batch0, mesh),
        model=CFG,
        tx=TX,
        loss_cfg=LOSS,
      )
      losses.append((float(m["loss"]), float(m["grad_norm"])))
    runs[name] = (init, losses, _host(state.params))
  (init1, l1, p1), (init8, l8, p8) = runs["one"], runs["dp_fsdp_tp"]
  # born sharded from the same key: the same numbers
  jax.tree.map(np.testing.assert_array_equal, init1, init8)
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), p8, p1
  )
  # and training really moved the params
  assert not np.allclose(
    p1["params"]["embedding"], init1["params"]["embedding"]
  )
