"""The long2short token-efficiency frontier (report Fig. 7, PAPER.md §6).

  python -m k15.tools.long2short --config experiments/long2short.py \\
      --seeds 0,1,2 --workdir DIR
  python -m k15.tools.long2short --config experiments/long2short.py:runlocal \\
      --seeds 0 --workdir DIR                      # the smoke size

runs (or resumes) every arm of the experiment for each seed, in
`DIR/seed_<n>/<arm>`, each arm after the arms it starts from (the
experiment's `sweep()` order, `root=DIR/seed_<n>`), then writes

  DIR/frontier.csv    one row per arm: held-out pass@1, mean response
                      tokens and acc_per_1k_tokens, mean and std over the
                      seeds, and each seed's values;
  DIR/frontier.md     the same as a markdown table (what the README quotes),
                      with the command, the machine and the wall time;
  DIR/frontier.json   everything, per seed and arm;
  DIR/frontier.png    accuracy against mean response tokens with error bars
                      (one std over the seeds), where matplotlib is installed
                      (`pip install -e .[figures]`).

An arm's point is the evaluation of its last stage (long: its RL, short:
its SFT, merge: the merged weights, ...). Every arm is evaluated the same
way (the experiment's `eval` section), so the points compare.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from k15 import config_lib, pipeline, sweep

# the metrics of a point, in the table's order
METRICS = ("pass1", "mean_length", "acc_per_1k_tokens", "finished")


def settings(config, **kw):
  """The arms are k15.main runs: their configs validate as those do."""
  return pipeline.settings(config, **kw)


def _module(path: str):
  spec = importlib.util.spec_from_file_location("_long2short_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def arm_configs(path: str, arg: str, root: str, seed: int):
  """[(arm, config)] of one seed, in the order they must run."""
  module = _module(path)
  if not hasattr(module, "sweep"):
    raise config_lib.ConfigError(
      f"{path}: a long2short experiment defines sweep() -> [(arm, arg)]"
    )
  out = []
  for arm, arm_arg in module.sweep(arg or None):
    full = f"{arm_arg},root={root},seed={seed}"
    out.append((arm, config_lib.load(path, full)))
  return out


def run(path: str, arg: str, workdir: str, seeds: Sequence[int]
        ) -> dict[str, Any]:  # fmt: skip
  """Runs every arm of every seed (resuming what already ran) and writes
  the frontier files; returns what frontier.json holds."""
  command = (
    f"python -m k15.tools.long2short --config {path}{':' * bool(arg)}{arg} "
    f"--seeds {','.join(map(str, seeds))} --workdir {workdir}"
  )
  os.makedirs(workdir, exist_ok=True)
  per_seed: dict[int, dict[str, dict[str, float]]] = {}
  walls: dict[int, float] = {}
  for seed in seeds:
    root = os.path.join(os.path.abspath(workdir), f"seed_{seed}")
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    per_seed[seed] = {}
    for arm, config in arm_configs(path, arg, root, seed):
      summary = pipeline.run(config, os.path.join(root, arm))
      if summary.get("preempted"):
        return {"preempted": True}
      last = config.stages[-1]
      per_seed[seed][arm] = dict(
        stage=last, **{k: summary["results"][last][k] for k in METRICS}
      )
    walls[seed] = sweep.add_wall(root, time.time() - t0)
  out = frontier(per_seed)
  out["wall_s"] = {str(k): v for k, v in walls.items()}
  out["environment"] = sweep.environment(command)
  write(workdir, out)
  return out


def frontier(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict:
  """Mean and std (ddof 1; 0 for one seed) of every metric per arm."""
  arms: list[str] = []
  for s in per_seed.values():
    arms += [a for a in s if a not in arms]
  points = {}
  for arm in arms:
    runs = [s[arm] for s in per_seed.values() if arm in s]
    point: dict[str, Any] = dict(stage=runs[0]["stage"], seeds=len(runs))
    for k in METRICS:
      v = np.array([r[k] for r in runs], np.float64)
      point[k] = float(v.mean())
      point[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    points[arm] = point
  return dict(seeds=list(per_seed), per_seed=per_seed, points=points)


def markdown(out: dict[str, Any]) -> str:
  env = out["environment"]
  seeds = out["seeds"]
  wall = sum(out["wall_s"].values())
  lines = [
    f"Long2short frontier, seeds {', '.join(map(str, seeds))} "
    f"({len(seeds)} seed{'s' * (len(seeds) > 1)}; ± is the std over them)",
    "",
    f"    {env['command']}",
    "",
    f"CPU: {env['cpu']} ({env['cores']} cores); jax {env['jax']} on "
    f"{env['backend']} x{env['devices']}; {env['date']}; wall time "
    f"{int(wall // 60)}m{int(wall % 60):02d}s (every seed, every arm, "
    "compiles included).",
    "",
    "| arm | stage | pass@1 | mean tokens | acc per 1k tokens | finished |",
    "|---|---|---|---|---|---|",
  ]
  for arm, p in out["points"].items():
    lines.append(
      f"| {arm} | {p['stage']} | {p['pass1']:.3f} ± {p['pass1_std']:.3f} | "
      f"{p['mean_length']:.1f} ± {p['mean_length_std']:.1f} | "
      f"{p['acc_per_1k_tokens']:.1f} ± {p['acc_per_1k_tokens_std']:.1f} | "
      f"{p['finished']:.3f} |"
    )
  return "\n".join(lines) + "\n"


def write(workdir: str, out: dict[str, Any]) -> None:
  def put(name: str, text: str) -> None:
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)

  put("frontier.json", json.dumps(out, indent=2))
  put("frontier.md", markdown(out))
  path = os.path.join(workdir, "frontier.csv")
  with open(path + ".tmp", "w", newline="") as f:
    w = csv.writer(f)
    seeds = out["seeds"]
    w.writerow(
      ["arm", "stage", "seeds"]
      + [c for k in METRICS for c in (k, f"{k}_std")]
      + [f"{k}_seed{s}" for s in seeds for k in ("pass1", "mean_length")]
    )
    for arm, p in out["points"].items():
      w.writerow(
        [arm, p["stage"], p["seeds"]]
        + [f"{p[c]:.6g}" for k in METRICS for c in (k, f"{k}_std")]
        + [
          f"{out['per_seed'][s][arm][k]:.6g}" if arm in out["per_seed"][s]
          else "" for s in seeds for k in ("pass1", "mean_length")
        ]
      )  # fmt: skip
  os.replace(path + ".tmp", path)
  plot(out, os.path.join(workdir, "frontier.png"))
  print(markdown(out), flush=True)


def plot(out: dict[str, Any], path: str) -> bool:
  """The scatter (Fig. 7's axes); False when matplotlib is missing."""
  try:
    import matplotlib  # noqa: PLC0415 - optional: the [figures] extra

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for i, (arm, p) in enumerate(out["points"].items()):
    ax.errorbar(
      p["mean_length"], p["pass1"], xerr=p["mean_length_std"],
      yerr=p["pass1_std"], fmt="osD^vPX*"[i % 8], capsize=3, label=arm,
      alpha=0.8,
    )  # fmt: skip
  n = len(out["seeds"])
  ax.set_xlabel("mean response tokens (held out)")
  ax.set_ylabel("pass@1 (held out)")
  ax.set_title(f"long2short token efficiency ({n} seed{'s' * (n > 1)})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


_CONFIG = flags.DEFINE_string(
  "config", None, "experiments/long2short.py[:runlocal]: the experiment "
  "file and the arg added to every arm's")  # fmt: skip
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the seeds' arms "
                               "run; rerunning resumes.")  # fmt: skip
_SEEDS = flags.DEFINE_string("seeds", "0", "e.g. 0,1,2 or 0-2")


def main(argv):
  del argv
  # orbax logs every save at INFO through absl; keep the console readable
  absl_logging.set_verbosity(absl_logging.WARNING)
  path, _, arg = _CONFIG.value.partition(":")
  try:
    seeds = sweep.parse_seeds(_SEEDS.value)
    out = run(path, arg, _WORKDIR.value, seeds)
  except (ValueError, config_lib.ConfigError, FileNotFoundError) as e:
    sys.exit(f"k15.tools.long2short: error: {e}")
  if out.get("preempted"):
    sys.exit(0)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
