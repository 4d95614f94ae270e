"""The stage runner: tokenizer -> long-CoT SFT warm-up -> RL -> evaluation.

`run(config, workdir)` is what `python -m k15.main` calls and what notebooks
import. Stages (`config.stages`) run in order and each keeps its own
checkpoint directory under `workdir/ckpt/<stage>`:

  sft      supervised warm-up on the verified chain-of-thought traces;
  rl       the report's RL iterations (PAPER.md §1-3), from the SFT weights;
  control  continues SFT from the SFT weights for as many gradient steps as
           RL took (the "more imitation" control the RL result is judged
           against).

A rerun with the same workdir resumes: finished stages are skipped (their
evaluation results are read back from the checkpoint), an unfinished stage
continues from its newest checkpoint. Every random draw is derived from
(seed, stage, step), so a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from k15 import checkpoint as ckpt_lib
from k15 import (
  config_lib,
  curriculum,
  data,
  evaluate,
  faults,
  objective,
  rl,
  rollout,
  sharding,
  tasks,
  train,
)
from k15 import metrics as metrics_lib
from k15 import model as model_lib
from k15 import sampler as sampler_lib
from k15 import tokenizer as tokenizer_lib
from k15.rewards import reward_model as reward_model_lib

STAGES = ("sft", "rl", "control")
_STAGE_SEED = {"sft": 11, "rl": 22, "control": 33, "eval": 44}


# ---------------------------------------------------------------------------
# Config -> frozen settings
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  name: str = "arithmetic"
  min_steps: int = 2
  max_steps: int = 5
  ops: str = "+-*"
  num_sft: int = 256
  num_rl: int = 4096
  num_eval: int = 256
  sft_max_steps: int = 0  # > 0: warm-up traces only up to this difficulty
  max_operand: int = 9  # arithmetic: operands 1..max_operand
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: str = "sentencepiece"  # sentencepiece (trained for the task) | file
  vocab_size: int = 64
  path: str = ""  # kind=file: a .model or tokenizer.json


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int = 200
  batch_size: int = 32
  lr: float = 0.0  # > 0 overrides optim.lr for supervised stages
  eps: float = 0.0  # > 0 overrides optim.eps for supervised stages


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  k: int = 8  # samples per prompt
  prompts_per_iter: int = 32
  prompt_len: int = 32  # left-padded prompt bucket
  budget: int = 96  # new tokens per trajectory per iteration
  max_len: int = 128  # cache length (prompt + response)
  gen_rows: int = 256  # rows per sampler call
  # partial rollouts (PAPER.md §4): a trajectory cut by the budget continues
  # next iteration (else it is final, "cut by budget")
  partial: bool = False
  loss_segments: str = "all"  # all | current (only this policy's tokens)
  repeat_penalty: float = 0.0  # subtracted from the reward of REPEAT rows
  # > 0: continued trajectories are re-prefilled in blocks of this many rows
  # of their own, each at its own bucket (less left padding), and decoded
  # gen_rows at a time; 0: they share gen_rows calls with new prompts
  continue_rows: int = 0
  # > 1: dynamic sampling (not in the report; DAPO's): draw oversample x the
  # prompts, score every group, and train on prompts_per_iter groups, those
  # whose rewards differ first (a group whose k rewards are equal has zero
  # advantage under the mean baseline and moves nothing but the tau term).
  # Generation costs oversample x; the update, which dominates, does not.
  oversample: int = 1


@dataclasses.dataclass(frozen=True)
class LengthPenaltyConfig:
  schedule: str = "off"  # off | constant | linear
  weight: float = 0.0
  warmup: int = 0
  ramp: int = 0


@dataclasses.dataclass(frozen=True)
class RLConfig:
  iterations: int = 40
  loss: str = "mirror_descent"
  tau: float = 0.1
  baseline: str = "mean"  # mean (report) | logmeanexp
  normalize_length: bool = False
  clip_eps: float = 0.2
  kl_coef: float = 0.0
  num_minibatches: int = 4
  epochs: int = 1
  reset_optimizer: bool = True
  max_consecutive_skips: int = 5


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every config section as a frozen, validated dataclass."""

  seed: int
  stages: tuple[str, ...]
  task: TaskConfig
  tokenizer: TokenizerConfig
  model: model_lib.ModelConfig
  sampler: sampler_lib.SamplingConfig
  rollout: RolloutConfig
  rl: RLConfig
  length_penalty: LengthPenaltyConfig
  data: curriculum.SamplerConfig
  sft: SFTConfig
  optim: train.OptimConfig
  ckpt: ckpt_lib.CheckpointConfig
  eval: evaluate.EvalConfig
  mesh: dict[str, int]
  init: str = ""  # a Llama/Qwen2 safetensors dir to start from
  reward: reward_model_lib.RewardConfig = reward_model_lib.RewardConfig()

  @property
  def loss(self) -> objective.LossConfig:
    return objective.LossConfig(
        kind=self.rl.loss, tau=self.rl.tau,
        normalize_length=self.rl.normalize_length, clip_eps=self.rl.clip_eps,
        kl_coef=self.rl.kl_coef)

  @property
  def gen(self) -> rollout.GenConfig:
    r = self.rollout
    cont = (rollout.continue_buckets(r.prompt_len, r.budget, r.max_len)
            if r.partial else ())
    return rollout.GenConfig(rows=r.gen_rows, prompt_buckets=(r.prompt_len,),
                             budget=r.budget, cache_len=r.max_len,
                             continue_buckets=cont,
                             continue_rows=r.continue_rows)


