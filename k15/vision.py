"""The vision tower (a ViT) and its projector, spliced into the decoder's
token embeddings at image placeholder tokens.

Dimension key (beside `k15.model`'s): N patch slots per sequence (every
image of a row, packed one after the other; `VisionConfig.max_patches`),
X pixel values per patch (patch_size^2 x channels), E tower width, Hv tower
heads, Dv tower head dim, M tower mlp width.

A sequence may hold any number of images at any positions. Each image is
cut into patch_size x patch_size patches (its own height and width, any
resolution whose patch count fits), and its prompt text holds one
placeholder token (`ModelConfig.image_token`) per patch, in row-major
order; the host (`k15.images`) writes both. The model sees per row

  pixels_BxNxX    the row's patches, image after image, zeros after;
  patch_pos_BxNx2 each patch's (row, column) within its image;
  patch_img_BxN   each patch's image index within the row, -1 on padding,

runs the tower over all N slots at once (a patch attends to the patches of
its own image only: they share a segment id and position 0 under
`attention`'s one mask rule, which makes attention bidirectional within an
image), projects the features to the decoder width, and puts the k-th
feature of a row in place of the row's k-th placeholder token (`splice`).
Image positions are ordinary sequence positions (RoPE, cache slots), but
never targets: the decoder's output distribution has no mass on the
placeholder token (`mask_image_logit`), and `model.sequence_logprobs`
gives its positions log-prob 0, so no loss and no length counts them.

The tower is SigLIP's (pre-norm blocks with biases, LayerNorm, a learned
position table, a post-norm), so SigLIP weights import as they are
(`k15.hf_vision`). The position embedding is 2-D: a learned [G, G, E] grid
indexed by each patch's (row, column), so an image of any shape up to
G x G patches reads the same table (SigLIP's [G*G, E] table, reshaped).
Layers are scanned (and optionally rematerialised) like the decoder's;
params carry the logical axes `vision_embed, vision_mlp, vision_heads,
vision_head_dim, vision_layers, vision_pixels, vision_rows, vision_cols`
and the
projector's `vision_embed, projector, embed` (`k15.sharding.RULES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from k15 import attention

# what the tower reads from a batch (`k15.images.pack` writes them)
IMAGE_KEYS = ("pixels_BxNxX", "patch_pos_BxNx2", "patch_img_BxN")
_ACTS = ("gelu_tanh", "gelu", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The `model.vision` section: the tower's shape (hashable, static)."""

  patch_size: int = 14
  channels: int = 3
  # patch slots per sequence: the tower's fixed input length; every image
  # of a row together, and so each image, has at most this many patches
  max_patches: int = 256
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  # side of the learned position grid; 0 = no position embedding. An
  # image may be at most pos_grid patches high and wide.
  pos_grid: int = 16
  # stddev of the position table's init: SigLIP's 0.02 is ~1/50 of a
  # patch embedding, which a small tower trained for a few hundred steps
  # never grows into a usable "where" signal (experiments/vision.py: 1.0)
  pos_init: float = 0.02
  act: str = "gelu_tanh"  # gelu_tanh (SigLIP) | gelu | quick_gelu (CLIP)
  norm_eps: float = 1e-6
  post_norm: bool = True
  # "mlp": linear -> gelu -> linear (LLaVA's projector); "linear": one
  projector: str = "mlp"
  projector_act: str = "gelu"
  # the placeholder token id; -1: the last id of model.vocab_size (the
  # pipeline leaves it free of the tokenizer's pieces)
  image_token: int = -1
  attention: str = "dense"  # dense | blockwise (bidirectional per image)
  remat: str = "none"  # none | full | dots
  init: str = ""  # a SigLIP safetensors dir the tower warm-up starts from

  def __post_init__(self):
    for name in ("patch_size", "channels", "max_patches", "width",
                 "num_heads", "mlp_dim"):  # fmt: skip
      if getattr(self, name) < 1:
        raise ValueError(
          f"model.vision.{name}={getattr(self, name)} must be >= 1"
        )
    if self.pos_init < 0:
      raise ValueError(f"model.vision.pos_init={self.pos_init} must be >= 0")
    if self.num_layers < 0 or self.pos_grid < 0:
      raise ValueError(
        f"model.vision.num_layers={self.num_layers} and "
        f"model.vision.pos_grid={self.pos_grid} must be >= 0"
      )
    if self.width % self.num_heads:
      raise ValueError(
        f"model.vision.width={self.width} is not a multiple of "
        f"model.vision.num_heads={self.num_heads}"
      )
    for name in ("act", "projector_act"):
      if getattr(self, name) not in _ACTS:
        raise ValueError(
          f"model.vision.{name}={getattr(self, name)!r}: "
          + " | ".join(_ACTS)
        )
    if self.projector not in ("mlp", "linear"):
      raise ValueError(
        f"model.vision.projector={self.projector!r}: mlp | linear"
      )
    if self.attention not in ("dense", "blockwise"):
      raise ValueError(
        f"model.vision.attention={self.attention!r}: dense | blockwise "
        "(the tower attends both ways within an image)"
      )
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.vision.remat={self.remat!r}: none | full | dots")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def patch_pixels(self) -> int:
    return self.patch_size * self.patch_size * self.channels

  def num_params(self, d_model: int) -> int:
    E, M, L = self.width, self.mlp_dim, self.num_layers
    tower = self.patch_pixels * E + E + self.pos_grid**2 * E
    tower += L * (4 * E * E + 4 * E + 2 * E * M + M + E + 4 * E)
    tower += 2 * E if self.post_norm else 0
    proj = E * d_model + d_model
    if self.projector == "mlp":
      proj += d_model * d_model + d_model
    return tower + proj


