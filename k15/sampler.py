"""Jitted sampling with an explicit KV cache: `prefill` then `decode`.

Prompts are left-padded to a fixed bucket P, so every row writes its next key
at the same cache slot and one scalar `index` addresses the cache; each row's
RoPE positions start at 0 on its first real token. Generated tokens go to a
fixed [B, N] buffer (N = the per-call budget), so nothing recompiles across
calls with the same (B, P, N, S).

`prefill` runs one forward of `model.Decoder` over the prompts and samples
the first new token; `decode` is a `lax.while_loop` (one per chunk of
`live_chunk` cache slots, so attention reads only the filled part of the
cache) that feeds one token per step and exits as soon as every row has
stopped (stop token, budget, the row's own length limit, cache end or
repetition). For every generated token we keep its log-prob under the model
at temperature 1 (what the loss uses) and under the actual sampling
distribution.

Decode speed. A decode step is one token per row, so it is bound by reading
the weights and the cache, and XLA:CPU materialises every slice of a stacked
[L, ...] array that feeds a matmul (on CPU that copy cost as much as the
matmuls). So the decode step is written out here (`_decode_forward`, the
same math as `model.Block`, pinned against the full forward by
tests/test_sampler.py) over a cache that holds, per layer, keys as
[B, K, Dh, S] and values as [B, K, S, Dh] (both attention matmuls read them
in place; the new key and value are written into them in place), and over
per-layer weights sliced from the trainer's stacked arrays once per `decode`
call rather than once per step. (Slicing inside the step peaks at the same
memory on XLA:CPU, which keeps all of a step's slices alive at once, and was
13% slower for a 75M model; on TPU the slices are views either way.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from k15 import model as model_lib

# Row status codes.
RUNNING, STOPPED, BUDGET, MAX_LEN, REPEAT = 0, 1, 2, 3, 4
STATUS_NAMES = {
  RUNNING: "running",
  STOPPED: "normal stop",
  BUDGET: "cut by budget",
  MAX_LEN: "cut by length",
  REPEAT: "repeat, early stop",
}
METHODS = ("gumbel", "cdf")
_NO_LIMIT = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: a jit static argument).

  method: how a token is drawn from the (filtered, tempered) distribution.
    "cdf" (the default) inverts the CDF with one uniform per row; "gumbel"
    is `jax.random.categorical` (V random numbers per row and step). The
    same distribution, other draws; cdf is much cheaper for large
    vocabularies (a 75M model with a 32k vocabulary on 2 CPU cores decodes
    13-19% faster, `python -m k15.bench sampler`).
  repeat_*: a row stops with status REPEAT when its last `repeat_ngram`
    tokens occur `repeat_count` times, without overlapping, within its last
    `repeat_window` generated tokens. repeat_ngram = 0 turns it off.
  live_chunk: decode attends over the first multiple of live_chunk slots
    that holds every written key, not the whole cache (see `decode`); 0
    attends over the whole cache every step.
  """

  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  stop_tokens: tuple[int, ...] = ()
  method: str = "cdf"
  repeat_ngram: int = 0
  repeat_window: int = 64
  repeat_count: int = 4
  live_chunk: int = 128

  def __post_init__(self):
    if self.live_chunk < 0:
      raise ValueError(
        f"sampler.live_chunk={self.live_chunk} must be >= 0 (0 = attend "
        "over the whole cache every step)"
      )
    if self.method not in METHODS:
      raise ValueError(
        f"sampler.method={self.method!r}; expected one of {METHODS}"
      )
    if self.repeat_ngram < 0 or self.repeat_count < 1:
      raise ValueError(
        f"sampler.repeat_ngram={self.repeat_ngram} must be >= 0 and "
        f"sampler.repeat_count={self.repeat_count} >= 1"
      )
    if self.repeat_ngram and (
      self.repeat_window < self.repeat_ngram * self.repeat_count
    ):
      raise ValueError(
        f"sampler.repeat_window={self.repeat_window} is shorter than "
        f"repeat_ngram * repeat_count = "
        f"{self.repeat_ngram * self.repeat_count}: nothing could repeat"
      )
    object.__setattr__(
      self, "stop_tokens", tuple(int(t) for t in self.stop_tokens)
    )


