"""Host side of generation: fixed-shape sampler calls.

`generate_segments` runs the jitted sampler over any number of requests
(prompt + the response so far, and how many more tokens the trajectory may
take). `plan_calls` lays the rows out: sorted (stably) by their context
bucket and cut into fixed [rows, bucket] calls, each at the smallest bucket
that holds its longest row, the last one padded with empty rows (which
start stopped); with `continue_rows`, continued rows are re-prefilled in
blocks of that many rows of their own (less left padding to re-prefill)
and several blocks are decoded as one call (fewer decode steps). A call at
bucket b has a cache of b + budget slots (`GenConfig.call_cache`). So the
compiled prefill/decode are reused across calls and iterations: one pair
per bucket (with `continue_rows`, also one placement of a block into a
call per pair of buckets, and one decode per bucket at `rows` rows);
`GenConfig.shapes` lists them, through the same two functions, for the
planner. The KV cache lives only inside one call.

`generate` samples one complete response per prompt (evaluation): rows cut
by the budget are continued when `GenConfig.continue_buckets` has room.

A request whose prompt holds image placeholders carries its images
(`images.Patches`); a call (block) with any such row hands the packed
patches of its rows to prefill, which splices them in (`k15.vision`). A
continued row is re-prefilled with its images, like its prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from k15 import images as images_lib
from k15 import model as model_lib
from k15 import sampler, sharding

_NO_CAP = 1 << 30


@dataclasses.dataclass(frozen=True)
class GenConfig:
  """Static shapes of generation.

  rows: sequences per sampler call (fixed; the last chunk is padded).
  prompt_buckets: left-padded prompt lengths P.
  budget: new tokens per sequence per call (N).
  cache_len: max_len: a prompt in bucket P gets at most cache_len - P
    response tokens in all.
  continue_buckets: left-padded lengths for prompt + partial response;
    () means a row cut by the budget is final.
  continue_rows: > 0: continued rows are re-prefilled in blocks of this
    many rows of their own, each at the smallest bucket that holds it (less
    left padding to re-prefill), and rows // continue_rows blocks are
    decoded together (`sampler.merge_rows`); 0: they share calls of `rows`
    with fresh rows, prefilled at the call's longest bucket.
  A call at bucket b has a cache of b + budget slots.
  """

  rows: int
  prompt_buckets: tuple[int, ...]
  budget: int
  cache_len: int
  continue_buckets: tuple[int, ...] = ()
  continue_rows: int = 0

  def __post_init__(self):
    if self.cache_len < max(self.prompt_buckets) + self.budget:
      raise ValueError(
        f"cache_len={self.cache_len} < largest prompt bucket "
        f"{max(self.prompt_buckets)} + budget {self.budget}"
      )

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.prompt_buckets) | set(self.continue_buckets)))

  def max_response(self, prompt_len: int) -> int:
    """Response tokens a trajectory of this prompt may take in all."""
    return self.cache_len - sampler.bucket_for(prompt_len, self.prompt_buckets)

  def call_cache(self, bucket: int) -> int:
    """Cache slots of a call whose contexts are left-padded to `bucket`."""
    return bucket + self.budget

  def shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every shape `generate_segments` compiles, by jitted entry point:
    prefill (rows, bucket, cache, budget) and decode (rows, cache, budget).

    Found by laying out, with `plan_calls` and `call_shapes` (what the
    runtime uses), one row and one more than a block's rows at each bucket:
    calls mixing buckets take the largest one's shapes.
    """
    prefill, decode = set(), set()
    for b in self.buckets:
      for n in {1, self.continue_rows + 1}:
        for call in plan_calls([b] * n, self):
          blocks, dec = call_shapes(call, self)
          prefill.update(blocks)
          decode.add(dec)
    return dict(prefill=tuple(sorted(prefill)), decode=tuple(sorted(decode)))


def continue_buckets(
  prompt_len: int, budget: int, max_len: int
) -> tuple[int, ...]:
  """Context buckets for trajectories continued after j budget-long
  segments: prompt_len + j * budget (exact fits), j >= 1, while a
  continuation is possible (the context is shorter than max_len)."""
  out, b = [], prompt_len + budget
  while b < max_len:
    out.append(b)
    b += budget
  return tuple(out)


