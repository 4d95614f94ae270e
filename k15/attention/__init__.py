"""Attention over long contexts: one mask rule, several implementations.

Dimension key: B batch, T query tokens, S key/value tokens, H query heads,
K kv heads, G = H // K query heads per kv head, Dh head dim. Blocked layouts
add Nq / Nk (number of query / kv blocks), Q (query block) and C (kv block).

Mask rule, shared by every implementation: query (b, t) attends key (b, s)
iff kv_seg[b, s] != 0, q_seg[b, t] == kv_seg[b, s] and
kv_pos[b, s] <= q_pos[b, t]. Segment 0 is padding; positions are explicit
int32, so packed sequences, left-padded prompts, a KV cache with unfilled
slots (seg 0) and the zigzag layout of ring attention all use this one rule.
A query with no allowed key outputs zeros.

Implementations (`attend(..., impl=...)`), one module each:
- "dense" (`dense`): reference; materialises [B, H, T, S] scores.
- "blockwise" (`blockwise`, over `blocks`): flash-style online softmax over
  (query block, kv block) pairs, custom_vjp whose backward recomputes scores
  per block; memory is O(T * block), and block pairs that the mask empties
  are skipped.
- "ring" (`ring`): context parallelism over the "context" mesh axis with
  shard_map; kv blocks rotate with ppermute, combined by the same online
  softmax; custom_vjp whose backward rotates kv together with its dK/dV
  accumulators.
- "cudnn" / "splash" (`kernels`): platform kernels on GPU / TPU, else
  "blockwise".
`decode` is the one-new-token-per-row path that the sampler's decode loop
runs over its own cache layout (see `k15.model.decode_step`).
"""

import jax
import jax.numpy as jnp

from k15.attention import decode, kernels, ring
from k15.attention.blockwise import blockwise_attention
from k15.attention.common import attention_mask, log_once, mesh_or_none
from k15.attention.dense import dense_attention
from k15.attention.ring import (
  inverse_zigzag_permutation,
  ring_attention,
  zigzag_permutation,
)

__all__ = [
  "IMPLS",
  "attend",
  "attention_mask",
  "blockwise_attention",
  "decode",
  "dense_attention",
  "inverse_zigzag_permutation",
  "ring_attention",
  "zigzag_permutation",
]

IMPLS = ("dense", "blockwise", "ring", "cudnn", "splash")


def attend(
  q_BxTxHxDh: jax.Array,
  k_BxSxKxDh: jax.Array,
  v_BxSxKxDh: jax.Array,
  *,
  q_pos_BxT: jax.Array,
  q_seg_BxT: jax.Array,
  kv_pos_BxS: jax.Array,
  kv_seg_BxS: jax.Array,
  impl: str = "dense",
  block_q: int = 512,
  block_kv: int = 512,
  mesh=None,
) -> jax.Array:
  """Grouped-query attention under the module's mask rule; [B, T, H, Dh].

  Scale 1/sqrt(Dh) is applied here; softmax statistics are float32; the
  output has q's dtype. `mesh` (else the mesh set by `jax.set_mesh`) is
  needed by "ring" (axis "context") and used by "splash" to shard batch and
  heads. "splash" reads segments but not positions (its masks are static):
  use it only for self-attention whose positions rise along the sequence
  within each segment, never for a zigzag layout.
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  Bk, S, K, Dhk = k_BxSxKxDh.shape
  if (Bk, Dhk) != (B, Dh) or v_BxSxKxDh.shape != k_BxSxKxDh.shape:
    raise ValueError(
      f"attend: q {q_BxTxHxDh.shape}, k {k_BxSxKxDh.shape} and v "
      f"{v_BxSxKxDh.shape} must be [B,T,H,Dh], [B,S,K,Dh], [B,S,K,Dh]"
    )
  if H % K:
    raise ValueError(f"attend: query heads H={H} not a multiple of K={K}")
  for name, x, shape in (
    ("q_pos_BxT", q_pos_BxT, (B, T)),
    ("q_seg_BxT", q_seg_BxT, (B, T)),
    ("kv_pos_BxS", kv_pos_BxS, (B, S)),
    ("kv_seg_BxS", kv_seg_BxS, (B, S)),
  ):
    if tuple(x.shape) != shape:
      raise ValueError(f"attend: {name} has shape {x.shape}, want {shape}")
  if block_q < 1 or block_kv < 1:
    raise ValueError(f"attend: block sizes {block_q}, {block_kv} must be >=1")
  ids = tuple(
    jnp.asarray(x, jnp.int32)
    for x in (q_pos_BxT, q_seg_BxT, kv_pos_BxS, kv_seg_BxS)
  )
  args = (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, *ids)
  platform = jax.default_backend()
  if impl == "dense":
    return dense_attention(*args)
  if impl == "blockwise":
    return blockwise_attention(*args, block_q=block_q, block_kv=block_kv)
  if impl == "ring":
    return ring_attention(
      *args, mesh=ring.resolve_mesh(mesh), block_q=block_q, block_kv=block_kv
    )
  if impl == "cudnn":
    if platform == "gpu" and q_BxTxHxDh.dtype in (jnp.bfloat16, jnp.float16):
      return kernels.cudnn_attention(*args)
    log_once(
      f"attend: impl='cudnn' needs a GPU and bf16/f16 inputs (have "
      f"{platform}, {q_BxTxHxDh.dtype}); using 'blockwise'"
    )
    return blockwise_attention(*args, block_q=block_q, block_kv=block_kv)
  if impl == "splash":
    if platform == "tpu" and T == S:
      return kernels.splash_attention(
        *args, block=min(block_q, block_kv), mesh=mesh_or_none(mesh)
      )
    log_once(
      f"attend: impl='splash' needs a TPU and self-attention T == S (have "
      f"{platform}, T={T}, S={S}); using 'blockwise'"
    )
    return blockwise_attention(*args, block_q=block_q, block_kv=block_kv)
  raise ValueError(f"attend: unknown impl {impl!r}; choose from {IMPLS}")
