"""k15.checkpoint: exact round trip of the run state, corrupt-step fallback,
config mismatches and bad paths, with nothing already saved lost."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import checkpoint as ckpt_lib
from k15 import curriculum, objective, sharding, train
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
)
TX = train.make_optimizer(train.OptimConfig(lr=1e-2))
SYNC = ckpt_lib.CheckpointConfig(keep=5, async_save=False)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, context=1))


def _trained_state(mesh, steps=1, seed=0):
  """A sharded TrainState with non-zero Adam moments."""
  state = train.init_state(jax.random.key(seed), model=CFG, tx=TX, mesh=mesh)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (4, 8)).astype(np.int32)
  seg = np.ones_like(tokens)
  mask = np.zeros(tokens.shape, bool)
  mask[:, 3:] = True
  ref = np.asarray(train.score(state.params, tokens, seg, model=CFG))
  batch = sharding.shard_batch(
    dict(
      tokens_BxT=tokens,
      seg_BxT=seg,
      loss_mask_BxT=mask,
      ref_logp_BxT=ref,
      advantages_B=np.array([1.0, -1.0, 0.5, -0.5], np.float32),
    ),
    mesh,
  )
  for _ in range(steps):
    state, _ = train.update_step(
      state, batch, model=CFG, tx=TX, loss_cfg=objective.LossConfig()
    )
  return state


@pytest.fixture(scope="module")
def states(mesh):
  """Two consecutive sharded TrainStates (steps 1 and 2), never donated."""
  s1 = _trained_state(mesh)
  s2 = train.update_step(
    jax.tree.map(jnp.copy, s1),
    _batch_like(mesh, s1),
    model=CFG,
    tx=TX,
    loss_cfg=objective.LossConfig(),
  )[0]
  return s1, s2


def _prompt_sampler():
  ps = curriculum.PromptSampler(
    np.arange(20) % 4, curriculum.SamplerConfig(strategy="prioritized"), seed=3
  )
  rng = np.random.default_rng(1)
  for it in range(3):
    idx = ps.sample(it, 5)
    ps.update(idx, rng.integers(0, 2, (5, 4)) / 1.0)
  return ps


def _abstract(mesh, ps, cfg=CFG):
  return dict(
    train=train.sharded_abstract_state(cfg, TX, mesh),
    sampler={
      k: jax.ShapeDtypeStruct(v.shape, v.dtype)
      for k, v in ps.state_dict().items()
    },
  )


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_tree_equal(got, want):
  g, gdef = jax.tree.flatten(got)
  w, wdef = jax.tree.flatten(want)
  assert gdef == wdef
  for a, b in zip(g, w, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def _files(*roots):
  """{relative path: size} of every file under the given directories."""
  out = {}
  for root in roots:
    for d, _, names in os.walk(root):
      for n in names:
        p = os.path.join(d, n)
        out[os.path.relpath(p, os.path.dirname(root))] = os.path.getsize(p)
  return out


HOST = dict(
  stage="rl",
  step=7,
  done=False,
  results={"sft": {"pass1": 0.1875, "greedy_acc": 1 / 3}},
  order=[3, 1, 2],
  note="ünïcode",
)


def test_round_trip_of_the_whole_run_state(tmp_path, mesh, states):
  state = states[1]
  ps = _prompt_sampler()
  tree = dict(train=state, sampler=ps.state_dict())
  want = _host(tree)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  ck.save(7, tree, HOST)
  ck.close()

  # a new process would open the directory afresh
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  assert ck.steps() == [7] and ck.latest_step() == 7
  abstract = _abstract(mesh, ps)
  step, got, host = ck.restore(abstract)
  ck.close()
  assert step == 7
  assert host == HOST
  _assert_tree_equal(_host(got), want)
  # restored arrays are placed as the target asks (born sharded again)
  for a, t in zip(
    jax.tree.leaves(got["train"]),
    jax.tree.leaves(abstract["train"]),
    strict=True,
  ):
    assert a.sharding.is_equivalent_to(t.sharding, a.ndim)
  # the prompt sampler continues exactly where it was
  fresh = curriculum.PromptSampler(np.arange(20) % 4, ps.cfg, seed=3)
  fresh.load_state_dict({k: np.asarray(v) for k, v in got["sampler"].items()})
  np.testing.assert_array_equal(fresh.success_rates(), ps.success_rates())
  np.testing.assert_array_equal(fresh.sample(3, 5), ps.sample(3, 5))


def test_restore_without_checkpoints_returns_none(tmp_path, mesh):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "empty"))
  assert ck.restore(_abstract(mesh, _prompt_sampler())) is None
  ck.close()


def _corrupt(step_dir, how):
  state_dir = os.path.join(step_dir, "state")
  paths = [os.path.join(d, n) for d, _, ns in os.walk(state_dir) for n in ns]
  assert paths
  for p in paths:
    if how == "delete":
      os.remove(p)
    elif how == "garble":
      size = os.path.getsize(p)
      with open(p, "wb") as f:
        f.write(np.random.default_rng(0).bytes(max(size, 16)))
    elif how == "truncate_data":  # metadata intact, array bytes gone
      if "_METADATA" not in p and "metadata" not in p:
        with open(p, "wb"):
          pass


@pytest.mark.parametrize("how", ["delete", "garble", "truncate_data"])
def test_corrupt_newest_step_falls_back_and_keeps_files(
  tmp_path, mesh, states, how, caplog
):
  ps = _prompt_sampler()
  s1, s2 = states
  want1 = _host(dict(train=s1, sampler=ps.state_dict()))
  d = str(tmp_path / "ckpt")
  ck = ckpt_lib.Checkpointer(d, SYNC)
  ck.save(1, dict(train=s1, sampler=ps.state_dict()), dict(HOST, step=1))
  ck.save(2, dict(train=s2, sampler=ps.state_dict()), dict(HOST, step=2))
  ck.close()
  _corrupt(os.path.join(d, "2"), how)
  before = _files(d)

  ck = ckpt_lib.Checkpointer(d, SYNC)
  with caplog.at_level(logging.WARNING):
    step, got, host = ck.restore(_abstract(mesh, ps))
  ck.close()
  assert step == 1 and host["step"] == 1
  _assert_tree_equal(_host(got), want1)
  reports = [
    r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
  ]
  assert any("step 2" in m and "unreadable" in m for m in reports), reports
  # nothing was deleted: every file is still there (possibly set aside)
  after = _files(d, d + ".unreadable")
  lost = [
    p
    for p in before
    if p not in after and p.replace("ckpt/", "ckpt.unreadable/", 1) not in after
  ]
  assert not lost, lost


def _batch_like(mesh, state):
  tokens = np.tile(np.arange(1, 9, dtype=np.int32), (4, 1))
  seg = np.ones_like(tokens)
  ref = np.asarray(train.score(state.params, tokens, seg, model=CFG))
  return sharding.shard_batch(
    dict(
      tokens_BxT=tokens,
      seg_BxT=seg,
      loss_mask_BxT=seg.astype(bool),
      ref_logp_BxT=ref,
      advantages_B=np.array([1.0, -1.0, 1.0, -1.0], np.float32),
    ),
    mesh,
  )


def test_no_readable_step_raises_and_keeps_files(tmp_path, mesh, states):
  ps = _prompt_sampler()
  d = str(tmp_path / "ckpt")
  ck = ckpt_lib.Checkpointer(d, SYNC)
  ck.save(3, dict(train=states[0], sampler=ps.state_dict()), HOST)
  ck.close()
  _corrupt(os.path.join(d, "3"), "garble")
  before = _files(d)
  ck = ckpt_lib.Checkpointer(d, SYNC)
  with pytest.raises(ckpt_lib.CheckpointError, match="step 3"):
    ck.restore(_abstract(mesh, ps))
  ck.close()
  assert _files(d) == before


def test_restore_into_a_different_model_names_the_parameter(
  tmp_path, mesh, states
):
  ps = _prompt_sampler()
  d = str(tmp_path / "ckpt")
  ck = ckpt_lib.Checkpointer(d, SYNC)
  ck.save(4, dict(train=states[0], sampler=ps.state_dict()), HOST)
  ck.close()
  before = _files(d)
  wider = ModelConfig(**{**CFG.__dict__, "d_model": 48})
  ck = ckpt_lib.Checkpointer(d, SYNC)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ck.restore(_abstract(mesh, ps, wider))
  ck.close()
  msg = str(e.value)
  assert "params/embedding" in msg, msg
  assert "(32, 32)" in msg and "(32, 48)" in msg, msg
  assert d in msg
  assert _files(d) == before


def test_missing_parent_directory_is_named(tmp_path):
  missing = tmp_path / "no" / "such"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    ckpt_lib.Checkpointer(str(missing / "ckpt"))
  assert not missing.exists()
