"""The curation command (report §2.1, PAPER.md §3.1): runs the filters of
`k15.tools.curate_filters` over a JSONL prompt file with a run's model.

  python -m k15.tools.curate --config experiments/tiny.py --workdir DIR \\
      --input prompts.jsonl --output curated.jsonl [--ckpt sft|rl|PATH]

writes the kept rows, `curated.report.json` (counts per reason, every
dropped row with its reason and detail, pass-rate histogram) and prints a
table. The model is the workdir's latest checkpoint of `--ckpt` (default
the SFT stage, as in the report) or a checkpoint directory. Rows without a
`kind` are scored by the run's task (`task.name`); every response is judged
through the reward entry point (`k15.rewards.score`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

from k15 import rejection, rewards, tasks
from k15 import tokenizer as tokenizer_lib
from k15.rewards import code as rewards_code
from k15.tools.curate_filters import (
  FORMS,
  CurateConfig,
  Row,
  curate,
  format_table,
  report,
)

# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def read_prompts(path: str) -> list[Row]:
  """Rows of a JSONL prompt file; errors name the file and line.

  Minimal reader (fields: question (or prompt), answer, optional
  difficulty, kind, metadata, id; others pass through unchanged). Numbers
  and booleans as answers become strings. Code rows (kind "code") carry
  `tests` instead of an answer, in a test mode programs cannot fake.
  """
  rows = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
      if not isinstance(row, dict):
        raise ValueError(
          f"{where}: expected a JSON object, got {type(row).__name__}"
        )
      q = row.get("question", row.get("prompt"))
      if not isinstance(q, str) or not q.strip():
        raise ValueError(
          f"{where}: field 'question' must be a non-empty string"
        )
      if row.get("kind") == "code":
        _check_code_row(row, where)
        rows.append(row)
        continue
      a = row.get("answer")
      if isinstance(a, bool):
        a = str(a).lower()
      elif isinstance(a, (int, float)):
        a = str(a)
      if not isinstance(a, str) or not a.strip():
        raise ValueError(
          f"{where}: field 'answer' must be a non-empty string or number"
        )
      d = row.get("difficulty")
      if d is not None and (
        isinstance(d, bool) or not isinstance(d, (int, float))
      ):
        raise ValueError(f"{where}: field 'difficulty' must be a number")
      if "metadata" in row and not isinstance(row["metadata"], dict):
        raise ValueError(f"{where}: field 'metadata' must be an object")
      row["answer"] = a
      rows.append(row)
  if not rows:
    raise ValueError(f"{path}: no prompts")
  return rows


def _check_code_row(row: Row, where: str) -> None:
  tests = row.get("tests")
  if not isinstance(tests, list) or not tests:
    raise ValueError(f"{where}: field 'tests' must be a non-empty list")
  try:
    mode = rewards_code.test_mode(row)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  rewards_code.check_mode_for_training(mode, f"{where}: test_mode")


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def default_report_path(output: str) -> str:
  base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
  return base + ".report.json"


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


model_sample_fn = rejection.model_sample_fn  # the jitted sampler's SampleFn


def resolve_ckpt(workdir: str, ckpt: str) -> str:
  """A stage name (sft | rl | control) under workdir/ckpt, or a path."""
  from k15 import pipeline  # noqa: PLC0415

  path = (
    os.path.join(workdir, "ckpt", ckpt) if ckpt in pipeline.STAGES else ckpt
  )
  if not os.path.isdir(path) or not any(s.isdigit() for s in os.listdir(path)):
    raise FileNotFoundError(
      f"--ckpt {ckpt}: no checkpoint in {path}; run that stage first or "
      "pass a checkpoint directory (one holding numbered steps)"
    )
  return os.path.abspath(path)


def load_model(config, workdir: str, ckpt: str = "sft"):
  """(params, settings, tokenizer, step, checkpoint dir) of a workdir's run.

  The tokenizer is the run's (workdir/tokenizer.model, or the config's
  file); params come from the newest readable step of the checkpoint,
  restored into the config's mesh. Other items saved beside the train
  state (e.g. RL sampler statistics) are read and dropped.
  """
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  from k15 import checkpoint as ckpt_lib  # noqa: PLC0415
  from k15 import pipeline, sharding, train  # noqa: PLC0415

  pre = pipeline.settings(config)
  if pre.tokenizer.kind == "file":
    tok = tokenizer_lib.load(pre.tokenizer.path)
  else:
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"--workdir {workdir}: no tokenizer.model; "
        "run the sft stage there first"
      )
    tok = tokenizer_lib.load(path)
  s = pipeline.settings(
    config, vocab_size=tok.vocab_size, num_devices=jax.device_count()
  )
  directory = resolve_ckpt(workdir, ckpt)
  mesh = sharding.make_mesh(s.mesh)
  abstract = {
    "train": train.sharded_abstract_state(
      s.model, train.make_optimizer(s.optim), mesh
    )
  }
  steps = sorted(int(x) for x in os.listdir(directory) if x.isdigit())
  # orbax warns about the items it is not asked to restore; they are fine.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with ocp.StandardCheckpointer() as reader:
      meta = reader.metadata(os.path.join(directory, str(steps[-1]), "state"))
    tree = dict(getattr(meta, "item_metadata", meta))
    for key in tree:
      if key != "train":
        abstract[key] = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
          tree[key],
          is_leaf=lambda m: hasattr(m, "shape"),
        )
    ck = ckpt_lib.Checkpointer(directory)
    try:
      step, state, _ = ck.restore(abstract)
    finally:
      ck.close()
  finally:
    absl_logging.set_verbosity(verbosity)
  return state["train"].params, s, tok, step, directory


def curate_file(
  config,
  *,
  workdir: str,
  input_path: str,
  output_path: str,
  report_path: str | None = None,
  ckpt: str = "sft",
  cfg: CurateConfig | None = None,
) -> dict[str, Any]:
  """The command: curate a JSONL file with a run's model; returns the
  report (also written to `report_path`) and prints its table."""
  from k15 import pipeline, sharding  # noqa: PLC0415

  cfg = cfg or CurateConfig()
  rows = read_prompts(input_path)
  params, s, tok, step, directory = load_model(config, workdir, ckpt)
  code_rows = [
    types.SimpleNamespace(kind="code", where=f"{input_path} row {i + 1}")
    for i, r in enumerate(rows)
    if r.get("kind") == "code"
  ]
  pipeline.check_sandbox({"rl": code_rows}, s)
  mesh = sharding.make_mesh(s.mesh)
  sampling = dataclasses.replace(
    s.sampler, stop_tokens=tuple(s.sampler.stop_tokens) or (tok.eos_id,)
  )
  fn = model_sample_fn(
    params,
    tok=tok,
    model=s.model,
    sampling=sampling,
    gen=s.rollout.gen,
    shard_fn=lambda t: sharding.shard_batch(t, mesh),
  )
  bucket = max(s.rollout.gen.prompt_buckets)
  with (
    rewards.RewardPool(
      s.reward.backends(), verifiers=tasks.verifiers()
    ) as pool,
    sharding.mesh_context(mesh),  # as the pipeline samples
  ):
    kept, decisions = curate(
      rows,
      cfg=cfg,
      sample_fn=fn,
      pool=pool,
      default_kind=s.task.default_reward_kind,
      fits=lambda t: len(tok.encode(t)) <= bucket,
    )
  report_path = report_path or default_report_path(output_path)
  rep = report(
    rows,
    decisions,
    cfg,
    input=os.path.abspath(input_path),
    output=os.path.abspath(output_path),
    model=dict(checkpoint=directory, step=int(step), task=s.task.name),
  )
  write_jsonl(output_path, kept)
  write_json(report_path, rep)
  print(
    f"\ncuration of {input_path} with {directory} (step {step}):\n"
    f"{format_table(rep)}\nkept rows -> {output_path}\n"
    f"report -> {report_path}\n",
    flush=True,
  )
  return rep


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_HELP = {
  "samples": "responses per prompt for the pass rate (0: skip)",
  "temperature": "sampling temperature of those responses",
  "trivial_pass_rate": "drop prompts with pass rate >= this",
  "min_pass_rate": "drop prompts with pass rate < this",
  "no_cot_attempts": "direct-answer attempts, N (0: skip)",
  "no_cot_min_correct": "correct direct answers that drop a prompt",
  "no_cot_prefix": "appended to the prompt to force a direct answer",
  "no_cot_temperature": "sampling temperature of direct answers",
  "no_cot_max_tokens": "token budget of a direct answer",
  "no_cot_score_unfinished": "judge direct answers cut by the budget too",
  "forms": f"form filters to apply (of {','.join(FORMS)})",
  "dedupe": "drop repeated questions",
  "seed": "sampling seed",
}


def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment file whose model/tokenizer/sampler the "
    "checkpoint was trained with, e.g. experiments/tiny.py",
    lock_config=True,
  )
  flags.DEFINE_string(
    "workdir", None, "The run's directory (tokenizer, checkpoints)."
  )
  flags.DEFINE_string("input", None, "JSONL prompt file.")
  flags.DEFINE_string("output", None, "Curated JSONL file to write.")
  flags.DEFINE_string(
    "report", None, "Report JSON (default: OUTPUT with .report.json)."
  )
  flags.DEFINE_string(
    "ckpt",
    "sft",
    "sft | rl | control (the workdir's "
    "newest checkpoint of that stage) or a checkpoint "
    "directory.",
  )
  defaults = CurateConfig()
  for f in dataclasses.fields(CurateConfig):
    value = getattr(defaults, f.name)
    define = {
      bool: flags.DEFINE_bool,
      int: flags.DEFINE_integer,
      float: flags.DEFINE_float,
      str: flags.DEFINE_string,
      tuple: flags.DEFINE_list,
    }[type(value)]
    define(
      f.name, list(value) if isinstance(value, tuple) else value, _HELP[f.name]
    )
  flags.mark_flags_as_required(["config", "workdir", "input", "output"])
  return flags.FLAGS


def main(argv):
  del argv
  import sys  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  try:
    cfg = CurateConfig(
      **{x.name: f[x.name].value for x in dataclasses.fields(CurateConfig)}
    )
    curate_file(
      f.config,
      workdir=f.workdir,
      input_path=f.input,
      output_path=f.output,
      report_path=f.report,
      ckpt=f.ckpt,
      cfg=cfg,
    )
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    sys.exit(f"k15.tools.curate: error: {e}")


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  _define_flags()
  app.run(main)
