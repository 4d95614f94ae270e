"""k15.sharding: sharded == unsharded for the update step and the sampler.

The same born-sharded state (same key), the same batch and the same rng on
a 1-device mesh and on the 8-device meshes (data=8), (data=2, fsdp=2,
tensor=2) and (data=2, context=4) (ring attention for training there) must
give the same loss, gradients, parameters after two steps and sampled
tokens. Tolerances are float32 reduction-order noise: the meshes split the
batch / embed / head sums differently; nothing else may differ. Also: the
mesh helpers (shapes, device order across processes, batch placement and
`gather`) on one process; several processes are `tests/test_multihost.py`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import model as model_lib
from k15 import objective, sampler, sharding, train
from k15.model import ModelConfig

CFG = ModelConfig(
  vocab_size=32,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=6,  # B, K, S, Dh all differ: cache dims are found by size
  mlp_dim=64,
  max_len=64,
  emb_init_scale=0.3,
)
LOSS = objective.LossConfig(loss="mirror_descent", tau=0.1)
TX = train.make_optimizer(train.OptimConfig(lr=1e-2))
B, PL, RL = 8, 6, 10  # rows, prompt and response lengths (T = 16)
T = PL + RL
MESHES = {
  "data8": dict(data=8),
  "dp_fsdp_tp": dict(data=2, fsdp=2, tensor=2),
  "dp_cp": dict(data=2, context=4),
}
PAD, BUCKET, BUDGET = 0, 8, 12
SAMPLING = sampler.SamplingConfig(temperature=1.0, stop_tokens=(2,))
PROMPTS = [
  [5, 9, 3],
  [7],
  [1, 2, 3, 4, 5, 6, 7, 8],
  [11, 4],
  [8, 8, 9, 10],
  [13, 2, 20],
  [],
  [30, 31, 1, 6, 6],
]  # [] is a padding row


def _mesh(name: str):
  if name == "one":
    return sharding.make_mesh({}, devices=jax.devices()[:1])
  return sharding.make_mesh(MESHES[name])


def _model(name: str) -> ModelConfig:
  if name == "dp_cp":
    return dataclasses.replace(CFG, attention="ring", attention_block=4)
  return CFG


def _batch() -> dict[str, np.ndarray]:
  """An RL minibatch with left-padded prompts, right-padded responses,
  a padding row, and reference log-probs that differ from the policy's."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  mask = np.zeros((B, T), bool)
  mask[:, PL:] = True
  for b, (lp, rp) in enumerate(
    [(0, 0), (2, 0), (0, 3), (1, 5), (4, 1), (0, 9), (3, 2), (5, 4)]
  ):
    seg[b, :lp] = 0
    tokens[b, :lp] = 0
    if rp:
      seg[b, -rp:] = 0
      tokens[b, -rp:] = 0
      mask[b, -rp:] = False
  weight = np.ones(B, np.float32)
  weight[6] = 0.0
  return dict(
    tokens_BxT=tokens,
    seg_BxT=seg,
    loss_mask_BxT=mask,
    ref_logp_BxT=rng.normal(-3.0, 0.5, (B, T)).astype(np.float32),
    behaviour_logp_BxT=rng.normal(-3.0, 0.5, (B, T)).astype(np.float32),
    advantages_B=rng.normal(0.0, 1.0, B).astype(np.float32),
    sample_weight_B=weight,
  )


@functools.partial(jax.jit, static_argnames=("model",))
def _loss_and_grads(params, batch, *, model):
  def loss_fn(p):
    logp = model_lib.sequence_logprobs(
      p, batch["tokens_BxT"], batch["seg_BxT"], model=model
    )
    return objective.loss(logp, batch, cfg=LOSS)[0]

  return jax.value_and_grad(loss_fn)(params)


@functools.cache
def _state0():
  mesh = _mesh("one")
  return sharding.gather(
    train.init_state(jax.random.key(0), model=CFG, tx=TX, mesh=mesh)
  )


