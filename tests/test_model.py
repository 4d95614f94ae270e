"""k15.model: KV-cache decoding == full forward, chunked log-probs, axes."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import model as model_lib
from k15.model import Decoder, ModelConfig

CFG = ModelConfig(
  vocab_size=48,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  max_len=64,
  emb_init_scale=0.5,
)


def _params(cfg=CFG, seed=0):
  return nn.unbox(model_lib.init_params(jax.random.key(seed), model=cfg))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _apply(params, tokens_BxT, pos_BxT, seg_BxT, cache=None, index=0, *, cfg):
  return Decoder(cfg).apply(params, tokens_BxT, pos_BxT, seg_BxT, cache, index)


_seq_logprobs = jax.jit(model_lib.sequence_logprobs, static_argnames=("model",))


def _full_logits(params, tokens_BxT, seg_BxT, cfg=CFG):
  pos = model_lib.positions_from_segments(jnp.asarray(seg_BxT))
  logits, cache = _apply(params, tokens_BxT, pos, seg_BxT, cfg=cfg)
  assert cache is None
  return np.asarray(logits)


@pytest.mark.parametrize(
  "cfg",
  [
    CFG,
    # untied head, q/k/v biases, odd cache length
    ModelConfig(
      vocab_size=40,
      num_layers=3,
      d_model=24,
      num_heads=6,
      num_kv_heads=3,
      head_dim=4,
      mlp_dim=48,
      tie_embeddings=False,
      qkv_bias=True,
    ),
  ],
  ids=["tied", "untied_bias"],
)
def test_prefill_then_decode_equals_full_forward(rng, cfg):
  """Rows are left-padded prompts of different lengths (one of length 1)."""
  params = _params(cfg, seed=1)
  if cfg.qkv_bias:  # zero-initialised: make them matter
    params = jax.tree_util.tree_map_with_path(
      lambda p, x: (
        x + 0.3 * jnp.ones_like(x) if "bias" in jax.tree_util.keystr(p) else x
      ),
      params,
    )
  P, N, S = 7, 6, 17  # prompt bucket, decode steps, cache length
  lengths = [7, 4, 1, 5]
  B = len(lengths)
  seq_BxT = rng.integers(1, cfg.vocab_size, (B, P + N)).astype(np.int32)
  seg_BxT = np.ones((B, P + N), np.int32)
  for b, n in enumerate(lengths):
    seg_BxT[b, : P - n] = 0
    seq_BxT[b, : P - n] = 0
  full_BxTxV = _full_logits(params, seq_BxT, seg_BxT, cfg)

  cache = model_lib.init_cache(cfg, B, S)
  pos_BxP = model_lib.positions_from_segments(jnp.asarray(seg_BxT[:, :P]))
  logits, cache = _apply(
    params, seq_BxT[:, :P], pos_BxP, seg_BxT[:, :P], cache, 0, cfg=cfg
  )
  real = seg_BxT[:, :P] == 1
  np.testing.assert_allclose(
    np.asarray(logits)[real], full_BxTxV[:, :P][real], atol=1e-5, rtol=1e-5
  )
  next_pos = np.asarray(lengths)
  for t in range(N):
    logits, cache = _apply(
      params,
      seq_BxT[:, P + t : P + t + 1],
      next_pos[:, None] + t,
      np.ones((B, 1), np.int32),
      cache,
      P + t,
      cfg=cfg,
    )
    np.testing.assert_allclose(
      np.asarray(logits)[:, 0],
      full_BxTxV[:, P + t],
      atol=1e-5,
      rtol=1e-5,
      err_msg=f"decode step {t}",
    )
  # the cache holds exactly the written slots, with their positions
  seg_cache = np.asarray(cache["seg"])
  np.testing.assert_array_equal(seg_cache[:, : P + N], seg_BxT)
  assert not seg_cache[:, P + N :].any()
  np.testing.assert_array_equal(
    np.asarray(cache["pos"])[:, : P + N][seg_BxT == 1],
    np.asarray(model_lib.positions_from_segments(seg_BxT))[seg_BxT == 1],
  )


@pytest.mark.parametrize(
  "cfg, tol",
  [
    (CFG, 1e-5),
    (dataclasses.replace(CFG, tie_embeddings=False, qkv_bias=True), 1e-5),
    # a bfloat16 cache under a float32 model: keys and values rounded to
    # 8 bits of mantissa, logits up to ~10
    (dataclasses.replace(CFG, cache_dtype="bfloat16"), 1e-1),
  ],
  ids=["tied", "untied_bias", "bf16_cache"],
)
def test_decode_step_equals_full_forward(rng, cfg, tol):
  """`decode_step` (the sampler's path: the same `block`s over
  `decode_weights` and a `decode_cache`) after a prefill gives the full
  forward's logits, step after step."""
  params = _params(cfg, seed=2)
  if cfg.qkv_bias:
    params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 if "bias" in jax.tree_util.keystr(p) else x,
      params,
    )
  P, N, S = 5, 6, 13
  lengths = [5, 2, 1]
  B = len(lengths)
  seq_BxT = rng.integers(1, cfg.vocab_size, (B, P + N)).astype(np.int32)
  seg_BxT = np.ones((B, P + N), np.int32)
  for b, n in enumerate(lengths):
    seg_BxT[b, : P - n] = 0
  full_BxTxV = _full_logits(params, seq_BxT, seg_BxT, cfg)
  pos_BxP = model_lib.positions_from_segments(jnp.asarray(seg_BxT[:, :P]))
  _, cache = _apply(
    params,
    seq_BxT[:, :P],
    pos_BxP,
    seg_BxT[:, :P],
    model_lib.init_cache(cfg, B, P),
    0,
    cfg=cfg,
  )
  cache = model_lib.decode_cache(cache, S, cfg)
  assert cache["k"][0].shape == (B, cfg.num_kv_heads, cfg.head_dim, S)
  assert cache["v"][0].dtype == cfg.jnp_cache_dtype
  w = model_lib.decode_weights(params, cfg)
  step = jax.jit(functools.partial(model_lib.decode_step, cfg=cfg))
  for t in range(N):
    logits_BxV, cache = step(
      w,
      jnp.asarray(seq_BxT[:, P + t]),
      jnp.asarray(lengths) + t,
      jnp.ones((B,), jnp.int32),
      cache,
      P + t,
    )
    np.testing.assert_allclose(
      np.asarray(logits_BxV),
      full_BxTxV[:, P + t],
      atol=tol,
      rtol=tol,
      err_msg=f"decode step {t}",
    )


