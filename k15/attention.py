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

Implementations (`attend(..., impl=...)`):
- "dense": reference; materialises [B, H, T, S] scores.
- "blockwise": flash-style online softmax over (query block, kv block)
  pairs, custom_vjp whose backward recomputes scores per block; memory is
  O(T * block), and block pairs that the mask empties are skipped.
- "ring": context parallelism over the "context" mesh axis with shard_map;
  kv blocks rotate with ppermute, combined by the same online softmax;
  custom_vjp whose backward rotates kv together with its dK/dV accumulators.
- "cudnn" / "splash": platform kernels on GPU / TPU, else "blockwise".
"""

import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

IMPLS = ("dense", "blockwise", "ring", "cudnn", "splash")
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"
_CONTEXT_AXIS = "context"
_IMAX = np.iinfo(np.int32).max
_IMIN = np.iinfo(np.int32).min
_F32 = jnp.float32

_log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(msg: str) -> None:
  """Fallbacks are chosen at trace time; say so once, not per layer."""
  if msg not in _logged:
    _logged.add(msg)
    _log.warning(msg)


# ----------------------------------------------------------------- public API


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
      *args, mesh=_resolve_mesh(mesh), block_q=block_q, block_kv=block_kv
    )
  if impl == "cudnn":
    if platform == "gpu" and q_BxTxHxDh.dtype in (jnp.bfloat16, jnp.float16):
      return _cudnn_attention(*args)
    _log_once(
      f"attend: impl='cudnn' needs a GPU and bf16/f16 inputs (have "
      f"{platform}, {q_BxTxHxDh.dtype}); using 'blockwise'"
    )
    return blockwise_attention(*args, block_q=block_q, block_kv=block_kv)
  if impl == "splash":
    if platform == "tpu" and T == S:
      return _splash_attention(
        *args, block=min(block_q, block_kv), mesh=_mesh_or_none(mesh)
      )
    _log_once(
      f"attend: impl='splash' needs a TPU and self-attention T == S (have "
      f"{platform}, T={T}, S={S}); using 'blockwise'"
    )
    return blockwise_attention(*args, block_q=block_q, block_kv=block_kv)
  raise ValueError(f"attend: unknown impl {impl!r}; choose from {IMPLS}")


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


def attention_mask(q_pos_BxT, q_seg_BxT, kv_pos_BxS, kv_seg_BxS) -> jax.Array:
  """The mask rule as a boolean [B, T, S] (dense reference only)."""
  kv_seg = kv_seg_BxS[:, None, :]
  return (
    (kv_seg != 0)
    & (q_seg_BxT[:, :, None] == kv_seg)
    & (kv_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None])
  )


# ------------------------------------------------------------------- dense


def dense_attention(
  q_BxTxHxDh,
  k_BxSxKxDh,
  v_BxSxKxDh,
  q_pos_BxT,
  q_seg_BxT,
  kv_pos_BxS,
  kv_seg_BxS,
) -> jax.Array:
  """Reference: every other implementation is tested against this one."""
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, H // K, Dh)
  s_BxKxGxTxS = jnp.einsum(
    "btkgd,bskd->bkgts",
    q_BxTxKxGxDh,
    k_BxSxKxDh,
    preferred_element_type=_F32,
  ) * (1.0 / math.sqrt(Dh))
  mask_BxTxS = attention_mask(q_pos_BxT, q_seg_BxT, kv_pos_BxS, kv_seg_BxS)
  s_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], s_BxKxGxTxS, -jnp.inf)
  m_BxKxGxT = lax.stop_gradient(s_BxKxGxTxS.max(-1))
  m_BxKxGxT = jnp.where(jnp.isfinite(m_BxKxGxT), m_BxKxGxT, 0.0)
  p_BxKxGxTxS = jnp.exp(s_BxKxGxTxS - m_BxKxGxT[..., None])
  l_BxKxGxT = p_BxKxGxTxS.sum(-1)
  p_BxKxGxTxS = (
    p_BxKxGxTxS / jnp.where(l_BxKxGxT == 0, 1.0, l_BxKxGxT)[..., None]
  )
  out_BxTxKxGxDh = jnp.einsum(
    "bkgts,bskd->btkgd",
    p_BxKxGxTxS.astype(v_BxSxKxDh.dtype),
    v_BxSxKxDh,
    preferred_element_type=_F32,
  )
  return out_BxTxKxGxDh.reshape(B, T, H, Dh).astype(q_BxTxHxDh.dtype)


# -------------------------------------------------------- blocked building
# Blocked layout: the block index leads so lax.scan / lax.map walk it.
# A query block carries (q, pos, seg, summary); a kv block (k, v, pos, seg,
# summary). Summaries are per-row bounds used to skip block pairs that the
# mask empties: (any real token, pos bound, min seg, max seg), each NxB.


def _pad_len(x, axis: int, to: int, value=0):
  pad = to - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _to_blocks(x, n: int):
  """[B, n*Q, ...] -> [n, B, Q, ...]."""
  B, L = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, n, L // n, *x.shape[2:]), 1, 0)


def _from_blocks(x):
  """[n, B, Q, ...] -> [B, n*Q, ...]."""
  n, B, Q = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, n * Q, *x.shape[3:])


def _summary(pos_NxBxL, seg_NxBxL, *, upper: bool):
  """Per-block bounds: max position for queries, min for keys."""
  real = seg_NxBxL != 0
  if upper:
    pos = jnp.where(real, pos_NxBxL, _IMIN).max(-1)
  else:
    pos = jnp.where(real, pos_NxBxL, _IMAX).min(-1)
  return (
    real.any(-1),
    pos,
    jnp.where(real, seg_NxBxL, _IMAX).min(-1),
    jnp.where(real, seg_NxBxL, _IMIN).max(-1),
  )


def _live(q_sum, kv_sum):
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


def _scores(
  q_BxQxKxGxDh, k_BxCxKxDh, q_pos_BxQ, q_seg_BxQ, k_pos_BxC, k_seg_BxC
):
  """Scaled, masked block scores in f32 and the block mask."""
  Dh = q_BxQxKxGxDh.shape[-1]
  s_BxKxGxQxC = jnp.einsum(
    "bqkgd,bckd->bkgqc",
    q_BxQxKxGxDh,
    k_BxCxKxDh,
    preferred_element_type=_F32,
  ) * (1.0 / math.sqrt(Dh))
  mask_BxQxC = attention_mask(q_pos_BxQ, q_seg_BxQ, k_pos_BxC, k_seg_BxC)
  mask = mask_BxQxC[:, None, None]
  return jnp.where(mask, s_BxKxGxQxC, -jnp.inf), mask


def _fwd_q_block(state, q_blk, kv_blocks):
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
      s, _ = _scores(q, k, q_pos, q_seg, k_pos, k_seg)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      corr = jnp.exp(m - m_safe)
      pv = jnp.einsum(
        "bkgqc,bckd->bkgqd", p.astype(v.dtype), v, preferred_element_type=_F32
      )
      return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

    live = _live(q_sum, k_sum)
    return lax.cond(live, compute, lambda s: s, state), live.astype(jnp.int32)

  state, counts = lax.scan(step, state, kv_blocks)
  return state, counts.sum()


def _fwd_chunk(state, q_blocks, kv_blocks):
  """Every query block against one run of kv blocks (lax.map over Nq)."""

  def per_q(args):
    state, q_blk = args
    return _fwd_q_block(state, q_blk, kv_blocks)

  state, counts = lax.map(per_q, (state, q_blocks))
  return state, counts.sum()


def _init_state(q_NqxBxQxKxGxDh):
  """Empty (m, l, acc). Built from q (zeros_like) so that under a mesh with
  Explicit axes the state carries q's sharding, as lax.cond requires."""
  acc = jnp.einsum("nbqkgd->nbkgqd", jnp.zeros_like(q_NqxBxQxKxGxDh, _F32))
  l = acc[..., 0]
  return l - jnp.inf, l, acc


