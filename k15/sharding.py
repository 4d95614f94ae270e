"""Device mesh and logical-axis rules: the one place that names mesh axes.

Mesh axes: `data` (batch), `fsdp` (batch + parameter sharding), `tensor`
(heads / mlp), `context` (sequence, for ring attention). Params and
activations carry logical names (see `k15.model`); `RULES` maps them to mesh
axes. State is born sharded: `jax.eval_shape` gives the boxed abstract tree,
`param_shardings` turns its logical names into `NamedSharding`s, and the
initialiser is jitted with those `out_shardings`.

Multi-host (several `jax.distributed` processes, one controller each): every
process runs the same host logic, so host batches are the same everywhere;
`shard_batch` places only this process's rows on its own devices and
`gather` brings device results (sampled tokens, log-probs, metrics) back to
every process whole. `make_mesh` lays processes out along the batch axes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
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
  # the vision tower and projector (k15.vision)
  ("vision_embed", "fsdp"),
  ("vision_mlp", "tensor"),
  ("vision_heads", "tensor"),
  ("vision_head_dim", None),
  ("vision_layers", None),
  ("vision_pixels", None),
  ("vision_rows", None),
  ("vision_cols", None),
  ("projector", "tensor"),
  # activations
  ("activation_batch", BATCH),
  ("activation_length", "context"),
  ("activation_embed", None),
  ("activation_mlp", "tensor"),
  ("activation_heads", "tensor"),
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
        f"{ {a: n for a, n in shape.items() if n != -1} }"
      )
    shape[free[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(
      f"mesh {shape} needs {math.prod(shape.values())} devices but "
      f"{num_devices} are available"
    )
  return shape


def make_mesh(spec: Mapping[str, int], devices=None) -> Mesh:
  """The mesh of `spec` over `devices` (default: every device of every
  process). With several processes, see `device_grid`: process p's devices
  hold block p of the batch, as `data.process_slice` assumes."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  return Mesh(device_grid(shape, devices), AXES)


