"""The decoder: RMSNorm, RoPE, GQA attention, SwiGLU, scan over layers.

Dimension key (suffixes on tensor names):
  B batch, T tokens of this call, S cache length (keys), D model width,
  H query heads, K kv heads, Dh head dim, F mlp width, V vocab, L layers.

One definition of a layer, `block`, serves training, prefill and decode:
`Decoder` (flax, scanned over layers) runs it for training, scoring and
prefill, and `decode_step` for the sampler's one-token steps. Every token
carries an explicit position and segment id (0 = padding), so packed
sequences, left-padded prompts and a partly filled KV cache all use one mask
rule (see `attention`). The cache is explicit state passed in and out:

  cache = {"k": [L,B,S,K,Dh], "v": [L,B,S,K,Dh], "pos": [B,S], "seg": [B,S]}

and a call with a cache writes its T new keys at slots [index, index + T).
`decode_step` reads the same cache laid out for decode (`decode_cache`):
per layer, keys [B,K,Dh,S] and values [B,K,S,Dh], in `cache_dtype`.
Params carry logical axis names (`vocab, embed, mlp, heads, kv_heads,
head_dim, layers`) that `k15.sharding` maps onto the mesh.

With `ModelConfig.vision` set, the params also hold a ViT tower and its
projector (`k15.vision`), whose features take the place of the image
placeholder tokens' embeddings in every forward that is given `images`
(training, scoring, prefill); decode steps only ever see text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k15 import attention
from k15 import vision as vision_lib

Params = Any
Cache = dict[str, jax.Array]
_CACHE_DTYPES = ("", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model shape; hashable so it can be a jit static argument."""

  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 512
  max_len: int = 256
  rope_theta: float = 10_000.0
  # RoPE frequency scaling as in HF `rope_scaling`: "" (none),
  # "linear:factor=4" or "llama3:factor=8,low_freq_factor=1,
  # high_freq_factor=4,original_max_position_embeddings=8192".
  rope_scaling: str = ""
  tie_embeddings: bool = True
  qkv_bias: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"  # activations
  # KV cache: "" = `dtype`. float32 with a bf16 `dtype` trades memory for
  # speed on CPU (XLA:CPU round-trips a bf16 cache through f32 around every
  # write, and its bf16 batched matmuls are slower).
  cache_dtype: str = ""
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots
  attention: str = "dense"  # dense | blockwise | ring | cudnn | splash
  attention_block: int = 512
  logits_chunk: int = 1024  # tokens per chunk when computing log-probs
  emb_init_scale: float = 1.0
  # a ViT tower + projector for interleaved image-text sequences
  vision: vision_lib.VisionConfig | None = None

  def __post_init__(self):
    for name in ("num_layers", "d_model", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "max_len", "logits_chunk",
                 "attention_block"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
    if self.vocab_size < 0:  # 0: filled in from the tokenizer
      raise ValueError(f"model.vocab_size={self.vocab_size} must be >= 0")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} is not a multiple of "
          f"model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE)")
    if self.cache_dtype not in _CACHE_DTYPES:
      raise ValueError(
          f"model.cache_dtype={self.cache_dtype!r}: \"\" (= model.dtype) | "
          + " | ".join(_CACHE_DTYPES[1:]))
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat={self.remat!r}: none | full | dots")
    rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    if self.vision is not None and self.vocab_size and not (
        0 <= self.image_token < self.vocab_size):
      raise ValueError(
          f"model.vision.image_token={self.vision.image_token} is not an id "
          f"of model.vocab_size={self.vocab_size}")

  @property
  def image_token(self) -> int | None:
    """The image placeholder id (None without a tower): vision.image_token,
    or the last id of the vocabulary when that is -1."""
    if self.vision is None:
      return None
    t = self.vision.image_token
    return t if t >= 0 else self.vocab_size - 1

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_cache_dtype(self):
    return jnp.dtype(self.cache_dtype or self.dtype)

  def num_params(self) -> int:
    D, F, V = self.d_model, self.mlp_dim, self.vocab_size
    H, K, Dh = self.num_heads, self.num_kv_heads, self.head_dim
    attn = D * H * Dh * 2 + D * K * Dh * 2
    if self.qkv_bias:
      attn += (H + 2 * K) * Dh
    per_layer = attn + 3 * D * F + 2 * D
    emb = V * D * (1 if self.tie_embeddings else 2)
    tower = self.vision.num_params(D) if self.vision is not None else 0
    return self.num_layers * per_layer + emb + D + tower


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(dtype))