@dataclasses.dataclass
class Generation:
  prompt: list[int]
  response: np.ndarray  # [n] int32, includes the stop token if any
  logp: np.ndarray  # [n] model log-probs at temperature 1
  sample_logp: np.ndarray  # [n] under the sampling distribution
  status: int  # sampler.STOPPED / BUDGET / MAX_LEN / REPEAT


@dataclasses.dataclass(frozen=True)
class Request:
  """One row of a sampler call: continue `prefix` after `prompt`."""

  prompt: Sequence[int]
  prefix: Sequence[int] = ()
  max_new: int = _NO_CAP  # tokens this trajectory may still take
  images: images_lib.Patches | None = None  # the prompt's, if any


@dataclasses.dataclass(frozen=True)
class Block:
  """Rows prefilled together: `rows` (request indices) then padding rows up
  to `size`, left-padded to `bucket`."""

  rows: tuple[int, ...]
  size: int
  bucket: int


def plan_calls(lengths: Sequence[int], gen: GenConfig) -> list[list[Block]]:
  """Sampler calls for rows of these context lengths: each call a list of
  blocks decoded together (see the module docstring)."""
  row_bucket = [sampler.bucket_for(n, gen.buckets) for n in lengths]
  order = sorted(range(len(lengths)), key=lambda i: row_bucket[i])

  def cut(rows, size):
    return [tuple(rows[a : a + size]) for a in range(0, len(rows), size)]

  def block(rows, size):
    return Block(rows, size, max(row_bucket[i] for i in rows))

  if not gen.continue_rows:
    return [[block(c, gen.rows)] for c in cut(order, gen.rows)]
  fresh = set(gen.prompt_buckets)
  new = [i for i in order if row_bucket[i] in fresh]
  old = [i for i in order if row_bucket[i] not in fresh]
  blocks = [block(b, gen.continue_rows) for b in cut(old, gen.continue_rows)]
  per_call = max(gen.rows // gen.continue_rows, 1)
  calls = [[block(c, gen.rows)] for c in cut(new, gen.rows)]
  return calls + [
    blocks[a : a + per_call] for a in range(0, len(blocks), per_call)
  ]


def call_shapes(
  call: list[Block], gen: GenConfig
) -> tuple[list[tuple[int, int, int, int]], tuple[int, int, int]]:
  """The shapes one call compiles: prefill (rows, bucket, cache, budget)
  per block, and its decode (rows, cache, budget). Several blocks are
  merged into one call of `merged_rows` rows at the largest cache."""
  prefill = [(b.size, b.bucket, gen.call_cache(b.bucket), gen.budget)
             for b in call]  # fmt: skip
  rows = call[0].size if len(call) == 1 else merged_rows(gen)
  cache = max(gen.call_cache(b.bucket) for b in call)
  return prefill, (rows, cache, gen.budget)


def merged_rows(gen: GenConfig) -> int:
  """Rows of a call that decodes several continued blocks together."""
  return max(gen.rows // gen.continue_rows, 1) * gen.continue_rows


def generate_segments(
  params,
  requests: Sequence[Request],
  rng: jax.Array,
  *,
  model: model_lib.ModelConfig,
  sampling: sampler.SamplingConfig,
  gen: GenConfig,
  pad_id: int,
  shard_fn=None,
) -> list[Generation]:
  """One segment (at most `gen.budget` new tokens) for every request.

  Returns per request (in order) the new tokens only. Deterministic for a
  given rng and request list.
  """
  if not requests:
    return []
  ctx = [list(q.prompt) + [int(t) for t in q.prefix] for q in requests]
  out: list[Generation | None] = [None] * len(requests)
  for c, call in enumerate(plan_calls([len(x) for x in ctx], gen)):
    state = _sample_call(
      params, call, ctx, requests, jax.random.fold_in(rng, c), model=model,
      sampling=sampling, gen=gen, pad_id=pad_id, shard_fn=shard_fn,
    )  # fmt: skip
    # every process gets every row (multi-host: an all-gather)
    tokens, logp, slp, length, status = sharding.gather(
      (state.tokens, state.logp, state.sample_logp, state.length, state.status)
    )
    del state  # the KV cache is freed before the next call
    # a block's padding rows come after its real rows
    at = np.cumsum([0] + [b.size for b in call])
    for j, b in enumerate(call):
      for r, i in enumerate(b.rows):
        k, n = at[j] + r, int(length[at[j] + r])
        out[i] = Generation(
          list(requests[i].prompt),
          tokens[k, :n].copy(),
          logp[k, :n].copy(),
          slp[k, :n].copy(),
          int(status[k]),
        )
  return out


def _sample_call(
  params, call, ctx, requests, rng, *, model, sampling, gen, pad_id,
  shard_fn,
) -> sampler.SamplingState:  # fmt: skip
  """One call: each block prefilled at its bucket; several blocks merged
  and decoded as one."""
  states = []
  for j, b in enumerate(call):
    pad = b.size - len(b.rows)
    toks, seg = sampler.left_pad(
      [ctx[i] for i in b.rows] + [[]] * pad, b.bucket, pad_id
    )
    max_new = np.array(
      [min(requests[i].max_new, _NO_CAP) for i in b.rows] + [1] * pad,
      np.int32,
    )
    imgs = images_lib.pack_or_none(
      [requests[i].images for i in b.rows] + [None] * pad, model.vision
    )
    if shard_fn is not None:
      toks, seg, max_new, imgs = shard_fn((toks, seg, max_new, imgs))
    kw = dict(
      model=model,
      cfg=sampling,
      budget=gen.budget,
      cache_len=gen.call_cache(b.bucket),
      pad_id=pad_id,
      max_new_B=max_new,
      images=imgs,
    )
    if len(call) == 1:
      return sampler.generate(params, toks, seg, rng, **kw)
    rng_j = jax.random.fold_in(rng, j) if j else rng
    states.append(sampler.prefill(params, toks, seg, rng_j, **kw))
  # several blocks, each re-prefilled at its own bucket, decoded as one
  state = sampler.merge_rows(states, merged_rows(gen), pad_id=pad_id)
  del states
  return sampler.decode(
    params, state, model=model, cfg=sampling, max_steps=gen.budget,
    pad_id=pad_id,
  )  # fmt: skip


def generate(
  params,
  prompts: list[list[int]],
  rng: jax.Array,
  *,
  model: model_lib.ModelConfig,
  sampling: sampler.SamplingConfig,
  gen: GenConfig,
  pad_id: int,
  shard_fn=None,
  images: Sequence[images_lib.Patches | None] | None = None,
) -> list[Generation]:
  """Samples one response per prompt. Deterministic for a given rng.

  A row cut by the budget is continued (prompt + response re-prefilled)
  while `gen.continue_buckets` holds it and max_len allows; otherwise it
  ends with status BUDGET. images[i]: prompt i's images, if any.
  """
  imgs = list(images) if images is not None else [None] * len(prompts)
  reqs = [Request(p, (), gen.max_response(len(p)), im)
          for p, im in zip(prompts, imgs, strict=True)]  # fmt: skip
  gens = generate_segments(
    params,
    reqs,
    rng,
    model=model,
    sampling=sampling,
    gen=gen,
    pad_id=pad_id,
    shard_fn=shard_fn,
  )
  if not gen.continue_buckets:
    return gens
  seg_rng = jax.random.fold_in(rng, 0x5E6)
  for rnd in range(1, gen.cache_len):
    todo = [i for i, g in enumerate(gens) if g.status == sampler.BUDGET]
    if not todo:
      break
    reqs = [
      Request(
        gens[i].prompt,
        gens[i].response,
        gen.max_response(len(gens[i].prompt)) - len(gens[i].response),
        imgs[i],
      )
      for i in todo
    ]
    more = generate_segments(
      params,
      reqs,
      jax.random.fold_in(seg_rng, rnd),
      model=model,
      sampling=sampling,
      gen=gen,
      pad_id=pad_id,
      shard_fn=shard_fn,
    )
    for i, m in zip(todo, more, strict=True):
      g = gens[i]
      gens[i] = Generation(
        g.prompt,
        np.concatenate([g.response, m.response]),
        np.concatenate([g.logp, m.logp]),
        np.concatenate([g.sample_logp, m.sample_logp]),
        m.status,
      )
  return gens
