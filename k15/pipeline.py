"""The run: tokenizer -> long-CoT SFT warm-up -> RL -> evaluation.

`run(config, workdir)` is what `python -m k15.main` calls and what notebooks
import. Stages (`config.stages`, names from `STAGES`) run in order through
the template of `k15.stages.common`, each keeping its own checkpoint
directory under `workdir/ckpt/<stage>`:

  sft      supervised warm-up on the verified chain-of-thought traces;
  rl       the report's RL iterations (PAPER.md §1-3), from the SFT weights;
  control  continues SFT from the SFT weights for as many gradient steps as
           RL took (the "more imitation" control the RL result is judged
           against);
  merge    long2short model merging: two models' weights averaged;
  rs       long2short shortest rejection sampling, from the RL weights;
  dpo      long2short DPO, from the RL weights.

`config.init` starts a run from elsewhere (`k15.sources`): another run's
DIR:stage or DIR:stage@step, or an HF directory; the first stage, and any
stage whose need the run does not list, starts from its weights (long2short
RL is the rl stage started from a long-CoT run's RL checkpoint).

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
  sources,
  tasks,
  train,
)
from k15 import images as images_lib
from k15 import metrics as metrics_lib
from k15 import model as model_lib
from k15 import rewards as rewards_lib
from k15 import rm as rm_lib
from k15 import sampler as sampler_lib
from k15 import tokenizer as tokenizer_lib
from k15.rewards import code as rewards_code
from k15.rewards import sandbox
from k15.stages import common, control, dpo, joint, merge, rl, rs, sft, tower
from k15.tasks import jsonl

# Every stage `config.stages` may name; a new stage is one module under
# k15/stages/ and one line here.
STAGES: dict[str, common.Stage] = {
  "sft": sft.STAGE,
  "tower": tower.STAGE,
  "joint": joint.STAGE,
  "rl": rl.STAGE,
  "control": control.STAGE,
  "merge": merge.STAGE,
  "rs": rs.STAGE,
  "dpo": dpo.STAGE,
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
  # the weights to start from (k15.sources): another run's DIR:stage or
  # DIR:stage@step, or a Llama/Qwen2 safetensors dir
  init: str = ""
  reward: rm_lib.RewardConfig = rm_lib.RewardConfig()
  tower: tower.TowerConfig = tower.TowerConfig()
  joint: joint.JointConfig = joint.JointConfig()
  merge: merge.MergeConfig = merge.MergeConfig()
  rs: rs.RSConfig = rs.RSConfig()
  dpo: dpo.DPOStageConfig = dpo.DPOStageConfig()


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
  "merge": merge.MergeConfig,
  "rs": rs.RSConfig,
  "dpo": dpo.DPOStageConfig,
}
# with an HF config.init the architecture comes from the checkpoint; the
# config keeps the runtime fields
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
  init_hf = sources.is_hf(init)
  for name, cls in _SECTIONS.items():
    section = dict(cfg.get(name) or {})
    if name == "model" and init_hf:
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
  if "merge" in s.stages and len(s.merge.models) != 2:
    raise ValueError(
      "config: stage merge needs merge.models, two sources such as "
      "('LONG_DIR:rl', 'SHORT_DIR:sft')"
    )
  r = s.rollout
  if r.prompt_len + s.eval.max_response > s.model.max_len:
    raise ValueError(
      f"config: rollout.prompt_len ({r.prompt_len}) + eval.max_response "
      f"({s.eval.max_response}) exceeds model.max_len ({s.model.max_len})"
    )
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
  if v is not None and v.init and "tower" in s.stages:
    # the tower stage imports it: a mismatch stops the run now, not after
    # the language-only warm-up has trained
    from k15 import hf_vision  # noqa: PLC0415 - safetensors only with init

    try:
      hf_vision.check_matches(v, v.init)
    except (OSError, ValueError) as e:
      raise ValueError(f"config: model.vision.init={v.init!r}: {e}") from e
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
  problems (a jsonl task's files read and every row checked), the
  tokenizer (trained into workdir on first use), mesh, optimizers, metric
  writer and the reward pool. Code rows need the sandbox: without it the
  run stops here, saying how to install it."""
  workdir = os.path.abspath(workdir)
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise FileNotFoundError(
      f"--workdir {workdir}: parent directory {parent} does not exist"
    )
  # Validate before anything is written or trained (the tokenizer's
  # vocabulary is checked once it exists).
  pre = settings(config, num_devices=jax.device_count())
  if pre.init:  # the source exists and can be read (its stage finished)
    sources.resolve(sources.parse(pre.init))
  os.makedirs(workdir, exist_ok=True)
  problems = _problems(pre, workdir)
  check_sandbox(problems, pre)
  tok = _tokenizer(pre, problems, workdir)
  s = settings(
    config, vocab_size=tok.vocab_size, num_devices=jax.device_count()
  )
  check_lengths(problems, tok, s)
  mesh = sharding.make_mesh(s.mesh)
  tx = train.make_optimizer(s.optim)
  sft_optim = s.sft.optim(s.optim)
  stop = tuple(s.sampler.stop_tokens) or (
    _hf().eos_token_ids(s.init) if sources.is_hf(s.init) else ()
  )
  return common.Context(
    workdir=workdir,
    s=s,
    tok=tok,
    task=s.task,
    problems=problems,
    mesh=mesh,
    tx=tx,
    sft_tx=tx if sft_optim == s.optim else train.make_optimizer(sft_optim),
    sampling=dataclasses.replace(s.sampler, stop_tokens=stop or (tok.eos_id,)),
    abstract=train.sharded_abstract_state(s.model, tx, mesh),
    writer=metrics_lib.MetricWriter(workdir),
    rewards=rewards_lib.RewardPool(
      s.reward.backends(),
      verifiers=tasks.verifiers(),
      judges=rm_lib.lazy_judges(s.reward, mesh=mesh, rows=s.rollout.gen_rows),
    ),
  )


