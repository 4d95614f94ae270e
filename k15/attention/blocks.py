"""The blocked online softmax that blockwise and ring attention run.

Blocked layout: the block index leads so lax.scan / lax.map walk it.
A query block carries (q, pos, seg, summary); a kv block (k, v, pos, seg,
summary). Summaries are per-row bounds used to skip block pairs that the
mask empties: (any real token, pos bound, min seg, max seg), each NxB.
"""

import math

import jax.numpy as jnp
from jax import lax

from k15.attention.common import F32, IMAX, IMIN, attention_mask


def to_blocks(x, n: int):
  """[B, n*Q, ...] -> [n, B, Q, ...]."""
  B, L = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, n, L // n, *x.shape[2:]), 1, 0)


def from_blocks(x):
  """[n, B, Q, ...] -> [B, n*Q, ...]."""
  n, B, Q = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, n * Q, *x.shape[3:])


def summary(pos_NxBxL, seg_NxBxL, *, upper: bool):
  """Per-block bounds: max position for queries, min for keys."""
  real = seg_NxBxL != 0
  if upper:
    pos = jnp.where(real, pos_NxBxL, IMIN).max(-1)
  else:
    pos = jnp.where(real, pos_NxBxL, IMAX).min(-1)
  return (
    real.any(-1),
    pos,
    jnp.where(real, seg_NxBxL, IMAX).min(-1),
    jnp.where(real, seg_NxBxL, IMIN).max(-1),
  )


def pair_live(q_sum, kv_sum):
  """False only when the mask is empty for the whole (q, kv) block pair."""
  q_any, q_pos_max, q_seg_min, q_seg_max = q_sum
  k_any, k_pos_min, k_seg_min, k_seg_max = kv_sum
  live_B = (
    q_any
    & k_any
    & (k_pos_min <= q_pos_max)
    & (k_seg_min <= q_seg_max)
    & (q_seg_min <= k_seg_max)
  )
  return live_B.any()


def pair_scores(
  q_BxQxKxGxDh, k_BxCxKxDh, q_pos_BxQ, q_seg_BxQ, k_pos_BxC, k_seg_BxC
):
  """Scaled, masked block scores in f32 and the block mask."""
  Dh = q_BxQxKxGxDh.shape[-1]
  s_BxKxGxQxC = jnp.einsum(
    "bqkgd,bckd->bkgqc",
    q_BxQxKxGxDh,
    k_BxCxKxDh,
    preferred_element_type=F32,
  ) * (1.0 / math.sqrt(Dh))
  mask_BxQxC = attention_mask(q_pos_BxQ, q_seg_BxQ, k_pos_BxC, k_seg_BxC)
  mask = mask_BxQxC[:, None, None]
  return jnp.where(mask, s_BxKxGxQxC, -jnp.inf), mask


def fwd_q_block(state, q_blk, kv_blocks):
  """Online softmax of one query block over a run of kv blocks.

  state = (m_BxKxGxQ, l_BxKxGxQ, acc_BxKxGxQxDh), all f32 and unnormalised,
  so a ring step continues where the previous kv chunk stopped. Returns the
  new state and the number of block pairs actually computed.
  """
  q, q_pos, q_seg, q_sum = q_blk

  def step(state, kv_blk):
    k, v, k_pos, k_seg, k_sum = kv_blk

    def compute(state):
      m, l, acc = state
      s, _ = pair_scores(q, k, q_pos, q_seg, k_pos, k_seg)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      corr = jnp.exp(m - m_safe)
      pv = jnp.einsum(
        "bkgqc,bckd->bkgqd", p.astype(v.dtype), v, preferred_element_type=F32
      )
      return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    live = pair_live(q_sum, k_sum)
    return lax.cond(live, compute, lambda s: s, state), live.astype(jnp.int32)

  state, counts = lax.scan(step, state, kv_blocks)
  return state, counts.sum()


def fwd_chunk(state, q_blocks, kv_blocks):
  """Every query block against one run of kv blocks (lax.map over Nq)."""

  def per_q(args):
    state, q_blk = args
    return fwd_q_block(state, q_blk, kv_blocks)

  state, counts = lax.map(per_q, (state, q_blocks))
  return state, counts.sum()


def init_state(q_NqxBxQxKxGxDh):
  """Empty (m, l, acc). Built from q (zeros_like) so that under a mesh with
  Explicit axes the state carries q's sharding, as lax.cond requires."""
  acc = jnp.einsum("nbqkgd->nbkgqd", jnp.zeros_like(q_NqxBxQxKxGxDh, F32))
  l = acc[..., 0]
  return l - jnp.inf, l, acc


