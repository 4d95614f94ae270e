"""Attention of one new token per row over the decode cache.

A decode step feeds one token per row, so it is bound by reading the weights
and the cache. The decode cache is laid out for its two attention matmuls on
XLA:CPU: per layer, keys [B, K, Dh, S] and values [B, K, S, Dh]. q @ k and
p @ v then read them in place (contracting the keys' minor axis instead made
XLA:CPU repack the whole cache every step: 15x slower), and the new key and
value are written into them in place. The mask rule is `attention_mask`'s,
for one query per row. `k15.model.decode_step` runs it inside the model's
own `block`.
"""

import math

import jax
import jax.numpy as jnp

from k15.attention.common import F32

KEY_SLOT_AXIS = 3  # keys [B, K, Dh, S]
VALUE_SLOT_AXIS = 2  # values [B, K, S, Dh]


def from_model_layout(k_BxPxKxDh, v_BxPxKxDh, length: int):
  """Keys [B, K, Dh, S] and values [B, K, S, Dh] from the model's
  [B, P, K, Dh] ones, with S - P empty slots after them (S = length)."""
  pad = length - k_BxPxKxDh.shape[1]
  k_BxKxDhxP = jnp.transpose(k_BxPxKxDh, (0, 2, 3, 1))
  v_BxKxPxDh = jnp.swapaxes(v_BxPxKxDh, 1, 2)
  return (
    jnp.pad(k_BxKxDhxP, ((0, 0), (0, 0), (0, 0), (0, pad))),
    jnp.pad(v_BxKxPxDh, ((0, 0), (0, 0), (0, pad), (0, 0))),
  )


def attend(q_Bx1xHxDh, k_Bx1xKxDh, v_Bx1xKxDh, *, layer_kv, mask_BxS, index):
  """Writes the new key and value at slot `index` of layer_kv = (keys
  [B, K, Dh, S], values [B, K, S, Dh]), then attends each row's one query
  over them where mask_BxS allows. Returns (out [B, 1, H, Dh] in q's dtype,
  the updated (keys, values))."""
  k_BxKxDhxS, v_BxKxSxDh = layer_kv
  B, _, H, Dh = q_Bx1xHxDh.shape
  K = k_BxKxDhxS.shape[1]
  k_BxKxDhxS = jax.lax.dynamic_update_slice_in_dim(
    k_BxKxDhxS,
    jnp.transpose(k_Bx1xKxDh, (0, 2, 3, 1)).astype(k_BxKxDhxS.dtype),
    index,
    KEY_SLOT_AXIS,
  )
  v_BxKxSxDh = jax.lax.dynamic_update_slice_in_dim(
    v_BxKxSxDh,
    jnp.swapaxes(v_Bx1xKxDh, 1, 2).astype(v_BxKxSxDh.dtype),
    index,
    VALUE_SLOT_AXIS,
  )
  # grouped-query attention of one query per row: G = H // K queries
  # share each kv head, so both matmuls are [G, Dh] x [Dh, S] per (b, k)
  q_BxKxGxDh = q_Bx1xHxDh.reshape(B, K, H // K, Dh)
  s_BxKxGxS = jnp.matmul(
    q_BxKxGxDh.astype(k_BxKxDhxS.dtype),
    k_BxKxDhxS,
    preferred_element_type=F32,
  )
  s_BxKxGxS = jnp.where(
    mask_BxS[:, None, None], s_BxKxGxS * (1.0 / math.sqrt(Dh)), -jnp.inf
  )
  m_BxKxGx1 = jnp.max(s_BxKxGxS, -1, keepdims=True)
  m_BxKxGx1 = jnp.where(jnp.isfinite(m_BxKxGx1), m_BxKxGx1, 0.0)
  p_BxKxGxS = jnp.exp(s_BxKxGxS - m_BxKxGx1)
  l_BxKxGx1 = p_BxKxGxS.sum(-1, keepdims=True)
  p_BxKxGxS = p_BxKxGxS / jnp.where(l_BxKxGx1 == 0, 1.0, l_BxKxGx1)
  o_BxKxGxDh = jnp.matmul(
    p_BxKxGxS.astype(v_BxKxSxDh.dtype),
    v_BxKxSxDh,
    preferred_element_type=F32,
  )
  out_Bx1xHxDh = o_BxKxGxDh.reshape(B, 1, H, Dh).astype(q_Bx1xHxDh.dtype)
  return out_Bx1xHxDh, (k_BxKxDhxS, v_BxKxSxDh)
