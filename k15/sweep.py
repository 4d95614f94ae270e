"""Seeds sweeps: one experiment over several seeds, and its results table.

  python -m k15.main --config experiments/tiny.py --seeds 0,1,2 --workdir DIR

runs (or resumes) the experiment once per seed, in `DIR/seed_<n>`, one seed
after the other in this process, then writes `DIR/results.json` and
`DIR/results.md`: per stage the mean ± standard deviation and the range of
every evaluation metric over the seeds, each seed's own numbers and wall
time, and, when the config has a `targets` section, whether every seed met
each target. The table names the command, the CPU and the numerics settings
(`XLA_FLAGS`, `JAX_DEFAULT_MATMUL_PRECISION`) it ran under, because a
one-seed, one-CPU learning result is not a result: the same recipe can land
anywhere from 0.07 to 0.42 when its warm-up sits on a knife edge.

Only the run seed (`config.seed`) changes; the task's data split
(`task.seed`) stays, so every seed is judged on the same held-out set.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from k15 import config_lib, pipeline

# evaluation metrics that go in the tables, in this order (others, e.g.
# the per-difficulty pass1_d<n>, follow in the order they first appear)
_MAIN = ("pass1", "greedy_acc", "mean_length", "finished")
# summary deltas (pipeline.write_summary) a target can name; prompt-file
# runs add one per domain (rl_minus_sft_pass1_math, ...)
_DELTAS = ("rl_minus_sft_pass1", "rl_minus_control_pass1")
_DELTA_RE = re.compile(r"rl_minus_(sft|control)_pass1(_[A-Za-z0-9_]+)?$")
_EPS = 1e-9  # pass@1 differences are sums of floats: 0.6 - 0.5 < 0.1
_ENV = ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION", "JAX_PLATFORMS")


def parse_seeds(text: str) -> list[int]:
  """"0,1,2" or "0-4" -> [0, 1, 2] / [0, 1, 2, 3, 4]; errors name the text."""
  out: list[int] = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    lo, dash, hi = part.partition("-")
    try:
      out += list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
    except ValueError:
      raise config_lib.ConfigError(
          f"--seeds={text!r}: {part!r} is not a seed or a range a-b") from None
  if not out or len(set(out)) != len(out):
    raise config_lib.ConfigError(f"--seeds={text!r}: give distinct seeds")
  return out


def targets_of(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The config's `targets` section: {summary key: minimum}. Keys are the
  summary's deltas (`rl_minus_sft_pass1`, ...) or `<stage>/<metric>`."""
  targets = dict(config.get("targets") or {})
  for key, value in targets.items():
    if not _DELTA_RE.match(key) and "/" not in key:
      raise config_lib.ConfigError(
          f"config: targets.{key} names no result (known: "
          f"{', '.join(_DELTAS)}, the same with _<domain>, or "
          "<stage>/<metric> such as rl/pass1)")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise config_lib.ConfigError(
          f"config field targets.{key}={value!r} should be a number")
  return {k: float(v) for k, v in targets.items()}


def run(config: ml_collections.ConfigDict, workdir: str,
        seeds: Sequence[int], *, about: dict[str, str] | None = None
        ) -> dict[str, Any]:
  """Runs every seed (resuming finished or partial ones) and writes the
  results files; returns the results dict (what results.json holds).

  `about` describes the run's machine and command (`environment(...)`,
  which `main` fills from the process environment)."""
  targets_of(config)  # a bad targets section fails before any training
  os.makedirs(workdir, exist_ok=True)
  per_seed: dict[int, dict[str, Any]] = {}
  for seed in seeds:
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    t0 = time.time()
    summary = pipeline.run(config_lib.override(config, seed=seed), seed_dir)
    if summary.get("preempted"):
      return {"preempted": True}
    per_seed[seed] = dict(summary, wall_s=add_wall(seed_dir,
                                                     time.time() - t0))
  results = summarize(per_seed, targets_of(config))
  results["environment"] = about or environment()
  if jax.process_index() == 0:
    _write(workdir, results, config.get("name", ""))
  return results


def add_wall(seed_dir: str, dt: float) -> float:
  """Wall seconds spent on this run so far, over every (resumed) call
  (`seed_dir`/wall_time.json, adding `dt`)."""
  os.makedirs(seed_dir, exist_ok=True)
  path = os.path.join(seed_dir, "wall_time.json")
  total = dt
  if os.path.exists(path):
    with open(path) as f:
      total += json.load(f)["wall_s"]
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump({"wall_s": total}, f)
  return total