def activation(name: str):
  return {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  }[name]


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(dtype))  # fmt: skip


def layer_norm(x, scale, bias, eps: float, dt):
  """LayerNorm in float32, returned in `dt`."""
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  x = (x - mu) * jax.lax.rsqrt(var + eps)
  return (x * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dt)


class LayerNorm(nn.Module):
  """A LayerNorm's params, `<name>/scale` and `<name>/bias` ([E])."""

  width: int
  eps: float
  param_dtype: str

  @nn.compact
  def __call__(self, x, dt):
    axes = ("vision_embed",)
    scale = _param(self, "scale", nn.initializers.ones, (self.width,), axes,
                   self.param_dtype)  # fmt: skip
    bias = _param(self, "bias", nn.initializers.zeros, (self.width,), axes,
                  self.param_dtype)  # fmt: skip
    return layer_norm(x, scale, bias, self.eps, dt)


class VisionBlock(nn.Module):
  """Pre-norm attention (biases, both ways within an image) + MLP."""

  cfg: Any  # model.ModelConfig (its `vision` set)

  @nn.compact
  def __call__(self, x_BxNxE, seg_BxN):
    v, dt, pdt = self.cfg.vision, self.cfg.jnp_dtype, self.cfg.param_dtype
    E, Hv, Dv, M = v.width, v.num_heads, v.head_dim, v.mlp_dim
    B, N = seg_BxN.shape
    x_BxNxE = nn.with_logical_constraint(
      x_BxNxE, ("activation_batch", None, "activation_embed")
    )
    init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    init_o = nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    zeros = nn.initializers.zeros
    heads = ("vision_embed", "vision_heads", "vision_head_dim")
    w = {}
    for name in ("q", "k", "v"):
      w[name] = _param(self, name, init, (E, Hv, Dv), heads, pdt)
      w[f"{name}_bias"] = _param(self, f"{name}_bias", zeros, (Hv, Dv),
                                 heads[1:], pdt)  # fmt: skip
    w["o"] = _param(self, "o", init_o, (Hv, Dv, E),
                    ("vision_heads", "vision_head_dim", "vision_embed"), pdt)
    w["o_bias"] = _param(self, "o_bias", zeros, (E,), ("vision_embed",), pdt)
    init = nn.initializers.lecun_normal()
    w["fc1"] = _param(self, "fc1", init, (E, M), ("vision_embed",
                                                  "vision_mlp"), pdt)
    w["fc1_bias"] = _param(self, "fc1_bias", zeros, (M,), ("vision_mlp",), pdt)
    w["fc2"] = _param(self, "fc2", init, (M, E), ("vision_mlp",
                                                  "vision_embed"), pdt)
    w["fc2_bias"] = _param(self, "fc2_bias", zeros, (E,), ("vision_embed",),
                           pdt)  # fmt: skip
    w = {k: x.astype(dt) for k, x in w.items()}

    h = LayerNorm(E, v.norm_eps, pdt, name="ln1")(x_BxNxE, dt)
    q, k, val = (jnp.einsum("bne,ehd->bnhd", h, w[n]) + w[f"{n}_bias"]
                 for n in ("q", "k", "v"))  # fmt: skip
    zero_BxN = jnp.zeros((B, N), jnp.int32)  # one position: no causality
    out_BxNxHvxDv = attention.attend(
      q, k, val, q_pos_BxT=zero_BxN, q_seg_BxT=seg_BxN, kv_pos_BxS=zero_BxN,
      kv_seg_BxS=seg_BxN, impl=v.attention,
      block_q=min(512, N), block_kv=min(512, N),
    )  # fmt: skip
    x_BxNxE = x_BxNxE + (jnp.einsum("bnhd,hde->bne", out_BxNxHvxDv, w["o"])
                         + w["o_bias"])  # fmt: skip
    h = LayerNorm(E, v.norm_eps, pdt, name="ln2")(x_BxNxE, dt)
    h_BxNxM = activation(v.act)(h @ w["fc1"] + w["fc1_bias"])
    h_BxNxM = nn.with_logical_constraint(
      h_BxNxM, ("activation_batch", None, "activation_mlp")
    )
    return x_BxNxE + h_BxNxM @ w["fc2"] + w["fc2_bias"], None


