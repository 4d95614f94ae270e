"""The run: tokenizer -> long-CoT SFT warm-up -> RL -> evaluation.

`run(config, workdir)` is what `python -m k15.main` calls and what notebooks
import. Stages (`config.stages`, names from `STAGES`) run in order through
the template of `k15.stages.common`, each keeping its own checkpoint
directory under `workdir/ckpt/<stage>`:

  sft      supervised warm-up on the verified chain-of-thought traces;
  rl       the report's RL iterations (PAPER.md §1-3), from the SFT weights;
  control  continues SFT from the SFT weights for as many gradient steps as
           RL took (the "more imitation" control the RL result is judged
           against).

With a vision tower (`model.vision`) and image problems (`task.name=
"visual"`), the report's phases (App. B.4) go between the warm-up and RL:

  tower    the tower + projector trained on image rows, the LM frozen;
  joint    everything trained on the text/image mix (`joint.image_share`);
           rl and control then start from (and control continues) it.

A rerun with the same workdir resumes: finished stages are skipped (their
evaluation results are read back from the checkpoint), an unfinished stage
continues from its newest checkpoint. Every random draw is derived from
(seed, stage, step), so a resumed run draws what the uninterrupted run drew.

`settings(config)` validates the whole config first: each section's
dataclass (beside the code that uses it) checks its own fields, naming the
config path (`rl.tau`); this module checks what spans sections.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections

from k15 import checkpoint as ckpt_lib
from k15 import (
  config_lib,
  curriculum,
  evaluate,
  objective,
  rollout,
  sharding,
  tasks,
  train,
)
from k15 import metrics as metrics_lib
from k15 import model as model_lib
from k15 import rewards as rewards_lib
from k15 import rm as rm_lib
from k15 import sampler as sampler_lib
from k15 import tokenizer as tokenizer_lib
from k15.stages import common, control, joint, rl, sft, tower

# Every stage `config.stages` may name; a new stage is one module under
# k15/stages/ and one line here.
STAGES: dict[str, common.Stage] = {
  "sft": sft.STAGE,
  "tower": tower.STAGE,
  "joint": joint.STAGE,
  "rl": rl.STAGE,
  "control": control.STAGE,
}


# ---------------------------------------------------------------------------
# Config -> frozen settings
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every config section as a frozen, validated dataclass."""

  seed: int
  stages: tuple[str, ...]
  task: tasks.TaskConfig
  tokenizer: tokenizer_lib.TokenizerConfig
  model: model_lib.ModelConfig
  sampler: sampler_lib.SamplingConfig
  rollout: rollout.RolloutConfig
  rl: rl.RLConfig
  length_penalty: objective.LengthPenaltyConfig
  data: curriculum.SamplerConfig
  sft: sft.SFTConfig
  optim: train.OptimConfig
  ckpt: ckpt_lib.CheckpointConfig
  eval: evaluate.EvalConfig
  mesh: dict[str, int]
  init: str = ""  # a Llama/Qwen2 safetensors dir to start from
  reward: rm_lib.RewardConfig = rm_lib.RewardConfig()
  tower: tower.TowerConfig = tower.TowerConfig()
  joint: joint.JointConfig = joint.JointConfig()


_SECTIONS = {
  "task": tasks.TaskConfig,
  "tokenizer": tokenizer_lib.TokenizerConfig,
  "model": model_lib.ModelConfig,
  "sampler": sampler_lib.SamplingConfig,
  "rollout": rollout.RolloutConfig,
  "rl": rl.RLConfig,
  "length_penalty": objective.LengthPenaltyConfig,
  "data": curriculum.SamplerConfig,
  "sft": sft.SFTConfig,
  "optim": train.OptimConfig,
  "ckpt": ckpt_lib.CheckpointConfig,
  "eval": evaluate.EvalConfig,
  "reward": rm_lib.RewardConfig,
  "tower": tower.TowerConfig,
  "joint": joint.JointConfig,
}
# with config.init the architecture comes from the checkpoint; the config
# keeps the runtime fields
_RUNTIME_FIELDS = ("dtype", "param_dtype", "cache_dtype", "remat",
                   "attention", "attention_block", "logits_chunk",
                   "max_len")  # fmt: skip