def _stats(values: Sequence[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return dict(mean=float(v.mean()),
              std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
              min=float(v.min()), max=float(v.max()))


def summarize(per_seed: dict[int, dict[str, Any]],
              targets: dict[str, float]) -> dict[str, Any]:
  """Mean / std / range per stage and metric, the deltas, the targets."""
  stages: list[str] = []
  for s in per_seed.values():
    stages += [k for k in s["results"] if k not in stages]
  agg: dict[str, dict[str, dict[str, float]]] = {}
  for stage in stages:
    keys: list[str] = list(_MAIN)
    for s in per_seed.values():
      keys += [k for k in s["results"].get(stage, {}) if k not in keys]
    agg[stage] = {k: _stats([s["results"][stage][k] for s in
                             per_seed.values() if k in
                             s["results"].get(stage, {})])
                  for k in keys if any(k in s["results"].get(stage, {})
                                       for s in per_seed.values())}
  names = [k for s in per_seed.values() for k in s if _DELTA_RE.match(k)]
  deltas = {k: _stats([s[k] for s in per_seed.values()])
            for k in dict.fromkeys(names)
            if all(k in s for s in per_seed.values())}
  checks = {}
  for key, minimum in targets.items():
    got = {seed: _lookup(s, key) for seed, s in per_seed.items()}
    checks[key] = dict(minimum=minimum, per_seed=got,
                       met=all(v is not None and v >= minimum - _EPS
                               for v in got.values()))
  return dict(seeds=list(per_seed), per_seed=per_seed, stages=agg,
              deltas=deltas, targets=checks,
              all_targets_met=all(c["met"] for c in checks.values()))


def _lookup(summary: dict[str, Any], key: str) -> float | None:
  if key in summary:
    return summary[key]
  stage, _, metric = key.partition("/")
  return summary["results"].get(stage, {}).get(metric)


def environment(command: str = "", env: Mapping[str, str] | None = None
                ) -> dict[str, str]:
  """What the numbers depend on besides the config: CPU, flags (from `env`,
  the launching process's environment), versions."""
  cpu, flags = platform.processor() or platform.machine(), ""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    info = ""
  for line in info.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model name":
      cpu = value.strip()
    elif key.strip() == "flags":
      flags = f" {value.strip()} "
      break
  isa = [f for f in ("avx2", "avx512f", "amx_tile") if f" {f} " in flags]
  env = {k: (env or {}).get(k, "") for k in _ENV}
  return dict(command=command or " ".join(sys.argv), cpu=cpu,
              isa=" ".join(isa) or "unknown", cores=str(os.cpu_count()),
              jax=jax.__version__, backend=jax.default_backend(),
              devices=str(jax.device_count()),
              date=time.strftime("%Y-%m-%d"), **env)


def _fmt(st: dict[str, float], digits: int = 3) -> str:
  return (f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} "
          f"[{st['min']:.{digits}f}, {st['max']:.{digits}f}]")


def markdown(results: dict[str, Any], name: str = "") -> str:
  """results.md: the tables the README quotes."""
  env = results["environment"]
  seeds = results["seeds"]
  lines = [f"# {name or 'experiment'}: seeds {', '.join(map(str, seeds))}",
           "", f"    {env['command']}", "",
           f"CPU: {env['cpu']} ({env['cores']} cores; {env['isa']}); "
           f"jax {env['jax']} on {env['backend']} x{env['devices']}; "
           f"XLA_FLAGS={env['XLA_FLAGS'] or '(unset)'}; "
           f"JAX_DEFAULT_MATMUL_PRECISION="
           f"{env['JAX_DEFAULT_MATMUL_PRECISION'] or '(unset)'}; "
           f"{env['date']}.", "",
           "Held-out evaluation, mean ± std [min, max] over the seeds:", "",
           "| stage | pass@1 | greedy | mean length | finished |",
           "|---|---|---|---|---|"]
  for stage, st in results["stages"].items():
    cells = [_fmt(st[k], 1 if k == "mean_length" else 3) if k in st else ""
             for k in _MAIN]
    lines.append(f"| {stage} | " + " | ".join(cells) + " |")
  diffs = sorted({k for st in results["stages"].values() for k in st
                  if k.startswith("pass1_d")}, key=lambda k: int(k[7:]))
  if diffs:
    lines += ["", "pass@1 by difficulty (mean over the seeds):", "",
              "| stage | " + " | ".join(d[6:] for d in diffs) + " |",
              "|---|" + "---|" * len(diffs)]
    for stage, st in results["stages"].items():
      lines.append(f"| {stage} | " + " | ".join(
          f"{st[d]['mean']:.2f}" if d in st else "" for d in diffs) + " |")
  lines += _domain_tables(results)
  stages = list(results["stages"])
  deltas = [d for d in results["deltas"] if d in _DELTAS]
  lines += ["", "Each seed (pass@1; wall time includes compiles and resumes):",
            "", "| seed | " + " | ".join(stages + deltas) + " | wall |",
            "|---|" + "---|" * (len(stages) + len(deltas) + 1)]
  for seed in seeds:
    s = results["per_seed"][seed]
    cells = [f"{s['results'][st]['pass1']:.3f}" if st in s["results"] else ""
             for st in stages] + [f"{s[d]:+.3f}" for d in deltas]
    wall = s["wall_s"]
    lines.append(f"| {seed} | " + " | ".join(cells)
                 + f" | {int(wall // 60)}m{int(wall % 60):02d}s |")
  if deltas:
    lines.append("| mean ± std | " + " | ".join(
        [f"{results['stages'][st]['pass1']['mean']:.3f}" for st in stages]
        + [f"{results['deltas'][d]['mean']:+.3f} ± "
           f"{results['deltas'][d]['std']:.3f}" for d in deltas]) + " | |")
  if results["targets"]:
    lines += ["", "Targets (every seed must meet each):", ""]
    for key, c in results["targets"].items():
      got = ", ".join("—" if v is None else f"{v:+.3f}"
                      for v in c["per_seed"].values())
      lines.append(f"- {key} ≥ {c['minimum']:+.2f}: "
                   f"{'met' if c['met'] else 'NOT met'} ({got})")
  return "\n".join(lines) + "\n"


def _domains(results: dict[str, Any]) -> list[str]:
  """Domains of a prompt-file run (pass1_<domain> in the evaluations)."""
  out: list[str] = []
  for st in results["stages"].values():
    out += [k[6:] for k in st if k.startswith("pass1_")
            and not re.fullmatch(r"pass1_d\d+", k) and k[6:] not in out]
  return out


def _domain_tables(results: dict[str, Any]) -> list[str]:
  """Per-domain pass@1 (mean ± std [min, max]) and each seed's numbers."""
  doms = _domains(results)
  if not doms:
    return []
  stages = list(results["stages"])
  lines = ["", "pass@1 by domain, mean ± std [min, max] over the seeds "
           "(greedy accuracy in brackets after it):", "",
           "| stage | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
  for stage in stages:
    st = results["stages"][stage]
    cells = []
    for d in doms:
      cell = _fmt(st[f"pass1_{d}"]) if f"pass1_{d}" in st else ""
      if f"greedy_acc_{d}" in st:
        cell += f" (greedy {st[f'greedy_acc_{d}']['mean']:.3f})"
      cells.append(cell)
    lines.append(f"| {stage} | " + " | ".join(cells) + " |")
  deltas = [f"rl_minus_{b}_pass1_{d}" for b in ("sft", "control")
            for d in doms if f"rl_minus_{b}_pass1_{d}" in results["deltas"]]
  cols = [(st, d) for st in stages for d in doms]
  lines += ["", "Each seed, pass@1 by domain:", "",
            "| seed | " + " | ".join(f"{st} {d}" for st, d in cols)
            + "".join(f" | {k[len('rl_minus_'):]}" for k in deltas) + " |",
            "|---|" + "---|" * (len(cols) + len(deltas))]
  for seed in results["seeds"]:
    s = results["per_seed"][seed]
    cells = [f"{s['results'][st][f'pass1_{d}']:.3f}"
             if f"pass1_{d}" in s["results"].get(st, {}) else ""
             for st, d in cols]
    cells += [f"{s[k]:+.3f}" for k in deltas]
    lines.append(f"| {seed} | " + " | ".join(cells) + " |")
  return lines


def _write(workdir: str, results: dict[str, Any], name: str) -> None:
  for fname, text in (("results.json", json.dumps(results, indent=2)),
                      ("results.md", markdown(results, name))):
    path = os.path.join(workdir, fname)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  print(markdown(results, name), flush=True)
