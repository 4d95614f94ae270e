"""Jitted sampling with an explicit KV cache: `prefill` then `decode`.

Prompts are left-padded to a fixed bucket P, so every row writes its next key
at the same cache slot and one scalar `index` addresses the cache; each row's
RoPE positions start at 0 on its first real token. Generated tokens go to a
fixed [B, N] buffer (N = the per-call budget), so nothing recompiles across
calls with the same (B, P, N, S).

`prefill` runs one forward over the prompts and samples the first token;
`decode` is one `lax.while_loop` that feeds one token per step and exits as
soon as every row has stopped (stop token, budget, cache end or repetition).
For every generated token we keep its log-prob under the model at temperature
1 (what the loss uses) and under the actual sampling distribution.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from k15 import model as model_lib

# Row status codes.
RUNNING, STOPPED, BUDGET, MAX_LEN, REPEAT = 0, 1, 2, 3, 4
STATUS_NAMES = {RUNNING: "running", STOPPED: "normal stop",
                BUDGET: "cut by budget", MAX_LEN: "cut by length",
                REPEAT: "repeat, early stop"}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  stop_tokens: tuple[int, ...] = ()
  # Repeat detection: a row stops with status REPEAT when its last
  # `repeat_ngram` tokens have occurred `repeat_count` times (non-overlapping
  # or not) within its last `repeat_window` generated tokens. 0 = off.
  repeat_ngram: int = 0
  repeat_window: int = 64
  repeat_count: int = 4


@flax.struct.dataclass
class SamplingState:
  cache: dict
  index: jax.Array  # [] next cache slot to write
  last_token: jax.Array  # [B] token to feed next
  next_pos: jax.Array  # [B] RoPE position of last_token
  tokens: jax.Array  # [B, N] generated tokens (pad after a row stops)
  logp: jax.Array  # [B, N] model log-prob at temperature 1
  sample_logp: jax.Array  # [B, N] log-prob under the sampling distribution
  length: jax.Array  # [B] tokens generated so far in this call
  status: jax.Array  # [B] RUNNING / STOPPED / BUDGET / MAX_LEN / REPEAT
  rng: jax.Array
  step: jax.Array  # [] decode steps taken (for rng folding)


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


def sample_token(rng, logits_BxV, cfg: SamplingConfig):
  """Returns (token [B], logp at T=1 [B], logp under sampling dist [B])."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  filt = _filter_logits(logits_BxV, cfg)
  if cfg.temperature <= 0:
    tok = jnp.argmax(logits_BxV, axis=-1)
    samp_lp = jnp.zeros(tok.shape, jnp.float32)
  else:
    tok = jax.random.categorical(rng, filt, axis=-1)
    samp_lp = jnp.take_along_axis(jax.nn.log_softmax(filt), tok[:, None],
                                  -1)[:, 0]
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), tok[:, None],
                           -1)[:, 0]
  return tok.astype(jnp.int32), lp, samp_lp


def _record(state: SamplingState, tok_B, lp_B, slp_B, *, cfg: SamplingConfig,
            pad_id: int, cache_len: int) -> SamplingState:
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
    rep = detect_repeat(tokens, length, ngram=cfg.repeat_ngram,
                        window=cfg.repeat_window, count=cfg.repeat_count)
    status = jnp.where((status == RUNNING) & rep, REPEAT, status)
  # the next token would be written at cache slot `index` (after this one)
  status = jnp.where((status == RUNNING) & (length >= N), BUDGET, status)
  status = jnp.where((status == RUNNING) & (state.index + 1 >= cache_len),
                     MAX_LEN, status)
  last = jnp.where(running, tok_B, pad_id)
  return state.replace(tokens=tokens, logp=logp, sample_logp=sample_logp,
                       length=length, status=status, last_token=last)


def detect_repeat(tokens_BxN, length_B, *, ngram: int, window: int,
                  count: int) -> jax.Array:
  """True where a row's last `ngram` tokens occur >= `count` times in its last
  `window` generated tokens (degenerate looping). Pure; jittable."""
  B, N = tokens_BxN.shape
  idx = jnp.arange(N)
  # rows' last n-gram, gathered per row
  last_start = length_B - ngram  # [B]
  gram_idx = last_start[:, None] + jnp.arange(ngram)[None, :]  # [B, n]
  gram = jnp.take_along_axis(tokens_BxN, jnp.clip(gram_idx, 0, N - 1), 1)
  # match[b, s] = tokens[b, s:s+n] == gram[b]
  match = jnp.ones((B, N), bool)
  for j in range(ngram):
    shifted = jnp.roll(tokens_BxN, -j, axis=1)
    match &= shifted == gram[:, j:j + 1]
  start_ok = (idx[None, :] <= last_start[:, None]) & (
      idx[None, :] >= (length_B - window)[:, None]) & (idx[None, :] >= 0)
  hits = jnp.sum(match & start_ok, axis=1)
  return (length_B >= ngram * count) & (hits >= count)


