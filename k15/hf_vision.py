"""SigLIP vision towers (HF config.json + safetensors) -> k15.vision.

The tower (`k15.vision.VisionTower`) is SigLIP's, so its weights import as
they are; only layouts change (as in `k15.hf`, HF `nn.Linear` weights are
[out, in], ours [in, out...] with heads split out, per-layer tensors are
stacked on a leading L axis):

  embeddings.patch_embedding.weight [E, C, p, p] -> patch_kernel [p*p*C, E]
      (a patch's pixels in (row, column, channel) order, `k15.images`)
  embeddings.patch_embedding.bias   [E]          -> patch_bias   [E]
  embeddings.position_embedding.weight [G*G, E]  -> pos_embed    [G, G, E]
  encoder.layers.i.self_attn.{q,k,v}_proj.weight [Hv*Dv, E]
                                   -> layers/{q,k,v}  [L, E, Hv, Dv]
  ....self_attn.{q,k,v}_proj.bias  -> layers/{q,k,v}_bias [L, Hv, Dv]
  ....self_attn.out_proj.weight [E, Hv*Dv] -> layers/o [L, Hv, Dv, E]
  ....self_attn.out_proj.bias      -> layers/o_bias [L, E]
  ....mlp.fc1 / fc2 weight, bias   -> layers/fc1 [L, E, M], fc2 [L, M, E]
  ....layer_norm1 / layer_norm2    -> layers/ln1, ln2 {scale, bias} [L, E]
  post_layernorm.{weight, bias}    -> post_norm {scale, bias}

under whatever prefix the checkpoint uses (`vision_model.` in a
SiglipVisionModel or SiglipModel, `vision_tower.vision_model.` in many
VLMs). SigLIP's attention-pooling head and a SiglipModel's text tower are
not used (k15 splices every patch's feature, LLaVA-style): they are
skipped. CLIP towers (a class token, a pre-norm) have no place in k15's
tower and are refused by name.

The position table is for a full-resolution image (G = image_size /
patch_size patches per side); an image of fewer patches reads the top-left
corner of the grid (k15 does not interpolate the table, as HF's
`interpolate_pos_encoding` would). The projector is not in the checkpoint:
the tower warm-up (`stages.tower`) trains it from its init.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import numpy as np

from k15 import hf, vision
from k15 import model as model_lib

# HF hidden_act -> VisionConfig.act
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu": "gelu", "quick_gelu": "quick_gelu"}  # fmt: skip
_PATCH = "embeddings.patch_embedding.weight"
# VisionConfig fields a checkpoint fixes, and the config.json key of each
_HF_NAMES = {
  "patch_size": "patch_size",
  "channels": "num_channels",
  "width": "hidden_size",
  "num_layers": "num_hidden_layers",
  "num_heads": "num_attention_heads",
  "mlp_dim": "intermediate_size",
  "pos_grid": "image_size / patch_size",
  "act": "hidden_act",
  "norm_eps": "layer_norm_eps",
}


def _vision_section(path: str) -> dict[str, Any]:
  cfg = hf.read_config(path)
  kind = cfg.get("model_type", "")
  if "clip" in kind:
    raise ValueError(
      f"hf_vision: {path} is a {kind} checkpoint; k15's tower is SigLIP's "
      "(no class token, no pre-norm), so only SigLIP vision weights import"
    )
  if "vision_config" in cfg:  # SiglipModel, or a VLM holding one
    cfg = cfg["vision_config"]
  return cfg


def vision_config_from_hf(path: str, **overrides: Any) -> vision.VisionConfig:
  """A VisionConfig from a SigLIP checkpoint's config.json; `overrides`
  set what the checkpoint does not fix (max_patches, projector, ...).
  max_patches defaults to a full-resolution image's patch count."""
  c = _vision_section(path)
  act = c.get("hidden_act", "gelu_pytorch_tanh")
  if act not in _ACTS:
    raise ValueError(f"hf_vision: {path}: hidden_act={act!r} is not one of "
                     f"{sorted(_ACTS)}")  # fmt: skip
  p = int(c.get("patch_size", 16))
  grid = int(c.get("image_size", 224)) // p
  fields = dict(
    patch_size=p, channels=int(c.get("num_channels", 3)),
    width=int(c.get("hidden_size", 768)),
    num_layers=int(c.get("num_hidden_layers", 12)),
    num_heads=int(c.get("num_attention_heads", 12)),
    mlp_dim=int(c.get("intermediate_size", 3072)), pos_grid=grid,
    act=_ACTS[act], norm_eps=float(c.get("layer_norm_eps", 1e-6)),
    post_norm=True, max_patches=grid * grid,
  )  # fmt: skip
  fields.update(overrides)
  return vision.VisionConfig(**fields)


