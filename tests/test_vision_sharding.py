"""Sharded == one device with images: the RL loss and its gradients (of
the tower, projector and LM) and the sampler's prefill with images, on 8
fake devices as (data=2, fsdp=2, tensor=2) (the batch, the tower's width
and its heads all split; test_sharding covers data=8 for text); the
tower's params split as the rules say."""

import functools

import jax
import numpy as np
import pytest

from k15 import images as images_lib
from k15 import model as model_lib
from k15 import objective, rollout, sampler, sharding, train, vision
from k15.model import ModelConfig

VIS = vision.VisionConfig(
  patch_size=2, channels=3, max_patches=8, width=16, num_layers=2,
  num_heads=2, mlp_dim=32, pos_grid=4,
)  # fmt: skip
CFG = ModelConfig(
  vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
  head_dim=8, mlp_dim=64, max_len=64, emb_init_scale=0.3, vision=VIS,
)  # fmt: skip
IMG = CFG.image_token
LOSS = objective.LossConfig(loss="mirror_descent", tau=0.1)
TX = train.make_optimizer(train.OptimConfig(lr=1e-2))
B, PL, RL = 8, 16, 6
MESHES = {"dp_fsdp_tp": dict(data=2, fsdp=2, tensor=2)}


def _mesh(name):
  if name == "one":
    return sharding.make_mesh({}, devices=jax.devices()[:1])
  return sharding.make_mesh(MESHES[name])


def _prompts():
  """Rows with 0, 1 or 2 images of different shapes, anywhere."""
  rng = np.random.default_rng(0)
  out = []
  for b in range(B):
    n_img = b % 3
    shapes = [(2, 2), (1, 3), (2, 1)][: n_img]
    ims = [rng.integers(0, 256, (2 * h, 2 * w, 3)).astype(np.uint8)
           for h, w in shapes]  # fmt: skip
    text = [int(t) for t in rng.integers(3, 30, 1 + b % 4)]
    ids = list(text)
    patches = images_lib.patches_of(ims, VIS, f"row {b}") if ims else None
    for i, (h, w) in enumerate(shapes):
      ids += [IMG] * (h * w) + [int(rng.integers(3, 30))] * (i + 1)
    out.append((ids, patches))
  return out


def _batch():
  rng = np.random.default_rng(1)
  prompts = _prompts()
  responses = [rng.integers(3, 30, 1 + b % RL).astype(np.int32)
               for b in range(B)]  # fmt: skip
  batch = rollout.to_batch([p for p, _ in prompts], responses, prompt_len=PL,
                           response_len=RL, pad_id=0)  # fmt: skip
  batch.update(images_lib.pack([im for _, im in prompts], VIS))
  T = PL + RL
  batch.update(
    ref_logp_BxT=rng.normal(-3.0, 0.5, (B, T)).astype(np.float32),
    behaviour_logp_BxT=rng.normal(-3.0, 0.5, (B, T)).astype(np.float32),
    advantages_B=rng.normal(0.0, 1.0, B).astype(np.float32),
  )
  return batch


def _run(name):
  mesh = _mesh(name)
  with sharding.mesh_context(mesh):
    state = train.init_state(jax.random.key(0), model=CFG, tx=TX, mesh=mesh)
    init = sharding.gather(state.params)
    batch = sharding.shard_batch(_batch(), mesh)

    def loss_fn(p):
      lp = model_lib.sequence_logprobs(
        p, batch["tokens_BxT"], batch["seg_BxT"], model=CFG,
        images=vision.images_of(batch))  # fmt: skip
      return objective.loss(lp, batch, cfg=LOSS)[0]

    # the gradients are what train.update_step applies (one compile of the
    # backward pass is enough for the suite's time)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    placement = jax.tree.map(lambda x: x.sharding, state.params)
    prompts = _prompts()
    toks, seg = sampler.left_pad([p for p, _ in prompts], PL, 0)
    imgs = images_lib.pack([im for _, im in prompts], VIS)
    toks, seg, imgs = sharding.shard_batch((toks, seg, imgs), mesh)
    s = sampler.generate(
      state.params, toks, seg, jax.random.key(5), model=CFG,
      cfg=sampler.SamplingConfig(temperature=1.0), budget=5,
      cache_len=PL + 5, images=imgs,
    )  # fmt: skip
    return dict(
      init=init, loss=float(loss), grads=sharding.gather(grads),
      placement=placement,
      sample=sharding.gather(dict(tokens=s.tokens, logp=s.logp)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def one():
  return _run("one")


@pytest.mark.parametrize("name", list(MESHES))
def test_with_images_sharded_equals_one_device(one, name):
  run = _run(name)
  ruled = train.state_shardings(CFG, TX, _mesh(name)).params
  for path, got in jax.tree_util.tree_flatten_with_path(run["placement"])[0]:
    want = functools.reduce(lambda t, k: t[k.key], path, ruled)
    shape = functools.reduce(lambda t, k: t[k.key], path, one["init"]).shape
    assert got.shard_shape(shape) == want.shard_shape(shape), path
  if name == "dp_fsdp_tp":  # the tower is split, not copied
    q = run["placement"]["params"]["vision"]["layers"]["q"]
    assert q.shard_shape((2, 16, 2, 8)) == (2, 8, 1, 8)
  jax.tree.map(np.testing.assert_array_equal, run["init"], one["init"])
  np.testing.assert_allclose(run["loss"], one["loss"], rtol=1e-5)
  top = max(np.abs(g).max() for g in jax.tree.leaves(one["grads"]))
  for path, g1 in jax.tree_util.tree_flatten_with_path(one["grads"])[0]:
    g8 = functools.reduce(lambda t, k: t[k.key], path, run["grads"])
    # the key bias's gradient is 0 in exact arithmetic (it shifts every
    # score of a query alike): only rounding noise is left, compared on
    # the scale of the largest gradient
    if "k_bias" in jax.tree_util.keystr(path):
      scale = 1e-2 * top
    else:  # the tower learns too
      assert np.abs(g1).max() > 1e-3 * top, jax.tree_util.keystr(path)
      scale = max(np.abs(g1).max(), 1e-3 * top)
    np.testing.assert_allclose(g8, g1, atol=1e-5 * scale, rtol=1e-4,
                               err_msg=f"{name} {jax.tree_util.keystr(path)}")
  np.testing.assert_array_equal(run["sample"]["tokens"],
                                one["sample"]["tokens"])  # fmt: skip
  np.testing.assert_allclose(run["sample"]["logp"], one["sample"]["logp"],
                             atol=1e-5, rtol=1e-5)  # fmt: skip