@flax.struct.dataclass
class SamplingState:
  # {"k": L x [B, K, Dh, S], "v": L x [B, K, S, Dh], "pos": [B, S],
  #  "seg": [B, S]}: one array per layer, so decode updates it in place
  cache: dict
  index: jax.Array  # [] next cache slot to write
  last_token: jax.Array  # [B] token to feed next
  next_pos: jax.Array  # [B] RoPE position of last_token
  tokens: jax.Array  # [B, N] generated tokens (pad after a row stops)
  logp: jax.Array  # [B, N] model log-prob at temperature 1
  sample_logp: jax.Array  # [B, N] log-prob under the sampling distribution
  length: jax.Array  # [B] tokens generated so far in this call
  limit: jax.Array  # [B] a row reaching this length stops with MAX_LEN
  status: jax.Array  # [B] RUNNING / STOPPED / BUDGET / MAX_LEN / REPEAT
  rng: jax.Array
  step: jax.Array  # [] decode steps taken (for rng folding)


# ---------------------------------------------------------------------------
# Drawing a token
# ---------------------------------------------------------------------------


def _filter_logits(logits_BxV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  x = logits_BxV / max(cfg.temperature, 1e-6)
  if cfg.top_k > 0:
    kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if cfg.top_p < 1.0:
    sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
    cut_idx = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_x, cut_idx, axis=-1)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  return x


def _block_size(V: int) -> int:
  return max(8, 1 << int(round(math.log2(max(V, 1)) / 2)))