def parse_rope_scaling(spec: str) -> tuple[str, dict[str, float]]:
  kind, _, args = spec.partition(":")
  params = {}
  for part in filter(None, args.split(",")):
    key, eq, value = part.partition("=")
    try:
      params[key.strip()] = float(value)
    except ValueError:
      raise ValueError(f"model.rope_scaling={spec!r}: {part!r} is not "
                       f"key=number") from None
  return kind.strip(), params


def rope_frequencies(head_dim: int, theta: float, scaling: str = ""
                     ) -> np.ndarray:
  """Inverse frequencies [Dh/2] (f32), as HF computes them for `scaling`.

  A static numpy constant, so a bad `scaling` spec fails at config time.
  """
  inv = 1.0 / (np.float32(theta) ** (
      np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  if not scaling:
    return inv.astype(np.float32)
  kind, p = parse_rope_scaling(scaling)
  need = {"linear": {"factor"},
          "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"}}.get(kind)
  if need is None:
    raise ValueError(f"model.rope_scaling={scaling!r}: unsupported type "
                     f"{kind!r} (supported: linear, llama3)")
  if set(p) != need:
    raise ValueError(f"model.rope_scaling={scaling!r}: {kind} takes exactly "
                     f"{sorted(need)}")
  if kind == "linear":
    return (inv / np.float32(p["factor"])).astype(np.float32)
  # llama3: keep high frequencies, divide low ones by `factor`, interpolate
  # smoothly in between (HF `_compute_llama3_parameters`).
  factor, old_len = p["factor"], p["original_max_position_embeddings"]
  lo, hi = p["low_freq_factor"], p["high_freq_factor"]
  wavelen = 2 * np.pi / inv
  out = np.where(wavelen > old_len / lo, inv / factor, inv)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
  out = np.where(mid, (1 - smooth) * out / factor + smooth * out, out)
  return out.astype(np.float32)


def rope(x_BxTxNxDh: jax.Array, pos_BxT: jax.Array, theta: float,
         scaling: str = ""):
  """Rotary embedding, rotate-half layout (as Llama/Qwen2 checkpoints)."""
  freq = jnp.asarray(rope_frequencies(x_BxTxNxDh.shape[-1], theta, scaling))
  ang_BxTxF = pos_BxT[..., None].astype(jnp.float32) * freq
  sin = jnp.sin(ang_BxTxF)[:, :, None, :]
  cos = jnp.cos(ang_BxTxF)[:, :, None, :]
  x = x_BxTxNxDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxDh.dtype)


def rms_norm(x_BxTxD, scale_D, cfg: ModelConfig):
  """RMSNorm in float32, returned in the activation dtype."""
  x = x_BxTxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
  return (x * scale_D.astype(jnp.float32)).astype(cfg.jnp_dtype)