def settings(
  config: ml_collections.ConfigDict,
  *,
  vocab_size: int | None = None,
  num_devices: int | None = None,
) -> Settings:
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
    cfg,
    set(_SECTIONS) | {"seed", "stages", "mesh", "name", "init", "targets"},
    "config",
  )
  out: dict[str, Any] = {}
  init = str(cfg.get("init", "") or "")
  for name, cls in _SECTIONS.items():
    section = dict(cfg.get(name) or {})
    if name == "model" and init:
      runtime = {k: v for k, v in section.items() if k in _RUNTIME_FIELDS}
      out[name] = _hf().config_from_hf(init, **runtime)
      continue
    if (
      name == "model"
      and vocab_size is not None
      and not section.get("vocab_size")
    ):
      # a tower's placeholder takes the last id: keep it free of pieces
      extra = 1 if section.get("vision") else 0
      section["vocab_size"] = -(-(vocab_size + extra) // 8) * 8
    out[name] = config_lib.to_dataclass(cls, section, name)
  stages = cfg.get("stages", ("sft", "rl"))
  if isinstance(stages, str) or not isinstance(stages, (tuple, list)):
    raise TypeError(
      f"config field stages={stages!r} should be a tuple of stage names "
      f"from {tuple(STAGES)}"
    )
  for stage in stages:
    if stage not in STAGES:
      raise ValueError(
        f"config: unknown stage {stage!r} in config.stages (known: "
        f"{tuple(STAGES)})"
      )
  mesh = dict(cfg.get("mesh") or {})
  for axis, n in mesh.items():
    if not isinstance(n, int) or isinstance(n, bool):
      raise TypeError(f"config field mesh.{axis}={n!r} should be int")
  seed = cfg.get("seed", 0)
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise TypeError(f"config field seed={seed!r} should be int")
  s = Settings(seed=seed, stages=tuple(stages), mesh=mesh, init=init, **out)
  _check_across_sections(s, vocab_size, num_devices)
  return s


def _hf():
  from k15 import hf  # noqa: PLC0415 - safetensors only needed with init

  return hf


def _check_across_sections(s: Settings, vocab_size, num_devices) -> None:
  """What no single section can check (each checks its own fields)."""
  r = s.rollout
  if r.max_len > s.model.max_len:
    raise ValueError(
      f"config: rollout.max_len ({r.max_len}) exceeds model.max_len "
      f"({s.model.max_len})"
    )
  rows = r.k * r.prompts_per_iter
  if rows % s.rl.num_minibatches:
    raise ValueError(
      f"config: rollout.k * rollout.prompts_per_iter = {rows} is not "
      f"divisible by rl.num_minibatches ({s.rl.num_minibatches})"
    )
  if vocab_size is not None and s.model.vocab_size < vocab_size:
    raise ValueError(
      f"config: model.vocab_size ({s.model.vocab_size}) is smaller than the "
      f"tokenizer's {vocab_size}"
    )
  _check_vision(s, vocab_size)
  if num_devices is None:
    return
  shape = sharding.mesh_shape(s.mesh, num_devices)
  div = shape["data"] * shape["fsdp"]
  for name, n in (
    ("rl minibatch (rollout.k * prompts_per_iter / rl.num_minibatches)",
     rl.minibatch_rows(s)),
    ("rollout.gen_rows", r.gen_rows),
    ("rollout.continue_rows", r.continue_rows),
    ("sft.batch_size", s.sft.batch_size),
    ("tower.batch_size", s.tower.batch_size),
    ("joint.batch_size", s.joint.batch_size),
  ):  # fmt: skip
    if n % div:
      raise ValueError(
        f"config: {name} = {n} is not divisible by the mesh's data*fsdp = {div}"
      )


def _check_vision(s: Settings, vocab_size) -> None:
  """A tower where the stages or the task need one; its placeholder id
  free of the tokenizer's pieces."""
  v = s.model.vision
  need = [st for st in s.stages if st in ("tower", "joint")]
  if s.task.name == "visual" and set(s.task.visual.tasks if s.task.visual
                                     else ("rendered",)) - {"arith"}:
    need.append("task.name='visual' (image problems)")
  if v is None and need:
    raise ValueError(
      f"config: {need[0]} needs a vision tower; set model.vision"
    )
  if v is not None and not s.init and vocab_size is not None and (
    s.model.image_token < vocab_size
  ):
    raise ValueError(
      f"config: the image placeholder id {s.model.image_token} "
      f"(model.vision.image_token) is one of the tokenizer's {vocab_size} "
      "pieces; leave it at -1 (the last id of a model.vocab_size above "
      "the tokenizer's)"
    )


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def make_context(
  config: ml_collections.ConfigDict, workdir: str
) -> common.Context:
  """Validates the config, then builds what every stage reads: the
  tokenizer (trained into workdir on first use), problems, mesh,
  optimizers, metric writer."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise FileNotFoundError(
      f"--workdir {workdir}: parent directory {parent} does not exist"
    )
  # Validate before anything is written or trained (the tokenizer's
  # vocabulary is checked once it exists).
  pre = settings(config, num_devices=jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  task = tasks.get(pre.task.name)
  tok = _tokenizer(pre, task, workdir)
  s = settings(
    config, vocab_size=tok.vocab_size, num_devices=jax.device_count()
  )
  mesh = sharding.make_mesh(s.mesh)
  tx = train.make_optimizer(s.optim)
  sft_optim = s.sft.optim(s.optim)
  stop = tuple(s.sampler.stop_tokens) or (
    _hf().eos_token_ids(s.init) if s.init else ()
  )
  return common.Context(
    workdir=workdir,
    s=s,
    tok=tok,
    task=task,
    problems=s.task.splits(),
    mesh=mesh,
    tx=tx,
    sft_tx=tx if sft_optim == s.optim else train.make_optimizer(sft_optim),
    sampling=dataclasses.replace(s.sampler, stop_tokens=stop or (tok.eos_id,)),
    abstract=train.sharded_abstract_state(s.model, tx, mesh),
    writer=metrics_lib.MetricWriter(workdir),
    rewards=rewards_lib.RewardPool(
      verifiers=tasks.verifiers(),
      judges=rm_lib.lazy_judges(s.reward, mesh=mesh, rows=s.rollout.gen_rows),
    ),
  )


def _tokenizer(s: Settings, task, workdir: str) -> tokenizer_lib.Tokenizer:
  if s.init and s.tokenizer.kind == "sentencepiece":
    return tokenizer_lib.load(s.init)  # the checkpoint's tokenizer.json
  if s.tokenizer.kind == "file":
    return tokenizer_lib.load(s.tokenizer.path)
  path = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    return tokenizer_lib.load(path)
  tok = tokenizer_lib.train_sentencepiece(
    task.tokenizer_corpus(),
    s.tokenizer.vocab_size,
    **getattr(task, "TOKENIZER", {}),
  )
  if jax.process_index() == 0:
    tok.save(path)
  return tok


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every configured stage; returns the summary."""
  ctx = make_context(config, workdir)
  ctx.preemption.install()
  logging.info(
    "k15: %d params, mesh %s, stages %s",
    ctx.s.model.num_params(),
    dict(ctx.mesh.shape),
    ctx.s.stages,
  )
  states, results = {}, {}
  try:
    with sharding.mesh_context(ctx.mesh):
      for name in ctx.s.stages:
        if ctx.preemption.requested:  # during the previous stage's eval
          raise common.Preempted
        out = common.run_stage(ctx, STAGES[name], states, results)
        states[name], results = out.state, out.results
  except common.Preempted:
    logging.warning("k15: preempted (SIGTERM); checkpoint saved, exiting")
    ctx.writer.close()
    return {"preempted": True}
  finally:
    ctx.rewards.close()
  if ctx.preemption.requested:
    logging.warning("k15: SIGTERM after the last stage; the run is complete")
  summary = write_summary(ctx.workdir, results)
  ctx.writer.close()
  return summary


def write_summary(workdir: str, results: common.Results) -> dict[str, Any]:
  """summary.json (and a printed table): every stage's evaluation and the
  pass@1 differences the experiment is about."""
  res = results
  summary: dict[str, Any] = {"results": res}
  if "sft" in res and "rl" in res:
    summary["rl_minus_sft_pass1"] = res["rl"]["pass1"] - res["sft"]["pass1"]
  if "control" in res and "rl" in res:
    summary["rl_minus_control_pass1"] = (
      res["rl"]["pass1"] - res["control"]["pass1"]
    )
  if jax.process_index() == 0:
    cols = ("pass1", "greedy_acc", "mean_length", "finished")
    table = metrics_lib.summary_table(
      {k: {c: v[c] for c in cols if c in v} for k, v in res.items()}
    )
    deltas = "  ".join(
      f"{k}={v:+.3f}" for k, v in summary.items() if k != "results"
    )
    print(f"\n{table}\n{deltas}\n", flush=True)
    path = os.path.join(workdir, "summary.json")
    with open(path + ".tmp", "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
  return summary
