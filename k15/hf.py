"""Llama / Qwen2-family HF checkpoints (config.json + safetensors) <-> k15.

Tensor layouts. HF `nn.Linear` weights are [out, in]; ours are [in, out...]
with heads split out, and per-layer tensors are stacked on a leading L axis
(the decoder scans over layers):

  model.embed_tokens.weight  [V, D]     -> embedding        [V, D]
  self_attn.q_proj.weight    [H*Dh, D]  -> layers/q         [L, D, H, Dh]
  self_attn.k_proj.weight    [K*Dh, D]  -> layers/k         [L, D, K, Dh]
  self_attn.v_proj.weight    [K*Dh, D]  -> layers/v         [L, D, K, Dh]
  self_attn.{q,k,v}_proj.bias [N*Dh]    -> layers/{q,k,v}_bias [L, N, Dh]
  self_attn.o_proj.weight    [D, H*Dh]  -> layers/o         [L, H, Dh, D]
  mlp.{gate,up}_proj.weight  [F, D]     -> layers/{gate,up} [L, D, F]
  mlp.down_proj.weight       [D, F]     -> layers/down      [L, F, D]
  input_layernorm.weight     [D]        -> layers/attn_norm/scale [L, D]
  post_attention_layernorm   [D]        -> layers/mlp_norm/scale  [L, D]
  model.norm.weight          [D]        -> final_norm/scale [D]
  lm_head.weight             [V, D]     -> lm_head          [D, V]

RoPE needs no permutation: HF checkpoints are already in the rotate-half
layout (HF's Meta->HF conversion script permutes q/k rows into it), which is
what `k15.model.rope` uses, over the full head dim.

Import reads one tensor at a time from memory-mapped safetensors into
preallocated stacked numpy arrays of `model.param_dtype`, so the peak is one
copy of the model plus one tensor. It returns host (numpy) arrays: the caller
places them with `jax.device_put(params, shardings)`, which never gathers the
whole model on one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from k15 import model as model_lib

Params = Any
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Our ModelConfig field -> the config.json key it comes from (for errors).
_HF_NAMES = {
  "vocab_size": "vocab_size",
  "num_layers": "num_hidden_layers",
  "d_model": "hidden_size",
  "num_heads": "num_attention_heads",
  "num_kv_heads": "num_key_value_heads",
  "head_dim": "head_dim",
  "mlp_dim": "intermediate_size",
  "rope_theta": "rope_theta",
  "rope_scaling": "rope_scaling",
  "tie_embeddings": "tie_word_embeddings",
  "qkv_bias": "attention_bias (Qwen2: always q/k/v biases)",
  "norm_eps": "rms_norm_eps",
}


def read_config(path: str) -> dict[str, Any]:
  """The checkpoint's config.json as a dict."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"hf: no config.json in {path}")
  with open(file) as f:
    return json.load(f)


def eos_token_ids(path: str) -> tuple[int, ...]:
  """Stop tokens of the checkpoint: generation_config.json's eos_token_id
  (instruct models often list several), else config.json's; () if none."""
  for name in ("generation_config.json", "config.json"):
    file = os.path.join(path, name)
    if os.path.exists(file):
      with open(file) as f:
        eos = json.load(f).get("eos_token_id")
      if eos is not None:
        return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
  return ()


def config_from_hf(path: str, **overrides: Any) -> model_lib.ModelConfig:
  """Our ModelConfig for the checkpoint at `path` (a dir with config.json).

  Architecture fields come from config.json; `overrides` set the rest
  (dtype, param_dtype, attention, remat, max_len, ...).
  """
  hf = read_config(path)
  return dataclasses.replace(_model_config(hf, path), **overrides)


def _model_config(hf: Mapping[str, Any], path: str) -> model_lib.ModelConfig:
  where = os.path.join(path, "config.json")
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ValueError(
      f"{where}: model_type={family!r} is not supported "
      f"(supported: {', '.join(FAMILIES)})"
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(
      f"{where}: hidden_act={hf['hidden_act']!r}; k15's MLP is SwiGLU (silu)"
    )
  if hf.get("mlp_bias"):
    raise ValueError(f"{where}: mlp_bias=true; k15's MLP has no biases")
  if family == "qwen2" and hf.get("use_sliding_window"):
    raise ValueError(
      f"{where}: use_sliding_window=true; k15 has no sliding-window attention"
    )
  try:
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, scaling = _rope_from_hf(hf, where)
    return model_lib.ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      d_model=d,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or d // heads),
      mlp_dim=int(hf["intermediate_size"]),
      max_len=int(hf.get("max_position_embeddings", 2048)),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )
  except KeyError as e:
    raise ValueError(f"{where}: missing field {e.args[0]!r}") from None