def sample_cdf(rng: jax.Array, x_BxV: jax.Array) -> jax.Array:
  """A token per row from softmax(x) by inverting its CDF at one uniform.

  Two levels (blocks of ~sqrt(V) tokens, then tokens within the chosen
  block), so no cumulative sum runs over all of V. Tokens with probability
  0 (x = -inf) are never drawn.
  """
  B, V = x_BxV.shape
  bs = _block_size(V)
  nb = -(-V // bs)
  p_BxV = jnp.exp(x_BxV - jnp.max(x_BxV, axis=-1, keepdims=True))
  p_BxNxC = jnp.pad(p_BxV, ((0, 0), (0, nb * bs - V))).reshape(B, nb, bs)
  cum_BxN = jnp.cumsum(p_BxNxC.sum(-1), axis=-1)
  u_Bx1 = jax.random.uniform(rng, (B, 1)) * cum_BxN[:, -1:]
  # rounding can put u at or past the total: fall back to the last block
  # (then the last token) that has any mass
  nonzero_BxN = cum_BxN > jnp.concatenate(
    [jnp.zeros((B, 1)), cum_BxN[:, :-1]], axis=-1
  )
  last_blk_B = nb - 1 - jnp.argmax(nonzero_BxN[:, ::-1], axis=-1)
  blk_B = jnp.minimum(jnp.sum(cum_BxN <= u_Bx1, axis=-1), last_blk_B)
  p_BxC = jnp.take_along_axis(p_BxNxC, blk_B[:, None, None], 1)[:, 0]
  before_B = jnp.where(
    blk_B > 0,
    jnp.take_along_axis(cum_BxN, jnp.maximum(blk_B - 1, 0)[:, None], 1)[:, 0],
    0.0,
  )
  cum_BxC = before_B[:, None] + jnp.cumsum(p_BxC, axis=-1)
  last_tok_B = bs - 1 - jnp.argmax((p_BxC > 0)[:, ::-1], axis=-1)
  tok_B = jnp.minimum(jnp.sum(cum_BxC <= u_Bx1, axis=-1), last_tok_B)
  return (blk_B * bs + tok_B).astype(jnp.int32)


def sample_token(rng, logits_BxV, cfg: SamplingConfig):
  """Returns (token [B], logp at T=1 [B], logp under sampling dist [B])."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  plain = cfg.temperature == 1.0 and cfg.top_k == 0 and cfg.top_p >= 1.0
  filt = logits_BxV if plain else _filter_logits(logits_BxV, cfg)
  if cfg.temperature <= 0:
    tok = jnp.argmax(logits_BxV, axis=-1)
  elif cfg.method == "cdf":
    tok = sample_cdf(rng, filt)
  else:
    tok = jax.random.categorical(rng, filt, axis=-1)
  tok = tok.astype(jnp.int32)

  def logp_of(x_BxV):
    picked = jnp.take_along_axis(x_BxV, tok[:, None], -1)[:, 0]
    return picked - jax.nn.logsumexp(x_BxV, axis=-1)

  lp = logp_of(logits_BxV)
  if cfg.temperature <= 0:
    samp_lp = jnp.zeros(tok.shape, jnp.float32)
  else:
    samp_lp = lp if plain else logp_of(filt)
  return tok, lp, samp_lp


# ---------------------------------------------------------------------------
# Status bookkeeping and repeat detection
# ---------------------------------------------------------------------------


def _record(
  state: SamplingState,
  tok_B,
  lp_B,
  slp_B,
  *,
  cfg: SamplingConfig,
  pad_id: int,
  cache_len: int,
) -> SamplingState:
  """Writes the sampled token of every running row and updates status."""
  B, N = state.tokens.shape
  running = state.status == RUNNING
  col = jnp.minimum(state.length, N - 1)
  one_hot = (jnp.arange(N)[None, :] == col[:, None]) & running[:, None]
  tokens = jnp.where(one_hot, tok_B[:, None], state.tokens)
  logp = jnp.where(one_hot, lp_B[:, None], state.logp)
  sample_logp = jnp.where(one_hot, slp_B[:, None], state.sample_logp)
  length = state.length + running.astype(jnp.int32)
  status = state.status
  is_stop = jnp.isin(tok_B, jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32))
  status = jnp.where(running & is_stop, STOPPED, status)
  if cfg.repeat_ngram > 0:
    rep = detect_repeat(
      tokens,
      length,
      ngram=cfg.repeat_ngram,
      window=cfg.repeat_window,
      count=cfg.repeat_count,
    )
    status = jnp.where((status == RUNNING) & rep, REPEAT, status)
  # the row's own cap (prompt + response <= max_len) is final, the budget
  # is not (a partial rollout continues it), so the cap wins a tie
  status = jnp.where(
    (status == RUNNING) & (length >= state.limit), MAX_LEN, status
  )
  status = jnp.where((status == RUNNING) & (length >= N), BUDGET, status)
  # the next token would be written at cache slot `index` (after this one)
  status = jnp.where(
    (status == RUNNING) & (state.index + 1 >= cache_len), MAX_LEN, status
  )
  last = jnp.where(running, tok_B, pad_id)
  return state.replace(
    tokens=tokens,
    logp=logp,
    sample_logp=sample_logp,
    length=length,
    status=status,
    last_token=last,
  )


def detect_repeat(
  tokens_BxN, length_B, *, ngram: int, window: int, count: int
) -> jax.Array:
  """True where a row's last `ngram` tokens occur `count` times, without
  overlapping, within its last `window` generated tokens (degenerate
  looping). Pure; jittable; O(B * window * (ngram + count)).

  Non-overlapping, so a run of one repeated token needs ngram * count
  tokens ("1000000" is not a loop at ngram=3, count=4); occurrences are
  picked greedily from the end, which finds the most there are.
  """
  B, N = tokens_BxN.shape
  W = min(window, N)
  n_starts = W - ngram + 1
  if n_starts <= 0:
    return jnp.zeros((B,), bool)
  # the row's last W tokens (positions length - W .. length - 1)
  first_B = length_B - W
  idx_BxW = first_B[:, None] + jnp.arange(W)[None, :]
  win_BxW = jnp.take_along_axis(tokens_BxN, jnp.clip(idx_BxW, 0, N - 1), 1)
  gram_Bxn = win_BxW[:, W - ngram :]
  match_BxS = idx_BxW[:, :n_starts] >= 0  # starts inside the response
  for j in range(ngram):
    match_BxS &= win_BxW[:, j : j + n_starts] == gram_Bxn[:, j : j + 1]
  # greedy from the end: the last occurrence is the row's own last n-gram
  # (start n_starts - 1); each next one must end before the previous starts
  start_S = jnp.arange(n_starts)
  prev_B = jnp.full((B,), n_starts - 1)
  found_B = jnp.ones((B,), jnp.int32)
  for _ in range(count - 1):
    ok_BxS = match_BxS & (start_S[None, :] <= (prev_B - ngram)[:, None])
    nxt_B = jnp.max(jnp.where(ok_BxS, start_S[None, :], -1), axis=1)
    found_B += (nxt_B >= 0).astype(jnp.int32)
    prev_B = jnp.where(nxt_B >= 0, nxt_B, -ngram - 1)
  return (length_B >= ngram * count) & (found_B >= count)


# ---------------------------------------------------------------------------
# The single-token forward
# ---------------------------------------------------------------------------


def _weights(params, model: model_lib.ModelConfig) -> dict:
  """The decode step's weights: per layer, every matrix as [out, in] in the
  compute dtype (x @ w.T, contracting both minor axes, is the faster
  matmul on XLA:CPU: 1.4x for the MLP and the logits at 32 rows). Made
  once per `decode` call from the trainer's stacked params."""
  p = nn.unbox(params)
  p = p["params"] if "params" in p else p
  dt = model.jnp_dtype
  D, H, K, Dh = (
    model.d_model,
    model.num_heads,
    model.num_kv_heads,
    model.head_dim,
  )
  lp = p["layers"]
  per_layer = []
  for i in range(model.num_layers):
    w = dict(
      attn_norm=lp["attn_norm"]["scale"][i],
      mlp_norm=lp["mlp_norm"]["scale"][i],
      q=lp["q"][i].reshape(D, H * Dh).T,
      k=lp["k"][i].reshape(D, K * Dh).T,
      v=lp["v"][i].reshape(D, K * Dh).T,
      o=lp["o"][i].reshape(H * Dh, D).T,
      gate=lp["gate"][i].T,
      up=lp["up"][i].T,
      down=lp["down"][i].T,
    )
    w = {k: x if "norm" in k else x.astype(dt) for k, x in w.items()}
    if model.qkv_bias:
      for name in ("q_bias", "k_bias", "v_bias"):
        w[name] = lp[name][i].reshape(-1).astype(dt)
    per_layer.append(w)
  out_VxD = p["embedding"] if model.tie_embeddings else p["lm_head"].T
  return dict(
    embedding=p["embedding"],
    out=out_VxD.astype(dt),
    final_norm=p["final_norm"]["scale"],
    layers=per_layer,
  )


def _rms(x, scale, model):
  """`model.RMSNorm`, for the decode step."""
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + model.norm_eps)
  return (x * scale.astype(jnp.float32)).astype(model.jnp_dtype)


