"""Host side of generation: fixed-shape sampler calls, partial rollouts.

`generate_segments` runs the jitted sampler over any number of requests
(prompt + the response so far, and how many more tokens the trajectory may
take). Rows are sorted (stably) by their context bucket and cut into fixed
[rows, bucket] chunks, each at the smallest bucket that holds its longest
row, the last chunk padded with empty rows (which start stopped); with
`continue_rows`, continued rows are re-prefilled in blocks of that many rows
of their own (less left padding to re-prefill) and several blocks are
decoded as one call (fewer decode steps). So the compiled prefill/decode are
reused across calls and iterations: one pair per bucket (with
`continue_rows`, also one placement of a block into a call per pair of
buckets, and one decode per bucket at `rows` rows). The KV cache lives
only inside one call.

`generate` samples one complete response per prompt (evaluation): rows cut
by the budget are continued when `GenConfig.continue_buckets` has room.

`RolloutBuffer` is the partial-rollout buffer of an RL run (PAPER.md §4):
groups of k trajectories per prompt; every trajectory keeps its tokens, the
behaviour log-prob of each and the iteration (policy version) that sampled
it. A trajectory cut by the per-iteration budget stays in the buffer and is
continued next iteration (re-prefilled under the new parameters); a group is
handed to the trainer only when all k members have finished, so its mean
reward is a proper baseline. It is plain Python + numpy and round-trips
through JSON exactly (the run checkpoints it).

`to_batch` lays prompt + response rows out the way the trainer scores them:

  tokens_BxT = [left-padded prompt (P) | response (N), right-padded]

with segment ids 1 on real tokens and a loss mask on the response tokens.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

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
  buckets = gen.buckets
  ctx = [list(q.prompt) + [int(t) for t in q.prefix] for q in requests]
  row_bucket = [sampler.bucket_for(len(c), buckets) for c in ctx]
  order = sorted(range(len(requests)), key=lambda i: row_bucket[i])
  # calls: lists of blocks of rows, each block prefilled at its own bucket
  if gen.continue_rows:
    fresh = set(gen.prompt_buckets)
    new = [i for i in order if row_bucket[i] in fresh]
    old = [i for i in order if row_bucket[i] not in fresh]
    blocks = [
      old[a : a + gen.continue_rows]
      for a in range(0, len(old), gen.continue_rows)
    ]
    per_call = max(gen.rows // gen.continue_rows, 1)
    calls = [
      [(new[a : a + gen.rows], gen.rows)] for a in range(0, len(new), gen.rows)
    ]
    calls += [
      [(b, gen.continue_rows) for b in blocks[a : a + per_call]]
      for a in range(0, len(blocks), per_call)
    ]
  else:
    calls = [
      [(order[a : a + gen.rows], gen.rows)]
      for a in range(0, len(order), gen.rows)
    ]
  out: list[Generation | None] = [None] * len(requests)
  for c, call in enumerate(calls):
    rng_c = jax.random.fold_in(rng, c)
    states = []
    for j, (block, size) in enumerate(call):
      bucket = max(row_bucket[i] for i in block)
      pad = size - len(block)
      toks, seg = sampler.left_pad(
        [ctx[i] for i in block] + [[]] * pad, bucket, pad_id
      )
      max_new = np.array(
        [min(requests[i].max_new, _NO_CAP) for i in block] + [1] * pad,
        np.int32,
      )
      if shard_fn is not None:
        toks, seg, max_new = shard_fn((toks, seg, max_new))
      kw = dict(
        model=model,
        cfg=sampling,
        budget=gen.budget,
        cache_len=bucket + gen.budget,
        pad_id=pad_id,
        max_new_B=max_new,
      )
      if len(call) == 1:
        state = sampler.generate(params, toks, seg, rng_c, **kw)
      else:
        rng_j = jax.random.fold_in(rng_c, j) if j else rng_c
        states.append(sampler.prefill(params, toks, seg, rng_j, **kw))
    if states:
      # several blocks, each re-prefilled at its own bucket, decoded as one
      state = sampler.merge_rows(
        states, per_call * gen.continue_rows, pad_id=pad_id
      )
      del states
      state = sampler.decode(
        params,
        state,
        model=model,
        cfg=sampling,
        max_steps=gen.budget,
        pad_id=pad_id,
      )
    # every process gets every row (multi-host: an all-gather)
    tokens, logp, slp, length, status = sharding.gather(
      (state.tokens, state.logp, state.sample_logp, state.length, state.status)
    )
    del state  # the KV cache is freed before the next call
    rows = [i for block, _ in call for i in block]
    # a block's padding rows come after its real rows
    at = np.cumsum([0] + [size for _, size in call])
    pos = [
      at[j] + r for j, (block, _) in enumerate(call) for r in range(len(block))
    ]
    for i, j in zip(rows, pos, strict=True):
      n = int(length[j])
      out[i] = Generation(
        list(requests[i].prompt),
        tokens[j, :n].copy(),
        logp[j, :n].copy(),
        slp[j, :n].copy(),
        int(status[j]),
      )
  return out


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
) -> list[Generation]:
  """Samples one response per prompt. Deterministic for a given rng.

  A row cut by the budget is continued (prompt + response re-prefilled)
  while `gen.continue_buckets` holds it and max_len allows; otherwise it
  ends with status BUDGET.
  """
  reqs = [Request(p, (), gen.max_response(len(p))) for p in prompts]
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


# ---------------------------------------------------------------------------
# The partial-rollout buffer
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Trajectory:
  """One sample of a group; `status` is RUNNING until it has finished."""

  response: np.ndarray  # [n] int32
  logp: np.ndarray  # [n] f32 behaviour log-probs (model, temperature 1)
  version: np.ndarray  # [n] int32 iteration whose policy sampled the token
  cap: int  # response tokens it may take in all (max_len - prompt bucket)
  status: int = sampler.RUNNING

  @property
  def finished(self) -> bool:
    return self.status != sampler.RUNNING


@dataclasses.dataclass
class Group:
  """The k samples of one prompt; trained on once all have finished."""

  gid: int
  problem: int  # index into the RL problem set
  prompt: list[int]
  born: int  # iteration the group started
  members: list[Trajectory]

  @property
  def finished(self) -> bool:
    return all(t.finished for t in self.members)


def _enc(x: np.ndarray, dtype) -> str:
  return base64.b64encode(np.ascontiguousarray(x, dtype).tobytes()).decode()


def _dec(s: str, dtype) -> np.ndarray:
  return np.frombuffer(base64.b64decode(s), dtype).copy()


class RolloutBuffer:
  """Groups in flight, oldest first (see the module docstring).

  partial=False: a trajectory cut by the budget is final (status BUDGET),
  so every group finishes in the iteration it starts.
  """

  def __init__(self, k: int, *, partial: bool):
    self.k = k
    self.partial = partial
    self.groups: list[Group] = []
    self.next_gid = 0

  def start(
    self,
    problems: Sequence[int],
    prompts: Sequence[Sequence[int]],
    iteration: int,
    caps: Sequence[int | Sequence[int]],
  ) -> None:
    """New groups of k empty trajectories for problems[i]; caps[i] is the
    response cap of its members (one int, or one per member)."""
    for p, q, cap in zip(problems, prompts, caps, strict=True):
      cap_k = [cap] * self.k if np.ndim(cap) == 0 else list(cap)
      if len(cap_k) != self.k:
        raise ValueError(f"{len(cap_k)} caps for a group of {self.k}")
      members = [
        Trajectory(
          np.zeros(0, np.int32),
          np.zeros(0, np.float32),
          np.zeros(0, np.int32),
          int(c),
        )
        for c in cap_k
      ]
      self.groups.append(
        Group(self.next_gid, int(p), list(q), iteration, members)
      )
      self.next_gid += 1

  def running(self) -> list[tuple[Group, Trajectory]]:
    """Every unfinished trajectory, oldest group first."""
    return [(g, t) for g in self.groups for t in g.members if not t.finished]

  def requests(self) -> tuple[list[tuple[Group, Trajectory]], list[Request]]:
    todo = self.running()
    return todo, [
      Request(g.prompt, t.response, t.cap - len(t.response)) for g, t in todo
    ]

  def record(
    self,
    todo: Sequence[tuple[Group, Trajectory]],
    gens: Sequence[Generation],
    iteration: int,
  ) -> None:
    """Appends this iteration's segments; settles who has finished."""
    for (_, t), g in zip(todo, gens, strict=True):
      t.response = np.concatenate([t.response, g.response.astype(np.int32)])
      t.logp = np.concatenate([t.logp, g.logp.astype(np.float32)])
      t.version = np.concatenate(
        [t.version, np.full(len(g.response), iteration, np.int32)]
      )
      status = g.status
      if status == sampler.BUDGET and len(t.response) >= t.cap:
        status = sampler.MAX_LEN
      if status == sampler.BUDGET and self.partial:
        status = sampler.RUNNING  # carried over to the next iteration
      t.status = status

  def pop_finished(self, max_groups: int) -> list[Group]:
    """Up to `max_groups` finished groups, oldest first; removed."""
    done = [g for g in self.groups if g.finished][:max_groups]
    ids = {g.gid for g in done}
    self.groups = [g for g in self.groups if g.gid not in ids]
    return done

  def num_finished(self) -> int:
    return sum(g.finished for g in self.groups)

  def metrics(self, iteration: int) -> dict[str, float]:
    running = self.running()
    oldest = min(
      (int(t.version.min()) for _, t in running if len(t.version)),
      default=iteration,
    )
    return dict(
      buffer_groups=float(len(self.groups)),
      buffer_running=float(len(running)),
      buffer_finished_groups=float(self.num_finished()),
      buffer_oldest_age=float(iteration - oldest),
    )

  def state_dict(self) -> dict:
    """JSON-able and exact (arrays as base64 of their bytes)."""
    return dict(
      k=self.k,
      partial=self.partial,
      next_gid=self.next_gid,
      groups=[
        dict(
          gid=g.gid,
          problem=g.problem,
          prompt=g.prompt,
          born=g.born,
          members=[
            dict(
              response=_enc(t.response, "<i4"),
              logp=_enc(t.logp, "<f4"),
              version=_enc(t.version, "<i4"),
              cap=t.cap,
              status=t.status,
            )
            for t in g.members
          ],
        )
        for g in self.groups
      ],
    )

  def load_state_dict(self, d: dict) -> None:
    if int(d["k"]) != self.k:
      raise ValueError(
        f"rollout buffer: checkpoint has k={d['k']}, the config k={self.k}"
      )
    self.next_gid = int(d["next_gid"])
    self.groups = [
      Group(
        int(g["gid"]),
        int(g["problem"]),
        [int(x) for x in g["prompt"]],
        int(g["born"]),
        [
          Trajectory(
            _dec(t["response"], "<i4"),
            _dec(t["logp"], "<f4"),
            _dec(t["version"], "<i4"),
            int(t["cap"]),
            int(t["status"]),
          )
          for t in g["members"]
        ],
      )
      for g in d["groups"]
    ]