class VisionTower(nn.Module):
  """Patches in, per-patch features [B, N, E] out (padding slots: junk
  that `splice` never reads)."""

  cfg: Any  # model.ModelConfig

  @nn.compact
  def __call__(self, pixels_BxNxX, patch_pos_BxNx2, patch_img_BxN):
    v, dt, pdt = self.cfg.vision, self.cfg.jnp_dtype, self.cfg.param_dtype
    E = v.width
    kernel = _param(self, "patch_kernel", nn.initializers.lecun_normal(),
                    (v.patch_pixels, E), ("vision_pixels", "vision_embed"),
                    pdt)  # fmt: skip
    bias = _param(self, "patch_bias", nn.initializers.zeros, (E,),
                  ("vision_embed",), pdt)  # fmt: skip
    x_BxNxE = pixels_BxNxX.astype(dt) @ kernel.astype(dt) + bias.astype(dt)
    if v.pos_grid:
      table_GxGxE = _param(
        self, "pos_embed", nn.initializers.normal(stddev=v.pos_init),
        (v.pos_grid, v.pos_grid, E), ("vision_rows", "vision_cols",
                                      "vision_embed"), pdt,
      )  # fmt: skip
      rc = jnp.clip(patch_pos_BxNx2, 0, v.pos_grid - 1)
      x_BxNxE = x_BxNxE + table_GxGxE.astype(dt)[rc[..., 0], rc[..., 1]]
    seg_BxN = jnp.where(patch_img_BxN >= 0, patch_img_BxN + 1, 0)
    block = VisionBlock
    if v.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                if v.remat == "dots" else None)  # fmt: skip
      block = nn.remat(VisionBlock, policy=policy, prevent_cse=False)
    if v.num_layers:
      x_BxNxE, _ = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast,), length=v.num_layers,
        metadata_params={nn.PARTITION_NAME: "vision_layers"},
      )(self.cfg, name="layers")(x_BxNxE, seg_BxN)  # fmt: skip
    if v.post_norm:
      x_BxNxE = LayerNorm(E, v.norm_eps, pdt, name="post_norm")(x_BxNxE, dt)
    return x_BxNxE