class NormScale(nn.Module):
  """A norm's learned scale, as param `<name>/scale` ([D], ones)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self):
    return _param(self, "scale", nn.initializers.ones, (self.cfg.d_model,),
                  ("embed",), self.cfg.param_dtype)


# einsum letters of every projection: (input, the weight's input axes, its
# output axes). Params hold [in..., out...]; `decode_weights` 2-D [out, in].
_PROJ = dict(
    q=("btd", "d", "hk"), k=("btd", "d", "hk"), v=("btd", "d", "hk"),
    o=("bthk", "hk", "d"),
    gate=("btd", "d", "f"), up=("btd", "d", "f"), down=("btf", "f", "d"),
    logits=("btd", "d", "v"))


def project(x, w, name: str, dt, *, decode: bool = False):
  """x @ w for projection `name`, in dtype dt: [B, T, out...].

  decode: w is `decode_weights`' [out, in], and the output [B, T, out]
  flat. x @ w.T, contracting both minor axes, is the faster matmul on
  XLA:CPU (1.4x for the MLP and the logits at 32 rows); it accumulates in
  float32, which is XLA:CPU's fast bf16 path. (3-D [out..., in...] weights
  made XLA:CPU copy them into a matmul layout every step.)
  """
  x_sub, w_in, w_out = _PROJ[name]
  if decode:
    B, T = x.shape[:2]
    return jnp.einsum("bti,oi->bto", x.reshape(B, T, -1), w,
                      preferred_element_type=jnp.float32).astype(dt)
  return jnp.einsum(f"{x_sub},{w_in}{w_out}->bt{w_out}", x, w.astype(dt))


def block(w: dict, x_BxTxD, pos_BxT, attend, *, cfg: ModelConfig,
          decode: bool = False):
  """Pre-norm attention + SwiGLU: the one definition of a layer, which
  training, prefill (`Block`) and decode (`decode_step`) all run.

  w: the layer's weights under Block's param names. attend(q_BxTxHxDh,
  k_BxTxKxDh, v_BxTxKxDh) -> (out_BxTxHxDh, new layer kv) is the caller's
  attention: it writes the new keys where its cache keeps them and reads
  them back. decode: w as `decode_weights` lays it out, and no sharding
  constraints (one token per row has no length to split).
  Returns (x_BxTxD, new layer kv).
  """
  dt = cfg.jnp_dtype
  B, T = x_BxTxD.shape[:2]
  H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  proj = functools.partial(project, dt=dt, decode=decode)

  def constrain(x, names):
    return x if decode else nn.with_logical_constraint(x, names)

  x_BxTxD = constrain(
      x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
  h = rms_norm(x_BxTxD, w["attn_norm"], cfg)
  q_BxTxHxDh = proj(h, w["q"], "q").reshape(B, T, H, Dh)
  k_BxTxKxDh = proj(h, w["k"], "k").reshape(B, T, K, Dh)
  v_BxTxKxDh = proj(h, w["v"], "v").reshape(B, T, K, Dh)
  if cfg.qkv_bias:
    q_BxTxHxDh += w["q_bias"].astype(dt)
    k_BxTxKxDh += w["k_bias"].astype(dt)
    v_BxTxKxDh += w["v_bias"].astype(dt)
  q_BxTxHxDh = rope(q_BxTxHxDh, pos_BxT, cfg.rope_theta, cfg.rope_scaling)
  k_BxTxKxDh = rope(k_BxTxKxDh, pos_BxT, cfg.rope_theta, cfg.rope_scaling)
  out_BxTxHxDh, new_kv = attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh)
  x_BxTxD = x_BxTxD + proj(out_BxTxHxDh, w["o"], "o")

  h = rms_norm(x_BxTxD, w["mlp_norm"], cfg)
  g_BxTxF = proj(h, w["gate"], "gate")
  u_BxTxF = proj(h, w["up"], "up")
  g_BxTxF = constrain(
      g_BxTxF, ("activation_batch", "activation_length", "activation_mlp"))
  x_BxTxD = x_BxTxD + proj(nn.silu(g_BxTxF) * u_BxTxF, w["down"], "down")
  return x_BxTxD, new_kv


class Block(nn.Module):
  """A layer's params, run through `block` with `attention.attend` over
  this call's keys or a [B, S, K, Dh] cache. Returns (x, new kv or None)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, layer_kv, q_pos_BxT, q_seg_BxT, kv_pos_BxS,
               kv_seg_BxS, index):
    cfg = self.cfg
    D, H, K, Dh, F = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.mlp_dim)
    pdt = cfg.param_dtype
    # fan-in is D for q/k/v ([D, heads, Dh]) and H*Dh for o ([H, Dh, D]);
    # the default (in_axis=-2) would take the head count as fan-in.
    init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    init_o = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    # declared in this order: params draw their init keys in turn
    w = dict(attn_norm=NormScale(cfg, name="attn_norm")())
    w["q"] = _param(self, "q", init, (D, H, Dh),
                    ("embed", "heads", "head_dim"), pdt)
    w["k"] = _param(self, "k", init, (D, K, Dh),
                    ("embed", "kv_heads", "head_dim"), pdt)
    w["v"] = _param(self, "v", init, (D, K, Dh),
                    ("embed", "kv_heads", "head_dim"), pdt)
    w["o"] = _param(self, "o", init_o, (H, Dh, D),
                    ("heads", "head_dim", "embed"), pdt)
    if cfg.qkv_bias:
      for name, n, axis in (("q", H, "heads"), ("k", K, "kv_heads"),
                            ("v", K, "kv_heads")):
        w[f"{name}_bias"] = _param(self, f"{name}_bias", nn.initializers.zeros,
                                   (n, Dh), (axis, "head_dim"), pdt)
    w["mlp_norm"] = NormScale(cfg, name="mlp_norm")()
    init = nn.initializers.lecun_normal()  # 2-D kernels: [in, out]
    w["gate"] = _param(self, "gate", init, (D, F), ("embed", "mlp"), pdt)
    w["up"] = _param(self, "up", init, (D, F), ("embed", "mlp"), pdt)
    w["down"] = _param(self, "down", init, (F, D), ("mlp", "embed"), pdt)

    def attend(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh):
      if layer_kv is None:  # training / scoring: keys are this call's tokens
        keys, values, new_kv = k_BxTxKxDh, v_BxTxKxDh, None
      else:  # write into the cache, attend over all of it
        k_BxSxKxDh, v_BxSxKxDh = layer_kv
        keys = jax.lax.dynamic_update_slice_in_dim(
            k_BxSxKxDh, k_BxTxKxDh.astype(k_BxSxKxDh.dtype), index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(
            v_BxSxKxDh, v_BxTxKxDh.astype(v_BxSxKxDh.dtype), index, axis=1)
        new_kv = (keys, values)
      out_BxTxHxDh = attention.attend(
          q_BxTxHxDh, keys, values, q_pos_BxT=q_pos_BxT, q_seg_BxT=q_seg_BxT,
          kv_pos_BxS=kv_pos_BxS, kv_seg_BxS=kv_seg_BxS, impl=cfg.attention,
          block_q=cfg.attention_block, block_kv=cfg.attention_block)
      return out_BxTxHxDh, new_kv

    return block(w, x_BxTxD, q_pos_BxT, attend, cfg=cfg)


class Decoder(nn.Module):
  """Token ids in, final normalised hidden states (or logits) out."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = _param(
        self, "embedding",
        nn.initializers.normal(stddev=cfg.emb_init_scale),
        (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = _param(self, "lm_head", nn.initializers.lecun_normal(),
                            (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                            cfg.param_dtype)
    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                if cfg.remat == "dots" else None)
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    self.layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                 nn.broadcast), length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    self.final_norm = NormScale(cfg)
    if cfg.vision is not None:
      self.vision = vision_lib.VisionTower(cfg)
      self.projector = vision_lib.Projector(cfg)

  def __call__(self, tokens_BxT, pos_BxT, seg_BxT, cache: Cache | None = None,
               index=0, return_hidden: bool = False,
               images: dict | None = None):
    """Returns (hidden_BxTxD or logits_BxTxV, new cache or None).

    images: the tower's inputs for these rows (`vision.IMAGE_KEYS`), whose
    features replace the placeholder tokens' embeddings; None: text only.
    """
    x_BxTxD = self.embed(tokens_BxT, images)
    return self.layers_from(x_BxTxD, pos_BxT, seg_BxT, cache, index,
                            return_hidden)

  def embed(self, tokens_BxT, images: dict | None = None):
    """Token embeddings [B, T, D], image features at the placeholders."""
    # gather the fsdp-split table (as FSDP does for every weight) before
    # the lookup: a lookup into an embed-split table yields embed-split
    # rows, which XLA can only turn into batch-split ones by a full copy
    emb_VxD = nn.with_logical_constraint(self.embedding, ("vocab", None))
    x_BxTxD = emb_VxD.astype(self.cfg.jnp_dtype)[tokens_BxT]
    if images is None:
      return x_BxTxD
    if self.cfg.vision is None:
      raise ValueError("Decoder: images given but model.vision is not set")
    return vision_lib.splice(x_BxTxD, self.image_features(images),
                             tokens_BxT, self.cfg.image_token)

  def image_features(self, images: dict):
    """The projected tower features [B, N, D] of the rows' patches."""
    return self.projector(self.vision(*(images[k]
                                        for k in vision_lib.IMAGE_KEYS)))

  def layers_from(self, x_BxTxD, pos_BxT, seg_BxT, cache: Cache | None = None,
                  index=0, return_hidden: bool = False):
    """The layers, final norm (and head) over embeddings x_BxTxD."""
    if cache is None:
      kv_pos, kv_seg, layer_kv = pos_BxT, seg_BxT, None
    else:
      kv_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], pos_BxT,
                                                   index, axis=1)
      kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], seg_BxT,
                                                   index, axis=1)
      layer_kv = (cache["k"], cache["v"])
    x_BxTxD, new_kv = self.layers(x_BxTxD, layer_kv, pos_BxT, seg_BxT,
                                  kv_pos, kv_seg, index)
    h_BxTxD = rms_norm(x_BxTxD, self.final_norm(), self.cfg)
    new_cache = None
    if cache is not None:
      new_cache = dict(k=new_kv[0], v=new_kv[1], pos=kv_pos, seg=kv_seg)
    if return_hidden:
      return h_BxTxD, new_cache
    return self.logits(h_BxTxD), new_cache

  def logits(self, h_BxTxD):
    w_DxV = (self.embedding.T if self.cfg.tie_embeddings else self.lm_head)
    return vision_lib.mask_image_logit(project(
        h_BxTxD, w_DxV, "logits", h_BxTxD.dtype).astype(jnp.float32),
        self.cfg.image_token)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """An empty cache: every slot has segment 0, so nothing attends to it."""
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, cfg.jnp_dtype),
              v=jnp.zeros(shape, cfg.jnp_dtype),
              pos=jnp.zeros((batch, length), jnp.int32),
              seg=jnp.zeros((batch, length), jnp.int32))