_SECTIONS = {
    "task": TaskConfig, "tokenizer": TokenizerConfig,
    "model": model_lib.ModelConfig, "sampler": sampler_lib.SamplingConfig,
    "rollout": RolloutConfig, "rl": RLConfig,
    "length_penalty": LengthPenaltyConfig, "data": curriculum.SamplerConfig,
    "sft": SFTConfig, "optim": train.OptimConfig,
    "ckpt": ckpt_lib.CheckpointConfig, "eval": evaluate.EvalConfig,
    "reward": reward_model_lib.RewardConfig,
}


def settings(config: ml_collections.ConfigDict, *, vocab_size: int | None
             = None, num_devices: int | None = None) -> Settings:
  """Validates the whole config before any work; errors name the field.

  Raises config_lib.ConfigError (a ValueError)."""
  try:
    return _settings(config, vocab_size=vocab_size, num_devices=num_devices)
  except config_lib.ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise config_lib.ConfigError(msg) from e


def _settings(config, *, vocab_size, num_devices) -> Settings:
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  config_lib.check_keys(
      cfg, set(_SECTIONS) | {"seed", "stages", "mesh", "name", "init"},
      "config")
  out: dict[str, Any] = {}
  init = str(cfg.get("init", "") or "")
  for name, cls in _SECTIONS.items():
    section = dict(cfg.get(name) or {})
    if name == "model" and init:
      # the architecture comes from the checkpoint; the config keeps the
      # runtime fields (dtype, remat, attention kernel, max_len, ...)
      runtime = {k: v for k, v in section.items() if k in _RUNTIME_FIELDS}
      out[name] = _hf().config_from_hf(init, **runtime)
      continue
    if name == "model" and vocab_size is not None and not section.get(
        "vocab_size"):
      section["vocab_size"] = _round_up(vocab_size, 8)
    out[name] = config_lib.to_dataclass(cls, section, name)
  stages = cfg.get("stages", ("sft", "rl"))
  if isinstance(stages, str) or not isinstance(stages, (tuple, list)):
    raise TypeError(f"config field stages={stages!r} should be a tuple of "
                    f"stage names from {STAGES}")
  stages = tuple(stages)
  for s in stages:
    if s not in STAGES:
      raise ValueError(f"config: unknown stage {s!r} in config.stages "
                       f"(known: {STAGES})")
  mesh = dict(cfg.get("mesh") or {})
  for axis, n in mesh.items():
    if not isinstance(n, int) or isinstance(n, bool):
      raise TypeError(f"config field mesh.{axis}={n!r} should be int")
  seed = cfg.get("seed", 0)
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise TypeError(f"config field seed={seed!r} should be int")
  s = Settings(seed=seed, stages=stages, mesh=mesh,
               init=init, **out)
  _check_combinations(s, vocab_size, num_devices)
  return s


_RUNTIME_FIELDS = ("dtype", "param_dtype", "cache_dtype", "remat",
                   "attention", "attention_block", "logits_chunk", "max_len")