# ---------------------------------------------------------------------------
# Training rows
# ---------------------------------------------------------------------------


def to_batch(
  prompts: list[list[int]],
  responses: list[np.ndarray],
  *,
  prompt_len: int,
  response_len: int,
  pad_id: int,
  rows: int | None = None,
) -> dict[str, np.ndarray]:
  """Training rows [prompt | response]; `rows` pads B with empty rows.

  Returns tokens_BxT, seg_BxT (1 on real tokens), loss_mask_BxT (response
  tokens) and sample_weight_B (0 on padding rows), T = prompt_len +
  response_len.
  """
  B = len(prompts) if rows is None else rows
  if len(prompts) > B:
    raise ValueError(f"{len(prompts)} rows do not fit a batch of {B}")
  T = prompt_len + response_len
  tokens = np.full((B, T), pad_id, np.int32)
  seg = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T), bool)
  weight = np.zeros((B,), np.float32)
  for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
    if len(p) > prompt_len or len(r) > response_len:
      raise ValueError(
        f"row {i}: prompt {len(p)} / response {len(r)} tokens "
        f"exceed {prompt_len} / {response_len}"
      )
    tokens[i, prompt_len - len(p) : prompt_len] = p
    tokens[i, prompt_len : prompt_len + len(r)] = r
    seg[i, prompt_len - len(p) : prompt_len + len(r)] = 1
    mask[i, prompt_len : prompt_len + len(r)] = True
    weight[i] = 1.0
  return dict(
    tokens_BxT=tokens, seg_BxT=seg, loss_mask_BxT=mask, sample_weight_B=weight
  )


