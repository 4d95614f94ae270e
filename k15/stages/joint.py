"""The joint SFT: every param trained on a text/image mix whose image share
of each batch is `joint.image_share` (the report raises it to 30%, App.
B.4), from the tower warm-up (`stages.tower`), or from `sft` without one.

Its result is what RL (`stages.rl`) and the control (`stages.control`)
start from when the run has this stage (`sft.warmup`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from k15 import train
from k15.stages import common, sft

SEED_OFFSET = 3  # its data order's stream (sft 0, control 1, tower 2)


@dataclasses.dataclass(frozen=True)
class JointConfig(sft.SFTConfig):
  """The `joint` section: a supervised stage over the whole mix."""

  SECTION: ClassVar[str] = "joint"
  image_share: float = 0.3


def needs(s) -> tuple[str, ...]:
  return ("tower",) if "tower" in s.stages else ("sft",)


def _tx(ctx: common.Context):
  return sft.optimizer(ctx, ctx.s.joint)


def _start(ctx: common.Context, states) -> sft.Carry:
  # a copy: updates donate their input, and the stage before may be needed
  state = jax.tree.map(jnp.copy, states[needs(ctx.s)[0]])
  state = train.reset_optimizer(state, tx=_tx(ctx))
  return sft.Carry(state, sft.dataset(ctx, SEED_OFFSET, ctx.s.joint), _tx(ctx))


STAGE = common.Stage(
  name="joint",
  needs=needs,
  num_steps=lambda s: s.joint.steps,
  save_every=lambda s: max(s.joint.steps // 4, 1),
  start=_start,
  resume=lambda ctx, tree, host: sft.Carry(
    tree["train"], sft.dataset(ctx, SEED_OFFSET, ctx.s.joint), _tx(ctx)
  ),
  step=functools.partial(sft.step, stage="joint"),
  save=sft.save,
  progress=sft.progress,
)
