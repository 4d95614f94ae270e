"""Blockwise (flash-style) attention on one device: an online softmax over
(query block, kv block) pairs, skipping pairs the mask empties, with a
custom_vjp whose backward recomputes scores per block."""

import functools

import jax
import jax.numpy as jnp

from k15.attention import blocks
from k15.attention.common import F32, pad_len


def blockwise_attention(
  q_BxTxHxDh,
  k_BxSxKxDh,
  v_BxSxKxDh,
  q_pos_BxT,
  q_seg_BxT,
  kv_pos_BxS,
  kv_seg_BxS,
  *,
  block_q: int = 512,
  block_kv: int = 512,
) -> jax.Array:
  """Flash-style attention in O(T * block) memory, forward and backward.

  Lengths that are not block multiples are padded with segment 0.
  """
  # The barrier keeps the position/segment masks inside the layer scan: under
  # grad, JAX otherwise hoists them out of a scan over layers and stores one
  # [T, S] mask per block pair for every layer (tens of GiB at 128k).
  (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_pos_BxT, q_seg_BxT, kv_pos_BxS,
   kv_seg_BxS) = jax.lax.optimization_barrier(
    (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_pos_BxT, q_seg_BxT, kv_pos_BxS,
     kv_seg_BxS))
  T, S = q_BxTxHxDh.shape[1], k_BxSxKxDh.shape[1]
  Q, C, Tp, Sp = blocks.block_sizes(T, S, block_q, block_kv)
  out = _blockwise(
    Q,
    C,
    pad_len(q_BxTxHxDh, 1, Tp),
    pad_len(k_BxSxKxDh, 1, Sp),
    pad_len(v_BxSxKxDh, 1, Sp),
    pad_len(q_pos_BxT, 1, Tp),
    pad_len(q_seg_BxT, 1, Tp),
    pad_len(kv_pos_BxS, 1, Sp),
    pad_len(kv_seg_BxS, 1, Sp),
  )
  return out[:, :T]


def _blockwise_fwd_impl(Q, C, q, k, v, q_pos, q_seg, kv_pos, kv_seg):
  K = k.shape[2]
  q_blk = blocks.split_q(q, q_pos, q_seg, K, Q)
  kv_blk = blocks.split_kv(k, v, kv_pos, kv_seg, C)
  state, _ = blocks.fwd_chunk(blocks.init_state(q_blk[0]), q_blk, kv_blk)
  out_blocks, lse = blocks.finalize(state, q.dtype)
  B, T, H, Dh = q.shape
  return blocks.from_blocks(out_blocks).reshape(B, T, H, Dh), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise(Q, C, q, k, v, q_pos, q_seg, kv_pos, kv_seg):
  return _blockwise_fwd_impl(Q, C, q, k, v, q_pos, q_seg, kv_pos, kv_seg)[0]


def _blockwise_fwd(Q, C, q, k, v, q_pos, q_seg, kv_pos, kv_seg):
  out, lse = _blockwise_fwd_impl(Q, C, q, k, v, q_pos, q_seg, kv_pos, kv_seg)
  return out, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, out, lse)


def _blockwise_bwd(Q, C, res, do_BxTxHxDh):
  q, k, v, q_pos, q_seg, kv_pos, kv_seg, out, lse = res
  B, T, H, Dh = q.shape
  K = k.shape[2]
  q_b, pos_b, seg_b, sum_b = blocks.split_q(q, q_pos, q_seg, K, Q)
  do_b = blocks.split_q(do_BxTxHxDh, q_pos, q_seg, K, Q)[0]
  out_b = blocks.split_q(out, q_pos, q_seg, K, Q)[0]
  kv_blk = blocks.split_kv(k, v, kv_pos, kv_seg, C)
  dkv0 = jnp.zeros_like(kv_blk[0], F32)
  dq, dk, dv, _ = blocks.bwd_chunk(
    (q_b, do_b, lse, blocks.delta(do_b, out_b), pos_b, seg_b, sum_b),
    kv_blk,
    dkv0,
    dkv0,
  )
  return (
    blocks.from_blocks(dq).reshape(B, T, H, Dh).astype(q.dtype),
    blocks.from_blocks(dk).astype(k.dtype),
    blocks.from_blocks(dv).astype(v.dtype),
    None,
    None,
    None,
    None,
  )


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