# ---------------------------------------------------------------------------
# Decode: one new token per row, through the same `block`
# ---------------------------------------------------------------------------
# XLA:CPU copies every slice of a stacked [L, ...] array that feeds a matmul
# (on CPU that copy cost as much as the matmuls), so decode keeps weights
# and cache one array per layer, sliced once per sampler `decode` call
# rather than once per step (slicing inside the step peaked at the same
# memory on XLA:CPU and was 13% slower for a 75M model; on TPU the slices
# are views either way).

# the slot axis of each decode cache entry (keys [B, K, Dh, S], values
# [B, K, S, Dh]: see `attention.decode`)
DECODE_SLOT_AXES = dict(k=attention.decode.KEY_SLOT_AXIS,
                        v=attention.decode.VALUE_SLOT_AXIS, pos=1, seg=1)


def decode_weights(params: Params, cfg: ModelConfig) -> dict:
  """The weights `decode_step` reads: per layer, Block's weights with each
  matrix as 2-D [out, in] in the compute dtype (see `project`); the output
  head as [V, D]."""
  p = nn.unbox(params)
  p = p["params"] if "params" in p else p
  dt = cfg.jnp_dtype

  def out_in(name, x):
    n_in = len(_PROJ[name][1])
    return x.reshape(math.prod(x.shape[:n_in]), -1).T.astype(dt)

  lp = p["layers"]
  layers = []
  for i in range(cfg.num_layers):
    w = {name: out_in(name, lp[name][i])
         for name in ("q", "k", "v", "o", "gate", "up", "down")}
    w.update(attn_norm=lp["attn_norm"]["scale"][i],
             mlp_norm=lp["mlp_norm"]["scale"][i])
    if cfg.qkv_bias:
      w.update({f"{n}_bias": lp[f"{n}_bias"][i].astype(dt) for n in "qkv"})
    layers.append(w)
  out_VxD = p["embedding"] if cfg.tie_embeddings else p["lm_head"].T
  return dict(embedding=p["embedding"], out=out_VxD.astype(dt),
              final_norm=p["final_norm"]["scale"], layers=tuple(layers))