def _mm(x_BxI, w_OxI, dt):
  """x @ w.T with float32 accumulation (bf16 then takes XLA:CPU's fast
  matmul path), in dtype dt."""
  return jnp.einsum(
    "bi,oi->bo", x_BxI, w_OxI, preferred_element_type=jnp.float32
  ).astype(dt)


def _cache_dtype(dt) -> jnp.dtype:
  """The decode cache is float32 on CPU: XLA:CPU round-trips a bf16 buffer
  through f32 around a dynamic-update-slice (the whole cache, every step),
  and its bf16 batched matmuls are slower; elsewhere the model's dtype."""
  if jax.default_backend() == "cpu":
    return jnp.dtype(jnp.float32)
  return jnp.dtype(dt)


def _decode_block(
  w,
  x_BxD,
  k_BxKxDhxS,
  v_BxKxSxDh,
  pos_B,
  mask_BxS,
  index,
  model: model_lib.ModelConfig,
):
  """`model.Block` for one new token per row; writes its key and value."""
  B = x_BxD.shape[0]
  H, K, Dh = model.num_heads, model.num_kv_heads, model.head_dim
  dt = model.jnp_dtype
  h = _rms(x_BxD, w["attn_norm"], model)
  q_BxHDh = _mm(h, w["q"], dt)
  k_BxKDh = _mm(h, w["k"], dt)
  v_BxKDh = _mm(h, w["v"], dt)
  if model.qkv_bias:
    q_BxHDh += w["q_bias"]
    k_BxKDh += w["k_bias"]
    v_BxKDh += w["v_bias"]
  q_BxHxDh = q_BxHDh.reshape(B, H, Dh)
  k_BxKxDh = k_BxKDh.reshape(B, K, Dh)
  v_BxKxDh = v_BxKDh.reshape(B, K, Dh)
  rope = functools.partial(
    model_lib.rope,
    pos_BxT=pos_B[:, None],
    theta=model.rope_theta,
    scaling=model.rope_scaling,
  )
  q_BxHxDh = rope(q_BxHxDh[:, None])[:, 0]
  k_BxKxDh = rope(k_BxKxDh[:, None])[:, 0]
  k_BxKxDhxS = jax.lax.dynamic_update_slice_in_dim(
    k_BxKxDhxS, k_BxKxDh[..., None].astype(k_BxKxDhxS.dtype), index, 3
  )
  v_BxKxSxDh = jax.lax.dynamic_update_slice_in_dim(
    v_BxKxSxDh, v_BxKxDh[:, :, None].astype(v_BxKxSxDh.dtype), index, 2
  )
  # grouped-query attention of one query per row over the whole cache;
  # keys are stored [Dh, S] so q @ k is a plain matmul (contracting k's
  # minor axis instead made XLA:CPU repack the cache: 15x slower)
  q_BxKxGxDh = q_BxHxDh.reshape(B, K, H // K, Dh)
  s_BxKxGxS = jnp.matmul(
    q_BxKxGxDh.astype(k_BxKxDhxS.dtype),
    k_BxKxDhxS,
    preferred_element_type=jnp.float32,
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
    preferred_element_type=jnp.float32,
  )
  o_BxHDh = o_BxKxGxDh.reshape(B, H * Dh).astype(dt)
  x_BxD = x_BxD + _mm(o_BxHDh, w["o"], dt)
  h = _rms(x_BxD, w["mlp_norm"], model)
  g_BxF = _mm(h, w["gate"], dt)
  u_BxF = _mm(h, w["up"], dt)
  x_BxD = x_BxD + _mm(nn.silu(g_BxF) * u_BxF, w["down"], dt)
  return x_BxD, k_BxKxDhxS, v_BxKxSxDh


def _decode_forward(
  w: dict,
  tok_B,
  pos_B,
  seg_B,
  cache: dict,
  index,
  *,
  model: model_lib.ModelConfig,
):
  """Logits [B, V] (f32) of one new token per row, and the updated cache."""
  dt = model.jnp_dtype
  x_BxD = w["embedding"].astype(dt)[tok_B]
  kv_pos_BxS = jax.lax.dynamic_update_slice_in_dim(
    cache["pos"], pos_B[:, None], index, axis=1
  )
  kv_seg_BxS = jax.lax.dynamic_update_slice_in_dim(
    cache["seg"], seg_B[:, None], index, axis=1
  )
  # the mask rule of `attention.attend` for one query per row
  mask_BxS = (
    (kv_seg_BxS != 0)
    & (kv_seg_BxS == seg_B[:, None])
    & (kv_pos_BxS <= pos_B[:, None])
  )
  ks, vs = [], []
  for i, lw in enumerate(w["layers"]):
    x_BxD, k, v = _decode_block(
      lw, x_BxD, cache["k"][i], cache["v"][i], pos_B, mask_BxS, index, model
    )
    ks.append(k)
    vs.append(v)
  h_BxD = _rms(x_BxD, w["final_norm"], model)
  # rounded to the compute dtype first, as `model.Decoder.logits` does
  logits_BxV = _mm(h_BxD, w["out"], dt).astype(jnp.float32)
  return logits_BxV, dict(
    k=tuple(ks), v=tuple(vs), pos=kv_pos_BxS, seg=kv_seg_BxS
  )


def _to_decode_cache(cache: dict, cache_len: int) -> dict:
  """The model's stacked [L, B, P, K, Dh] prompt cache -> per-layer keys
  [B, K, Dh, S] and values [B, K, S, Dh] with room for S - P new tokens
  (segment 0)."""
  P = cache["pos"].shape[1]
  pad = cache_len - P
  cdt = _cache_dtype(cache["k"].dtype)

  def keys(x_BxPxKxDh):
    x = jnp.transpose(x_BxPxKxDh, (0, 2, 3, 1)).astype(cdt)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad)))

  def values(x_BxPxKxDh):
    x = jnp.swapaxes(x_BxPxKxDh, 1, 2).astype(cdt)
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))

  L = cache["k"].shape[0]
  return dict(
    k=tuple(keys(cache["k"][i]) for i in range(L)),
    v=tuple(values(cache["v"][i]) for i in range(L)),
    pos=jnp.pad(cache["pos"], ((0, 0), (0, pad))),
    seg=jnp.pad(cache["seg"], ((0, 0), (0, pad))),
  )


