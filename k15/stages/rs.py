"""Shortest rejection sampling (long2short, PAPER.md §6): sample the same
question n = 8 times from the starting model, keep the shortest correct
response, and SFT the model on those.

The stage starts from its need, `rl` (this workdir's, or config.init:
another run's DIR:stage, e.g. the long model's RL checkpoint or a merged
model). Before step 0 it samples `rs.n` responses for each of the first
`rs.num_prompts` RL prompts (each scored by the reward entry point), and
writes the groups to `workdir/data/rs.jsonl`, which a resumed stage reads
back; then `rs.steps` supervised steps on the shortest correct response of
every prompt that has one (`k15.rejection`). Batch i is a pure function
of i, as in the warm-up.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import grain
import jax
import jax.numpy as jnp

from k15 import config_lib, rejection, train
from k15.stages import common, sft

SEED = 33  # the rng stream of the stage's sampling
DATA = os.path.join("data", "rs.jsonl")  # under the workdir


@dataclasses.dataclass(frozen=True)
class RSConfig:
  """The `rs` section."""

  n: int = 8  # samples per prompt (the report's n)
  num_prompts: int = 0  # the first num_prompts RL prompts; 0 = all
  steps: int = 100
  batch_size: int = 32
  lr: float = 0.0  # > 0 overrides optim.lr
  eps: float = 0.0  # > 0 overrides optim.eps
  temperature: float = 1.0  # of the n samples

  def __post_init__(self):
    for name in ("n", "steps", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"rs.{name}={getattr(self, name)} must be >= 1")
    if self.num_prompts < 0:
      raise ValueError(f"rs.num_prompts={self.num_prompts} must be >= 0")
    if not self.temperature > 0:
      raise ValueError(f"rs.temperature={self.temperature} must be > 0")

  def optim(self, optim: train.OptimConfig) -> train.OptimConfig:
    return optim.overridden(self.lr, self.eps)


@functools.cache
def optimizer(cfg: train.OptimConfig):
  """One optimizer per config (a jit static argument: built once)."""
  return train.make_optimizer(cfg)


def sample_groups(
  ctx: common.Context, params, *, n: int, num_prompts: int,
  temperature: float, seed: int,
) -> list[rejection.Group]:  # fmt: skip
  """n scored samples for each of the first num_prompts (0: all) RL
  prompts, from `params` (rs and dpo share it)."""
  problems = ctx.problems["rl"]
  problems = problems[:num_prompts] if num_prompts else problems
  imaged = [i for i, p in enumerate(problems)
            if getattr(p, "image_paths", ()) or getattr(p, "images", ())]
  if imaged:  # rejection.sample prompts with the question's text only
    p = problems[imaged[0]]
    raise ValueError(
      f"rs / dpo: {len(imaged)} RL problems have images (first: "
      f"{getattr(p, 'where', '') or f'rl problem {imaged[0]}'}); the "
      "long2short sampling stages take text prompts only"
    )
  return rejection.sample(
    params,
    problems,
    ctx.rng(seed, 0),
    n=n,
    tok=ctx.tok,
    model=ctx.s.model,
    sampling=dataclasses.replace(ctx.sampling, temperature=temperature),
    gen=ctx.s.rollout.gen,
    pool=ctx.rewards,
    shard_fn=ctx.shard,
  )


def _dataset(ctx: common.Context, groups) -> grain.MapDataset:
  examples = rejection.shortest_correct(groups)
  if not examples:
    raise config_lib.ConfigError(
      "rs: no prompt has a correct response among its samples; nothing to "
      "train on (a stronger starting model, or more rs.n / rs.num_prompts)"
    )
  return sft.examples_dataset(ctx, examples, ctx.s.rs.batch_size, 2)


def _start(ctx: common.Context, states) -> sft.Carry:
  cfg = ctx.s.rs
  # a copy: updates donate their input, and other stages may start from it
  state = jax.tree.map(jnp.copy, states["rl"])
  t0 = time.time()
  groups = sample_groups(
    ctx,
    state.params,
    n=cfg.n,
    num_prompts=cfg.num_prompts,
    temperature=cfg.temperature,
    seed=SEED,
  )
  rejection.write(os.path.join(ctx.workdir, DATA), groups)
  st = dict(rejection.stats(groups), time=time.time() - t0)
  ctx.writer.write("rs", 0, {f"data/{k}": v for k, v in st.items()})
  state = train.reset_optimizer(state, tx=optimizer(cfg.optim(ctx.s.optim)))
  return sft.Carry(state, _dataset(ctx, groups))


def _resume(ctx: common.Context, tree, host) -> sft.Carry:
  del host
  groups = rejection.read(os.path.join(ctx.workdir, DATA))
  return sft.Carry(tree["train"], _dataset(ctx, groups))


def _step(ctx: common.Context, carry: sft.Carry, i: int):
  tx = optimizer(ctx.s.rs.optim(ctx.s.optim))
  return sft.step(ctx, carry, i, stage="rs", tx=tx)


STAGE = common.Stage(
  name="rs",
  needs=("rl",),
  num_steps=lambda s: s.rs.steps,
  save_every=lambda s: max(s.rs.steps // 4, 1),
  start=_start,
  resume=_resume,
  step=_step,
  save=sft.save,
  progress=sft.progress,
)