def decode_cache(cache: Cache, length: int, cfg: ModelConfig) -> Cache:
  """The prefill cache ([L, B, P, K, Dh] keys and values, in the activation
  dtype, as the trainer's forward sees them) as `decode_step` reads it: in
  `cfg.cache_dtype`, per layer, keys [B, K, Dh, S] and values [B, K, S, Dh],
  with S - P empty slots (segment 0) after the prompt (S = length)."""
  pad = length - cache["pos"].shape[1]
  cdt = cfg.jnp_cache_dtype
  kv = [attention.decode.from_model_layout(k.astype(cdt), v.astype(cdt),
                                           length)
        for k, v in zip(cache["k"], cache["v"], strict=True)]
  return dict(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv),
              pos=jnp.pad(cache["pos"], ((0, 0), (0, pad))),
              seg=jnp.pad(cache["seg"], ((0, 0), (0, pad))))


def decode_step(w: dict, tok_B, pos_B, seg_B, cache: Cache, index, *,
                cfg: ModelConfig):
  """Logits [B, V] (f32) for one new token per row, and `cache` (a
  `decode_cache`) with its keys and values written at slot `index`.

  The same `block`s, norm and head as `Decoder`, over `decode_weights`,
  with `attention.decode` as each layer's attention.
  """
  dt = cfg.jnp_dtype
  x_Bx1xD = w["embedding"].astype(dt)[tok_B[:, None]]
  kv_pos_BxS = jax.lax.dynamic_update_slice_in_dim(
      cache["pos"], pos_B[:, None], index, axis=1)
  kv_seg_BxS = jax.lax.dynamic_update_slice_in_dim(
      cache["seg"], seg_B[:, None], index, axis=1)
  mask_BxS = attention.attention_mask(pos_B[:, None], seg_B[:, None],
                                      kv_pos_BxS, kv_seg_BxS)[:, 0]
  ks, vs = [], []
  for lw, k, v in zip(w["layers"], cache["k"], cache["v"], strict=True):
    attend = functools.partial(attention.decode.attend, layer_kv=(k, v),
                               mask_BxS=mask_BxS, index=index)
    x_Bx1xD, (k, v) = block(lw, x_Bx1xD, pos_B[:, None], attend, cfg=cfg,
                            decode=True)
    ks.append(k)
    vs.append(v)
  h_Bx1xD = rms_norm(x_Bx1xD, w["final_norm"], cfg)
  # rounded to the compute dtype first, as `Decoder.logits` does
  logits_Bx1xV = project(h_Bx1xD, w["out"], "logits", dt, decode=True)
  logits_BxV = vision_lib.mask_image_logit(
      logits_Bx1xV[:, 0].astype(jnp.float32), cfg.image_token)
  return logits_BxV, dict(
      k=tuple(ks), v=tuple(vs), pos=kv_pos_BxS, seg=kv_seg_BxS)