# ---------------------------------------------------------------------------
# prefill / decode
# ---------------------------------------------------------------------------


@functools.partial(
  jax.jit, static_argnames=("model", "cfg", "budget", "cache_len", "pad_id")
)
def prefill(
  params,
  prompt_BxP: jax.Array,
  prompt_seg_BxP: jax.Array,
  rng: jax.Array,
  *,
  model: model_lib.ModelConfig,
  cfg: SamplingConfig,
  budget: int,
  cache_len: int,
  pad_id: int = 0,
  max_new_B: jax.Array | None = None,
) -> SamplingState:
  """One forward over left-padded prompts; samples the first new token.

  prompt_seg_BxP: 1 on real tokens, 0 on (left) padding; a row with no real
  token is a padding row and starts stopped (length 0).
  max_new_B: optional per-row cap on new tokens (e.g. what is left of
  max_len for a continued trajectory); a row reaching it stops with MAX_LEN.
  """
  B, P = prompt_BxP.shape
  if cache_len < P + 1:
    raise ValueError(f"cache_len={cache_len} must exceed the prompt bucket {P}")
  cache = model_lib.init_cache(model, B, P)
  pos_BxP = model_lib.positions_from_segments(prompt_seg_BxP)
  h_BxPxD, cache = model_lib.Decoder(model).apply(
    params, prompt_BxP, pos_BxP, prompt_seg_BxP, cache, 0, return_hidden=True
  )
  logits_BxV = model_lib.Decoder(model).apply(
    params, h_BxPxD[:, -1:], method=model_lib.Decoder.logits
  )[:, 0]
  real_B = jnp.sum(prompt_seg_BxP != 0, axis=1).astype(jnp.int32)
  limit_B = (
    jnp.full((B,), _NO_LIMIT, jnp.int32)
    if max_new_B is None
    else jnp.asarray(max_new_B, jnp.int32)
  )
  state = SamplingState(
    cache=_to_decode_cache(cache, cache_len),
    index=jnp.asarray(P, jnp.int32),
    last_token=jnp.full((B,), pad_id, jnp.int32),
    next_pos=real_B,
    tokens=jnp.full((B, budget), pad_id, jnp.int32),
    logp=jnp.zeros((B, budget), jnp.float32),
    sample_logp=jnp.zeros((B, budget), jnp.float32),
    length=jnp.zeros((B,), jnp.int32),
    limit=limit_B,
    status=jnp.where(real_B > 0, RUNNING, STOPPED).astype(jnp.int32),
    rng=rng,
    step=jnp.asarray(0, jnp.int32),
  )
  tok, lp, slp = sample_token(jax.random.fold_in(rng, 0), logits_BxV, cfg)
  return _record(
    state, tok, lp, slp, cfg=cfg, pad_id=pad_id, cache_len=cache_len
  )