def _rope_from_hf(hf: Mapping[str, Any], where: str) -> tuple[float, str]:
  """(rope_theta, our rope_scaling spec) from either config.json style.

  transformers < 5 writes `rope_theta` + `rope_scaling`; >= 5 writes
  `rope_parameters` (with rope_theta inside). Both are read.
  """
  p = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if any(isinstance(v, Mapping) for v in p.values()):
    raise ValueError(
      f"{where}: per-layer-type rope_parameters are not supported"
    )
  theta = float(p.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  partial = p.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    raise ValueError(
      f"{where}: partial_rotary_factor={partial}; k15 rotates the full head dim"
    )
  kind = p.get("rope_type", p.get("type", "default"))
  if kind == "default":
    return theta, ""
  if kind == "linear":
    return theta, f"linear:factor={float(p['factor'])!r}"
  if kind == "llama3":
    orig = p.get(
      "original_max_position_embeddings", hf.get("max_position_embeddings")
    )
    return theta, (
      f"llama3:factor={float(p['factor'])!r},"
      f"low_freq_factor={float(p['low_freq_factor'])!r},"
      f"high_freq_factor={float(p['high_freq_factor'])!r},"
      f"original_max_position_embeddings={int(orig)}"
    )
  raise ValueError(
    f"{where}: rope_scaling type {kind!r} is not supported "
    f"(supported: default, linear, llama3)"
  )


def _rope_to_hf(model: model_lib.ModelConfig) -> dict[str, Any] | None:
  if not model.rope_scaling:
    return None
  kind, p = model_lib.parse_rope_scaling(model.rope_scaling)
  out: dict[str, Any] = dict(rope_type=kind, **p)
  if "original_max_position_embeddings" in out:
    out["original_max_position_embeddings"] = int(
      out["original_max_position_embeddings"]
    )
  return out


def _check_matches(
  model: model_lib.ModelConfig, want: model_lib.ModelConfig, path: str
) -> None:
  """Raises naming the first architecture field where model != config.json."""
  for field, hf_name in _HF_NAMES.items():
    ours, theirs = getattr(model, field), getattr(want, field)
    if field == "rope_scaling":
      same = (model_lib.parse_rope_scaling(ours) if ours else None) == (
        model_lib.parse_rope_scaling(theirs) if theirs else None
      )
    elif field == "qkv_bias" and theirs and not ours:
      continue  # allowed when the biases are all zero; checked on load
    else:
      same = ours == theirs
    if not same:
      raise ValueError(
        f"hf: {path}/config.json has {hf_name}={theirs!r} (as "
        f"model.{field}) but model.{field}={ours!r}; build the model "
        f"config with hf.config_from_hf(path) or fix model.{field}"
      )


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor kind: our path, HF name, our (per-layer) shape, layout.

  `dims` names our axes with the dimension key of k15.model. `kind`:
  "copy" (same layout), "flat" (HF flattens our axes: biases), or
  "linear:n" (a HF [out, in] Linear weight; our first n axes are `in`).
  """

  path: str
  hf: str
  dims: str
  kind: str

  @property
  def ours(self) -> tuple[str, ...]:
    return tuple(self.path.split("/"))

  def shape(self, c: model_lib.ModelConfig) -> tuple[int, ...]:
    size = dict(
      V=c.vocab_size, D=c.d_model, F=c.mlp_dim, H=c.num_heads,
      K=c.num_kv_heads, Dh=c.head_dim,
    )  # fmt: skip
    return tuple(size[d] for d in self.dims.split())

  def hf_shape(self, c: model_lib.ModelConfig) -> tuple[int, ...]:
    return self.to_hf(np.empty(self.shape(c), np.int8), c).shape

  def to_hf(self, w: np.ndarray, c: model_lib.ModelConfig) -> np.ndarray:
    if self.kind == "copy":
      return w
    if self.kind == "flat":
      return w.reshape(-1)
    n_in = int(self.kind.partition(":")[2])
    return w.reshape(int(np.prod(w.shape[:n_in])), -1).T

  def to_ours(self, w: np.ndarray, c: model_lib.ModelConfig) -> np.ndarray:
    if self.kind == "copy":
      return w
    if self.kind == "flat":
      return w.reshape(self.shape(c))
    return w.T.reshape(self.shape(c))


_LAYER = [
  _Entry("attn_norm/scale", "input_layernorm.weight", "D", "copy"),
  _Entry("q", "self_attn.q_proj.weight", "D H Dh", "linear:1"),
  _Entry("k", "self_attn.k_proj.weight", "D K Dh", "linear:1"),
  _Entry("v", "self_attn.v_proj.weight", "D K Dh", "linear:1"),
  _Entry("o", "self_attn.o_proj.weight", "H Dh D", "linear:2"),
  _Entry("mlp_norm/scale", "post_attention_layernorm.weight", "D", "copy"),
  _Entry("gate", "mlp.gate_proj.weight", "D F", "linear:1"),
  _Entry("up", "mlp.up_proj.weight", "D F", "linear:1"),
  _Entry("down", "mlp.down_proj.weight", "F D", "linear:1"),
]
_BIASES = [
  _Entry("q_bias", "self_attn.q_proj.bias", "H Dh", "flat"),
  _Entry("k_bias", "self_attn.k_proj.bias", "K Dh", "flat"),
  _Entry("v_bias", "self_attn.v_proj.bias", "K Dh", "flat"),
]
_EMBED = _Entry("embedding", "model.embed_tokens.weight", "V D", "copy")
_NORM = _Entry("final_norm/scale", "model.norm.weight", "D", "copy")
_HEAD = _Entry("lm_head", "lm_head.weight", "D V", "linear:1")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers in old checkpoints
# Files export_params(assets_from=...) copies beside the weights.
ASSETS = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "generation_config.json",
)


def _layer_entries(model: model_lib.ModelConfig) -> list[_Entry]:
  return _LAYER + (_BIASES if model.qkv_bias else [])


def _top_entries(model: model_lib.ModelConfig) -> list[_Entry]:
  return [_EMBED, _NORM] + ([] if model.tie_embeddings else [_HEAD])


def param_shapes(model: model_lib.ModelConfig) -> dict[str, tuple]:
  """{our parameter path: (shape, dtype name)} of `model`, as
  `import_params` lays them out ("params/layers/q": (L, D, H, Dh), ...);
  nothing is traced or read."""
  dtype = str(np.dtype(model.param_dtype))
  out = {f"params/{e.path}": (e.shape(model), dtype)
         for e in _top_entries(model)}  # fmt: skip
  for e in _layer_entries(model):
    out[f"params/layers/{e.path}"] = ((model.num_layers, *e.shape(model)),
                                      dtype)  # fmt: skip
  return out


class Tensors:
  """Name -> tensor over one or more safetensors files, one at a time."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    from safetensors import safe_open  # noqa: PLC0415 - optional dependency

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(
        os.path.basename(f)
        for f in glob.glob(os.path.join(path, "*.safetensors"))
      )
      weight_map = None
    if not files:
      raise FileNotFoundError(
        f"hf: no *.safetensors in {path} (convert .bin checkpoints with "
        f"transformers' save_pretrained(safe_serialization=True) first)"
      )
    self.path = path
    self._handles = {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.exists(file):
        raise FileNotFoundError(f"hf: {index} names missing file {file}")
      self._handles[name] = stack.enter_context(safe_open(file, "np"))
    if weight_map is None:
      weight_map = {k: n for n, h in self._handles.items() for k in h.keys()}
    self._where = weight_map

  def names(self) -> set[str]:
    return set(self._where)

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self._where:
      raise ValueError(f"hf: tensor {name} not found in {self.path}")
    handle = self._handles[self._where[name]]
    got = tuple(handle.get_slice(name).get_shape())
    if got != tuple(shape):
      raise ValueError(
        f"hf: tensor {name} in {self.path} has shape {got}, "
        f"expected {tuple(shape)} from the model config"
      )
    return handle.get_tensor(name)


def import_params(path: str, *, model: model_lib.ModelConfig) -> Params:
  """{"params": ...} (host numpy arrays, model.param_dtype) from a HF dir.

  Raises naming the field when config.json disagrees with `model`, and the
  tensor when a file is missing one, has a wrong shape, or holds a weight
  k15 has no place for.
  """
  _check_matches(model, config_from_hf(path), path)
  hf = read_config(path)
  dtype = np.dtype(model.param_dtype)
  L = model.num_layers
  out: dict[str, Any] = {}
  used: set[str] = set()

  def put(keys: tuple[str, ...], value: np.ndarray) -> None:
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value

  with contextlib.ExitStack() as stack:
    tensors = Tensors(path, stack)
    for e in _top_entries(model):
      t = tensors.get(e.hf, e.hf_shape(model))
      put(e.ours, np.ascontiguousarray(e.to_ours(t, model), dtype))
      used.add(e.hf)
      del t
    layers: dict[str, Any] = {}
    for e in _layer_entries(model):
      arr = np.empty((L, *e.shape(model)), dtype)
      for i in range(L):
        name = f"model.layers.{i}.{e.hf}"
        arr[i] = e.to_ours(tensors.get(name, e.hf_shape(model)), model)
        used.add(name)
      node = layers
      for k in e.ours[:-1]:
        node = node.setdefault(k, {})
      node[e.ours[-1]] = arr
    out["layers"] = layers
    # Biases k15's model lacks are accepted only when zero (as written by
    # export_params): Llama's attention_bias also adds one to o_proj, and
    # Qwen2 always has q/k/v biases.
    zero_biases = []
    if hf.get("model_type") == "llama" and hf.get("attention_bias"):
      zero_biases.append(("self_attn.o_proj.bias", (model.d_model,)))
    if not model.qkv_bias:
      zero_biases += [(e.hf, e.hf_shape(model)) for e in _BIASES]
    for suffix, shape in zero_biases:
      for i in range(L):
        name = f"model.layers.{i}.{suffix}"
        if name not in tensors.names() and "o_proj" not in suffix:
          continue
        if np.any(tensors.get(name, shape) != 0):
          raise ValueError(
            f"hf: {name} is nonzero but k15's model has no such bias "
            f"(model.qkv_bias={model.qkv_bias})"
          )
        used.add(name)
    if model.tie_embeddings:
      used.add(_HEAD.hf)  # some tied checkpoints store a copy; ignore it
    extra = sorted(
      n for n in tensors.names() - used if not n.endswith(_IGNORED_SUFFIXES)
    )
    if extra:
      raise ValueError(
        f"hf: {path} has tensors k15 does not use, e.g. "
        f"{extra[0]} ({len(extra)} in all); is this a "
        f"Llama/Qwen2-family checkpoint?"
      )
  return {"params": out}


def hf_config(
  model: model_lib.ModelConfig, family: str = "llama", dtype: str | None = None
) -> dict[str, Any]:
  """config.json contents for `model` as a `family` checkpoint.

  Written in the transformers 4 style (`rope_theta`, `rope_scaling`), which
  transformers 5 also reads.
  """
  if family not in FAMILIES:
    raise ValueError(
      f"hf: family={family!r} (supported: {', '.join(FAMILIES)})"
    )
  cfg: dict[str, Any] = dict(
    architectures=[FAMILIES[family]],
    model_type=family,
    vocab_size=model.vocab_size,
    hidden_size=model.d_model,
    intermediate_size=model.mlp_dim,
    num_hidden_layers=model.num_layers,
    num_attention_heads=model.num_heads,
    num_key_value_heads=model.num_kv_heads,
    head_dim=model.head_dim,
    hidden_act="silu",
    max_position_embeddings=model.max_len,
    rms_norm_eps=model.norm_eps,
    rope_theta=model.rope_theta,
    rope_scaling=_rope_to_hf(model),
    tie_word_embeddings=model.tie_embeddings,
    torch_dtype=dtype or model.param_dtype,
  )
  if family == "llama":
    cfg.update(attention_bias=model.qkv_bias, mlp_bias=False)
  else:
    cfg.update(use_sliding_window=False)
  return cfg


def _hf_tensors(
  p: Mapping[str, Any], model: model_lib.ModelConfig, family: str
) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...]]]:
  """(HF name, thunk producing the HF-layout array, its shape), in order.

  Thunks fetch one layer of one tensor kind at a time, so exporting never
  holds more than the tensors of the shard being written.
  """

  def leaf(keys: tuple[str, ...]):
    node = p
    for k in keys:
      node = node[k]
    return node

  def item(e: _Entry, name: str, i: int | None = None):
    x = leaf(e.ours if i is None else ("layers", *e.ours))

    def thunk():
      return e.to_hf(
        np.asarray(jax.device_get(x if i is None else x[i])), model
      )

    return name, thunk, e.hf_shape(model)

  def zeros(name: str, shape: tuple[int, ...]):
    return name, lambda: np.zeros(shape, np.float32), shape

  yield item(_EMBED, _EMBED.hf)
  for i in range(model.num_layers):
    prefix = f"model.layers.{i}."
    for e in _LAYER:
      yield item(e, prefix + e.hf, i)
    for e in _BIASES:  # Qwen2 always has q/k/v biases: zeros if we have none
      if model.qkv_bias:
        yield item(e, prefix + e.hf, i)
      elif family == "qwen2":
        yield zeros(prefix + e.hf, e.hf_shape(model))
    if family == "llama" and model.qkv_bias:  # attention_bias adds o_proj's
      yield zeros(prefix + "self_attn.o_proj.bias", (model.d_model,))
  yield item(_NORM, _NORM.hf)
  if not model.tie_embeddings:
    yield item(_HEAD, _HEAD.hf)


