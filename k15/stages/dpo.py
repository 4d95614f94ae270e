"""Long2short DPO (PAPER.md §6): preferences between the long model's own
samples, shorter correct over longer.

The stage starts from its need, `rl` (this workdir's, or config.init, e.g.
the long model's RL checkpoint), which is also the frozen reference. Before
step 0 it samples `dpo.n` responses for each of the first
`dpo.num_prompts` RL prompts (each scored by the reward entry point), pairs
each prompt's shortest correct response with its wrong longer ones and its
correct ones at least `dpo.ratio` times as long (`objective.dpo_pairs`),
scores every paired response under the reference once (its sequence
log-prob), and writes the pairs to `workdir/data/dpo.jsonl`, which a
resumed stage reads back. Then `dpo.steps` steps of the DPO loss
(`objective.dpo_loss`, temperature `dpo.beta`) on `dpo.batch_size` pairs
each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from k15 import (
  config_lib,
  data,
  faults,
  objective,
  rejection,
  rollout,
  sharding,
  train,
)
from k15.stages import common, rs, sft

SEED = 34  # the rng stream of the stage's sampling
DATA = os.path.join("data", "dpo.jsonl")  # under the workdir: the pairs
SAMPLES = os.path.join("data", "dpo_samples.jsonl")  # the scored samples


@dataclasses.dataclass(frozen=True)
class DPOStageConfig(objective.DPOConfig):
  """The `dpo` section: the loss and pair rule (`objective.DPOConfig`:
  beta, ratio) and the stage's sampling and steps."""

  n: int = 8  # samples per prompt
  num_prompts: int = 0  # the first num_prompts RL prompts; 0 = all
  steps: int = 100
  batch_size: int = 16  # pairs per step (2x rows)
  lr: float = 0.0  # > 0 overrides optim.lr
  eps: float = 0.0  # > 0 overrides optim.eps
  temperature: float = 1.0  # of the n samples

  def __post_init__(self):
    super().__post_init__()
    for name in ("n", "steps", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"dpo.{name}={getattr(self, name)} must be >= 1")
    if self.num_prompts < 0:
      raise ValueError(f"dpo.num_prompts={self.num_prompts} must be >= 0")
    if not self.temperature > 0:
      raise ValueError(f"dpo.temperature={self.temperature} must be > 0")

  def optim(self, optim: train.OptimConfig) -> train.OptimConfig:
    return optim.overridden(self.lr, self.eps)


@dataclasses.dataclass(frozen=True)
class Carry:
  state: train.TrainState
  ds: grain.MapDataset  # batch i at ds[i]


Pair = tuple[list[int], list[int], list[int], float, float]


def make_pairs(
  groups: list[rejection.Group], ratio: float
) -> list[tuple[list[int], list[int], list[int]]]:
  """(prompt, chosen, rejected) ids of every pair of every group."""
  return [
    (g.prompt, g.responses[w], g.responses[l])
    for g in groups
    for w, l in objective.dpo_pairs(g.correct, g.lengths, ratio=ratio)
  ]


def _response_len(ctx: common.Context, pairs) -> int:
  longest = max(max(len(p[1]), len(p[2])) for p in pairs)
  return sft.response_len(longest, ctx.s.rollout)


def reference_logps(ctx: common.Context, params, pairs) -> list[Pair]:
  """`pairs` with the sequence log-probs of chosen and rejected under
  `params` (the frozen reference), scored batch_size pairs at a time."""
  cfg, ro = ctx.s.dpo, ctx.s.rollout
  width, rows = _response_len(ctx, pairs), 2 * cfg.batch_size
  out: list[Pair] = []
  for i in range(0, len(pairs), cfg.batch_size):
    chunk = pairs[i : i + cfg.batch_size]
    batch = rollout.to_batch(
      [p[0] for p in chunk for _ in (1, 2)],
      [np.asarray(p[k], np.int32) for p in chunk for k in (1, 2)],
      prompt_len=ro.prompt_len,
      response_len=width,
      pad_id=ctx.tok.pad_id,
      rows=rows,
    )
    logp_BxT = train.score(
      params,
      ctx.shard(batch["tokens_BxT"]),
      ctx.shard(batch["seg_BxT"]),
      model=ctx.s.model,
    )
    logp_BxT = np.asarray(sharding.gather(logp_BxT))
    seq_B = np.where(batch["loss_mask_BxT"], logp_BxT, 0.0).sum(-1)
    for j, p in enumerate(chunk):
      out.append((*p, float(seq_B[2 * j]), float(seq_B[2 * j + 1])))
  return out


