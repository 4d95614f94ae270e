"""The tower warm-up: the vision tower and projector trained on image rows
with the language model frozen (report App. B.4, PAPER.md §7).

It starts from the language-only warm-up (`sft`) and trains only the
params under `TRAINABLE` (an optimizer mask, `train.make_optimizer`): the
LM stays bitwise what `sft` left. With `model.vision.init`, the tower
starts from an imported SigLIP checkpoint (`k15.hf_vision`) instead of its
random init. The joint SFT (`stages.joint`) then unfreezes everything.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from k15 import train
from k15.stages import common, sft

TRAINABLE = ("vision", "projector")
SEED_OFFSET = 2  # its data order's stream (sft 0, control 1, joint 3)


@dataclasses.dataclass(frozen=True)
class TowerConfig(sft.SFTConfig):
  """The `tower` section: a supervised stage on image rows only."""

  SECTION: ClassVar[str] = "tower"
  image_share: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if self.image_share != 1.0:
      raise ValueError(
        f"tower.image_share={self.image_share}: the tower trains on image "
        "rows only (the LM is frozen); leave it at 1"
      )


def _tx(ctx: common.Context):
  return sft.optimizer(ctx, ctx.s.tower, TRAINABLE)


def _start(ctx: common.Context, states) -> sft.Carry:
  # a copy: updates donate their input, and later stages need sft too
  state = jax.tree.map(jnp.copy, states["sft"])
  if ctx.s.model.vision.init:
    state = _load_tower(ctx, state)
  state = train.reset_optimizer(state, tx=_tx(ctx))
  return sft.Carry(state, sft.dataset(ctx, SEED_OFFSET, ctx.s.tower), _tx(ctx))


def _load_tower(ctx: common.Context, state) -> train.TrainState:
  from k15 import hf_vision  # noqa: PLC0415 - safetensors only needed here

  tower = hf_vision.import_tower(ctx.s.model.vision.init,
                                 model=ctx.s.model)  # fmt: skip
  shardings = jax.tree.map(lambda x: x.sharding, ctx.abstract.params)
  params = dict(state.params["params"])
  params["vision"] = jax.device_put(tower, shardings["params"]["vision"])
  return state.replace(params={"params": params})


STAGE = common.Stage(
  name="tower",
  needs=("sft",),
  num_steps=lambda s: s.tower.steps,
  save_every=lambda s: max(s.tower.steps // 4, 1),
  start=_start,
  resume=lambda ctx, tree, host: sft.Carry(
    tree["train"], sft.dataset(ctx, SEED_OFFSET, ctx.s.tower), _tx(ctx)
  ),
  step=functools.partial(sft.step, stage="tower"),
  save=sft.save,
  progress=sft.progress,
)
