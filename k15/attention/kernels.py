"""Platform attention kernels: cuDNN fused attention on GPU, Pallas splash
attention on TPU (`attend` falls back to blockwise elsewhere)."""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k15.attention.common import (
  attention_mask,
  batch_head_specs,
  explicit_axes,
  pad_len,
  reshard,
)


def cudnn_attention(
  q_BxTxHxDh,
  k_BxSxKxDh,
  v_BxSxKxDh,
  q_pos_BxT,
  q_seg_BxT,
  kv_pos_BxS,
  kv_seg_BxS,
) -> jax.Array:
  """cuDNN fused attention; the mask rule goes in as a [B, 1, T, S] mask.

  cuDNN's kernel is flash-style, but the explicit-position mask it is given
  is dense (bool, and a bias of q's dtype inside JAX): O(T * S) memory.
  """
  mask_BxTxS = attention_mask(q_pos_BxT, q_seg_BxT, kv_pos_BxS, kv_seg_BxS)
  out = jax.nn.dot_product_attention(
    q_BxTxHxDh,
    k_BxSxKxDh,
    v_BxSxKxDh,
    mask=mask_BxTxS[:, None],
    implementation="cudnn",
  )
  has_BxT = mask_BxTxS.any(-1)
  return jnp.where(has_BxT[:, :, None, None], out, 0).astype(q_BxTxHxDh.dtype)


def splash_attention(
  q_BxTxHxDh,
  k_BxSxKxDh,
  v_BxSxKxDh,
  q_pos_BxT,
  q_seg_BxT,
  kv_pos_BxS,
  kv_seg_BxS,
  *,
  block: int = 512,
  mesh=None,
  interpret: bool = False,
) -> jax.Array:
  """Pallas TPU splash attention for self-attention (T == S).

  Splash masks are static, so the rule is expressed as causal-by-index plus
  segment ids. That equals the position rule when q and kv are the same
  tokens and positions increase along the sequence within each segment
  (packing, left padding); it is not valid for the zigzag layout or a
  cache. `interpret=True` runs the kernel on CPU for tests.
  """
  del q_pos_BxT, kv_pos_BxS  # assumed to follow the index (see above)
  T = q_BxTxHxDh.shape[1]
  b = min(block, -(-T // 128) * 128)
  Tp = -(-T // b) * b
  local = functools.partial(_splash_local, block=b, interpret=interpret)
  args = (
    pad_len(q_BxTxHxDh, 1, Tp),
    pad_len(k_BxSxKxDh, 1, Tp),
    pad_len(v_BxSxKxDh, 1, Tp),
    pad_len(q_seg_BxT, 1, Tp),
    pad_len(kv_seg_BxS, 1, Tp),
  )
  if mesh is None:
    return local(*args)[:, :T]
  batch, head = batch_head_specs(mesh)
  x_spec, id_spec = P(batch, None, head, None), P(batch, None)
  specs = (x_spec,) * 3 + (id_spec,) * 2
  explicit = explicit_axes(mesh)
  if explicit:  # Explicit axes: shard_map wants inputs already laid out.
    out_spec = jax.typeof(q_BxTxHxDh).sharding.spec
    args = tuple(
      reshard(x, mesh, sp) for x, sp in zip(args, specs, strict=True)
    )
  out = jax.shard_map(
    local, mesh=mesh, check_vma=False, in_specs=specs, out_specs=x_spec
  )(*args)
  if explicit:
    out = reshard(out, mesh, out_spec)
  return out[:, :T]


def _splash_local(q, k, v, q_seg, kv_seg, *, block: int, interpret: bool):
  """Splash on one device's [B, Tp, ...] blocks (Tp a multiple of block)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as sk,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as sm,
  )

  B, Tp, H, Dh = q.shape
  K = k.shape[2]
  G = H // K
  b = block
  q = q.reshape(B, Tp, K, G, Dh) * jnp.asarray(1.0 / math.sqrt(Dh), q.dtype)
  mask = sm.MultiHeadMask([sm.CausalMask((Tp, Tp)) for _ in range(G)])
  sizes = sk.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  kernel = sk.make_splash_mqa(
    mask,
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )

  def one(q_GxTxDh, k_TxDh, v_TxDh, q_seg_T, kv_seg_T):
    ids = sk.SegmentIds(q=q_seg_T, kv=kv_seg_T)
    return kernel(q_GxTxDh, k_TxDh, v_TxDh, segment_ids=ids)

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
  out_BxKxGxTxDh = jax.vmap(per_head)(
    jnp.einsum("btkgd->bkgtd", q),
    jnp.einsum("btkd->bktd", k),
    jnp.einsum("btkd->bktd", v),
    q_seg,
    kv_seg,
  )
  out = jnp.einsum("bkgtd->btkgd", out_BxKxGxTxDh).reshape(B, Tp, H, Dh)
  # Segment-0 rows attend each other inside splash; the rule gives zeros.
  return jnp.where((q_seg != 0)[:, :, None, None], out, 0).astype(q.dtype)