def _dataset(ctx: common.Context, pairs: list[Pair]) -> grain.MapDataset:
  return data.pair_dataset(
    pairs,
    batch_size=ctx.s.dpo.batch_size,
    prompt_len=ctx.s.rollout.prompt_len,
    response_len=_response_len(ctx, pairs),
    pad_id=ctx.tok.pad_id,
    seed=ctx.s.seed + 3,
  )


def _write_pairs(path: str, pairs: list[Pair]) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  keys = ("prompt", "chosen", "rejected", "ref_chosen", "ref_rejected")
  with open(path + ".tmp", "w") as f:
    for p in pairs:
      f.write(json.dumps(dict(zip(keys, p, strict=True))) + "\n")
  os.replace(path + ".tmp", path)


def _read_pairs(path: str) -> list[Pair]:
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path}: the pairs of this stage are missing; move the stage's "
      "checkpoints aside to sample them again"
    )
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [
    (r["prompt"], r["chosen"], r["rejected"], r["ref_chosen"],
     r["ref_rejected"])
    for r in rows
  ]  # fmt: skip


def _start(ctx: common.Context, states) -> Carry:
  cfg = ctx.s.dpo
  # a copy: updates donate their input, and other stages may start from it
  state = jax.tree.map(jnp.copy, states["rl"])
  t0 = time.time()
  groups = rs.sample_groups(
    ctx,
    state.params,
    n=cfg.n,
    num_prompts=cfg.num_prompts,
    temperature=cfg.temperature,
    seed=SEED,
  )
  rejection.write(os.path.join(ctx.workdir, SAMPLES), groups)
  pairs = make_pairs(groups, cfg.ratio)
  if not pairs:
    raise config_lib.ConfigError(
      "dpo: no preference pairs (no prompt has a correct response with a "
      "longer wrong or a >= dpo.ratio x longer correct one among its "
      "samples); a stronger starting model, or more dpo.n / num_prompts"
    )
  pairs = reference_logps(ctx, state.params, pairs)
  _write_pairs(os.path.join(ctx.workdir, DATA), pairs)
  lens = np.array([(len(p[1]), len(p[2])) for p in pairs], np.float64)
  st = dict(
    rejection.stats(groups),
    pairs=float(len(pairs)),
    chosen_length=float(lens[:, 0].mean()),
    rejected_length=float(lens[:, 1].mean()),
    time=time.time() - t0,
  )
  ctx.writer.write("dpo", 0, {f"data/{k}": v for k, v in st.items()})
  state = train.reset_optimizer(state, tx=rs.optimizer(cfg.optim(ctx.s.optim)))
  return Carry(state, _dataset(ctx, pairs))


def _resume(ctx: common.Context, tree, host) -> Carry:
  del host
  pairs = _read_pairs(os.path.join(ctx.workdir, DATA))
  return Carry(tree["train"], _dataset(ctx, pairs))


def _step(ctx: common.Context, carry: Carry, i: int):
  """DPO step i on batch_size pairs."""
  t0 = time.time()
  cfg = ctx.s.dpo
  batch = sharding.shard_batch(
    data.process_slice(carry.ds[i]), ctx.mesh, local=True
  )
  state, m = train.dpo_step(
    carry.state,
    batch,
    model=ctx.s.model,
    tx=rs.optimizer(cfg.optim(ctx.s.optim)),
    cfg=cfg,
  )
  faults.point("dpo", i + 1, "update")
  m = sharding.gather(m)
  metrics = {k: float(v) for k, v in m.items()}
  metrics["step_time"] = time.time() - t0
  return Carry(state, carry.ds), metrics, (bool(m["skipped"]),)


STAGE = common.Stage(
  name="dpo",
  needs=("rl",),
  num_steps=lambda s: s.dpo.steps,
  save_every=lambda s: max(s.dpo.steps // 4, 1),
  start=_start,
  resume=_resume,
  step=_step,
  save=lambda carry: (dict(train=carry.state), {}),
  progress=lambda m: dict(loss=float(m["loss"]), acc=m["pair_accuracy"]),
)
