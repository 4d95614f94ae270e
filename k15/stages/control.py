"""The "more imitation" control: supervised training continued from the
warm-up weights (the joint SFT's, when the run has one: `sft.warmup`) for
as many gradient steps as RL takes (rl.iterations x rl.num_minibatches x
rl.epochs), on that warm-up's data and optimizer: the arm the RL result is
judged against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from k15.stages import common, sft


def num_steps(s) -> int:
  return s.rl.iterations * s.rl.num_minibatches * s.rl.epochs


def _carry(ctx: common.Context, state) -> sft.Carry:
  cfg = getattr(ctx.s, sft.warmup(ctx.s))  # its section: sft or joint
  return sft.Carry(state, sft.dataset(ctx, 1, cfg), sft.optimizer(ctx, cfg))


STAGE = common.Stage(
  name="control",
  needs=lambda s: (sft.warmup(s),),
  num_steps=num_steps,
  save_every=lambda s: max(num_steps(s) // 4, 1),
  # a copy: updates donate their input, and rl starts from the warm-up too
  start=lambda ctx, states: _carry(
    ctx, jax.tree.map(jnp.copy, states[sft.warmup(ctx.s)])
  ),
  resume=lambda ctx, tree, host: _carry(ctx, tree["train"]),
  step=functools.partial(sft.step, stage="control"),
  save=sft.save,
  progress=sft.progress,
)