def _decode_step(
  w, state: SamplingState, *, model, cfg, pad_id, cache_len
) -> SamplingState:
  running = state.status == RUNNING
  logits_BxV, cache = _decode_forward(
    w,
    state.last_token,
    state.next_pos,
    running.astype(jnp.int32),
    state.cache,
    state.index,
    model=model,
  )
  step = state.step + 1
  tok, lp, slp = sample_token(
    jax.random.fold_in(state.rng, step), logits_BxV, cfg
  )
  state = state.replace(
    cache=cache,
    index=state.index + 1,
    next_pos=state.next_pos + running.astype(jnp.int32),
    step=step,
  )
  return _record(
    state, tok, lp, slp, cfg=cfg, pad_id=pad_id, cache_len=cache_len
  )


@functools.partial(
  jax.jit,
  static_argnames=("model", "cfg", "max_steps", "pad_id"),
  donate_argnames=("state",),
)
def decode(
  params,
  state: SamplingState,
  *,
  model: model_lib.ModelConfig,
  cfg: SamplingConfig,
  max_steps: int,
  pad_id: int = 0,
) -> SamplingState:
  """Up to `max_steps` decode steps; exits when every row has stopped.

  Attention reads only the live part of the cache, to within
  `cfg.live_chunk` slots: the steps that write slots [S - chunk, S) run in
  their own while_loop over a copy of the cache cut to its first S slots,
  which is pasted back after (one compiled loop per S, skipped with its
  copies when it would run no step). The copies cost about two cache reads
  per chunk against one per step saved; peak memory is the cache plus the
  cut copy (live_chunk=0: the cache alone).
  """
  cache_len = state.cache["pos"].shape[1]
  start = state.step
  w = _weights(params, model)

  def go(s, S):
    more = (s.step - start < max_steps) & jnp.any(s.status == RUNNING)
    return more & (s.index < S)

  def run(state, S):
    def body(s):
      return _decode_step(
        w, s, model=model, cfg=cfg, pad_id=pad_id, cache_len=cache_len
      )

    return jax.lax.while_loop(lambda s: go(s, S), body, state)

  def run_cut(state, S):
    cut = run(state.replace(cache=_cut_cache(state.cache, S)), S)
    return cut.replace(cache=_paste_cache(state.cache, cut.cache))

  for S in live_bounds(cache_len, cfg.live_chunk)[:-1]:
    # no copies for a chunk that runs no step (behind `index`, or after
    # the budget or every row has stopped)
    state = jax.lax.cond(
      go(state, S), functools.partial(run_cut, S=S), lambda s: s, state
    )
  return run(state, cache_len)