def export_params(
  params: Params,
  *,
  model: model_lib.ModelConfig,
  path: str,
  family: str = "llama",
  dtype: str | None = None,
  max_shard_bytes: int = 5 << 30,
  extra_config: Mapping[str, Any] | None = None,
  assets_from: str | None = None,
) -> None:
  """Writes `path`/config.json + safetensors that transformers loads.

  Tensors keep their dtype unless `dtype` is given (so import(export(p))
  == p exactly). Over `max_shard_bytes` the weights are split into
  model-0000i-of-0000n.safetensors with model.safetensors.index.json.
  `extra_config` (e.g. bos/eos_token_id) is merged into config.json;
  `assets_from` (e.g. the imported checkpoint) supplies tokenizer and
  generation-config files (`ASSETS`), copied when present.
  Arrays must be fully addressable from this process (single host, or
  gathered first).
  """
  from safetensors.numpy import save_file  # noqa: PLC0415 - optional dep

  p = nn.unbox(params)
  p = p["params"] if "params" in p else p
  out_dtype = np.dtype(dtype or p["embedding"].dtype)
  os.makedirs(path, exist_ok=True)
  cfg = hf_config(model, family, dtype=str(out_dtype))
  cfg.update(extra_config or {})
  # One pass over shapes decides the shards before any array is fetched.
  plan = list(_hf_tensors(p, model, family))
  shards: list[list] = [[]]
  size = 0
  for item in plan:
    nbytes = int(np.prod(item[2])) * out_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  n = len(shards)
  names = (
    ["model.safetensors"]
    if n == 1
    else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  )
  weight_map, total = {}, 0
  for file, shard in zip(names, shards, strict=True):
    tensors = {}
    for name, thunk, shape in shard:
      t = np.ascontiguousarray(thunk(), out_dtype)
      assert t.shape == tuple(shape), (name, t.shape, shape)
      tensors[name] = t
      weight_map[name] = file
      total += t.nbytes
    _atomic(
      os.path.join(path, file),
      lambda tmp, tensors=tensors: save_file(
        tensors, tmp, metadata={"format": "pt"}
      ),
    )
    del tensors
  if n > 1:
    index = dict(metadata=dict(total_size=total), weight_map=weight_map)
    _atomic(
      os.path.join(path, "model.safetensors.index.json"),
      lambda tmp: _write_json(index, tmp),
    )
  for name in ASSETS if assets_from else ():
    src = os.path.join(assets_from, name)
    if os.path.exists(src):
      dst = os.path.join(path, name)
      _atomic(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
  _atomic(os.path.join(path, "config.json"), lambda tmp: _write_json(cfg, tmp))


def _write_json(obj: Any, file: str) -> None:
  with open(file, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _atomic(file: str, write: Callable[[str], None]) -> None:
  """Writes via a temp file + rename, so a crash never leaves a torn file."""
  tmp = file + ".tmp"
  write(tmp)
  os.replace(tmp, file)