def cut_cache(cache: Cache, length: int) -> Cache:
  """A decode cache's first `length` slots."""
  return {name: jax.tree.map(
      lambda x, a=DECODE_SLOT_AXES[name]: jax.lax.slice_in_dim(
          x, 0, length, axis=a), entry) for name, entry in cache.items()}


def paste_cache(full: Cache, cut: Cache) -> Cache:
  """Decode cache `full` with its first slots replaced by `cut`'s."""
  return jax.tree.map(
      lambda f, c: jax.lax.dynamic_update_slice(f, c, (0,) * f.ndim),
      full, cut)


def output_weight(params: Params, cfg: ModelConfig) -> jax.Array:
  """The [D, V] projection from hidden states to logits."""
  p = params["params"] if "params" in params else params
  p = nn.unbox(p)
  return p["embedding"].T if cfg.tie_embeddings else p["lm_head"]


def token_logprobs(h_BxTxD: jax.Array, w_DxV: jax.Array,
                   targets_BxT: jax.Array, chunk: int,
                   image_token: int | None = None) -> jax.Array:
  """log softmax(h @ w)[target] per token, without a [B, T, V] f32 array.

  Scans over chunks of T; each chunk's logits are rematerialised in the
  backward pass, so peak memory is O(B * chunk * V). `image_token`'s logit
  is masked (`vision.mask_image_logit`), as in `Decoder.logits`.
  """
  B, T, D = h_BxTxD.shape
  chunk = min(chunk, T)
  pad = (-T) % chunk
  h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
  tgt = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  n = (T + pad) // chunk
  h_NxBxCxD = h.reshape(B, n, chunk, D).swapaxes(0, 1)
  tgt_NxBxC = tgt.reshape(B, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_BxCxD, tgt_BxC):
    logits = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV.astype(h_BxCxD.dtype))
    logits = vision_lib.mask_image_logit(logits.astype(jnp.float32),
                                         image_token)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt_BxC[..., None], -1)[..., 0]
    return picked - lse

  out = jax.lax.map(lambda a: one(*a), (h_NxBxCxD, tgt_NxBxC))
  return out.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]