def test_left_padding_does_not_change_logits(rng):
  """A row's logits depend neither on padding before it nor tokens after."""
  params = _params()
  row = rng.integers(1, CFG.vocab_size, 8).astype(np.int32)
  toks = np.stack([np.concatenate([np.zeros(3, np.int32), row[:5]]), row])
  seg = np.ones((2, 8), np.int32)
  seg[0, :3] = 0
  logits = _full_logits(params, toks, seg)
  np.testing.assert_allclose(logits[0, 3:], logits[1, :5], atol=1e-5, rtol=1e-5)
  assert not np.allclose(logits[1, 5], logits[1, 4], atol=1e-3)


def test_positions_from_segments():
  seg = jnp.asarray(
    [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
    model_lib.positions_from_segments(seg),
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
  )


def _direct_logprobs(h_BxTxD, w_DxV, tgt_BxT):
  logits = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV)
  lp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(lp, tgt_BxT[..., None], -1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 12, 100])
def test_token_logprobs_chunked_matches_direct(rng, chunk):
  B, T, D, V = 2, 12, 8, 19
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  tgt = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  got = jax.jit(model_lib.token_logprobs, static_argnums=3)(h, w, tgt, chunk)
  want = _direct_logprobs(h, w, tgt)
  assert got.shape == (B, T)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  # a weighted sum, so every position's gradient is distinct
  c = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  f = lambda fn: jax.jit(jax.grad(lambda h, w: jnp.sum(c * fn(h, w)), (0, 1)))
  gh, gw = f(lambda h, w: model_lib.token_logprobs(h, w, tgt, chunk))(h, w)
  wh, ww = f(lambda h, w: _direct_logprobs(h, w, tgt))(h, w)
  np.testing.assert_allclose(gh, wh, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gw, ww, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_matches_full_logits(rng):
  """Entry t scores token t given tokens < t; entry 0 and pads are 0."""
  cfg = dataclasses.replace(CFG, logits_chunk=4)
  params = _params(cfg)
  toks = rng.integers(1, cfg.vocab_size, (2, 9)).astype(np.int32)
  seg = np.ones((2, 9), np.int32)
  seg[1, :3] = 0
  toks[1, :3] = 0
  lp = np.asarray(_seq_logprobs(params, toks, seg, model=cfg))
  logits = _full_logits(params, toks, seg, cfg)
  want = np.take_along_axis(
    np.asarray(jax.nn.log_softmax(logits[:, :-1])), toks[:, 1:, None], -1
  )[..., 0]
  assert (lp[:, 0] == 0).all()
  np.testing.assert_allclose(lp[0, 1:], want[0], atol=1e-5, rtol=1e-5)
  # row 1: real tokens start at 3; entry 4.. scores them
  np.testing.assert_allclose(lp[1, 4:], want[1, 3:], atol=1e-5, rtol=1e-5)


def _abstract(cfg):
  """The boxed params' shapes and names, traced without compiling."""
  return jax.eval_shape(
    functools.partial(model_lib.init_params, model=cfg), jax.random.key(0)
  )


def test_params_carry_logical_axis_names():
  boxed = _abstract(CFG)
  names = jax.tree.map(
    lambda x: x.names,
    boxed["params"],
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  assert names["embedding"] == ("vocab", "embed")
  assert names["final_norm"]["scale"] == ("embed",)
  layers = names["layers"]
  assert layers["q"] == ("layers", "embed", "heads", "head_dim")
  assert layers["k"] == ("layers", "embed", "kv_heads", "head_dim")
  assert layers["v"] == ("layers", "embed", "kv_heads", "head_dim")
  assert layers["o"] == ("layers", "heads", "head_dim", "embed")
  assert layers["gate"] == ("layers", "embed", "mlp")
  assert layers["up"] == ("layers", "embed", "mlp")
  assert layers["down"] == ("layers", "mlp", "embed")
  assert layers["attn_norm"]["scale"] == ("layers", "embed")
  # every leaf is annotated, and the leading axis of stacked layers is L
  leaves = jax.tree.leaves(
    boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  assert all(isinstance(x, nn.Partitioned) for x in leaves)
  assert boxed["params"]["layers"]["q"].value.shape == (
    CFG.num_layers,
    CFG.d_model,
    CFG.num_heads,
    CFG.head_dim,
  )
  n = sum(x.value.size for x in leaves)
  assert n == CFG.num_params()


def test_untied_head_has_its_own_axes():
  cfg = dataclasses.replace(CFG, tie_embeddings=False, qkv_bias=True)
  boxed = _abstract(cfg)["params"]
  assert boxed["lm_head"].names == ("embed", "vocab")
  assert boxed["layers"]["q_bias"].names == ("layers", "heads", "head_dim")
  n = sum(
    x.value.size
    for x in jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
  )
  assert n == cfg.num_params()


@pytest.mark.parametrize(
  "kw, field",
  [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(remat="sometimes"), "remat"),
    (dict(num_kv_heads=0), "num_kv_heads"),  # not a ZeroDivisionError
    (dict(d_model=0), "d_model"),
    (dict(num_layers=-1), "num_layers"),
    (dict(vocab_size=-8), "vocab_size"),
    (dict(logits_chunk=0), "logits_chunk"),
    (dict(cache_dtype="int8"), "cache_dtype"),
  ],
)
def test_model_config_rejects_bad_shapes(kw, field):
  with pytest.raises(ValueError, match=f"model.{field}"):
    ModelConfig(**kw)


def test_remat_does_not_change_outputs(rng):
  toks = rng.integers(1, CFG.vocab_size, (2, 6)).astype(np.int32)
  seg = np.ones_like(toks)
  params = _params()
  base = _seq_logprobs(params, toks, seg, model=CFG)
  for remat in ("full", "dots"):
    cfg = dataclasses.replace(CFG, remat=remat)
    np.testing.assert_allclose(
      _seq_logprobs(params, toks, seg, model=cfg), base, atol=1e-6
    )


def test_model_config_allows_vocab_from_the_tokenizer():
  # configs leave vocab_size 0 until the tokenizer exists
  assert ModelConfig(vocab_size=0).vocab_size == 0
