"""The "more imitation" control: SFT continued from the warm-up weights for
as many gradient steps as RL takes (rl.iterations x rl.num_minibatches x
rl.epochs), the arm the RL result is judged against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from k15.stages import common, sft


def num_steps(s) -> int:
  return s.rl.iterations * s.rl.num_minibatches * s.rl.epochs


STAGE = common.Stage(
  name="control",
  needs=("sft",),
  num_steps=num_steps,
  save_every=lambda s: max(num_steps(s) // 4, 1),
  # a copy: updates donate their input, and rl starts from the warm-up too
  start=lambda ctx, states: sft.Carry(
    jax.tree.map(jnp.copy, states["sft"]), sft.dataset(ctx, 1)
  ),
  resume=lambda ctx, tree, host: sft.Carry(tree["train"], sft.dataset(ctx, 1)),
  step=functools.partial(sft.step, stage="control"),
  save=sft.save,
  progress=sft.progress,
)