def finalize(state, dtype):
  """(m, l, acc) -> out [Nq,B,Q,K,G,Dh] in dtype, lse [Nq,B,K,G,Q] f32.

  Rows without an allowed key have l == 0: out 0 and lse -inf.
  """
  m, l, acc = state
  has = l > 0
  out = acc / jnp.where(has, l, 1.0)[..., None]
  lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
  return jnp.einsum("nbkgqd->nbqkgd", out).astype(dtype), lse


def bwd_chunk(q_blocks, kv_blocks, dk_NkxBxCxKxDh, dv_NkxBxCxKxDh):
  """Gradient contributions of one run of kv blocks, recomputed per block.

  q_blocks = (q, do, lse, delta, pos, seg, summary) with delta = rowsum(dO*O).
  Scans query blocks outside and kv blocks inside; dK/dV (f32) ride the
  inner scan as xs/ys so nothing larger than a block pair is live. Returns
  (dq [Nq,B,Q,K,G,Dh] f32, dk, dv, computed block pairs).
  """

  def per_q(carry, q_blk):
    dk_all, dv_all = carry
    q, do, lse, delta, q_pos, q_seg, q_sum = q_blk
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def step(dq, xs):
      k, v, k_pos, k_seg, k_sum, dk, dv = xs

      def compute(dq, dk, dv):
        s, mask = pair_scores(q, k, q_pos, q_seg, k_pos, k_seg)
        p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)
        dv = dv + jnp.einsum(
          "bkgqc,bqkgd->bckd",
          p.astype(do.dtype),
          do,
          preferred_element_type=F32,
        )
        dp = jnp.einsum("bqkgd,bckd->bkgqc", do, v, preferred_element_type=F32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum(
          "bkgqc,bckd->bqkgd",
          ds.astype(k.dtype),
          k,
          preferred_element_type=F32,
        )
        dk = dk + jnp.einsum(
          "bkgqc,bqkgd->bckd",
          ds.astype(q.dtype),
          q,
          preferred_element_type=F32,
        )
        return dq, dk, dv

      live = pair_live(q_sum, k_sum)
      dq, dk, dv = lax.cond(live, compute, lambda *a: a, dq, dk, dv)
      return dq, (dk, dv, live.astype(jnp.int32))

    dq0 = jnp.zeros_like(q, F32)
    dq, (dk_all, dv_all, counts) = lax.scan(
      step, dq0, (*kv_blocks, dk_all, dv_all)
    )
    return (dk_all, dv_all), (dq, counts.sum())

  (dk, dv), (dq, counts) = lax.scan(
    per_q, (dk_NkxBxCxKxDh, dv_NkxBxCxKxDh), q_blocks
  )
  return dq, dk, dv, counts.sum()


def split_q(q_BxTxHxDh, q_pos_BxT, q_seg_BxT, K: int, Q: int):
  """Split queries into blocks of Q, grouped [.., K, G, Dh] for GQA."""
  B, T, H, Dh = q_BxTxHxDh.shape
  Nq = T // Q
  q = to_blocks(q_BxTxHxDh.reshape(B, T, K, H // K, Dh), Nq)
  pos, seg = to_blocks(q_pos_BxT, Nq), to_blocks(q_seg_BxT, Nq)
  return q, pos, seg, summary(pos, seg, upper=True)


def split_kv(k_BxSxKxDh, v_BxSxKxDh, kv_pos_BxS, kv_seg_BxS, C: int):
  Nk = k_BxSxKxDh.shape[1] // C
  pos, seg = to_blocks(kv_pos_BxS, Nk), to_blocks(kv_seg_BxS, Nk)
  return (
    to_blocks(k_BxSxKxDh, Nk),
    to_blocks(v_BxSxKxDh, Nk),
    pos,
    seg,
    summary(pos, seg, upper=False),
  )


def delta(do_NqxBxQxKxGxDh, out_NqxBxQxKxGxDh):
  """rowsum(dO * O) in f32, [Nq, B, K, G, Q]."""
  return jnp.einsum(
    "nbqkgd,nbqkgd->nbkgq",
    do_NqxBxQxKxGxDh.astype(F32),
    out_NqxBxQxKxGxDh.astype(F32),
  )



def block_sizes(T: int, S: int, block_q: int, block_kv: int):
  """Blocks no larger than the sequence, and the lengths padded to them."""
  Q, C = min(block_q, T), min(block_kv, S)
  return Q, C, -(-T // Q) * Q, -(-S // C) * C