def training_batch(
  groups: Sequence[Group],
  adv_GxK: np.ndarray,
  *,
  iteration: int,
  prompt_len: int,
  response_len: int,
  rows: int,
  pad_id: int,
  loss_segments: str = "all",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`to_batch` rows of finished groups' trajectories (padded to `rows`)
  with behaviour log-probs, advantages and the loss mask.

  loss_segments: "all" puts every response token in the loss; "current"
  only the tokens this iteration's policy sampled (the report: "certain
  segments can be excluded from loss computation"). Also returns
  old_BxT: response tokens sampled by an earlier policy (for metrics).
  The batch's response_BxT marks every response token (not a loss input).
  """
  if loss_segments not in ("all", "current"):
    raise ValueError(f"loss_segments={loss_segments!r}: all | current")
  trajs = [t for g in groups for t in g.members]
  T = prompt_len + response_len
  batch = to_batch(
    [g.prompt for g in groups for _ in g.members],
    [t.response for t in trajs],
    prompt_len=prompt_len,
    response_len=response_len,
    pad_id=pad_id,
    rows=rows,
  )
  batch["behaviour_logp_BxT"] = place_per_token(
    [t.logp for t in trajs], prompt_len=prompt_len, T=T, rows=rows
  )
  version_BxT = place_per_token(
    [t.version for t in trajs],
    prompt_len=prompt_len,
    T=T,
    rows=rows,
    dtype=np.int32,
  )
  response_BxT = batch["loss_mask_BxT"]
  batch["response_BxT"] = response_BxT
  if loss_segments == "current":
    batch["loss_mask_BxT"] = response_BxT & (version_BxT == iteration)
  adv_B = np.zeros(rows, np.float32)
  adv_B[: len(trajs)] = np.asarray(adv_GxK, np.float32).reshape(-1)
  batch["advantages_B"] = adv_B
  return batch, response_BxT & (version_BxT < iteration)


def place_per_token(
  values: list[np.ndarray],
  *,
  prompt_len: int,
  T: int,
  rows: int,
  dtype=np.float32,
) -> np.ndarray:
  """Aligns per-response-token values (e.g. behaviour log-probs) to [B, T]."""
  out = np.zeros((rows, T), dtype)
  for i, v in enumerate(values):
    out[i, prompt_len : prompt_len + len(v)] = v
  return out