class Projector(nn.Module):
  """Tower features [B, N, E] -> decoder embeddings [B, N, D]."""

  cfg: Any  # model.ModelConfig

  @nn.compact
  def __call__(self, x_BxNxE):
    v, dt, pdt = self.cfg.vision, self.cfg.jnp_dtype, self.cfg.param_dtype
    D = self.cfg.d_model
    init, zeros = nn.initializers.lecun_normal(), nn.initializers.zeros
    if v.projector == "linear":
      w = _param(self, "out", init, (v.width, D), ("vision_embed", "embed"),
                 pdt)  # fmt: skip
      b = _param(self, "out_bias", zeros, (D,), ("embed",), pdt)
      return x_BxNxE @ w.astype(dt) + b.astype(dt)
    w1 = _param(self, "in", init, (v.width, D), ("vision_embed", "projector"),
                pdt)  # fmt: skip
    b1 = _param(self, "in_bias", zeros, (D,), ("projector",), pdt)
    w2 = _param(self, "out", init, (D, D), ("projector", "embed"), pdt)
    b2 = _param(self, "out_bias", zeros, (D,), ("embed",), pdt)
    h = activation(v.projector_act)(x_BxNxE @ w1.astype(dt) + b1.astype(dt))
    return h @ w2.astype(dt) + b2.astype(dt)


def splice(x_BxTxD, feats_BxNxD, tokens_BxT, image_token: int):
  """The token embeddings with the row's k-th placeholder token replaced by
  its k-th image feature (k counted along the row)."""
  is_img_BxT = tokens_BxT == image_token
  k_BxT = jnp.cumsum(is_img_BxT.astype(jnp.int32), axis=1) - 1
  k_BxT = jnp.clip(k_BxT, 0, feats_BxNxD.shape[1] - 1)
  picked_BxTxD = jnp.take_along_axis(feats_BxNxD, k_BxT[..., None], axis=1)
  return jnp.where(is_img_BxT[..., None], picked_BxTxD.astype(x_BxTxD.dtype),
                   x_BxTxD)  # fmt: skip


def mask_image_logit(logits, image_token: int | None):
  """Logits [..., V] with the placeholder token's set to -inf: the model
  never predicts (samples, or is trained towards) an image position."""
  if image_token is None:
    return logits
  V = logits.shape[-1]
  col = jax.lax.broadcasted_iota(jnp.int32, (V,), 0) == image_token
  return jnp.where(col, -jnp.inf, logits)


def dummy_images(v: VisionConfig, batch: int = 1) -> dict[str, jax.Array]:
  """An empty image batch of the tower's shape (for init and tracing)."""
  N = v.max_patches
  return dict(
    pixels_BxNxX=jnp.zeros((batch, N, v.patch_pixels), jnp.float32),
    patch_pos_BxNx2=jnp.zeros((batch, N, 2), jnp.int32),
    patch_img_BxN=jnp.full((batch, N), -1, jnp.int32),
  )


def images_of(batch: dict) -> dict | None:
  """The tower's inputs in a training batch, or None for a text batch."""
  if IMAGE_KEYS[0] not in batch:
    return None
  return {k: batch[k] for k in IMAGE_KEYS}


def tower_flops(v: VisionConfig, d_model: int, rows: int) -> float:
  """Forward matmul FLOPs of tower + projector over `rows` x N patches."""
  N, E, M = v.max_patches, v.width, v.mlp_dim
  per = 2 * v.patch_pixels * E + v.num_layers * (8 * E * E + 4 * E * M)
  per += 2 * E * d_model + (2 * d_model * d_model
                            if v.projector == "mlp" else 0)  # fmt: skip
  attn = v.num_layers * 4 * N * E  # scores + values per patch
  return float(rows * N * (per + attn))

