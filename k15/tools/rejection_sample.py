"""Rejection sampling command: an SFT set from a checkpoint's own verified
responses (`k15.rejection.rejection_sample`).

  python -m k15.tools.rejection_sample --config experiments/mixed.py \\
      --workdir DIR [--ckpt sft|rl|PATH] [--input prompts.jsonl] \\
      --output rs.jsonl [--n 8] [--keep all|shortest] [--temperature 1.0]

samples `n` responses per prompt from the workdir's newest checkpoint of
`--ckpt` (default the SFT stage), judges each through the reward entry
point by its row's kind, and writes the kept ones (every distinct correct
response, or the shortest correct) as prompt-file rows whose `trace` is
the response, plus `<output>.report.json`. Prompts come from `--input` (a
prompt file) or, without it, the config's RL set. Train on the result
with `--config.task.sft_files='("/abs/rs.jsonl",)'`.
"""

from __future__ import annotations

import json
import os
import sys

from k15 import rejection, rewards, sharding, tasks
from k15.tasks import jsonl, make_data
from k15.tools import curate


def run(
  config,
  *,
  workdir: str,
  output: str,
  input_path: str = "",
  ckpt: str = "sft",
  n: int = 8,
  keep: str = "all",
  temperature: float = 1.0,
  seed: int = 0,
) -> rejection.RSResult:
  """The command; returns the result (also written to `output`)."""
  import dataclasses  # noqa: PLC0415

  from k15 import pipeline  # noqa: PLC0415

  params, s, tok, step, directory = curate.load_model(config, workdir, ckpt)
  if input_path:
    # rows of a synthetic task's run name no kind of their own: their
    # answers are compared exactly, as that task's verifier does
    kind = s.task.default_reward_kind
    problems = jsonl.load_problems(
      [input_path], default_kind=kind if kind in jsonl.KINDS else "exact"
    )
  else:
    problems = s.task.splits(os.path.abspath(workdir))["rl"]
  pipeline.check_sandbox({"rl": problems}, s)
  pipeline.check_lengths({"rl": problems}, tok, s)
  mesh = sharding.make_mesh(s.mesh)
  sampling = dataclasses.replace(
    s.sampler, stop_tokens=tuple(s.sampler.stop_tokens) or (tok.eos_id,)
  )
  fn = rejection.model_sample_fn(
    params, tok=tok, model=s.model, sampling=sampling, gen=s.rollout.gen,
    shard_fn=lambda t: sharding.shard_batch(t, mesh),
  )  # fmt: skip
  with (
    rewards.RewardPool(s.reward.backends(), verifiers=tasks.verifiers())
    as pool,
    sharding.mesh_context(mesh),
  ):
    res = rejection.rejection_sample(
      problems, fn, pool=pool, n=n, keep=keep, seed=seed,
      temperature=temperature,
    )  # fmt: skip
  res.report.update(
    checkpoint=directory, step=int(step), input=input_path or "task rl set"
  )
  make_data.write_jsonl(output, res.rows)
  with open(curate.default_report_path(output), "w") as f:
    json.dump(res.report, f, indent=2)
  r = res.report
  print(
    f"rejection sampling with {directory} (step {step}): {r['prompts']} "
    f"prompts x {n}: {r['correct']} correct samples, {r['prompts_solved']} "
    f"prompts solved, {r['kept']} rows kept ({keep}) -> {output}",
    flush=True,
  )
  return res


def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file(
    "config", None, "The run's experiment file.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "The run's directory.")
  flags.DEFINE_string("output", None, "JSONL SFT set to write.")
  flags.DEFINE_string("input", "", "Prompt file (default: the RL set).")
  flags.DEFINE_string("ckpt", "sft", "sft | rl | control | a directory.")
  flags.DEFINE_integer("n", 8, "Samples per prompt.")
  flags.DEFINE_enum("keep", "all", rejection.KEEP, "What to keep.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  from k15 import config_lib  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  try:
    run(
      f.config, workdir=f.workdir, output=f.output, input_path=f.input,
      ckpt=f.ckpt, n=f.n, keep=f.keep, temperature=f.temperature,
      seed=f.seed,
    )  # fmt: skip
  except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
    sys.exit(f"k15.tools.rejection_sample: error: {e}")


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  _define_flags()
  app.run(main)
