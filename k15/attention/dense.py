"""Dense attention: the reference, materialising [B, H, T, S] scores."""

import math

import jax
import jax.numpy as jnp
from jax import lax

from k15.attention.common import F32, attention_mask


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
    preferred_element_type=F32,
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
    preferred_element_type=F32,
  )
  return out_BxTxKxGxDh.reshape(B, T, H, Dh).astype(q_BxTxHxDh.dtype)