def _hf():
  from k15 import hf  # noqa: PLC0415 - safetensors only needed with init

  return hf


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# Fields that size loops, batches or divisors: 0 would divide by zero or
# silently do nothing.
_POSITIVE = ("rollout.k", "rollout.prompts_per_iter", "rollout.prompt_len",
             "rollout.oversample",
             "rollout.budget", "rollout.max_len", "rollout.gen_rows",
             "rl.num_minibatches", "rl.epochs", "rl.max_consecutive_skips",
             "sft.batch_size", "eval.num_samples")
_NON_NEGATIVE = ("rl.iterations", "sft.steps", "task.num_sft", "task.num_rl",
                 "task.num_eval", "rollout.continue_rows")


def _check_combinations(s: Settings, vocab_size, num_devices) -> None:
  if s.task.name not in tasks.TASKS:
    raise ValueError(f"config: task.name={s.task.name!r}; known tasks: "
                     f"{tasks.TASKS}")
  try:
    s.loss  # noqa: B018 - LossConfig validates rl.loss / rl.tau / clip...
  except ValueError as e:  # name the config field, not the dataclass's
    msg = str(e).replace("LossConfig.kind", "rl.loss")
    raise ValueError("config: " + msg.replace("LossConfig.", "rl.")) from e
  if s.rl.baseline not in objective.BASELINES:
    raise ValueError(f"config: rl.baseline={s.rl.baseline!r}; expected one "
                     f"of {objective.BASELINES}")
  if s.length_penalty.schedule not in objective.SCHEDULES:
    raise ValueError(
        f"config: length_penalty.schedule={s.length_penalty.schedule!r}; "
        f"expected one of {objective.SCHEDULES}")
  for names, low in ((_POSITIVE, 1), (_NON_NEGATIVE, 0)):
    for name in names:
      section, field = name.split(".")
      value = getattr(getattr(s, section), field)
      if value < low:
        raise ValueError(f"config: {name}={value} must be >= {low}")
  r = s.rollout
  if r.budget + r.prompt_len > r.max_len:
    raise ValueError(
        f"config: rollout.budget ({r.budget}) + rollout.prompt_len "
        f"({r.prompt_len}) exceeds rollout.max_len ({r.max_len})")
  if r.loss_segments not in ("all", "current"):
    raise ValueError(f"config: rollout.loss_segments={r.loss_segments!r}; "
                     "expected 'all' or 'current'")
  if r.repeat_penalty < 0:
    raise ValueError(f"config: rollout.repeat_penalty={r.repeat_penalty} "
                     "must be >= 0 (it is subtracted from the reward)")
  if r.max_len > s.model.max_len:
    raise ValueError(f"config: rollout.max_len ({r.max_len}) exceeds "
                     f"model.max_len ({s.model.max_len})")
  rows = r.k * r.prompts_per_iter
  if rows % s.rl.num_minibatches:
    raise ValueError(
        f"config: rollout.k * rollout.prompts_per_iter = {rows} is not "
        f"divisible by rl.num_minibatches ({s.rl.num_minibatches})")
  if vocab_size is not None and s.model.vocab_size < vocab_size:
    raise ValueError(f"config: model.vocab_size ({s.model.vocab_size}) is "
                     f"smaller than the tokenizer's {vocab_size}")
  if num_devices is not None:
    shape = sharding.mesh_shape(s.mesh, num_devices)
    div = shape["data"] * shape["fsdp"]
    for name, n in (("rl minibatch (rollout.k * prompts_per_iter / "
                     "rl.num_minibatches)", rows // s.rl.num_minibatches),
                    ("rollout.gen_rows", r.gen_rows),
                    ("rollout.continue_rows", r.continue_rows),
                    ("sft.batch_size", s.sft.batch_size)):
      if n % div:
        raise ValueError(f"config: {name} = {n} is not divisible by the "
                         f"mesh's data*fsdp = {div}")


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class _Preempted(Exception):
  pass


class Run:
  """Everything a stage needs; built once per `run` call."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    workdir = os.path.abspath(workdir)
    parent = os.path.dirname(workdir)
    if not os.path.isdir(parent):
      raise FileNotFoundError(
          f"--workdir {workdir}: parent directory {parent} does not exist")
    # Validate before anything is written or trained (the tokenizer's
    # vocabulary is checked once it exists).
    pre = settings(config, num_devices=jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.task = tasks.get(pre.task.name)
    self.tok = self._tokenizer(pre)
    self.s = settings(config, vocab_size=self.tok.vocab_size,
                      num_devices=jax.device_count())
    s = self.s
    self.mesh = sharding.make_mesh(s.mesh)
    self.problems = self.task.splits(
        seed=s.task.seed, num_sft=s.task.num_sft, num_rl=s.task.num_rl,
        num_eval=s.task.num_eval, min_steps=s.task.min_steps,
        max_steps=s.task.max_steps, ops=s.task.ops,
        sft_max_steps=s.task.sft_max_steps, max_operand=s.task.max_operand)
    self.tx = train.make_optimizer(s.optim)
    # sft and control: optim with sft.lr / sft.eps where given
    sft_optim = dataclasses.replace(
        s.optim, lr=s.sft.lr if s.sft.lr > 0 else s.optim.lr,
        eps=s.sft.eps if s.sft.eps > 0 else s.optim.eps)
    self.sft_tx = (self.tx if sft_optim == s.optim
                   else train.make_optimizer(sft_optim))
    self.writer = metrics_lib.MetricWriter(workdir)
    self.sampling = dataclasses.replace(
        s.sampler, stop_tokens=tuple(s.sampler.stop_tokens) or
        (_hf().eos_token_ids(s.init) if s.init else ()) or
        (self.tok.eos_id,))
    self.shard = lambda tree: sharding.shard_batch(tree, self.mesh)
    self.abstract = train.sharded_abstract_state(s.model, self.tx,
                                                 self.mesh)
    self.preempted = False
    self.results: dict[str, dict[str, float]] = {}

  def _tokenizer(self, s: Settings) -> tokenizer_lib.Tokenizer:
    if s.init and s.tokenizer.kind == "sentencepiece":
      return tokenizer_lib.load(s.init)  # the checkpoint's tokenizer.json
    if s.tokenizer.kind == "file":
      return tokenizer_lib.load(s.tokenizer.path)
    if s.tokenizer.kind != "sentencepiece":
      raise config_lib.ConfigError(
          f"config: tokenizer.kind={s.tokenizer.kind!r}; "
          "expected sentencepiece | file")
    path = os.path.join(self.workdir, "tokenizer.model")
    if os.path.exists(path):
      return tokenizer_lib.load(path)
    tok = tokenizer_lib.train_sentencepiece(
        self.task.tokenizer_corpus(), s.tokenizer.vocab_size,
        **getattr(self.task, "TOKENIZER", {}))
    if jax.process_index() == 0:
      tok.save(path)
    return tok

  def rng(self, stage: str, step: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(self.s.seed), _STAGE_SEED[stage])
    return jax.random.fold_in(key, step)

  def checkpointer(self, stage: str) -> ckpt_lib.Checkpointer:
    os.makedirs(os.path.join(self.workdir, "ckpt"), exist_ok=True)
    return ckpt_lib.Checkpointer(
        os.path.join(self.workdir, "ckpt", stage), self.s.ckpt)

  def evaluate(self, params, stage: str) -> dict[str, float]:
    return evaluate.evaluate(
        params, self.problems["eval"], self.rng("eval", 0), tok=self.tok,
        model=self.s.model, sampling=self.sampling, gen=self.s.gen,
        cfg=self.s.eval, verify=self.task.verify, shard_fn=self.shard)

  @functools.cached_property
  def reward_model(self) -> reward_model_lib.RewardModel | None:
    """The RM scoring RL rollouts (config.reward), loaded on first use;
    None when the task's rule verifier scores them."""
    return reward_model_lib.build(self.s.reward, mesh=self.mesh,
                                  rows=self.s.rollout.gen_rows)

  def sft_examples(self):
    return [data.encode_sft(self.tok, p.question, p.trace)
            for p in self.problems["sft"]]


def _install_sigterm(run: Run):
  """SIGTERM (preemption): finish the current step, checkpoint, exit 0."""

  def handler(signum, frame):
    del signum, frame
    run.preempted = True

  try:
    signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread (e.g. a notebook worker)
    pass


def _run_stages(r: Run) -> None:
  sft_state = None
  for stage in r.s.stages:
    if r.preempted:  # signalled during the previous stage's final eval
      raise _Preempted
    if stage == "sft":
      sft_state = run_sft_stage(r)
    elif stage == "rl":
      rl.run_rl_stage(r, sft_state)
    elif stage == "control":
      run_control_stage(r, sft_state)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every configured stage; returns the summary."""
  r = Run(config, workdir)
  _install_sigterm(r)
  logging.info("k15: %d params, mesh %s, stages %s",
               r.s.model.num_params(), dict(r.mesh.shape), r.s.stages)
  try:
    with sharding.mesh_context(r.mesh):
      _run_stages(r)
  except _Preempted:
    logging.warning("k15: preempted (SIGTERM); checkpoint saved, exiting")
    r.writer.close()
    return {"preempted": True}
  if r.preempted:
    logging.warning("k15: SIGTERM after the last stage; the run is complete")
  summary = write_summary(r)
  r.writer.close()
  return summary


def _host_state(stage: str, step: int, done: bool, r: Run,
                **extra) -> dict[str, Any]:
  return dict(stage=stage, step=int(step), done=bool(done),
              results=r.results, **extra)


def _save(ck: ckpt_lib.Checkpointer, step: int, tree, host) -> None:
  ck.save(step, tree, host)


def _periodic_save(r: Run, ck: ckpt_lib.Checkpointer, stage: str, step: int,
                   *, last: bool, every: int, tree, **host_extra) -> None:
  """Saves every `every` steps, and on SIGTERM (the next safe point) saves
  and stops the run. Never at the stage's last step: its evaluation and the
  final (done) checkpoint follow, and a step is written only once."""
  if last or not (step % every == 0 or r.preempted):
    return
  ck.save(step, tree, _host_state(stage, step, False, r, **host_extra))
  if r.preempted:
    ck.close()
    raise _Preempted


def _restore_or(r: Run, stage: str, ck: ckpt_lib.Checkpointer, extra_abs
                ) -> tuple[int, Any, dict] | None:
  """Restores {train, **extra} of `stage`, or None when it has none.

  Either way metrics.jsonl loses the records a killed run wrote past the
  point this run continues from (all of `stage`'s when it starts afresh),
  so the rerun writes each record exactly once.
  """
  out = ck.restore(dict(train=r.abstract, **extra_abs))
  if out is None:
    r.writer.truncate(stage, 0)
    return None
  step, tree, host = out
  r.results.update(host.get("results", {}))
  r.writer.truncate(stage, step + 1)
  logging.info("k15: %s resumes from step %d", stage, step)
  return step, tree, host


def _check_skips(stage: str, step: int, skips: int, limit: int, ck) -> None:
  """Stops the run after `limit` consecutive skipped (non-finite) updates."""
  if skips >= limit:
    ck.wait()
    raise FloatingPointError(
        f"{stage} step {step}: {skips} consecutive updates had a non-finite "
        f"loss or gradient (limit rl.max_consecutive_skips={limit}); "
        f"stopping. The last good checkpoint (step {ck.latest_step()}) in "
        f"{ck.directory} is intact; a rerun resumes from it.")


def _sft_loop(r: Run, stage: str, state, start: int, steps: int,
              ck: ckpt_lib.Checkpointer, seed_offset: int, every: int,
              skips: int = 0):
  """Supervised steps start..steps-1 (batch i is a pure function of i)."""
  s = r.s
  examples = r.sft_examples()
  longest = max(len(e[1]) for e in examples)
  ds = data.sft_dataset(
      examples, batch_size=s.sft.batch_size,
      prompt_len=s.rollout.prompt_len,
      response_len=min(_round_up(longest, 16),
                       s.rollout.max_len - s.rollout.prompt_len),
      pad_id=r.tok.pad_id, seed=s.seed + seed_offset)
  bar = metrics_lib.Progress(steps, stage, initial=start)
  t0 = time.time()
  for step in range(start, steps):
    # this process's rows only (multi-host: each host loads its share)
    batch = sharding.shard_batch(data.process_slice(ds[step]), r.mesh,
                                 local=True)
    state, m = train.sft_step(state, batch, model=s.model, tx=r.sft_tx)
    faults.point(stage, step + 1, "update")
    m = sharding.gather(m)
    skips = skips + 1 if m["skipped"] else 0
    dt = time.time() - t0
    t0 = time.time()
    r.writer.write(stage, step + 1, {**m, "step_time": dt,
                                     "tokens_per_s": m["tokens"] / dt})
    _check_skips(stage, step + 1, skips, s.rl.max_consecutive_skips, ck)
    bar.update(1, loss=float(m["loss"]))
    _periodic_save(r, ck, stage, step + 1, last=step + 1 == steps,
                   every=every, tree=dict(train=state), skips=skips)
  bar.close()
  return state


def run_sft_stage(r: Run):
  """Long-CoT warm-up; returns the final state (for rl and control)."""
  s = r.s
  ck = r.checkpointer("sft")
  restored = _restore_or(r, "sft", ck, {})
  if restored is not None and restored[2].get("done"):
    ck.close()
    return restored[1]["train"]
  if restored is None:
    if s.init:
      state = _load_init(r)
    else:
      state = train.init_state(jax.random.key(s.seed), model=s.model,
                               tx=r.tx, mesh=r.mesh)
    start, skips = 0, 0
  else:
    start, state = restored[0], restored[1]["train"]
    skips = restored[2].get("skips", 0)
  state = _sft_loop(r, "sft", state, start, s.sft.steps, ck, 0,
                    every=max(s.sft.steps // 4, 1), skips=skips)
  faults.point("sft", s.sft.steps, "eval")
  r.results["sft"] = r.evaluate(state.params, "sft")
  r.writer.write("eval", 0, {f"sft/{k}": v for k, v in
                             r.results["sft"].items()})
  _save(ck, s.sft.steps, dict(train=state),
        _host_state("sft", s.sft.steps, True, r))
  ck.close()
  logging.info("k15: after SFT %s", r.results["sft"])
  return state


def _load_init(r: Run):
  """A state whose params are an imported HF checkpoint's, placed straight
  into their shardings (no random init, no full copy on one device)."""
  params = _hf().import_params(r.s.init, model=r.s.model)
  shardings = jax.tree.map(lambda x: x.sharding, r.abstract)
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(r.sft_tx.init, out_shardings=shardings.opt_state)(
      params)
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=opt_state)


def _need_sft_state(r: Run, sft_state):
  if sft_state is not None:
    return sft_state
  ck = r.checkpointer("sft")
  out = ck.restore(dict(train=r.abstract))
  ck.close()
  if out is None or not out[2].get("done"):
    raise config_lib.ConfigError(
        "config: this stage starts from the SFT weights, but "
                     "the sft stage has not finished in this workdir; add "
                     "'sft' to config.stages")
  r.results.update(out[2].get("results", {}))
  return out[1]["train"]


def run_control_stage(r: Run, sft_state):
  """More SFT on the warm-up set, for as many steps as RL takes."""
  s = r.s
  steps = s.rl.iterations * s.rl.num_minibatches * s.rl.epochs
  ck = r.checkpointer("control")
  restored = _restore_or(r, "control", ck, {})
  if restored is not None and restored[2].get("done"):
    ck.close()
    return
  if restored is None:
    state, start, skips = _need_sft_state(r, sft_state), 0, 0
  else:
    start, state = restored[0], restored[1]["train"]
    skips = restored[2].get("skips", 0)
  state = _sft_loop(r, "control", state, start, steps, ck, 1,
                    every=max(steps // 4, 1), skips=skips)
  faults.point("control", steps, "eval")
  r.results["control"] = r.evaluate(state.params, "control")
  r.writer.write("eval", 0, {f"control/{k}": v for k, v in
                             r.results["control"].items()})
  _save(ck, steps, dict(train=state), _host_state("control", steps, True, r))
  ck.close()


def write_summary(r: Run) -> dict[str, Any]:
  res = r.results
  summary: dict[str, Any] = {"results": res}
  if "sft" in res and "rl" in res:
    summary["rl_minus_sft_pass1"] = res["rl"]["pass1"] - res["sft"]["pass1"]
  if "control" in res and "rl" in res:
    summary["rl_minus_control_pass1"] = (res["rl"]["pass1"]
                                         - res["control"]["pass1"])
  if jax.process_index() == 0:
    cols = ("pass1", "greedy_acc", "mean_length", "finished")
    table = metrics_lib.summary_table(
        {k: {c: v[c] for c in cols if c in v} for k, v in res.items()})
    deltas = "  ".join(f"{k}={v:+.3f}" for k, v in summary.items()
                       if k != "results")
    print(f"\n{table}\n{deltas}\n", flush=True)
    path = os.path.join(r.workdir, "summary.json")
    with open(path + ".tmp", "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
  return summary
