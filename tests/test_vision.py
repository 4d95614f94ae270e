"""k15.vision + k15.images: the tower spliced into interleaved sequences.

Pinned here: each placeholder, wherever it sits (any number of images per
row, at any position, of different resolutions, left padding), gets its
own patch's feature; image positions are never targets; prefill with
images then decode == the full forward; bad images are named.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import images as images_lib
from k15 import model as model_lib
from k15 import sampler, vision
from k15.model import Decoder, ModelConfig

VIS = vision.VisionConfig(
  patch_size=2, channels=3, max_patches=12, width=16, num_layers=2,
  num_heads=2, mlp_dim=32, pos_grid=4,
)  # fmt: skip
CFG = ModelConfig(
  vocab_size=40, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
  head_dim=8, mlp_dim=64, max_len=64, emb_init_scale=0.5, vision=VIS,
)  # fmt: skip
IMG = CFG.image_token  # 39: the last id


class _Tok:
  """A tokenizer stand-in: one id per character (ids 3..)."""

  vocab_size, pad_id, bos_id, eos_id = 36, 0, 1, 2

  def encode(self, text):
    return [3 + (ord(c) % 30) for c in text]

  def decode(self, ids):
    return "".join(chr(97 + i % 26) for i in ids)


def _params(cfg=CFG, seed=0):
  return nn.unbox(model_lib.init_params(jax.random.key(seed), model=cfg))


def _image(rng, h, w, p=2):
  return rng.integers(0, 256, (h * p, w * p, 3)).astype(np.uint8)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, tokens, seg, images, *, cfg=CFG):
  pos = model_lib.positions_from_segments(seg)
  return Decoder(cfg).apply(params, tokens, pos, seg, images=images)[0]


def _rows(rng, tok=None):
  """Three rows: images at the start, in the middle (two, of different
  resolutions) and none; left-padded to one bucket."""
  tok = tok or _Tok()
  questions = [
    ("<image> ab", [_image(rng, 2, 3)]),
    ("x <image> y <image>z", [_image(rng, 1, 2), _image(rng, 2, 2)]),
    ("plain text", []),
  ]
  enc = [
    images_lib.encode_prompt(tok, q, ims, model=CFG, where=f"row {i}")
    for i, (q, ims) in enumerate(questions)
  ]
  toks, seg = sampler.left_pad([e[0] for e in enc], 24, 0)
  return toks, seg, [e[1] for e in enc], questions


def test_encode_prompt_expands_each_marker_to_its_patches(rng):
  toks, seg, patches, _ = _rows(rng)
  assert [int((t == IMG).sum()) for t in toks] == [6, 6, 0]
  # row 1: 2 placeholders, text, 4 placeholders, in prompt order
  row = toks[1][seg[1] == 1].tolist()
  first = row.index(IMG)
  assert row[first : first + 2] == [IMG, IMG] and row[first + 2] != IMG
  np.testing.assert_array_equal(patches[1].img_n, [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(
    patches[1].pos_nx2, [[0, 0], [0, 1], [0, 0], [0, 1], [1, 0], [1, 1]]
  )
  assert patches[2] is None


def test_splice_puts_each_patch_feature_at_its_placeholder(rng):
  """The model's forward equals a reference that runs the tower, then
  writes feature k of a row into the row's k-th placeholder by hand, then
  runs the layers: images at the start, the middle, two per row, none."""
  params = _params()
  toks, seg, patches, _ = _rows(rng)
  imgs = images_lib.pack(patches, VIS)
  got = np.asarray(_forward(params, toks, seg, imgs))

  dec = Decoder(CFG)
  feats = np.asarray(dec.apply(params, imgs, method=Decoder.image_features))
  x = np.array(dec.apply(params, jnp.asarray(toks), method=Decoder.embed))
  for b in range(len(toks)):
    at = np.flatnonzero(toks[b] == IMG)
    for k, t in enumerate(at):
      x[b, t] = feats[b, k]
  pos = model_lib.positions_from_segments(jnp.asarray(seg))
  want = dec.apply(params, x, pos, seg, method=Decoder.layers_from)[0]
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=1e-5)
  # and the features are the images': another image changes them
  assert np.abs(feats[0, :6] - feats[1, :6]).max() > 1e-3


def test_features_depend_only_on_their_own_image(rng):
  """Patches attend within their image: changing image 1 of row 1 leaves
  image 0's features (and row 0's) unchanged; the text before the first
  placeholder is unchanged too (causal)."""
  params = _params()
  toks, seg, patches, qs = _rows(rng)
  imgs = images_lib.pack(patches, VIS)
  other = dict(imgs)
  px = imgs["pixels_BxNxX"].copy()
  px[1, 2:6] = rng.uniform(-1, 1, px[1, 2:6].shape)
  other["pixels_BxNxX"] = px
  dec = Decoder(CFG)
  f0 = np.asarray(dec.apply(params, imgs, method=Decoder.image_features))
  f1 = np.asarray(dec.apply(params, other, method=Decoder.image_features))
  np.testing.assert_allclose(f0[1, :2], f1[1, :2], atol=1e-6)
  np.testing.assert_allclose(f0[0], f1[0], atol=1e-6)
  assert np.abs(f0[1, 2:6] - f1[1, 2:6]).max() > 1e-3
  y0 = np.asarray(_forward(params, toks, seg, imgs))[..., :IMG]
  y1 = np.asarray(_forward(params, toks, seg, other))[..., :IMG]
  second = np.flatnonzero(toks[1] == IMG)[2]
  np.testing.assert_allclose(y0[1, :second], y1[1, :second], atol=1e-5)
  assert np.abs(y0[1, second:] - y1[1, second:]).max() > 1e-4


def test_image_position_is_never_a_target_or_a_sample(rng):
  params = _params()
  toks, seg, patches, _ = _rows(rng)
  imgs = images_lib.pack(patches, VIS)
  lp = np.asarray(
    jax.jit(model_lib.sequence_logprobs, static_argnames="model")(
      params, toks, seg, model=CFG, images=imgs
    )
  )
  assert (lp[toks == IMG] == 0).all()
  assert (lp[(toks != IMG) & (seg == 1)][1:] < 0).all()
  logits = np.asarray(_forward(params, toks, seg, imgs))
  assert np.isneginf(logits[..., IMG]).all()
  assert np.isfinite(logits[..., :IMG]).all()


def test_prefill_with_images_then_decode_equals_full_forward(rng):
  """The sampler's prefill takes the images; its decode steps (text only)
  give the log-probs the full forward over prompt + response gives."""
  params = _params(seed=1)
  toks, seg, patches, _ = _rows(rng)
  imgs = images_lib.pack(patches, VIS)
  N = 6
  cfg = sampler.SamplingConfig(temperature=1.0)
  state = sampler.generate(
    params, toks, seg, jax.random.key(3), model=CFG, cfg=cfg, budget=N,
    cache_len=24 + N, images=imgs,
  )  # fmt: skip
  gen = np.asarray(state.tokens)
  assert (gen != IMG).all()
  full = np.concatenate([toks, gen], axis=1)
  full_seg = np.concatenate([seg, np.ones_like(gen)], axis=1)
  lp = model_lib.sequence_logprobs(
    params, full, full_seg, model=CFG, images=imgs
  )
  np.testing.assert_allclose(
    np.asarray(state.logp), np.asarray(lp)[:, 24:], atol=1e-4, rtol=1e-4
  )
  # without its images, row 0's prompt is a different prompt
  lp_text = model_lib.sequence_logprobs(params, full, full_seg, model=CFG)
  gap = np.abs(np.asarray(lp_text)[0, 24:] - np.asarray(lp)[0, 24:])
  assert gap.max() > 1e-3


@pytest.mark.parametrize(
  "image, match",
  [
    (np.zeros((4, 4, 3), np.float32), "dtype float32"),
    (np.zeros((4, 4), np.uint8), r"shape \(4, 4\)"),
    (np.zeros((4, 4, 1), np.uint8), "channels=3"),
    (np.zeros((5, 4, 3), np.uint8), "multiples of model.vision.patch_size=2"),
    (np.zeros((2, 26, 3), np.uint8), "13 patches, more than"),
    (np.zeros((2, 10, 3), np.uint8), "at most 4 per side"),
    ([[0]], "is a list"),
  ],
)
def test_bad_images_are_named(image, match):
  with pytest.raises(images_lib.ImageError,
                     match=f"rl problem 7: image 0.*{match}"):
    images_lib.encode_prompt(
      _Tok(), "<image>?", [image], model=CFG, where="rl problem 7"
    )


def test_too_many_patches_in_one_row_and_marker_count_are_named(rng):
  ims = [_image(rng, 2, 3), _image(rng, 2, 2), _image(rng, 1, 2)]
  with pytest.raises(images_lib.ImageError, match=r"row 3: its 3 images "
                     r"have 6 \+ 4 \+ 2 = 12"):
    images_lib.encode_prompt(
      _Tok(), "<image><image><image>", ims + [_image(rng, 1, 1)][:0],
      model=dataclasses.replace(CFG, vision=dataclasses.replace(
        VIS, max_patches=11)), where="row 3",
    )  # fmt: skip
  with pytest.raises(images_lib.ImageError, match="row 4: the question has "
                     "1 <image> markers but the row has 2 images"):
    images_lib.encode_prompt(_Tok(), "<image>", ims[:2], model=CFG,
                             where="row 4")


def test_missing_image_file_in_a_jsonl_row_is_named(tmp_path):
  with pytest.raises(images_lib.ImageError, match=r"q.jsonl:3: image 0: "
                     r"image file .*nope.npy does not exist"):
    images_lib.row_images({"image": "nope.npy"}, base_dir=str(tmp_path),
                          where="q.jsonl:3")
  np.save(tmp_path / "ok.npy", np.zeros((2, 2, 3), np.uint8))
  got = images_lib.row_images({"image": ["ok.npy"]}, base_dir=str(tmp_path),
                              where="q.jsonl:4")
  assert got[0].shape == (2, 2, 3)


def test_vision_config_rejects_bad_fields():
  with pytest.raises(ValueError, match="model.vision.width=10 is not a mult"):
    vision.VisionConfig(width=10, num_heads=4)
  with pytest.raises(ValueError, match="model.vision.pos_init=-1"):
    vision.VisionConfig(pos_init=-1.0)
  with pytest.raises(ValueError, match="model.vision.attention='ring'"):
    vision.VisionConfig(attention="ring")
  with pytest.raises(ValueError, match="model.vision.image_token=99"):
    dataclasses.replace(CFG, vision=dataclasses.replace(VIS, image_token=99))


def test_tower_params_carry_their_logical_axes():
  boxed = model_lib.init_params(jax.random.key(0), model=CFG)["params"]
  names = jax.tree.map(lambda x: x.names, boxed,
                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert names["vision"]["layers"]["q"] == (
    "vision_layers", "vision_embed", "vision_heads", "vision_head_dim")
  assert names["vision"]["pos_embed"] == (
    "vision_rows", "vision_cols", "vision_embed")
  assert names["projector"]["out"] == ("projector", "embed")


def test_pos_init_sets_the_position_tables_scale():
  for scale in (0.02, 1.0):
    cfg = dataclasses.replace(
      CFG, vision=dataclasses.replace(VIS, pos_grid=16, pos_init=scale))
    table = _params(cfg)["params"]["vision"]["pos_embed"]
    assert abs(float(np.std(table)) / scale - 1) < 0.1


def test_frozen_lm_stage_leaves_the_lm_bitwise_unchanged(rng):
  """The tower stage's optimizer (a mask: only vision + projector) over a
  few SFT steps on image rows, with weight decay and clipping on: every
  LM param is bitwise what it was; the tower and projector moved. (Every
  param, the LM's included, has a nonzero gradient on such a batch:
  test_vision_sharding checks it, so the mask is what holds the LM.)"""
  from k15 import sharding, train  # noqa: PLC0415
  from k15.stages import tower  # noqa: PLC0415

  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  toks, seg, patches, _ = _rows(rng)
  batch = dict(tokens_BxT=toks, seg_BxT=seg,
               loss_mask_BxT=(seg > 0) & (toks != IMG),
               **images_lib.pack(patches, VIS))  # fmt: skip
  opt = train.OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5)
  tx = train.make_optimizer(opt, tower.TRAINABLE)
  state = train.init_state(jax.random.key(0), model=CFG, tx=tx, mesh=mesh)
  before = jax.tree.map(np.asarray, state.params["params"])
  for _ in range(3):
    state, m = train.sft_step(state, batch, model=CFG, tx=tx)
  assert np.isfinite(float(m["loss"]))
  after = jax.tree.map(np.asarray, state.params["params"])
  assert set(tower.TRAINABLE) < set(before)
  for name in before:
    pairs = zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]),
                strict=True)  # fmt: skip
    same = [np.array_equal(a, b) for a, b in pairs]
    if name in tower.TRAINABLE:
      assert not any(same), name
    else:
      assert all(same), name