def _finalize(state, dtype):
  """(m, l, acc) -> out [Nq,B,Q,K,G,Dh] in dtype, lse [Nq,B,K,G,Q] f32.

  Rows without an allowed key have l == 0: out 0 and lse -inf.
  """
  m, l, acc = state
  has = l > 0
  out = acc / jnp.where(has, l, 1.0)[..., None]
  lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
  return jnp.einsum("nbkgqd->nbqkgd", out).astype(dtype), lse


def _bwd_chunk(q_blocks, kv_blocks, dk_NkxBxCxKxDh, dv_NkxBxCxKxDh):
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
        s, mask = _scores(q, k, q_pos, q_seg, k_pos, k_seg)
        p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)
        dv = dv + jnp.einsum(
          "bkgqc,bqkgd->bckd",
          p.astype(do.dtype),
          do,
          preferred_element_type=_F32,
        )
        dp = jnp.einsum("bqkgd,bckd->bkgqc", do, v, preferred_element_type=_F32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum(
          "bkgqc,bckd->bqkgd",
          ds.astype(k.dtype),
          k,
          preferred_element_type=_F32,
        )
        dk = dk + jnp.einsum(
          "bkgqc,bqkgd->bckd",
          ds.astype(q.dtype),
          q,
          preferred_element_type=_F32,
        )
        return dq, dk, dv

      live = _live(q_sum, k_sum)
      dq, dk, dv = lax.cond(live, compute, lambda *a: a, dq, dk, dv)
      return dq, (dk, dv, live.astype(jnp.int32))

    dq0 = jnp.zeros_like(q, _F32)
    dq, (dk_all, dv_all, counts) = lax.scan(
      step, dq0, (*kv_blocks, dk_all, dv_all)
    )
    return (dk_all, dv_all), (dq, counts.sum())

  (dk, dv), (dq, counts) = lax.scan(
    per_q, (dk_NkxBxCxKxDh, dv_NkxBxCxKxDh), q_blocks
  )
  return dq, dk, dv, counts.sum()


def _q_blocks(q_BxTxHxDh, q_pos_BxT, q_seg_BxT, K: int, Q: int):
  """Split queries into blocks of Q, grouped [.., K, G, Dh] for GQA."""
  B, T, H, Dh = q_BxTxHxDh.shape
  Nq = T // Q
  q = _to_blocks(q_BxTxHxDh.reshape(B, T, K, H // K, Dh), Nq)
  pos, seg = _to_blocks(q_pos_BxT, Nq), _to_blocks(q_seg_BxT, Nq)
  return q, pos, seg, _summary(pos, seg, upper=True)


def _kv_blocks(k_BxSxKxDh, v_BxSxKxDh, kv_pos_BxS, kv_seg_BxS, C: int):
  Nk = k_BxSxKxDh.shape[1] // C
  pos, seg = _to_blocks(kv_pos_BxS, Nk), _to_blocks(kv_seg_BxS, Nk)
  return (
    _to_blocks(k_BxSxKxDh, Nk),
    _to_blocks(v_BxSxKxDh, Nk),
    pos,
    seg,
    _summary(pos, seg, upper=False),
  )


def _delta(do_NqxBxQxKxGxDh, out_NqxBxQxKxGxDh):
  """rowsum(dO * O) in f32, [Nq, B, K, G, Q]."""
  return jnp.einsum(
    "nbqkgd,nbqkgd->nbkgq",
    do_NqxBxQxKxGxDh.astype(_F32),
    out_NqxBxQxKxGxDh.astype(_F32),
  )


# ---------------------------------------------------------------- blockwise


def _block_sizes(T: int, S: int, block_q: int, block_kv: int):
  """Blocks no larger than the sequence, and the lengths padded to them."""
  Q, C = min(block_q, T), min(block_kv, S)
  return Q, C, -(-T // Q) * Q, -(-S // C) * C


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
  Q, C, Tp, Sp = _block_sizes(T, S, block_q, block_kv)
  out = _blockwise(
    Q,
    C,
    _pad_len(q_BxTxHxDh, 1, Tp),
    _pad_len(k_BxSxKxDh, 1, Sp),
    _pad_len(v_BxSxKxDh, 1, Sp),
    _pad_len(q_pos_BxT, 1, Tp),
    _pad_len(q_seg_BxT, 1, Tp),
    _pad_len(kv_pos_BxS, 1, Sp),
    _pad_len(kv_seg_BxS, 1, Sp),
  )
  return out[:, :T]


def _blockwise_fwd_impl(Q, C, q, k, v, q_pos, q_seg, kv_pos, kv_seg):
  K = k.shape[2]
  q_blk = _q_blocks(q, q_pos, q_seg, K, Q)
  kv_blk = _kv_blocks(k, v, kv_pos, kv_seg, C)
  state, _ = _fwd_chunk(_init_state(q_blk[0]), q_blk, kv_blk)
  out_blocks, lse = _finalize(state, q.dtype)
  B, T, H, Dh = q.shape
  return _from_blocks(out_blocks).reshape(B, T, H, Dh), lse


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
  q_b, pos_b, seg_b, sum_b = _q_blocks(q, q_pos, q_seg, K, Q)
  do_b = _q_blocks(do_BxTxHxDh, q_pos, q_seg, K, Q)[0]
  out_b = _q_blocks(out, q_pos, q_seg, K, Q)[0]
  kv_blk = _kv_blocks(k, v, kv_pos, kv_seg, C)
  dkv0 = jnp.zeros_like(kv_blk[0], _F32)
  dq, dk, dv, _ = _bwd_chunk(
    (q_b, do_b, lse, _delta(do_b, out_b), pos_b, seg_b, sum_b),
    kv_blk,
    dkv0,
    dkv0,
  )
  return (
    _from_blocks(dq).reshape(B, T, H, Dh).astype(q.dtype),
    _from_blocks(dk).astype(k.dtype),
    _from_blocks(dv).astype(v.dtype),
    None,
    None,
    None,
    None,
  )


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# -------------------------------------------------------------------- ring


def _mesh_or_none(mesh):
  """The argument, else the mesh of `jax.set_mesh`, else None."""
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def _resolve_mesh(mesh):
  found = _mesh_or_none(mesh)
  if found is None or _CONTEXT_AXIS not in found.axis_names:
    raise ValueError(
      "attend(impl='ring') needs a mesh with a 'context' axis: pass mesh= "
      f"or call under jax.set_mesh(mesh) (got {found})"
    )
  return found


def _ring_specs(mesh):
  names = mesh.axis_names
  batch = tuple(a for a in _BATCH_AXES if a in names) or None
  head = _HEAD_AXIS if _HEAD_AXIS in names else None
  return batch, head


def _pad_per_device(x, n: int, L: int, Lp: int):
  """[B, n*L, ...] -> [B, n*Lp, ...], padding each device's slice at its
  end so every device keeps its own tokens (and the zigzag balance)."""
  if L == Lp:
    return x
  B = x.shape[0]
  x = _pad_len(x.reshape(B, n, L, *x.shape[2:]), 2, Lp)
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


def _ring_block_counts(*args, mesh, block_q: int, block_kv: int) -> np.ndarray:
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
  n = mesh.shape[_CONTEXT_AXIS]
  B, T, H, Dh = q.shape
  S, K = k.shape[1], k.shape[2]
  Tn, Sn = -(-T // n), -(-S // n)
  Q, C, Tl, Sl = _block_sizes(Tn, Sn, block_q, block_kv)
  batch, head = _ring_specs(mesh)
  if head is not None and K % mesh.shape[head]:
    raise ValueError(
      f"ring attention: kv heads K={K} not divisible by '{head}' axis "
      f"size {mesh.shape[head]}"
    )

  def prep(x, L, Ln, Ll):
    return _pad_per_device(_pad_len(x, 1, n * Ln), n, Ln, Ll)

  q_ = prep(q, T, Tn, Tl)
  qp_, qs_ = prep(q_pos, T, Tn, Tl), prep(q_seg, T, Tn, Tl)
  k_, v_ = prep(k, S, Sn, Sl), prep(v, S, Sn, Sl)
  kp_, ks_ = prep(kv_pos, S, Sn, Sl), prep(kv_seg, S, Sn, Sl)
  args = (q_, k_, v_, qp_, qs_, kp_, ks_)
  explicit = _explicit_axes(mesh)
  if explicit:  # Explicit axes: shard_map wants inputs already laid out.
    out_spec = jax.typeof(q).sharding.spec
    x_spec, id_spec = P(batch, _CONTEXT_AXIS, head), P(batch, _CONTEXT_AXIS)
    specs = (x_spec,) * 3 + (id_spec,) * 4
    args = tuple(
      _reshard(x, mesh, sp) for x, sp in zip(args, specs, strict=True)
    )
  out, counts = _make_ring(mesh, n, Q, C, batch, head)(*args)
  if explicit:
    out = _reshard(out, mesh, out_spec)
  out = _unpad_per_device(out, n, Tn, Tl)[:, :T]
  return out, counts


def _explicit_axes(mesh) -> bool:
  explicit = jax.sharding.AxisType.Explicit
  return any(t == explicit for t in getattr(mesh, "axis_types", ()))


def _reshard(x, mesh, spec):
  if isinstance(mesh, jax.sharding.Mesh):
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
  return jax.sharding.reshard(x, spec)  # abstract mesh: from the context


def _make_ring(mesh, n: int, Q: int, C: int, batch, head) -> Callable:
  """custom_vjp around two shard_maps (forward, backward) over the mesh."""
  ctx = _CONTEXT_AXIS
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
    q_blk = _q_blocks(q, q_pos, q_seg, K, Q)
    kv_blk = _kv_blocks(k, v, kv_pos, kv_seg, C)

    def step(carry, _):
      state, kv_blk, count = carry
      state, c = _fwd_chunk(state, q_blk, kv_blk)
      return (state, rotate(kv_blk), count + c), None

    carry = (_init_state(q_blk[0]), kv_blk, jnp.int32(0))
    if n > 1:
      carry, _ = lax.scan(step, carry, None, length=n - 1)
    state, kv_blk, count = carry
    state, c = _fwd_chunk(state, q_blk, kv_blk)
    out_blocks, lse = _finalize(state, q.dtype)
    out = _from_blocks(out_blocks).reshape(q.shape)
    return out, lse, (count + c).reshape(1, 1, 1)

  fwd_sharded = shard(
    fwd_local, in_specs=in_specs, out_specs=(x_spec, lse_spec, cnt_spec)
  )

  def bwd_local(q, k, v, q_pos, q_seg, kv_pos, kv_seg, out, lse, do):
    K = k.shape[2]
    q_b, pos_b, seg_b, sum_b = _q_blocks(q, q_pos, q_seg, K, Q)
    do_b = _q_blocks(do, q_pos, q_seg, K, Q)[0]
    out_b = _q_blocks(out, q_pos, q_seg, K, Q)[0]
    q_blk = (q_b, do_b, lse, _delta(do_b, out_b), pos_b, seg_b, sum_b)
    kv_blk = _kv_blocks(k, v, kv_pos, kv_seg, C)

    def step(carry, _):
      dq, kv_blk, dk, dv = carry
      dq_c, dk, dv, _ = _bwd_chunk(q_blk, kv_blk, dk, dv)
      # dK/dV travel with their kv block; after n hops both are home.
      kv_blk, dk, dv = rotate((kv_blk, dk, dv))
      return (dq + dq_c, kv_blk, dk, dv), None

    dkv0 = jnp.zeros_like(kv_blk[0], _F32)
    carry = (jnp.zeros_like(q_b, _F32), kv_blk, dkv0, dkv0)
    (dq, _, dk, dv), _ = lax.scan(step, carry, None, length=n)
    return (
      _from_blocks(dq).reshape(q.shape).astype(q.dtype),
      _from_blocks(dk).astype(k.dtype),
      _from_blocks(dv).astype(v.dtype),
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


# --------------------------------------------------------- platform kernels


def _cudnn_attention(
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


def _splash_attention(
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
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as sk,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as sm,
  )

  del q_pos_BxT, kv_pos_BxS  # assumed to follow the index (see above)
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  G = H // K
  b = min(block, -(-T // 128) * 128)
  Tp = -(-T // b) * b
  batch, head = (None, None) if mesh is None else _ring_specs(mesh)

  def local(q, k, v, q_seg, kv_seg):
    Bl, _, Hl, _ = q.shape
    Kl = k.shape[2]
    q = q.reshape(Bl, Tp, Kl, G, Dh) * jnp.asarray(1.0 / math.sqrt(Dh), q.dtype)
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
    out = jnp.einsum("bkgtd->btkgd", out_BxKxGxTxDh).reshape(Bl, Tp, Hl, Dh)
    # Segment-0 rows attend each other inside splash; the rule gives zeros.
    return jnp.where((q_seg != 0)[:, :, None, None], out, 0).astype(q.dtype)

  args = (
    _pad_len(q_BxTxHxDh, 1, Tp),
    _pad_len(k_BxSxKxDh, 1, Tp),
    _pad_len(v_BxSxKxDh, 1, Tp),
    _pad_len(q_seg_BxT, 1, Tp),
    _pad_len(kv_seg_BxS, 1, Tp),
  )
  if mesh is None:
    return local(*args)[:, :T]
  x_spec, id_spec = P(batch, None, head, None), P(batch, None)
  specs = (x_spec,) * 3 + (id_spec,) * 2
  explicit = _explicit_axes(mesh)
  if explicit:  # Explicit axes: shard_map wants inputs already laid out.
    out_spec = jax.typeof(q_BxTxHxDh).sharding.spec
    args = tuple(
      _reshard(x, mesh, sp) for x, sp in zip(args, specs, strict=True)
    )
  out = jax.shard_map(
    local, mesh=mesh, check_vma=False, in_specs=specs, out_specs=x_spec
  )(*args)
  if explicit:
    out = _reshard(out, mesh, out_spec)
  return out[:, :T]