def _run(name: str) -> dict:
  """Everything compared, computed under mesh `name`, on the host."""
  mesh, model = _mesh(name), _model(name)
  with sharding.mesh_context(mesh):
    # one initial state for all (born-sharded init is tests/test_train's),
    # placed as the rules say
    state = jax.device_put(_state0(), train.state_shardings(model, TX, mesh))
    batch = sharding.shard_batch(_batch(), mesh)
    init = sharding.gather(state.params)
    loss, grads = _loss_and_grads(state.params, batch, model=model)
    out = dict(
      init=init,
      loss=sharding.gather(loss),
      grads=sharding.gather(grads),
      steps=[],
    )
    toks, seg = sharding.shard_batch(
      sampler.left_pad(PROMPTS, BUCKET, PAD), mesh
    )
    s = sampler.generate(
      state.params,
      toks,
      seg,
      jax.random.key(7),
      model=model,
      cfg=SAMPLING,
      budget=BUDGET,
      cache_len=BUCKET + BUDGET,
      pad_id=PAD,
    )
    out["sample"] = sharding.gather(
      dict(tokens=s.tokens, logp=s.logp, length=s.length, status=s.status)
    )
    out["placement"] = dict(
      tokens=(s.tokens.shape, s.tokens.sharding),
      **{
        f"cache_{k}": (x.shape, x.sharding)
        for k, x in dict(
          k=s.cache["k"][0], v=s.cache["v"][-1], pos=s.cache["pos"]
        ).items()
      },
    )
    for _ in range(2):
      state, m = train.update_step(
        state, batch, model=model, tx=TX, loss_cfg=LOSS
      )
      out["steps"].append(sharding.gather(m))
    out["params"] = sharding.gather(state.params)
    out["param_placement"] = jax.tree.map(lambda x: x.sharding, state.params)
  return out


@pytest.fixture(scope="module")
def one():
  return _run("one")


@pytest.fixture(scope="module", params=list(MESHES))
def sharded(request):
  return request.param, _run(request.param)


def test_update_step_sharded_equals_one_device(one, sharded):
  name, run = sharded
  # after two (donating) steps every param is still split as the rules say
  ruled = train.state_shardings(_model(name), TX, _mesh(name)).params
  for path, got in jax.tree_util.tree_flatten_with_path(run["param_placement"])[
    0
  ]:
    want = functools.reduce(lambda t, k: t[k.key], path, ruled)
    shape = functools.reduce(lambda t, k: t[k.key], path, one["init"]).shape
    assert got.mesh.devices.size == 8
    assert got.shard_shape(shape) == want.shard_shape(shape), path
  if name == "dp_fsdp_tp":  # (vocab, embed) -> (tensor, fsdp)
    emb = run["param_placement"]["params"]["embedding"]
    assert emb.shard_shape((32, 32)) == (16, 16)
  jax.tree.map(np.testing.assert_array_equal, run["init"], one["init"])
  np.testing.assert_allclose(run["loss"], one["loss"], rtol=1e-5)
  # gradients: every leaf, relative to the leaf's scale
  for path, g1 in jax.tree_util.tree_flatten_with_path(one["grads"])[0]:
    g8 = functools.reduce(lambda t, k: t[k.key], path, run["grads"])
    scale = np.abs(g1).max()
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(
      g8,
      g1,
      atol=1e-5 * scale,
      rtol=1e-4,
      err_msg=f"{name} {jax.tree_util.keystr(path)}",
    )
  # step 1 sees the same params; step 2 inherits step 1's noise (below)
  for m8, m1, rtol in zip(
    run["steps"], one["steps"], (1e-5, 1e-4), strict=True
  ):
    assert m8["skipped"] == m1["skipped"] == 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=rtol)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=rtol)
  # Adam's first steps are ~lr * sign(g): almost every entry agrees to
  # 1e-5, but for the rare entry whose gradient is ~0 (|g| ~ 1e-6 |g|max)
  # reduction-order noise moves it by up to ~1% of a step. A sharding bug
  # would move many entries by whole steps (2 lr = 2e-2).
  diff = np.concatenate(
    [
      np.abs(a - b).ravel()
      for a, b in zip(
        jax.tree.leaves(run["params"]),
        jax.tree.leaves(one["params"]),
        strict=True,
      )
    ]
  )
  assert diff.max() < 5e-4, diff.max()
  assert np.mean(diff > 1e-5) < 1e-3, np.sort(diff)[-10:]
  # two Adam steps at lr 1e-2 moved every param by far more than that
  moved = jax.tree.map(
    lambda a, b: np.abs(a - b).max(), one["params"], one["init"]
  )
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_sampler_sharded_equals_one_device(one, sharded):
  name, run = sharded
  a, b = run["sample"], one["sample"]
  # rows stay split over the batch axes; the KV cache (whatever order the
  # sampler keeps its dims in) also over kv heads (tensor) and cache slots
  # (context): no device holds a copy it need not
  mesh = _mesh(name)
  split = {
    B: mesh.shape["data"] * mesh.shape["fsdp"],
    CFG.num_kv_heads: mesh.shape["tensor"],
    BUCKET + BUDGET: mesh.shape["context"],
    CFG.head_dim: 1,
  }
  for key, (shape, got) in run["placement"].items():
    want = tuple(
      n if key == "tokens" and n == BUDGET else n // split[n] for n in shape
    )
    assert got.shard_shape(shape) == want, (key, shape, got)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["length"], b["length"])
  np.testing.assert_array_equal(a["status"], b["status"])
  np.testing.assert_allclose(a["logp"], b["logp"], atol=1e-5, rtol=1e-5)
  # a real sample: rows differ, some stop early, the padding row is empty
  assert b["length"][6] == 0 and (b["length"][:6] > 0).all()
  assert len({tuple(r) for r in b["tokens"]}) == B