@functools.partial(jax.jit, static_argnames=(
    "model", "cfg", "budget", "cache_len", "pad_id"))
def prefill(params, prompt_BxP: jax.Array, prompt_seg_BxP: jax.Array,
            rng: jax.Array, *, model: model_lib.ModelConfig,
            cfg: SamplingConfig, budget: int, cache_len: int,
            pad_id: int = 0) -> SamplingState:
  """One forward over left-padded prompts; samples the first new token.

  prompt_seg_BxP: 1 on real tokens, 0 on (left) padding.
  """
  B, P = prompt_BxP.shape
  if cache_len < P + 1:
    raise ValueError(f"cache_len={cache_len} must exceed the prompt bucket "
                     f"{P}")
  cache = model_lib.init_cache(model, B, cache_len)
  pos_BxP = model_lib.positions_from_segments(prompt_seg_BxP)
  h_BxPxD, cache = model_lib.Decoder(model).apply(
      params, prompt_BxP, pos_BxP, prompt_seg_BxP, cache, 0,
      return_hidden=True)
  logits_BxV = model_lib.Decoder(model).apply(
      params, h_BxPxD[:, -1:], method=model_lib.Decoder.logits)[:, 0]
  state = SamplingState(
      cache=cache, index=jnp.asarray(P, jnp.int32),
      last_token=jnp.full((B,), pad_id, jnp.int32),
      next_pos=jnp.sum(prompt_seg_BxP != 0, axis=1).astype(jnp.int32),
      tokens=jnp.full((B, budget), pad_id, jnp.int32),
      logp=jnp.zeros((B, budget), jnp.float32),
      sample_logp=jnp.zeros((B, budget), jnp.float32),
      length=jnp.zeros((B,), jnp.int32),
      status=jnp.full((B,), RUNNING, jnp.int32), rng=rng,
      step=jnp.asarray(0, jnp.int32))
  tok, lp, slp = sample_token(jax.random.fold_in(rng, 0), logits_BxV, cfg)
  return _record(state, tok, lp, slp, cfg=cfg, pad_id=pad_id,
                 cache_len=cache_len)


def _decode_step(params, state: SamplingState, *, model, cfg, pad_id,
                 cache_len) -> SamplingState:
  running = state.status == RUNNING
  tok_Bx1 = state.last_token[:, None]
  seg_Bx1 = running.astype(jnp.int32)[:, None]
  logits, cache = model_lib.Decoder(model).apply(
      params, tok_Bx1, state.next_pos[:, None], seg_Bx1, state.cache,
      state.index)
  step = state.step + 1
  tok, lp, slp = sample_token(jax.random.fold_in(state.rng, step),
                              logits[:, 0], cfg)
  state = state.replace(cache=cache, index=state.index + 1,
                        next_pos=state.next_pos + running.astype(jnp.int32),
                        step=step)
  return _record(state, tok, lp, slp, cfg=cfg, pad_id=pad_id,
                 cache_len=cache_len)


@functools.partial(jax.jit, static_argnames=(
    "model", "cfg", "max_steps", "pad_id"), donate_argnames=("state",))
def decode(params, state: SamplingState, *, model: model_lib.ModelConfig,
           cfg: SamplingConfig, max_steps: int, pad_id: int = 0
           ) -> SamplingState:
  """Up to `max_steps` decode steps; exits when every row has stopped."""
  cache_len = state.cache["pos"].shape[1]
  start = state.step

  def cond(s):
    return (s.step - start < max_steps) & jnp.any(s.status == RUNNING)

  def body(s):
    return _decode_step(params, s, model=model, cfg=cfg, pad_id=pad_id,
                        cache_len=cache_len)

  return jax.lax.while_loop(cond, body, state)


def generate(params, prompt_BxP, prompt_seg_BxP, rng, *, model, cfg, budget,
             cache_len, pad_id=0) -> SamplingState:
  """prefill + decode to the budget (or until every row stops)."""
  state = prefill(params, prompt_BxP, prompt_seg_BxP, rng, model=model,
                  cfg=cfg, budget=budget, cache_len=cache_len, pad_id=pad_id)
  return decode(params, state, model=model, cfg=cfg, max_steps=budget,
                pad_id=pad_id)


def left_pad(seqs: list[list[int]], bucket: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """[B, bucket] tokens and segment ids (1 real / 0 pad), padded left."""
  toks = np.full((len(seqs), bucket), pad_id, np.int32)
  seg = np.zeros((len(seqs), bucket), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > bucket:
      raise ValueError(f"prompt of {len(s)} tokens exceeds bucket {bucket}")
    if s:
      toks[i, bucket - len(s):] = s
      seg[i, bucket - len(s):] = 1
  return toks, seg


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(f"prompt of {length} tokens exceeds the largest prompt "
                   f"bucket {max(buckets)}")
