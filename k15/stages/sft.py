"""The long-CoT warm-up: supervised steps on the task's verified traces.

The `sft` stage starts from a random init (or `config.init`: another run's
stage, or an imported HF checkpoint) and minimises the NLL of the warm-up
traces' responses; the `control` stage (`stages.control`) continues it.
Batch i is a pure function of i (`data.sft_dataset`), so a resumed stage
draws what it would have.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import grain
import jax

from k15 import data, faults, sharding, train
from k15.stages import common


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """The `sft` section (also the control stage's batch and optimizer)."""

  steps: int = 200
  batch_size: int = 32
  lr: float = 0.0  # > 0 overrides optim.lr for supervised stages
  eps: float = 0.0  # > 0 overrides optim.eps for supervised stages

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"sft.steps={self.steps} must be >= 0")
    if self.batch_size < 1:
      raise ValueError(f"sft.batch_size={self.batch_size} must be >= 1")

  def optim(self, optim: train.OptimConfig) -> train.OptimConfig:
    """`optim` with this section's lr / eps where given."""
    return dataclasses.replace(
      optim,
      lr=self.lr if self.lr > 0 else optim.lr,
      eps=self.eps if self.eps > 0 else optim.eps,
    )


@dataclasses.dataclass(frozen=True)
class Carry:
  state: train.TrainState
  ds: grain.MapDataset  # batch i at ds[i]


def response_len(longest: int, rollout) -> int:
  """Columns of the supervised rows' responses: the longest trace rounded
  up to 16, at most what the rollout's rows hold (max_len - prompt_len)."""
  return min(-(-longest // 16) * 16, rollout.max_len - rollout.prompt_len)


def response_lens(rollout) -> tuple[int, ...]:
  """Every width `response_len` can give (the planner lists them)."""
  cap = rollout.max_len - rollout.prompt_len
  return tuple(sorted({response_len(n, rollout) for n in range(1, cap + 1)}))


def dataset(ctx: common.Context, seed_offset: int) -> grain.MapDataset:
  """The warm-up traces' batches (sft.batch_size rows)."""
  examples = [
    data.encode_sft(ctx.tok, p.question, p.trace) for p in ctx.problems["sft"]
  ]
  return examples_dataset(ctx, examples, ctx.s.sft.batch_size, seed_offset)


def examples_dataset(
  ctx: common.Context, examples, batch_size: int, seed_offset: int
) -> grain.MapDataset:
  """Batches of (prompt ids, response ids) examples, reshuffled per epoch;
  the response columns fit the longest (`response_len`)."""
  longest = max(len(e[1]) for e in examples)
  return data.sft_dataset(
    examples,
    batch_size=batch_size,
    prompt_len=ctx.s.rollout.prompt_len,
    response_len=response_len(longest, ctx.s.rollout),
    pad_id=ctx.tok.pad_id,
    seed=ctx.s.seed + seed_offset,
  )


def step(ctx: common.Context, carry: Carry, i: int, *, stage: str, tx=None):
  """Supervised step i of `stage` (sft, control, or rs with its own `tx`;
  default ctx.sft_tx)."""
  t0 = time.time()
  # this process's rows only (multi-host: each host loads its share)
  batch = sharding.shard_batch(
    data.process_slice(carry.ds[i]), ctx.mesh, local=True
  )
  state, m = train.sft_step(
    carry.state, batch, model=ctx.s.model, tx=tx or ctx.sft_tx
  )
  faults.point(stage, i + 1, "update")
  m = sharding.gather(m)
  dt = time.time() - t0
  metrics = {**m, "step_time": dt, "tokens_per_s": m["tokens"] / dt}
  return Carry(state, carry.ds), metrics, (bool(m["skipped"]),)


def save(carry: Carry) -> tuple[dict, dict]:
  return dict(train=carry.state), {}


def progress(m: dict) -> dict:
  return dict(loss=float(m["loss"]))


def _start(ctx: common.Context, states) -> Carry:
  del states
  s = ctx.s
  if s.init:  # another run's stage or an HF checkpoint (k15.sources)
    state = common.source_state(ctx, s.init, tx=ctx.sft_tx)
  else:
    state = train.init_state(
      jax.random.key(s.seed), model=s.model, tx=ctx.tx, mesh=ctx.mesh
    )
  return Carry(state, dataset(ctx, 0))


STAGE = common.Stage(
  name="sft",
  needs=(),
  num_steps=lambda s: s.sft.steps,
  save_every=lambda s: max(s.sft.steps // 4, 1),
  start=_start,
  resume=lambda ctx, tree, host: Carry(tree["train"], dataset(ctx, 0)),
  step=functools.partial(step, stage="sft"),
  save=save,
  progress=progress,
)