def live_bounds(cache_len: int, chunk: int) -> tuple[int, ...]:
  """The cache lengths `decode` attends over: multiples of `chunk` below
  cache_len, then cache_len (just cache_len when chunk is 0)."""
  if chunk <= 0:
    return (cache_len,)
  return tuple(range(chunk, cache_len, chunk)) + (cache_len,)


def _cut_cache(cache: dict, S: int) -> dict:
  """The decode cache's first S slots."""
  return dict(
    k=tuple(k[..., :S] for k in cache["k"]),
    v=tuple(v[:, :, :S] for v in cache["v"]),
    pos=cache["pos"][:, :S],
    seg=cache["seg"][:, :S],
  )


def _paste_cache(full: dict, cut: dict) -> dict:
  """`full` with its first slots replaced by `cut`."""
  put = jax.lax.dynamic_update_slice
  return dict(
    k=tuple(put(f, c, (0,) * f.ndim) for f, c in zip(full["k"], cut["k"])),
    v=tuple(put(f, c, (0,) * f.ndim) for f, c in zip(full["v"], cut["v"])),
    pos=put(full["pos"], cut["pos"], (0, 0)),
    seg=put(full["seg"], cut["seg"], (0, 0)),
  )


def generate(
  params,
  prompt_BxP,
  prompt_seg_BxP,
  rng,
  *,
  model,
  cfg,
  budget,
  cache_len,
  pad_id=0,
  max_new_B=None,
) -> SamplingState:
  """prefill + decode to the budget (or until every row stops)."""
  state = prefill(
    params,
    prompt_BxP,
    prompt_seg_BxP,
    rng,
    model=model,
    cfg=cfg,
    budget=budget,
    cache_len=cache_len,
    pad_id=pad_id,
    max_new_B=max_new_B,
  )
  return decode(
    params, state, model=model, cfg=cfg, max_steps=budget, pad_id=pad_id
  )


_ROW_FIELDS = (
  "last_token",
  "next_pos",
  "tokens",
  "logp",
  "sample_logp",
  "length",
  "limit",
  "status",
)