def _problems(s: Settings, workdir: str) -> dict[str, list]:
  try:
    return s.task.splits(workdir)
  except jsonl.JsonlError as e:  # a bad row: file:line and the reason
    raise config_lib.ConfigError(str(e)) from e


def check_sandbox(problems: dict[str, list], s: Settings) -> None:
  """Code rows are scored by running programs in the sandbox; when it
  cannot run here (bwrap missing, no user namespaces) the run must stop
  before any work, never score them 0. Raises ConfigError."""
  code = [
    getattr(p, "where", "") or f"{split} problem {i}"
    for split in ("rl", "eval")
    for i, p in enumerate(problems.get(split, ()))
    if getattr(p, "kind", "") == "code"
  ]
  if not code:
    return
  rewards_code.check_training_config(s.reward.backends().get("code", {}))
  reason = sandbox.unavailable_reason()
  if reason:
    raise config_lib.ConfigError(
      f"config: {len(code)} code rows (first: {code[0]}) are scored in the "
      f"code sandbox, which cannot run here: {reason}. Install it with "
      "`apt-get install bubblewrap` (Debian/Ubuntu; the kernel must allow "
      "unprivileged user namespaces, see k15/rewards/sandbox.py), or drop "
      "the code files from task.rl_files / task.eval_files."
    )


def check_lengths(problems: dict[str, list], tok, s: Settings) -> None:
  """Every prompt fits rollout.prompt_len (its image markers expanded to
  their images' patches) and every warm-up trace the rows' response width,
  or the run stops naming the row (file:line for prompt files). Every
  image is checked against model.vision here, before any training: a
  prompt file's from its files' headers (the pixels are read when a
  stage needs them). Raises ConfigError."""
  ro = s.rollout
  for split in ("sft", "rl", "eval"):
    for i, p in enumerate(problems.get(split, ())):
      where = getattr(p, "where", "") or f"task {split} problem {i}"
      try:
        counts = images_lib.patch_counts(p, s.model.vision, where)
        n = images_lib.prompt_length(tok, p.question, counts, where)
      except images_lib.ImageError as e:
        raise config_lib.ConfigError(str(e)) from e
      if n > ro.prompt_len:
        what = " (its images' patches included)" if counts else ""
        raise config_lib.ConfigError(
          f"{where}: the prompt is {n} tokens{what}, more than "
          f"rollout.prompt_len={ro.prompt_len}"
        )
      if split == "sft":
        m = len(tok.encode(p.trace)) + 1
        if ro.prompt_len + m > ro.max_len:
          raise config_lib.ConfigError(
            f"{where}: the trace is {m} tokens (with EOS); rollout.max_len="
            f"{ro.max_len} leaves {ro.max_len - ro.prompt_len} after the "
            "prompt"
          )


def _tokenizer(s: Settings, problems, workdir: str) -> tokenizer_lib.Tokenizer:
  """The checkpoint's own (HF init), a file, or the workdir's
  tokenizer.model: trained for the task, or copied from the run that
  config.init names (its weights index that run's vocabulary)."""
  src = sources.parse(s.init)
  if src and src.kind == "hf" and s.tokenizer.kind == "sentencepiece":
    return tokenizer_lib.load(s.init)  # the checkpoint's tokenizer.json
  if s.tokenizer.kind == "file":
    return tokenizer_lib.load(s.tokenizer.path)
  path = os.path.join(workdir, sources.TOKENIZER_FILE)
  theirs = sources.tokenizer_file(src) if src else None
  if os.path.exists(path):
    if theirs and not _same_file(path, theirs):
      raise config_lib.ConfigError(
        f"config: init={s.init!r}: its tokenizer {theirs} differs from "
        f"this workdir's {path}; use a fresh --workdir"
      )
    return tokenizer_lib.load(path)
  if theirs:
    tok = tokenizer_lib.load(theirs)
  else:
    tok = tokenizer_lib.train_sentencepiece(
      s.task.tokenizer_corpus(problems),
      s.tokenizer.vocab_size,
      **s.task.tokenizer_options(),
    )
  if jax.process_index() == 0:
    tok.save(path)
  return tok


def _same_file(a: str, b: str) -> bool:
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


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
  for base in ("sft", "control"):
    if base not in res or "rl" not in res:
      continue
    summary[f"rl_minus_{base}_pass1"] = res["rl"]["pass1"] - res[base]["pass1"]
    for dom in evaluate.domains(res["rl"]):  # per domain (prompt files)
      key = f"pass1_{dom}"
      if key in res[base]:
        summary[f"rl_minus_{base}_{key}"] = res["rl"][key] - res[base][key]
  if jax.process_index() == 0:
    cols = ("pass1", "greedy_acc", "mean_length", "finished")
    cols += tuple(f"pass1_{d}" for r in res.values() for d in
                  evaluate.domains(r))  # fmt: skip
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
