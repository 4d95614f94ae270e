"""The stage template: every stage of a run goes through `run_stage`.

  restore -> already done? -> resume or start -> loop (periodic save,
  SIGTERM preemption, fault points, the skipped-update guard) -> evaluate
  -> final save -> close.

A stage is a `Stage`: a name and a few plain functions over an explicit
carry (the loop's state: the train state and whatever else the stage
checkpoints or keeps between steps). Adding a stage is one module that
defines a `Stage` and one line in `k15.pipeline.STAGES`.

Each stage keeps its own checkpoint directory, `workdir/ckpt/<stage>`; a
rerun skips a finished stage (its evaluation results are read back from the
checkpoint) and continues an unfinished one from its newest step. Every
random draw is derived from (seed, stage, step), so a resumed run draws
what the uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from k15 import checkpoint as ckpt_lib
from k15 import config_lib, evaluate, faults, sharding, sources, train
from k15 import images as images_lib
from k15 import metrics as metrics_lib
from k15 import rewards as rewards_lib
from k15 import sampler as sampler_lib

EVAL_SEED = 44  # the rng stream of every stage's evaluation

Results = dict[str, dict[str, float]]  # stage -> evaluation metrics


class Preempted(Exception):
  """Raised once a SIGTERM'd run has saved; `pipeline.run` returns."""


class Preemption:
  """SIGTERM (preemption) sets `requested`; the running stage checkpoints
  at its next step and stops the run (exit 0, resumable)."""

  def __init__(self):
    self.requested = False

  def install(self) -> None:
    def handler(signum, frame):
      del signum, frame
      self.requested = True

    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker)
      pass