def merge_rows(
  states: Sequence[SamplingState], rows: int, *, pad_id: int = 0
) -> SamplingState:
  """One state of `rows` rows holding the rows of several fresh `prefill`
  states (same budget, any buckets) in order, for one `decode`; rows past
  them are empty (stopped from the start).

  Each block's cache is left-padded with empty slots (segment 0, never
  attended) to the longest, so every row writes its next key at the same
  slot, as if its context had been left-padded to the longest bucket;
  nothing is recomputed. The rng of the first state drives the decode.
  Compiles one placement per (block bucket, call bucket) pair, however
  many blocks a call has.
  """
  if sum(s.tokens.shape[0] for s in states) > rows:
    raise ValueError(
      f"merge_rows: {sum(s.tokens.shape[0] for s in states)} rows do not "
      f"fit a call of {rows}"
    )
  S = max(s.cache["pos"].shape[1] for s in states)
  out = _empty_call(states[0], rows=rows, cache_len=S, pad_id=pad_id)
  at = 0
  for s in states:
    out = _place_rows(out, s, jnp.asarray(at, jnp.int32))
    at += s.tokens.shape[0]
  return out


@functools.partial(jax.jit, static_argnames=("rows", "cache_len", "pad_id"))
def _empty_call(
  like: SamplingState, *, rows: int, cache_len: int, pad_id: int
) -> SamplingState:
  """`rows` stopped rows with an empty cache of `cache_len` slots, shaped
  like the fresh `prefill` state `like` (its budget, rng and step)."""
  budget = like.tokens.shape[1]

  def empty(x, axis_len: dict):
    shape = list(x.shape)
    for axis, n in axis_len.items():
      shape[axis] = n
    return jnp.zeros(shape, x.dtype)

  return like.replace(
    cache=dict(
      k=tuple(empty(k, {0: rows, 3: cache_len}) for k in like.cache["k"]),
      v=tuple(empty(v, {0: rows, 2: cache_len}) for v in like.cache["v"]),
      pos=jnp.zeros((rows, cache_len), like.cache["pos"].dtype),
      seg=jnp.zeros((rows, cache_len), like.cache["seg"].dtype),
    ),
    index=jnp.asarray(cache_len - budget, jnp.int32),
    last_token=jnp.full((rows,), pad_id, jnp.int32),
    next_pos=jnp.zeros((rows,), jnp.int32),
    tokens=jnp.full((rows, budget), pad_id, jnp.int32),
    logp=jnp.zeros((rows, budget), jnp.float32),
    sample_logp=jnp.zeros((rows, budget), jnp.float32),
    length=jnp.zeros((rows,), jnp.int32),
    limit=jnp.ones((rows,), jnp.int32),
    status=jnp.full((rows,), STOPPED, jnp.int32),
  )


@functools.partial(jax.jit, donate_argnames=("call",))
def _place_rows(
  call: SamplingState, block: SamplingState, at: jax.Array
) -> SamplingState:
  """`call` with rows [at, at + block rows) replaced by `block`'s, its cache
  left-padded to the call's length (in place: `call` is donated)."""
  d = call.cache["pos"].shape[1] - block.cache["pos"].shape[1]

  def put(into, x, slot_axis):
    if slot_axis is not None and d:
      widths = [(0, 0)] * x.ndim
      widths[slot_axis] = (d, 0)
      x = jnp.pad(x, widths)
    start = (at,) + (0,) * (x.ndim - 1)
    return jax.lax.dynamic_update_slice(into, x.astype(into.dtype), start)

  cache = dict(
    k=tuple(
      put(c, b, 3)
      for c, b in zip(call.cache["k"], block.cache["k"], strict=True)
    ),
    v=tuple(
      put(c, b, 2)
      for c, b in zip(call.cache["v"], block.cache["v"], strict=True)
    ),
    pos=put(call.cache["pos"], block.cache["pos"], 1),
    seg=put(call.cache["seg"], block.cache["seg"], 1),
  )
  return call.replace(
    cache=cache,
    **{
      name: put(getattr(call, name), getattr(block, name), None)
      for name in _ROW_FIELDS
    },
  )


def left_pad(
  seqs: list[list[int]], bucket: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """[B, bucket] tokens and segment ids (1 real / 0 pad), padded left."""
  toks = np.full((len(seqs), bucket), pad_id, np.int32)
  seg = np.zeros((len(seqs), bucket), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > bucket:
      raise ValueError(f"prompt of {len(s)} tokens exceeds bucket {bucket}")
    if len(s):
      toks[i, bucket - len(s) :] = s
      seg[i, bucket - len(s) :] = 1
  return toks, seg


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(
    f"prompt of {length} tokens exceeds the largest prompt "
    f"bucket {max(buckets)}"
  )
