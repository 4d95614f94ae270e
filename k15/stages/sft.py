"""The long-CoT warm-up: supervised steps on the task's verified traces.

The `sft` stage starts from a random init (or `config.init`: another run's
stage, or an imported HF checkpoint) and minimises the NLL of the warm-up
traces' responses; the `control` stage (`stages.control`) continues it.
Batch i is a pure function of i (`data.sft_dataset`), so a resumed stage
draws what it would have.

With images in the problem set (`task.name="visual"`), a supervised
section's `image_share` sets the share of image rows in every batch: 0
(the `sft` default) is language-only, 1 images only (the tower warm-up,
`stages.tower`), in between a fixed mix (the joint SFT, `stages.joint`).
This module holds what all supervised stages share.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, ClassVar

import grain
import jax

from k15 import data, faults, sharding, train
from k15 import images as images_lib
from k15.stages import common


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """The `sft` section (also the control stage's batch and optimizer)."""

  SECTION: ClassVar[str] = "sft"
  steps: int = 200
  batch_size: int = 32
  lr: float = 0.0  # > 0 overrides optim.lr for supervised stages
  eps: float = 0.0  # > 0 overrides optim.eps for supervised stages
  image_share: float = 0.0  # rows of every batch that hold images

  def __post_init__(self):
    n = self.SECTION
    if self.steps < 0:
      raise ValueError(f"{n}.steps={self.steps} must be >= 0")
    if self.batch_size < 1:
      raise ValueError(f"{n}.batch_size={self.batch_size} must be >= 1")
    if not 0 <= self.image_share <= 1:
      raise ValueError(f"{n}.image_share={self.image_share} must be in "
                       "[0, 1]")  # fmt: skip

  def optim(self, optim: train.OptimConfig) -> train.OptimConfig:
    """`optim` with this section's lr / eps where given."""
    return optim.overridden(self.lr, self.eps)


@dataclasses.dataclass(frozen=True)
class Carry:
  state: train.TrainState
  ds: grain.MapDataset | data.MixedDataset  # batch i at ds[i]
  tx: Any = None  # the stage's optimizer (None: ctx.sft_tx)


def response_len(longest: int, rollout) -> int:
  """Columns of the supervised rows' responses: the longest trace rounded
  up to 16, at most what the rollout's rows hold (max_len - prompt_len)."""
  return min(-(-longest // 16) * 16, rollout.max_len - rollout.prompt_len)


def response_lens(rollout) -> tuple[int, ...]:
  """Every width `response_len` can give (the planner lists them)."""
  cap = rollout.max_len - rollout.prompt_len
  return tuple(sorted({response_len(n, rollout) for n in range(1, cap + 1)}))


def examples(ctx: common.Context) -> list[tuple]:
  """(prompt ids, response ids, images.Patches or None) per warm-up
  problem, its images expanded (`images.encode_prompt`)."""
  out = []
  for i, p in enumerate(ctx.problems["sft"]):
    prompt, patches = images_lib.encode_problem(
      ctx.tok, p, model=ctx.s.model, where=f"sft problem {i}")
    response = ctx.tok.encode(p.trace) + [ctx.tok.eos_id]
    out.append((prompt, response, patches))
  return out


def dataset(ctx: common.Context, seed_offset: int,
            cfg: SFTConfig | None = None):  # fmt: skip
  """Batch i of a supervised stage (`cfg`, default the sft section): the
  warm-up problems, `cfg.image_share` of every batch's rows with images."""
  s, tok = ctx.s, ctx.tok
  cfg = cfg or s.sft
  exs = examples(ctx)
  img = [e for e in exs if e[2] is not None]
  txt = [e for e in exs if e[2] is None]
  n_img = round(cfg.image_share * cfg.batch_size)
  parts = [(img, n_img, "image"), (txt, cfg.batch_size - n_img, "text")]
  parts = [p for p in parts if p[1]]
  for rows, _, what in parts:
    if not rows:
      raise ValueError(
        f"config: {cfg.SECTION}.image_share={cfg.image_share} needs "
        f"{what} rows, but the warm-up problems have none"
      )
  used = [e for rows, _, _ in parts for e in rows]
  longest = max(len(e[1]) for e in used)
  vis = s.model.vision if img and cfg.image_share > 0 else None
  made = [
    data.sft_dataset(
      rows,
      batch_size=n,
      prompt_len=s.rollout.prompt_len,
      response_len=response_len(longest, s.rollout),
      pad_id=tok.pad_id,
      seed=s.seed + seed_offset + 1000 * j,
      vision_cfg=vis,
    )
    for j, (rows, n, _) in enumerate(parts)
  ]
  return made[0] if len(made) == 1 else data.mixed_dataset(made)


def warmup(s) -> str:
  """The supervised stage RL and the control start from: the joint SFT
  when the run has one (`stages.joint`), else the warm-up."""
  return "joint" if "joint" in s.stages else "sft"


def optimizer(ctx: common.Context, cfg: SFTConfig,
              trainable: tuple[str, ...] = ()):  # fmt: skip
  """The optimizer of a supervised stage (cached: one object per config)."""
  return train.make_optimizer(cfg.optim(ctx.s.optim), trainable)


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
    carry.state, batch, model=ctx.s.model, tx=tx or carry.tx or ctx.sft_tx
  )
  faults.point(stage, i + 1, "update")
  m = sharding.gather(m)
  dt = time.time() - t0
  metrics = {**m, "step_time": dt, "tokens_per_s": m["tokens"] / dt}
  return dataclasses.replace(carry, state=state), metrics, (
    bool(m["skipped"]),
  )


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
