"""What every attention implementation shares: the mask rule, padding to a
length, and the mesh helpers of the sharded ones (ring, splash)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
CONTEXT_AXIS = "context"
IMAX = np.iinfo(np.int32).max
IMIN = np.iinfo(np.int32).min
F32 = jnp.float32

_log = logging.getLogger("k15.attention")
_logged: set[str] = set()


def log_once(msg: str) -> None:
  """Fallbacks are chosen at trace time; say so once, not per layer."""
  if msg not in _logged:
    _logged.add(msg)
    _log.warning(msg)


def attention_mask(q_pos_BxT, q_seg_BxT, kv_pos_BxS, kv_seg_BxS) -> jax.Array:
  """The mask rule as a boolean [B, T, S]."""
  kv_seg = kv_seg_BxS[:, None, :]
  return (
    (kv_seg != 0)
    & (q_seg_BxT[:, :, None] == kv_seg)
    & (kv_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None])
  )


def pad_len(x, axis: int, to: int, value=0):
  """x padded with `value` at the end of `axis` to length `to`."""
  pad = to - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def mesh_or_none(mesh):
  """The argument, else the mesh of `jax.set_mesh`, else None."""
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def batch_head_specs(mesh):
  """The mesh axes that split batch and heads (None where absent)."""
  names = mesh.axis_names
  batch = tuple(a for a in BATCH_AXES if a in names) or None
  head = HEAD_AXIS if HEAD_AXIS in names else None
  return batch, head


def explicit_axes(mesh) -> bool:
  explicit = jax.sharding.AxisType.Explicit
  return any(t == explicit for t in getattr(mesh, "axis_types", ()))


def reshard(x, mesh, spec):
  if isinstance(mesh, jax.sharding.Mesh):
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
  return jax.sharding.reshard(x, spec)  # abstract mesh: from the context
