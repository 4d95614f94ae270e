"""Ring attention: context parallelism over the "context" mesh axis.

Each context device holds T/n tokens; kv blocks rotate with ppermute and
combine by the online softmax of `blocks`; a custom_vjp backward rotates kv
together with its dK/dV accumulators. `zigzag_permutation` lays tokens out
so that causal work balances over the devices.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from k15.attention import blocks
from k15.attention.common import (
  CONTEXT_AXIS,
  F32,
  batch_head_specs,
  explicit_axes,
  mesh_or_none,
  pad_len,
  reshard,
)


def zigzag_permutation(T: int, n: int) -> np.ndarray:
  """Token order that balances causal work over n context devices.

  The sequence is cut into 2n equal chunks; device d gets chunks d and
  2n-1-d, so every device holds one early (cheap) and one late (expensive)
  chunk. `x_zig = x[:, perm]` for tokens, positions and segments alike; the
  mask rule reads positions, so attention needs no other change.
  """
  if n < 1 or T % (2 * n):
    raise ValueError(
      f"zigzag_permutation: T={T} must be a multiple of 2n={2 * n}"
    )
  chunks = np.arange(T).reshape(2 * n, T // (2 * n))
  order = [c for d in range(n) for c in (d, 2 * n - 1 - d)]
  return chunks[order].reshape(-1)


def inverse_zigzag_permutation(T: int, n: int) -> np.ndarray:
  """`out = out_zig[:, inverse]` restores the natural token order."""
  return np.argsort(zigzag_permutation(T, n))


def resolve_mesh(mesh):
  found = mesh_or_none(mesh)
  if found is None or CONTEXT_AXIS not in found.axis_names:
    raise ValueError(
      "attend(impl='ring') needs a mesh with a 'context' axis: pass mesh= "
      f"or call under jax.set_mesh(mesh) (got {found})"
    )
  return found


def _pad_per_device(x, n: int, L: int, Lp: int):
  """[B, n*L, ...] -> [B, n*Lp, ...], padding each device's slice at its
  end so every device keeps its own tokens (and the zigzag balance)."""
  if L == Lp:
    return x
  B = x.shape[0]
  x = pad_len(x.reshape(B, n, L, *x.shape[2:]), 2, Lp)
  return x.reshape(B, n * Lp, *x.shape[3:])


def _unpad_per_device(x, n: int, L: int, Lp: int):
  if L == Lp:
    return x
  B = x.shape[0]
  x = x.reshape(B, n, Lp, *x.shape[2:])[:, :, :L]
  return x.reshape(B, n * L, *x.shape[3:])


def ring_attention(
  q_BxTxHxDh,
  k_BxSxKxDh,
  v_BxSxKxDh,
  q_pos_BxT,
  q_seg_BxT,
  kv_pos_BxS,
  kv_seg_BxS,
  *,
  mesh,
  block_q: int = 512,
  block_kv: int = 512,
) -> jax.Array:
  """Context-parallel attention; each "context" device holds T/n tokens.

  Batch is sharded over ("data", "fsdp") and heads over "tensor" (those
  present in the mesh). T and S are padded to multiples of n at the end and
  each device's slice to a block multiple at its own end. For balanced
  causal work lay tokens out with `zigzag_permutation` and pick blocks that
  divide T / (2n).
  """
  # See blockwise_attention: keeps the masks inside the layer scan.
  (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_pos_BxT, q_seg_BxT, kv_pos_BxS,
   kv_seg_BxS) = jax.lax.optimization_barrier(
    (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_pos_BxT, q_seg_BxT, kv_pos_BxS,
     kv_seg_BxS))
  out, _ = _ring_run(
    q_BxTxHxDh,
    k_BxSxKxDh,
    v_BxSxKxDh,
    q_pos_BxT,
    q_seg_BxT,
    kv_pos_BxS,
    kv_seg_BxS,
    mesh=mesh,
    block_q=block_q,
    block_kv=block_kv,
  )
  return out


def block_counts(*args, mesh, block_q: int, block_kv: int) -> np.ndarray:
  """Block pairs each device computed in the ring forward, [dp, tp, n].

  For tests and benchmarks: shows that skipping plus zigzag balances work.
  """
  run = functools.partial(
    _ring_run, mesh=mesh, block_q=block_q, block_kv=block_kv
  )
  return np.asarray(jax.jit(lambda *a: run(*a)[1])(*args))


def _ring_run(
  q, k, v, q_pos, q_seg, kv_pos, kv_seg, *, mesh, block_q, block_kv
):
  n = mesh.shape[CONTEXT_AXIS]
  B, T, H, Dh = q.shape
  S, K = k.shape[1], k.shape[2]
  Tn, Sn = -(-T // n), -(-S // n)
  Q, C, Tl, Sl = blocks.block_sizes(Tn, Sn, block_q, block_kv)
  batch, head = batch_head_specs(mesh)
  if head is not None and K % mesh.shape[head]:
    raise ValueError(
      f"ring attention: kv heads K={K} not divisible by '{head}' axis "
      f"size {mesh.shape[head]}"
    )

  def prep(x, L, Ln, Ll):
    return _pad_per_device(pad_len(x, 1, n * Ln), n, Ln, Ll)

  q_ = prep(q, T, Tn, Tl)
  qp_, qs_ = prep(q_pos, T, Tn, Tl), prep(q_seg, T, Tn, Tl)
  k_, v_ = prep(k, S, Sn, Sl), prep(v, S, Sn, Sl)
  kp_, ks_ = prep(kv_pos, S, Sn, Sl), prep(kv_seg, S, Sn, Sl)
  args = (q_, k_, v_, qp_, qs_, kp_, ks_)
  explicit = explicit_axes(mesh)
  if explicit:  # Explicit axes: shard_map wants inputs already laid out.
    out_spec = jax.typeof(q).sharding.spec
    x_spec, id_spec = P(batch, CONTEXT_AXIS, head), P(batch, CONTEXT_AXIS)
    specs = (x_spec,) * 3 + (id_spec,) * 4
    args = tuple(
      reshard(x, mesh, sp) for x, sp in zip(args, specs, strict=True)
    )
  out, counts = _make_ring(mesh, n, Q, C, batch, head)(*args)
  if explicit:
    out = reshard(out, mesh, out_spec)
  out = _unpad_per_device(out, n, Tn, Tl)[:, :T]
  return out, counts


def _make_ring(mesh, n: int, Q: int, C: int, batch, head) -> Callable:
  """custom_vjp around two shard_maps (forward, backward) over the mesh."""
  ctx = CONTEXT_AXIS
  x_spec = P(batch, ctx, head, None)
  id_spec = P(batch, ctx)
  lse_spec = P(ctx, batch, head)  # [Nq, B, K, G, Q] per device
  cnt_spec = P(batch, head, ctx)
  perm = [(i, (i + 1) % n) for i in range(n)]
  in_specs = (x_spec, x_spec, x_spec, id_spec, id_spec, id_spec, id_spec)
  shard = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

  def rotate(xs):
    return jax.tree.map(lambda x: lax.ppermute(x, ctx, perm), xs)

  def fwd_local(q, k, v, q_pos, q_seg, kv_pos, kv_seg):
    K = k.shape[2]
    q_blk = blocks.split_q(q, q_pos, q_seg, K, Q)
    kv_blk = blocks.split_kv(k, v, kv_pos, kv_seg, C)

    def step(carry, _):
      state, kv_blk, count = carry
      state, c = blocks.fwd_chunk(state, q_blk, kv_blk)
      return (state, rotate(kv_blk), count + c), None

    carry = (blocks.init_state(q_blk[0]), kv_blk, jnp.int32(0))
    if n > 1:
      carry, _ = lax.scan(step, carry, None, length=n - 1)
    state, kv_blk, count = carry
    state, c = blocks.fwd_chunk(state, q_blk, kv_blk)
    out_blocks, lse = blocks.finalize(state, q.dtype)
    out = blocks.from_blocks(out_blocks).reshape(q.shape)
    return out, lse, (count + c).reshape(1, 1, 1)

  fwd_sharded = shard(
    fwd_local, in_specs=in_specs, out_specs=(x_spec, lse_spec, cnt_spec)
  )

  def bwd_local(q, k, v, q_pos, q_seg, kv_pos, kv_seg, out, lse, do):
    K = k.shape[2]
    q_b, pos_b, seg_b, sum_b = blocks.split_q(q, q_pos, q_seg, K, Q)
    do_b = blocks.split_q(do, q_pos, q_seg, K, Q)[0]
    out_b = blocks.split_q(out, q_pos, q_seg, K, Q)[0]
    q_blk = (q_b, do_b, lse, blocks.delta(do_b, out_b), pos_b, seg_b, sum_b)
    kv_blk = blocks.split_kv(k, v, kv_pos, kv_seg, C)

    def step(carry, _):
      dq, kv_blk, dk, dv = carry
      dq_c, dk, dv, _ = blocks.bwd_chunk(q_blk, kv_blk, dk, dv)
      # dK/dV travel with their kv block; after n hops both are home.
      kv_blk, dk, dv = rotate((kv_blk, dk, dv))
      return (dq + dq_c, kv_blk, dk, dv), None

    dkv0 = jnp.zeros_like(kv_blk[0], F32)
    carry = (jnp.zeros_like(q_b, F32), kv_blk, dkv0, dkv0)
    (dq, _, dk, dv), _ = lax.scan(step, carry, None, length=n)
    return (
      blocks.from_blocks(dq).reshape(q.shape).astype(q.dtype),
      blocks.from_blocks(dk).astype(k.dtype),
      blocks.from_blocks(dv).astype(v.dtype),
    )

  bwd_sharded = shard(
    bwd_local,
    in_specs=(*in_specs, x_spec, lse_spec, x_spec),
    out_specs=(x_spec, x_spec, x_spec),
  )

  @jax.custom_vjp
  def ring(q, k, v, q_pos, q_seg, kv_pos, kv_seg):
    out, _, counts = fwd_sharded(q, k, v, q_pos, q_seg, kv_pos, kv_seg)
    return out, counts

  def ring_fwd(*args):
    out, lse, counts = fwd_sharded(*args)
    return (out, counts), (*args, out, lse)

  def ring_bwd(res, cts):
    do, _ = cts
    dq, dk, dv = bwd_sharded(*res, do)
    return dq, dk, dv, None, None, None, None

  ring.defvjp(ring_fwd, ring_bwd)
  return ring