def sequence_logprobs(params: Params, tokens_BxT: jax.Array,
                      seg_BxT: jax.Array, *, model: ModelConfig,
                      images: dict | None = None) -> jax.Array:
  """Per-token log p(tokens[t] | tokens[<t]) at temperature 1, shape [B, T].

  Entry t scores token t (entry 0 is 0: nothing predicts the first token;
  nor is an image position ever a target: its entries are 0 too).
  Positions are derived from the segment ids (left padding allowed).
  images: the rows' images (`vision.IMAGE_KEYS`), or None.
  """
  pos_BxT = positions_from_segments(seg_BxT)
  h_BxTxD, _ = Decoder(model).apply(params, tokens_BxT, pos_BxT, seg_BxT,
                                    return_hidden=True, images=images)
  lp_BxTm1 = token_logprobs(h_BxTxD[:, :-1], output_weight(params, model),
                            tokens_BxT[:, 1:], model.logits_chunk,
                            model.image_token)
  if model.image_token is not None:
    lp_BxTm1 = jnp.where(tokens_BxT[:, 1:] == model.image_token, 0.0,
                         lp_BxTm1)
  return jnp.pad(lp_BxTm1, ((0, 0), (1, 0)))


def positions_from_segments(seg_BxT: jax.Array) -> jax.Array:
  """0, 1, 2... over the real (seg != 0) tokens of each row; pads get 0."""
  real = (seg_BxT != 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0) * real


@functools.partial(jax.jit, static_argnames=("model",))
def init_params(rng: jax.Array, *, model: ModelConfig) -> Params:
  # Param shapes do not depend on the attention kernel, and a batch-1 trace
  # cannot be split by ring attention's context mesh: init with dense.
  model = dataclasses.replace(model, attention="dense")
  tokens = jnp.zeros((1, 8), jnp.int32)
  images = (None if model.vision is None else
            vision_lib.dummy_images(model.vision))
  return Decoder(model).init(rng, tokens, jnp.zeros_like(tokens),
                             jnp.ones_like(tokens), images=images)