@dataclasses.dataclass(frozen=True)
class Context:
  """What every stage reads; built once per run (`pipeline.make_context`)
  and never changed. `s` is the run's `pipeline.Settings`."""

  workdir: str
  s: Any
  tok: Any  # tokenizer.Tokenizer
  task: Any  # the `task` section (tasks.TaskConfig)
  problems: Mapping[str, Sequence[Any]]  # sft / rl / eval problem sets
  mesh: jax.sharding.Mesh
  tx: Any  # the RL optimizer (optim)
  sft_tx: Any  # the supervised stages' (optim with sft.lr / sft.eps)
  sampling: sampler_lib.SamplingConfig  # stop tokens filled in
  abstract: train.TrainState  # sharded ShapeDtypeStructs: restore target
  writer: metrics_lib.MetricWriter
  # every reward backend (`rewards.score`): the tasks' verifiers, math,
  # code, and config.reward's RM; closed when the run ends
  rewards: rewards_lib.RewardPool
  preemption: Preemption = dataclasses.field(default_factory=Preemption)
  # (split, index) -> prompt(split, index); filled on first use
  prompts: dict = dataclasses.field(default_factory=dict)

  def prompt(self, split: str, i: int
             ) -> tuple[list[int], images_lib.Patches | None]:  # fmt: skip
    """Problem i of `split`: its prompt ids under the chat template, each
    image marker expanded to its patches' placeholders, and the patches
    (None for a text problem). Cached: RL asks again for every segment;
    a prompt file's images (`jsonl.Problem.image_paths`, read lazily) are
    cut into patches again from the image cache at each ask, so this cache
    never holds every RL prompt's pixels."""
    p = self.problems[split][i]
    where = f"{split} problem {i}"
    if (split, i) not in self.prompts:
      ids, patches = images_lib.encode_problem(self.tok, p, model=self.s.model,
                                               where=where)  # fmt: skip
      lazy = bool(getattr(p, "image_paths", ()))
      self.prompts[split, i] = ids, None if lazy else patches
      return ids, patches
    ids, patches = self.prompts[split, i]
    if patches is None and getattr(p, "image_paths", ()):
      patches = images_lib.patches_of(p.images, self.s.model.vision,
                                      p.where or where)  # fmt: skip
    return ids, patches

  def rng(self, seed: int, step: int) -> jax.Array:
    """The key of (run seed, stream `seed`, step): a resumed run draws what
    the uninterrupted run drew."""
    key = jax.random.fold_in(jax.random.key(self.s.seed), seed)
    return jax.random.fold_in(key, step)

  def shard(self, tree):
    return sharding.shard_batch(tree, self.mesh)

  def checkpointer(self, stage: str) -> ckpt_lib.Checkpointer:
    os.makedirs(os.path.join(self.workdir, "ckpt"), exist_ok=True)
    return ckpt_lib.Checkpointer(
      os.path.join(self.workdir, "ckpt", stage), self.s.ckpt
    )

  def evaluate(self, params, max_problems: int | None = None
               ) -> dict[str, float]:  # fmt: skip
    """Held-out metrics (`evaluate.evaluate`), the same draws every call;
    `max_problems`: only the first ones (the RL stage's periodic eval)."""
    cfg = self.s.eval
    if max_problems:
      cfg = dataclasses.replace(cfg, max_problems=min(
        max_problems, cfg.max_problems or max_problems))  # fmt: skip
    return evaluate.evaluate(
      params,
      self.problems["eval"],
      self.rng(EVAL_SEED, 0),
      tok=self.tok,
      model=self.s.model,
      sampling=self.sampling,
      gen=self.s.rollout.gen,
      cfg=cfg,
      pool=self.rewards,
      shard_fn=self.shard,
    )


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage as `run_stage` runs it; `C` below is the stage's own carry.

  needs: stages whose final train state `start` receives (loaded from
    their checkpoints when they ran in an earlier process); a tuple, or a
    function of the settings that gives one (a stage that continues
    whichever warm-up the run has). A need that config.stages does not
    list comes from config.init when that is set (another run's
    DIR:stage[@step], or an HF directory): the source's params with a
    fresh optimizer state at step 0.
  num_steps(settings), save_every(settings): the loop's length and how
    often it checkpoints (steps are 1-based in metrics and checkpoints).
  start(ctx, states) -> C: the carry at step 0; `states` maps each need
    to its train state.
  resume(ctx, tree, host) -> C: the carry from a checkpoint's arrays and
    host (JSON) items.
  step(ctx, C, i) -> (C, metrics, skipped): step i (0-based); `skipped`
    flags each optimizer update it made (non-finite, not applied).
  save(C) -> (tree, host): what is checkpointed; tree["train"] is the
    train state (evaluated and handed to later stages), host is JSON.
  abstract(ctx) -> dict: restore targets of tree's items besides "train".
  progress(metrics) -> dict: the progress bar's fields.
  """

  name: str
  needs: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
  num_steps: Callable[[Any], int]
  save_every: Callable[[Any], int]
  start: Callable[[Context, dict[str, train.TrainState]], Any]
  resume: Callable[[Context, dict, dict], Any]
  step: Callable[[Context, Any, int], tuple[Any, dict, Sequence[bool]]]
  save: Callable[[Any], tuple[dict, dict]]
  abstract: Callable[[Context], dict] = lambda ctx: {}
  progress: Callable[[dict], dict] = lambda metrics: {}


@dataclasses.dataclass(frozen=True)
class Outcome:
  state: train.TrainState  # the stage's final train state
  results: Results  # every stage's evaluation so far, this one's included


def run_stage(
  ctx: Context,
  stage: Stage,
  states: Mapping[str, train.TrainState],
  results: Results,
) -> Outcome:
  """Runs (or resumes, or reads back) one stage; see the module doc.

  `states` holds the final train states of the stages that ran earlier in
  this process, `results` their evaluations. Raises `Preempted` after a
  SIGTERM'd run has saved.
  """
  name, n = stage.name, stage.num_steps(ctx.s)
  ck = ctx.checkpointer(name)
  restored = _restore(ctx, name, ck, stage.abstract(ctx))
  if restored is None:
    needed = {}
    needs = stage.needs(ctx.s) if callable(stage.needs) else stage.needs
    for need in needs:
      needed[need], results = needed_state(ctx, need, states, results)
    carry, start, skips = stage.start(ctx, needed), 0, 0
  else:
    start, tree, host = restored
    results = {**results, **host.get("results", {})}
    if host.get("done"):
      ck.close()
      return Outcome(tree["train"], results)
    carry, skips = stage.resume(ctx, tree, host), host.get("skips", 0)
  carry, skips = _loop(ctx, stage, ck, carry, start, skips, results)
  faults.point(name, n, "eval")
  tree, host = stage.save(carry)
  results = {**results, name: ctx.evaluate(tree["train"].params)}
  ctx.writer.write("eval", 0, {f"{name}/{k}": v for k, v in
                               results[name].items()})  # fmt: skip
  ck.save(n, tree, _host(name, n, True, results, skips, host))
  ck.close()
  logging.info("k15: after %s %s", name, results[name])
  return Outcome(tree["train"], results)


def _loop(ctx, stage, ck, carry, start, skips, results):
  """Steps start..n-1: metrics, the skip guard, periodic and SIGTERM saves
  (never at the last step: evaluation and the final save follow, and a
  step is written only once)."""
  name, n = stage.name, stage.num_steps(ctx.s)
  every = stage.save_every(ctx.s)
  bar = metrics_lib.Progress(n, name, initial=start)
  for i in range(start, n):
    carry, m, skipped = stage.step(ctx, carry, i)
    ctx.writer.write(name, i + 1, m)
    for s in skipped:
      skips = skips + 1 if s else 0
    _check_skips(name, i + 1, skips, ctx.s.rl.max_consecutive_skips, ck)
    bar.update(1, **stage.progress(m))
    stop = ctx.preemption.requested
    if i + 1 < n and ((i + 1) % every == 0 or stop):
      tree, host = stage.save(carry)
      ck.save(i + 1, tree, _host(name, i + 1, False, results, skips, host))
      if stop:
        ck.close()
        raise Preempted
  bar.close()
  return carry, skips


def _host(stage, step, done, results, skips, extra) -> dict[str, Any]:
  return dict(stage=stage, step=int(step), done=bool(done), results=results,
              skips=int(skips), **extra)  # fmt: skip


def _restore(ctx: Context, stage: str, ck, extra: dict):
  """(step, {train, **extra}, host) of `stage`'s newest checkpoint, or None.

  Either way metrics.jsonl loses the records a killed run wrote past the
  point this run continues from (all of `stage`'s when it starts afresh),
  so the rerun writes each record exactly once.
  """
  out = ck.restore(dict(train=ctx.abstract, **extra))
  if out is None:
    ctx.writer.truncate(stage, 0)
    return None
  step = out[0]
  ctx.writer.truncate(stage, step + 1)
  logging.info("k15: %s resumes from step %d", stage, step)
  return out


def needed_state(ctx: Context, need: str, states, results):
  """`need`'s final train state: from this process, config.init (when the
  run does not list `need`), or this workdir's checkpoint."""
  if need in states:
    return states[need], results
  if ctx.s.init and need not in ctx.s.stages:
    return source_state(ctx, ctx.s.init), results
  ck = ctx.checkpointer(need)
  out = ck.restore(dict(train=ctx.abstract))
  ck.close()
  if out is None or not out[2].get("done"):
    raise config_lib.ConfigError(
      f"config: this stage starts from the {need} stage's weights, but "
      f"{need} has not finished in this workdir; add '{need}' to "
      "config.stages, or start from another run: config.init=DIR:stage"
    )
  return out[1]["train"], {**results, **out[2].get("results", {})}


def source_state(
  ctx: Context, spec: str, *, field: str = "init", tx=None
) -> train.TrainState:
  """A train state at step 0 whose params are the source `spec`'s
  (`k15.sources`: DIR:stage[@step] or an HF directory), placed straight
  into their shardings, with a fresh state of `tx` (default ctx.tx)."""
  src = sources.parse(spec, field)
  shardings = jax.tree.map(lambda x: x.sharding, ctx.abstract)
  params = sources.load_params(
    src, model=ctx.s.model, abstract_params=ctx.abstract.params, field=field
  )
  tx = ctx.tx if tx is None else tx
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state
  )


def _check_skips(stage: str, step: int, skips: int, limit: int, ck) -> None:
  """Stops the run after `limit` consecutive skipped (non-finite) updates."""
  if skips >= limit:
    ck.wait()
    raise FloatingPointError(
      f"{stage} step {step}: {skips} consecutive updates had a non-finite "
      f"loss or gradient (limit rl.max_consecutive_skips={limit}); "
      f"stopping. The last good checkpoint (step {ck.latest_step()}) in "
      f"{ck.directory} is intact; a rerun resumes from it."
    )