def device_grid(shape: Mapping[str, int], devices) -> np.ndarray:
  """Devices laid out as the mesh `shape` [data, fsdp, tensor, context].

  One process: `mesh_utils.create_device_mesh` (topology-aware on TPU).
  Several: the process count is split over the outer axes first (data,
  then fsdp, ...), and each process's devices fill one block of the
  remaining (inner) shape, in process order -- a hybrid mesh with
  processes as the slow network, like `create_hybrid_device_mesh(...,
  process_is_granule=True)`. So collectives over tensor / context stay
  inside a host where they fit, and when data * fsdp >= the process count,
  process p holds rows [p * B / n, (p + 1) * B / n) of every batch.
  """
  dims = tuple(shape[a] for a in AXES)
  procs = sorted({d.process_index for d in devices})
  if len(procs) == 1:
    return _local_grid(dims, devices)
  by_proc = {
    p: sorted((d for d in devices if d.process_index == p), key=lambda d: d.id)
    for p in procs
  }
  per = {len(v) for v in by_proc.values()}
  if len(per) != 1:
    raise ValueError(
      f"mesh: processes hold different numbers of devices "
      f"{ {p: len(v) for p, v in by_proc.items()} }"
    )
  outer, rest = [], len(procs)
  for n in dims:
    g = math.gcd(rest, n)
    outer.append(g)
    rest //= g
  if rest != 1:
    raise ValueError(
      f"mesh {dict(shape)} cannot be split evenly over {len(procs)} processes"
    )
  inner = tuple(n // g for n, g in zip(dims, outer, strict=True))
  grid = np.empty(dims, dtype=object)
  for k, p in enumerate(procs):
    at = np.unravel_index(k, outer)
    block = tuple(
      slice(i * m, (i + 1) * m) for i, m in zip(at, inner, strict=True)
    )
    grid[block] = _local_grid(inner, by_proc[p])
  return grid


def _local_grid(dims: tuple[int, ...], devices) -> np.ndarray:
  try:
    return mesh_utils.create_device_mesh(dims, devices)
  except Exception:  # noqa: BLE001 - odd topologies: plain reshape
    arr = np.empty(len(devices), dtype=object)
    arr[:] = list(devices)
    return arr.reshape(dims)


def logical_to_spec(axes: tuple[str | None, ...] | None) -> P:
  if axes is None:
    return P()
  return nn.logical_to_mesh_axes(axes, RULES)


def param_shardings(boxed_abstract: Any, mesh: Mesh) -> Any:
  """NamedShardings for a (possibly boxed) abstract param/optimizer tree."""
  specs = nn.get_partition_spec(boxed_abstract)
  return jax.tree.map(
    lambda s: NamedSharding(
      mesh, nn.logical_to_mesh_axes(s, RULES) if _is_logical(s) else s
    ),
    specs,
    is_leaf=lambda x: isinstance(x, P),
  )


def _is_logical(spec: P) -> bool:
  return any(isinstance(a, str) and a not in AXES for a in spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over (data, fsdp); the rest replicated (scalars too)."""
  if ndim == 0:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: Any, mesh: Mesh, *, local: bool = False) -> Any:
  """Host arrays -> arrays on the mesh, rows split over (data, fsdp).

  Multi-controller JAX: each process places only the rows its own devices
  hold (`jax.make_array_from_process_local_data`); nothing crosses hosts.
  local=False: `batch` is the global batch, the same on every process (the
    RL loop runs the same host logic everywhere: same prompts, rewards).
  local=True: `batch` is this process's `data.process_slice` (rows
    [p * B / n, (p + 1) * B / n) of a global batch of B rows), e.g. from a
    per-process data pipeline; the global batch has n times its rows.
  """
  n, p = jax.process_count(), jax.process_index()

  def place(x):
    x = np.asarray(x)
    sh = batch_sharding(mesh, x.ndim)
    if x.ndim == 0:
      return jax.make_array_from_process_local_data(sh, x, x.shape)
    rows = x.shape[0] * (n if local else 1)
    if rows % batch_divisor(mesh):
      raise ValueError(
        f"shard_batch: a batch of {rows} rows is not divisible by the "
        f"mesh's data*fsdp = {batch_divisor(mesh)}"
      )
    if local and n > 1:
      held = process_rows(mesh, rows)
      want = slice(p * x.shape[0], (p + 1) * x.shape[0])
      if held != want:
        raise ValueError(
          f"shard_batch(local=True): process {p} holds rows "
          f"{held.start}:{held.stop} of {rows} under mesh "
          f"{dict(mesh.shape)}, not its process_slice "
          f"{want.start}:{want.stop} (the batch axes data*fsdp do not "
          f"split over the {n} processes); pass the global batch"
        )
    return jax.make_array_from_process_local_data(sh, x, (rows, *x.shape[1:]))

  return jax.tree.map(place, batch)


def process_rows(mesh: Mesh, rows: int) -> slice:
  """The rows of a [rows, ...] batch that this process's devices hold."""
  index = batch_sharding(mesh, 1).addressable_devices_indices_map((rows,))
  starts = sorted({i[0].indices(rows)[:2] for i in index.values()})
  lo, hi = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != hi - lo:
    raise ValueError(
      f"mesh {dict(mesh.shape)}: process "
      f"{jax.process_index()} holds non-contiguous rows "
      f"{starts}"
    )
  return slice(lo, hi)


def gather(tree: Any) -> Any:
  """Host numpy copies of a tree's jax.Arrays, whole on every process.

  What `jax.device_get` does on one process. An array sharded over devices
  of other processes (sampler outputs, scored log-probs) is all-gathered:
  that is a collective, so every process must call `gather` on the same
  arrays in the same order (the RL loop does: its host logic is the same
  everywhere). Replicated arrays (metrics) are read locally. Other leaves
  pass through unchanged.
  """
  leaves, treedef = jax.tree.flatten(tree)
  remote = [
    i
    for i, x in enumerate(leaves)
    if isinstance(x, jax.Array)
    and not x.is_fully_addressable
    and not x.is_fully_replicated
  ]
  if remote:
    xs = [leaves[i] for i in remote]
    reps = tuple(_replicated_like(x) for x in xs)
    for i, y in zip(
      remote, jax.jit(_identity, out_shardings=reps)(*xs), strict=True
    ):
      leaves[i] = y
  arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
  host = jax.device_get([leaves[i] for i in arrays])
  for i, h in zip(arrays, host, strict=True):
    leaves[i] = np.asarray(h)
  return jax.tree.unflatten(treedef, leaves)


def _identity(*xs):
  return xs


def _replicated_like(x: jax.Array):
  if isinstance(x.sharding, NamedSharding):
    return NamedSharding(x.sharding.mesh, P())
  return jax.sharding.GSPMDSharding.get_replicated(
    x.sharding._device_assignment
  )  # noqa: SLF001 - as process_allgather


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
  """The mesh (ring attention finds it here) and the logical-axis rules
  (activation constraints in the model are no-ops without them)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
