"""Model merging (long2short, PAPER.md §6): the weights of a long-CoT and a
short-CoT model averaged, with no training.

  merge.models = ("LONG_DIR:rl", "SHORT_DIR:sft")   # k15.sources specs
  merge.alpha = 0.5                                 # the report's average

gives alpha * long + (1 - alpha) * short, parameter by parameter. The two
must share an architecture (and, to mean anything, an ancestor: the
long2short experiment fine-tunes the long model from the short one); the
first tensor that differs is named before any weight is read. The stage
takes no steps: it evaluates the merged weights and checkpoints them, so a
later stage or run can start from `DIR:merge`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

from k15 import sources, train
from k15.stages import common


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """The `merge` section."""

  models: tuple[str, ...] = ()  # two sources: DIR:stage[@step] | HF dir
  alpha: float = 0.5  # weight of models[0]; models[1] gets 1 - alpha

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"merge.alpha={self.alpha} must be in [0, 1]")
    if self.models and len(self.models) != 2:
      raise ValueError(
        f"merge.models={self.models!r}: give two sources, e.g. "
        "('LONG_DIR:rl', 'SHORT_DIR:sft')"
      )
    for i, spec in enumerate(self.models):
      sources.parse(spec, f"merge.models[{i}]")


def check_same_architecture(
  shapes: list[Mapping[str, tuple]], names: list[str]
) -> None:
  """Raises naming the first parameter whose shape or dtype differs
  between `shapes[0]` and another entry, or that only one of them has.
  `shapes[i]` maps parameter paths to (shape, dtype); `names[i]` says
  which model it is."""
  first = shapes[0]
  for other, name in zip(shapes[1:], names[1:], strict=True):
    for path in sorted(set(first) | set(other)):
      if path not in other or path not in first:
        has, lacks = (names[0], name) if path in first else (name, names[0])
        raise ValueError(
          f"merge: {has} has parameter {path} but {lacks} has not; the "
          "models must share an architecture"
        )
      if tuple(first[path]) != tuple(other[path]):
        raise ValueError(
          f"merge: {path} is {other[path]} (shape, dtype) in {name} but "
          f"{first[path]} in {names[0]}; the models must share an "
          "architecture"
        )


@jax.jit
def average(a, b, alpha):
  """alpha * a + (1 - alpha) * b, leaf by leaf (in each leaf's dtype)."""
  return jax.tree.map(
    lambda x, y: (alpha * x + (1.0 - alpha) * y).astype(x.dtype), a, b
  )


def _start(ctx: common.Context, states) -> train.TrainState:
  del states
  cfg = ctx.s.merge
  fields = [f"merge.models[{i}]" for i in range(len(cfg.models))]
  names = [f"{f} ({spec})" for f, spec in zip(fields, cfg.models, strict=True)]
  shapes = [
    sources.param_shapes(sources.parse(spec, f), f)
    for spec, f in zip(cfg.models, fields, strict=True)
  ]
  check_same_architecture(shapes, names)
  first, second = (
    common.source_state(ctx, spec, field=f)
    for spec, f in zip(cfg.models, fields, strict=True)
  )
  params = average(first.params, second.params, cfg.alpha)
  return first.replace(params=params)


STAGE = common.Stage(
  name="merge",
  needs=(),
  num_steps=lambda s: 0,
  save_every=lambda s: 1,
  start=_start,
  resume=lambda ctx, tree, host: tree["train"],
  step=lambda ctx, state, i: (state, {}, ()),  # never called: no steps
  save=lambda state: (dict(train=state), {}),
)