def check_matches(v: vision.VisionConfig, path: str) -> None:
  """Raises naming the field where `v` differs from the checkpoint's
  config.json (the shape fields a checkpoint fixes)."""
  want = vision_config_from_hf(path)
  for name, hf_name in _HF_NAMES.items():
    ours, theirs = getattr(v, name), getattr(want, name)
    if ours != theirs:
      raise ValueError(
        f"hf_vision: model.vision.{name}={ours!r} but {path}'s config.json "
        f"has {hf_name} -> {theirs!r}"
      )
  if not v.post_norm:
    raise ValueError("hf_vision: model.vision.post_norm=False, but SigLIP "
                     "towers end in post_layernorm")  # fmt: skip


def import_tower(path: str, *, model: model_lib.ModelConfig) -> dict:
  """The `vision` subtree of the params (host numpy arrays of
  model.param_dtype) from a SigLIP checkpoint dir. Raises naming the field
  when config.json disagrees with `model.vision`, and the tensor when one
  is missing or has a wrong shape."""
  v = model.vision
  if v is None:
    raise ValueError("hf_vision: the model has no tower (model.vision)")
  check_matches(v, path)
  dtype = np.dtype(model.param_dtype)
  E, Hv, Dv, M, L = v.width, v.num_heads, v.head_dim, v.mlp_dim, v.num_layers
  p, C, G = v.patch_size, v.channels, v.pos_grid
  with contextlib.ExitStack() as stack:
    tensors = hf.Tensors(path, stack)
    heads = [n for n in tensors.names() if n.endswith(_PATCH)]
    if len(heads) != 1:
      raise ValueError(
        f"hf_vision: {path} has {len(heads)} tensors named *{_PATCH} "
        "(expected one vision tower)"
      )
    pre = heads[0][: -len(_PATCH)]

    def get(name, shape):
      return tensors.get(pre + name, shape).astype(np.float32)

    out: dict[str, Any] = {}
    w = get(_PATCH, (E, C, p, p))
    out["patch_kernel"] = w.transpose(2, 3, 1, 0).reshape(p * p * C, E)
    out["patch_bias"] = get("embeddings.patch_embedding.bias", (E,))
    if G:
      table = get("embeddings.position_embedding.weight", (G * G, E))
      out["pos_embed"] = table.reshape(G, G, E)
    out["post_norm"] = dict(scale=get("post_layernorm.weight", (E,)),
                            bias=get("post_layernorm.bias", (E,)))  # fmt: skip
    layers: dict[str, Any] = {}

    def stack_of(fn):
      return np.stack([fn(f"encoder.layers.{i}.") for i in range(L)])

    for n in ("q", "k", "v"):
      layers[n] = stack_of(lambda s, n=n: get(
        f"{s}self_attn.{n}_proj.weight", (Hv * Dv, E)).T.reshape(E, Hv, Dv))
      layers[f"{n}_bias"] = stack_of(lambda s, n=n: get(
        f"{s}self_attn.{n}_proj.bias", (Hv * Dv,)).reshape(Hv, Dv))
    layers["o"] = stack_of(lambda s: get(
      f"{s}self_attn.out_proj.weight", (E, Hv * Dv)).T.reshape(Hv, Dv, E))
    layers["o_bias"] = stack_of(lambda s: get(f"{s}self_attn.out_proj.bias",
                                              (E,)))  # fmt: skip
    layers["fc1"] = stack_of(lambda s: get(f"{s}mlp.fc1.weight", (M, E)).T)
    layers["fc1_bias"] = stack_of(lambda s: get(f"{s}mlp.fc1.bias", (M,)))
    layers["fc2"] = stack_of(lambda s: get(f"{s}mlp.fc2.weight", (E, M)).T)
    layers["fc2_bias"] = stack_of(lambda s: get(f"{s}mlp.fc2.bias", (E,)))
    for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
      layers[ours] = dict(
        scale=stack_of(lambda s, t=theirs: get(f"{s}{t}.weight", (E,))),
        bias=stack_of(lambda s, t=theirs: get(f"{s}{t}.bias", (E,))),
      )  # fmt: skip
    if L:
      out["layers"] = layers
  return jax.tree.map(lambda x: np.ascontiguousarray(x, dtype), out)


def with_tower(model: model_lib.ModelConfig, path: str,
               **overrides: Any) -> model_lib.ModelConfig:
  """`model` with its `vision` section read from a SigLIP checkpoint."""
  base = dataclasses.asdict(model.vision) if model.vision else {}
  keep = {k: base[k] for k in ("max_patches", "projector", "projector_act",
                               "image_token", "attention", "remat")
          if k in base}  # fmt: skip
  keep.update(overrides)
  keep["init"] = path
  return dataclasses.replace(model, vision=vision_config_from_hf(path, **keep))