# ---------------------------------------------------------------------------
# Mesh helpers on one process
# ---------------------------------------------------------------------------


def test_mesh_shape_fills_and_rejects():
  assert sharding.mesh_shape(dict(data=-1, tensor=2), 8) == dict(
    data=4, fsdp=1, tensor=2, context=1
  )
  with pytest.raises(ValueError, match="unknown axis 'model'"):
    sharding.mesh_shape(dict(model=2), 8)
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    sharding.mesh_shape(dict(data=4), 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(dict(data=-1, tensor=3), 8)


class _Dev:
  """A stand-in device: only process_index and id matter to the layout."""

  def __init__(self, process_index, id):
    self.process_index, self.id = process_index, id

  def __repr__(self):
    return f"D{self.process_index}.{self.id}"


@pytest.mark.parametrize(
  "spec, procs",
  [
    (dict(data=-1), 2),
    (dict(data=2, fsdp=2, tensor=2), 2),
    (dict(data=2, context=4), 2),
    (dict(data=4, tensor=2), 4),
    (dict(data=1, fsdp=2, tensor=4), 4),  # fewer batch blocks than hosts
  ],
)
def test_device_grid_splits_the_batch_over_processes_in_order(spec, procs):
  # devices listed interleaved, as no process would: the grid must sort
  devs = [_Dev(i % procs, 100 * (i % procs) + i // procs) for i in range(8)]
  shape = sharding.mesh_shape(spec, 8)
  grid = sharding.device_grid(shape, devs)
  assert grid.shape == tuple(shape[a] for a in sharding.AXES)
  # row block r of a batch lives on the devices grid[data, fsdp] = r
  R = shape["data"] * shape["fsdp"]
  blocks = grid.reshape(R, -1)
  for p in range(procs):
    held = [r for r in range(R) if any(d.process_index == p for d in blocks[r])]
    if R >= procs:  # process p holds block p of the batch (process_slice)
      assert held == list(range(p * R // procs, (p + 1) * R // procs)), p
    else:  # neighbouring processes share one block
      assert held == [p * R // procs], p
    # a process's devices keep their id order
    ids = [d.id for d in grid.flat if d.process_index == p]
    assert ids == sorted(ids) and len(ids) == 8 // procs


def test_device_grid_rejects_processes_with_unequal_devices():
  devs = [_Dev(0, 0), _Dev(0, 1), _Dev(0, 2), _Dev(1, 100)]
  with pytest.raises(ValueError, match="different numbers of devices"):
    sharding.device_grid(sharding.mesh_shape(dict(data=4), 4), devs)


def test_shard_batch_places_rows_and_gather_returns_them():
  mesh = _mesh("dp_fsdp_tp")
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  placed = sharding.shard_batch(dict(x=x, s=np.float32(3)), mesh)
  assert tuple(placed["x"].sharding.spec) == (sharding.BATCH, None)
  # each device holds 2 of the 8 rows: its (data, fsdp) block
  for shard in placed["x"].addressable_shards:
    np.testing.assert_array_equal(shard.data, x[shard.index])
    assert shard.data.shape == (2, 6)
  back = sharding.gather(placed)
  np.testing.assert_array_equal(back["x"], x)
  assert back["s"] == 3 and isinstance(back["x"], np.ndarray)
  # a process's own slice (one process: the whole batch) gives the same
  local = sharding.shard_batch(dict(x=x), mesh, local=True)
  np.testing.assert_array_equal(sharding.gather(local)["x"], x)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.shard_batch(np.zeros((6, 2)), mesh)


def test_gather_of_a_jitted_output_and_host_leaves():
  mesh = _mesh("data8")
  x = sharding.shard_batch(np.arange(16.0).reshape(8, 2), mesh)
  y = jax.jit(lambda a: (a * 2, a.sum()))(x)
  out = sharding.gather(dict(y=y, n=[1, 2], none=None))
  np.testing.assert_array_equal(out["y"][0], np.arange(16.0).reshape(8, 2) * 2)
  assert float(out["y"][1]) == 120.0 and out["n"] == [1, 2]
  assert out["none"] is None
  assert jnp.asarray(out["y"][0]).shape == (8, 2)
