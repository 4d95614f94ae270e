"""The jitted sampler: `prefill` then `decode` over an explicit KV cache.

Prompts are left-padded to a fixed bucket P, so every row writes its next key
at the same cache slot and one scalar `index` addresses the cache; each row's
RoPE positions start at 0 on its first real token. Generated tokens go to a
fixed [B, N] buffer (N = the per-call budget), so nothing recompiles across
calls with the same (B, P, N, S).

`prefill` runs one forward of `model.Decoder` over the prompts (and their
images, spliced at the placeholder tokens: `k15.vision`) and samples the
first new token; `decode` is a `lax.while_loop` (one per chunk of
`live_chunk` cache slots, so attention reads only the filled part of the
cache) that feeds one token per step through `model.decode_step` (the
model's own blocks, over per-layer weights and a cache laid out for decode:
see `k15.model` and `k15.attention.decode`) and exits as soon as every row
has stopped. How a token is drawn and when a row stops are the rules of
`k15.sampling`, whose public names this module re-exports.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from k15 import model as model_lib
from k15.sampling import (  # noqa: F401 - re-exported: the sampler's API
  BUDGET,
  MAX_LEN,
  METHODS,
  REPEAT,
  RUNNING,
  STATUS_NAMES,
  STOPPED,
  SamplingConfig,
  detect_repeat,
  sample_cdf,
  sample_token,
  update_status,
)

_NO_LIMIT = np.iinfo(np.int32).max


@flax.struct.dataclass
class SamplingState:
  # `model.decode_cache`: {"k": L x [B, K, Dh, S], "v": L x [B, K, S, Dh],
  #  "pos": [B, S], "seg": [B, S]} in model.cache_dtype; one array per
  #  layer, so decode updates it in place
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
  length = state.length + running.astype(jnp.int32)
  return state.replace(
    tokens=tokens,
    logp=jnp.where(one_hot, lp_B[:, None], state.logp),
    sample_logp=jnp.where(one_hot, slp_B[:, None], state.sample_logp),
    length=length,
    status=update_status(
      state.status,
      tok_B,
      tokens,
      length,
      state.limit,
      state.index,
      cfg=cfg,
      cache_len=cache_len,
    ),
    last_token=jnp.where(running, tok_B, pad_id),
  )


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
  images: dict | None = None,
) -> SamplingState:
  """One forward over left-padded prompts; samples the first new token.

  prompt_seg_BxP: 1 on real tokens, 0 on (left) padding; a row with no real
  token is a padding row and starts stopped (length 0).
  max_new_B: optional per-row cap on new tokens (e.g. what is left of
  max_len for a continued trajectory); a row reaching it stops with MAX_LEN.
  images: the rows' images (`vision.IMAGE_KEYS`, `images.pack`) for their
  placeholder tokens; None: text only. Decode never needs them again.
  """
  B, P = prompt_BxP.shape
  if cache_len < P + 1:
    raise ValueError(f"cache_len={cache_len} must exceed the prompt bucket {P}")
  cache = model_lib.init_cache(model, B, P)
  pos_BxP = model_lib.positions_from_segments(prompt_seg_BxP)
  h_BxPxD, cache = model_lib.Decoder(model).apply(
    params, prompt_BxP, pos_BxP, prompt_seg_BxP, cache, 0, return_hidden=True,
    images=images,
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
    cache=model_lib.decode_cache(cache, cache_len, model),
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
  logits_BxV, cache = model_lib.decode_step(
    w,
    state.last_token,
    state.next_pos,
    running.astype(jnp.int32),
    state.cache,
    state.index,
    cfg=model,
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
  w = model_lib.decode_weights(params, model)

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
    cut = run(state.replace(cache=model_lib.cut_cache(state.cache, S)), S)
    return cut.replace(cache=model_lib.paste_cache(state.cache, cut.cache))

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
  images=None,
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
    images=images,
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

  def empty(x, slot_axis: int):
    shape = list(x.shape)
    shape[0], shape[slot_axis] = rows, cache_len
    return jnp.zeros(shape, x.dtype)

  return like.replace(
    cache={
      name: jax.tree.map(
        functools.partial(empty, slot_axis=model_lib.DECODE_SLOT_AXES[name]),
        entry,
      )
      for name, entry in like.cache.items()
    },
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

  cache = {
    name: jax.tree.map(
      functools.partial(put, slot_axis=model_lib.DECODE_SLOT_AXES[name]),
      call.cache[name],
      block.cache[name],
    )
    for name in call.cache
  }
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
