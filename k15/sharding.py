"""Device mesh and logical-axis rules: the one place that names mesh axes.

Mesh axes: `data` (batch), `fsdp` (batch + parameter sharding), `tensor`
(heads / mlp), `context` (sequence, for ring attention). Params and
activations carry logical names (see `k15.model`); `RULES` maps them to mesh
axes. State is born sharded: `jax.eval_shape` gives the boxed abstract tree,
`param_shardings` turns its logical names into `NamedSharding`s, and the
initialiser is jitted with those `out_shardings`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "context")
BATCH = ("data", "fsdp")

RULES: tuple[tuple[str, Any], ...] = (
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # activations
    ("activation_batch", BATCH),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    # kv cache [L, B, S, K, Dh]
    ("cache_layers", None),
    ("cache_batch", BATCH),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one -1 entry to fill the devices; checks the product."""
  unknown = [k for k in spec if k not in AXES]
  if unknown:
    raise ValueError(f"mesh: unknown axis {unknown[0]!r}; axes are {AXES}")
  shape = {a: int(spec.get(a, 1)) for a in AXES}
  free = [a for a, n in shape.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {free}")
  known = math.prod(n for n in shape.values() if n != -1)
  if any(n == 0 or n < -1 for n in shape.values()):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {shape}")
  if free:
    if num_devices % known:
      raise ValueError(
          f"mesh: {num_devices} devices are not divisible by the fixed axes "
          f"{ {a: n for a, n in shape.items() if n != -1} }")
    shape[free[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(
        f"mesh {shape} needs {math.prod(shape.values())} devices but "
        f"{num_devices} are available")
  return shape


def make_mesh(spec: Mapping[str, int], devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  dims = tuple(shape[a] for a in AXES)
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(dims, devices)
  except Exception:  # noqa: BLE001 - odd topologies: plain reshape
    arr = np.asarray(devices).reshape(dims)
  return Mesh(arr, AXES)


def logical_to_spec(axes: tuple[str | None, ...] | None) -> P:
  if axes is None:
    return P()
  return nn.logical_to_mesh_axes(axes, RULES)


def param_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
  """NamedShardings for a (possibly boxed) abstract param/optimizer tree."""
  specs = nn.get_partition_spec(boxed_abstract)
  return jax.tree.map(
      lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(s, RULES)
                              if _is_logical(s) else s),
      specs, is_leaf=lambda x: isinstance(x, P))


def _is_logical(spec: P) -> bool:
  return any(isinstance(a, str) and a not in AXES for a in spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def cache_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  kv = P(None, BATCH, None, "tensor", None)
  return dict(k=NamedSharding(mesh, kv), v=NamedSharding(mesh, kv),
              pos=NamedSharding(mesh, P(BATCH, None)),
              seg=NamedSharding(mesh, P(BATCH, None)))


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places host arrays on the mesh, split over the batch axes."""
  return jax.tree.map(
      lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
  """The mesh (ring attention finds it here) and the logical-axis rules
  (activation constraints in the model are no-ops without them)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
