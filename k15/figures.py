"""The paper's figures, one command each (report §3.3-3.5, PAPER.md §8).

  python -m k15.figures fig5 --workdir DIR --seeds 0,1,2
  python -m k15.figures all --workdir DIR --seeds 0,1,2 --jobs 2
  python -m k15.figures fig10 --workdir DIR --seeds 0 --runlocal  # smoke

runs the arms of `experiments/figures.py` a figure needs (each arm a
`python -m k15.main` run in DIR/seed_<n>/<arm>; one that already finished
is read back, an interrupted one resumes), then writes, per figure,

  DIR/<figure>.png   the figure: the mean over the seeds, with a band or
                     error bars of one standard deviation over them;
  DIR/<figure>.csv   the numbers behind it (per arm and iteration: mean, std
                     and every seed's value);
  DIR/<figure>.md    the report's claim beside ours, with the effect's mean
                     and spread over the seeds, the command and the time.

The figures share arms (md is in every one), so `all` runs each arm once.

  fig5            accuracy and mean response length (95th-percentile band)
                  vs RL iteration, one panel per chain length, twin axes
  fig6            accuracy vs mean response length over md's checkpoints,
                  a linear fit per seed, the slope in the legend
  fig8            accuracy vs length for a small and the base model
  fig9            curriculum (hardest chains only from iteration 32) vs
                  uniform sampling, sharing the run up to the switch
  fig10           mirror descent vs ReST per chain length over iterations
  length_penalty  off vs on from iteration 0 vs on after a 32-iteration
                  warm-up: accuracy and length over iterations

The curves are the RL stage's periodic held-out evaluation (`eval.every`:
pass@1 over 4 samples at T = 1 on the first 128 held-out problems, with
mean and 95th-percentile response length per chain length).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from k15 import metrics as metrics_lib
from k15 import sweep

CONFIG = "experiments/figures.py"

# figure -> the arms it plots (their dependencies run first)
FIGURES = {
  "fig5": ("md",),
  "fig6": ("md",),
  "fig8": ("md", "small"),
  "fig9": ("md", "curriculum"),
  "fig10": ("md", "rest"),
  "length_penalty": ("md", "lp_on", "lp_warmup"),
}
LABELS = {
  "md": "mirror descent (uniform, no length penalty)",
  "rest": "ReST",
  "lp_on": "length penalty from iteration 0",
  "lp_warmup": "length penalty after warm-up",
  "curriculum": "curriculum (hard only after switch)",
  "small": "small model",
}


def resolve(path: str) -> str:
  """`path` from the repository root when it is there (as
  `config_lib.load_base` does), else as given; absolute."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isabs(path) and os.path.exists(os.path.join(root, path)):
    path = os.path.join(root, path)
  return os.path.abspath(path)


def experiment(path: str = CONFIG):
  """The experiment module (ARMS, CONTINUED, switch, get_config)."""
  path = resolve(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path}: the figures' experiment file; run from the repository root "
      "or give --config"
    )
  spec = importlib.util.spec_from_file_location("_k15_figures_exp", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def needed(arms: Sequence[str], deps: dict[str, Sequence[str]]) -> list[str]:
  """`arms` and everything they start from, each after its dependencies."""
  out: list[str] = []

  def add(arm):
    for d in deps[arm]:
      add(d)
    if arm not in out:
      out.append(arm)

  for a in arms:
    add(a)
  return out


def arm_dir(workdir: str, seed: int, arm: str) -> str:
  return os.path.join(os.path.abspath(workdir), f"seed_{seed}", arm)


def arm_command(config: str, workdir: str, seed: int, arm: str,
                runlocal: bool) -> list[str]:  # fmt: skip
  root = os.path.dirname(arm_dir(workdir, seed, arm))
  arg = f"arm={arm},root={root},seed={seed}" + ",runlocal" * runlocal
  return [sys.executable, "-m", "k15.main", f"--config={resolve(config)}:{arg}",
          f"--workdir={arm_dir(workdir, seed, arm)}"]  # fmt: skip


def done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "summary.json"))


def run_arms(config: str, workdir: str, seeds: Sequence[int],
             arms: Sequence[str], *, runlocal: bool = False, jobs: int = 1,
             log=print) -> dict[str, float]:  # fmt: skip
  """Runs every (seed, arm) not yet finished, at most `jobs` at once, each
  after the arms it starts from; returns each run's wall seconds (also in
  its workdir's wall_time.json). A failed run stops the rest and raises
  with the end of its log."""
  deps = experiment(config).ARMS
  check_size(workdir, runlocal)
  todo = [(s, a) for s in seeds for a in needed(arms, deps)]
  running: dict[tuple[int, str], tuple[subprocess.Popen, float, Any]] = {}
  walls: dict[str, float] = {}
  while todo or running:
    for key, (proc, t0, logf) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[key]
      logf.close()
      seed, arm = key
      path = arm_dir(workdir, seed, arm)
      if proc.returncode or not done(path):
        for p, _, f in running.values():
          p.terminate()
          f.close()
        with open(os.path.join(path, "run.log")) as f:
          tail = f.read()[-3000:]
        raise RuntimeError(
          f"figures: arm {arm} seed {seed} failed (exit {proc.returncode}); "
          f"end of {path}/run.log:\n{tail}"
        )
      walls[f"seed_{seed}/{arm}"] = sweep.add_wall(path, time.time() - t0)
      log(f"figures: seed {seed} {arm} done in {time.time() - t0:.0f} s")
    ready = [k for k in todo if all(
      done(arm_dir(workdir, k[0], d)) for d in deps[k[1]])]  # fmt: skip
    for key in ready:
      seed, arm = key
      path = arm_dir(workdir, seed, arm)
      if done(path):
        todo.remove(key)
        continue
      if len(running) >= jobs:
        break
      todo.remove(key)
      os.makedirs(path, exist_ok=True)
      cmd = arm_command(config, workdir, seed, arm, runlocal)
      log(f"figures: seed {seed} {arm}: {' '.join(cmd[1:])}")
      logf = open(os.path.join(path, "run.log"), "a")  # noqa: SIM115
      running[key] = (subprocess.Popen(cmd, stdout=logf, stderr=logf),
                      time.time(), logf)  # fmt: skip
    if todo and not running and not ready:
      raise RuntimeError(f"figures: cannot order {todo}")  # a cycle
    if running:
      time.sleep(1.0)
  return walls


def check_size(workdir: str, runlocal: bool) -> None:
  """Records the size (runlocal or full) a workdir's runs are made at, and
  refuses the other one: finished runs are read back, so a smoke run into
  a full-size workdir would otherwise be drawn as if it were full size."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "figures_size.json")
  size = "runlocal" if runlocal else "full"
  if os.path.exists(path):
    with open(path) as f:
      made = json.load(f)["size"]
    if made != size:
      raise ValueError(
        f"{workdir} holds {made}-size runs; this command asks for {size} "
        f"({'drop' if made == 'full' else 'add'} --runlocal, or use another "
        "--workdir)"
      )
    return
  with open(path, "w") as f:
    json.dump({"size": size}, f)


def arm_wall(path: str) -> float:
  try:
    with open(os.path.join(path, "wall_time.json")) as f:
      return float(json.load(f)["wall_s"])
  except FileNotFoundError:
    return float("nan")


# ---------------------------------------------------------------- curves


def curve(workdir: str, seed: int, arm: str, exp, at: int
          ) -> dict[int, dict]:  # fmt: skip
  """{iteration: heldout metrics} of one run of `arm`; a continued arm's
  iterations count from md's start, with md's curve up to the switch `at`."""
  recs = metrics_lib.read_jsonl(
    os.path.join(arm_dir(workdir, seed, arm), "metrics.jsonl"))
  out = {}
  for r in recs:
    if r.get("stage") == "rl" and "heldout/pass1" in r:
      out[int(r["step"])] = {k[len("heldout/"):]: v for k, v in r.items()
                             if k.startswith("heldout/")}  # fmt: skip
  if arm in exp.CONTINUED:
    base = curve(workdir, seed, "md", exp, at)
    out = {**{i: m for i, m in base.items() if i < at},
           **{i + at: m for i, m in out.items()}}
  if not out:
    raise ValueError(
      f"{arm_dir(workdir, seed, arm)}/metrics.jsonl has no held-out "
      "records (rl heldout/pass1): was it run with eval.every > 0?"
    )
  return dict(sorted(out.items()))


def stack(curves: Sequence[dict[int, dict]], key: str
          ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
  """(iterations, seeds x iterations values of `key`) on the iterations
  every seed has."""
  its = sorted(set.intersection(*(set(c) for c in curves)))
  vals = np.array([[c[i].get(key, np.nan) for i in its] for c in curves])
  return np.array(its), vals


def mean_std(v: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
  m = np.nanmean(v, axis=axis)
  s = np.nanstd(v, axis=axis, ddof=1) if v.shape[axis] > 1 else 0 * m
  return m, s


def stat(values: Sequence[float]) -> str:
  """`mean ± std [min, max]` over the seeds."""
  v = np.asarray(values, np.float64)
  s = v.std(ddof=1) if len(v) > 1 else 0.0
  return f"{v.mean():+.3f} ± {s:.3f} [{v.min():+.3f}, {v.max():+.3f}]"


def difficulties(curves: Sequence[dict[int, dict]]) -> list[int]:
  keys = {k for c in curves for m in c.values() for k in m}
  return sorted(int(k[len("pass1_d"):]) for k in keys
                if k.startswith("pass1_d"))  # fmt: skip


# ---------------------------------------------------------------- figures


def _plt():
  try:
    import matplotlib  # noqa: PLC0415 - optional: the [figures] extra

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
      "k15.figures draws with matplotlib: pip install -e '.[figures]'"
    ) from e
  return plt


def _panels(n: int, width: float = 3.4, height: float = 2.8):
  plt = _plt()
  cols = min(n, 3)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows),
                           squeeze=False)  # fmt: skip
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return plt, fig, list(axes.flat[:n])


def _buckets(curves) -> list[tuple[str, str]]:
  """(suffix, title) per panel: all problems, then each chain length."""
  return [("", "all"), *((f"_d{d}", f"{d} steps")
                         for d in difficulties(curves))]  # fmt: skip


def _save(plt, fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
  with open(path + ".tmp", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in rows:
      w.writerow([f"{x:.6g}" if isinstance(x, float) else x for x in r])
  os.replace(path + ".tmp", path)


def curves_csv(path: str, runs: dict[str, list[dict[int, dict]]],
               keys: Sequence[str], seeds: Sequence[int]) -> None:
  """One row per (arm, iteration, metric): mean, std, each seed's value."""
  rows = []
  for arm, cs in runs.items():
    for key in keys:
      its, v = stack(cs, key)
      if np.isnan(v).all():
        continue
      m, s = mean_std(v)
      for j, it in enumerate(its):
        rows.append([arm, int(it), key, float(m[j]), float(s[j]),
                     *(float(x) for x in v[:, j])])  # fmt: skip
  _csv(path, ["arm", "iteration", "metric", "mean", "std",
              *(f"seed_{s}" for s in seeds)], rows)  # fmt: skip


def _band(ax, its, v, label=None, color=None, **kw):
  m, s = mean_std(v)
  line = ax.plot(its, m, label=label, color=color, **kw)[0]
  ax.fill_between(its, m - s, m + s, color=line.get_color(), alpha=0.2)
  return line


def fig5(runs, path: str, **_):
  """Accuracy (left) and mean length with its 95th-percentile band (right)
  vs iteration, per chain length."""
  md = runs["md"]
  panels = _buckets(md)
  plt, fig, axes = _panels(len(panels))
  for ax, (suf, title) in zip(axes, panels, strict=True):
    its, acc = stack(md, f"pass1{suf}")
    _band(ax, its, acc, color="tab:blue", marker="o", ms=3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("pass@1", color="tab:blue")
    ax.set_xlabel("RL iteration")
    ax.set_title(title)
    ax2 = ax.twinx()
    _, ln = stack(md, f"mean_length{suf}")
    _, p95 = stack(md, f"p95_length{suf}")
    m, _ = mean_std(ln)
    top = mean_std(p95)[0]
    ax2.plot(its, m, color="tab:orange", marker="s", ms=3)
    ax2.fill_between(its, m, top, color="tab:orange", alpha=0.12)
    ax2.set_ylim(0, 1.15 * np.nanmax(top))
    ax2.set_ylabel("response tokens (mean to p95)", color="tab:orange")
    ax.grid(alpha=0.3)
  fig.suptitle(f"Fig. 5 analogue: held-out accuracy and length over RL "
               f"({len(md)} seeds)", fontsize=10)  # fmt: skip
  _save(plt, fig, path)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  ok = ~(np.isnan(x) | np.isnan(y))
  if ok.sum() < 2 or np.ptp(x[ok]) == 0:
    return float("nan"), float("nan")
  slope, icpt = np.polyfit(x[ok], y[ok], 1)
  return float(slope), float(icpt)


def slopes(cs, suf: str = "") -> list[float]:
  """Per seed, the least-squares slope of pass@1 on mean length (per
  token) over that seed's checkpoints."""
  _, acc = stack(cs, f"pass1{suf}")
  _, ln = stack(cs, f"mean_length{suf}")
  return [_fit(ln[i], acc[i])[0] for i in range(len(cs))]


def fig6(runs, path: str, **_):
  """Accuracy vs mean length over md's checkpoints, one fit per panel."""
  md = runs["md"]
  panels = _buckets(md)
  plt, fig, axes = _panels(len(panels))
  for ax, (suf, title) in zip(axes, panels, strict=True):
    _, acc = stack(md, f"pass1{suf}")
    _, ln = stack(md, f"mean_length{suf}")
    am, asd = mean_std(acc)
    lm, lsd = mean_std(ln)
    ax.errorbar(lm, am, xerr=lsd, yerr=asd, fmt="o", ms=3, capsize=2,
                alpha=0.8, label="checkpoints (mean ± std)")  # fmt: skip
    slope, icpt = _fit(lm, am)
    ss = np.array([s * 100 for s in slopes(md, suf)])
    ss = ss[~np.isnan(ss)]  # a seed whose lengths did not move has no fit
    sd = ss.std(ddof=1) if len(ss) > 1 else 0.0
    if not np.isnan(slope):
      xs = np.linspace(np.nanmin(lm), np.nanmax(lm), 10)
      ax.plot(xs, slope * xs + icpt, "k--", label=(
        f"fit: {slope * 100:+.2f} / 100 tok (seeds "
        f"{ss.mean() if len(ss) else np.nan:+.2f} ± {sd:.2f})"))  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("pass@1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.suptitle(f"Fig. 6 analogue: accuracy vs length over RL checkpoints "
               f"({len(md)} seeds)", fontsize=10)  # fmt: skip
  _save(plt, fig, path)


def fig8(runs, path: str, **_):
  """Accuracy vs mean length, a trend line per model size."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for arm, label in (("small", "small model"), ("md", "base model")):
    cs = runs[arm]
    _, acc = stack(cs, "pass1")
    _, ln = stack(cs, "mean_length")
    am, asd = mean_std(acc)
    lm, lsd = mean_std(ln)
    pts = ax.errorbar(lm, am, xerr=lsd, yerr=asd, fmt="o", ms=3, capsize=2,
                      alpha=0.7, label=label)  # fmt: skip
    slope, icpt = _fit(lm, am)
    if not np.isnan(slope):
      xs = np.linspace(np.nanmin(lm), np.nanmax(lm), 10)
      ax.plot(xs, slope * xs + icpt, "--", color=pts[0].get_color(),
              label=f"{label} trend ({slope * 100:+.2f} / 100 tok)")
  ax.set_xlabel("mean response tokens (held out)")
  ax.set_ylabel("pass@1 (held out)")
  ax.set_title(f"Fig. 8 analogue: model size ({len(runs['md'])} seeds)",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  _save(plt, fig, path)


def _versus(runs, arms, path, title, *, mark=None, buckets=None):
  """pass@1 over iterations per arm, one panel per bucket."""
  panels = buckets or _buckets(runs["md"])
  plt, fig, axes = _panels(len(panels))
  for ax, (suf, name) in zip(axes, panels, strict=True):
    for arm in arms:
      its, v = stack(runs[arm], f"pass1{suf}")
      _band(ax, its, v, label=LABELS[arm], marker="o", ms=3)
    if mark is not None:
      ax.axvline(mark, color="gray", ls=":", label="switch")
    ax.set_title(name)
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("pass@1")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=6)
  fig.suptitle(title, fontsize=10)
  _save(plt, fig, path)


def fig9(runs, path: str, *, switch: int, **_):
  _versus(runs, ("md", "curriculum"), path,
          f"Fig. 9 analogue: curriculum vs uniform ({len(runs['md'])} seeds)",
          mark=switch)  # fmt: skip


def fig10(runs, path: str, **_):
  _versus(runs, ("md", "rest"), path,
          f"Fig. 10 analogue: mirror descent vs ReST ({len(runs['md'])} "
          "seeds)")  # fmt: skip


def length_penalty(runs, path: str, *, switch: int, **_):
  plt, fig, axes = _panels(3, width=3.8)
  arms = ("md", "lp_on", "lp_warmup")
  for ax, (key, ylabel) in zip(axes, (
      ("pass1", "pass@1"), ("mean_length", "mean response tokens"),
      ("acc_per_1k_tokens", "pass@1 per 1k tokens")), strict=True):
    for arm in arms:
      its, v = stack(runs[arm], key)
      _band(ax, its, v, label=LABELS[arm], marker="o", ms=3)
    ax.axvline(switch, color="gray", ls=":")
    ax.set_xlabel("RL iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=6)
  fig.suptitle(f"Length penalty: off / on / after warm-up "
               f"({len(runs['md'])} seeds)", fontsize=10)  # fmt: skip
  _save(plt, fig, path)


# ---------------------------------------------------------------- claims


def _last(cs, key) -> np.ndarray:
  _, v = stack(cs, key)
  return v[:, -1]


def _first(cs, key) -> np.ndarray:
  _, v = stack(cs, key)
  return v[:, 0]


def claims(fig: str, runs) -> list[tuple[str, str]]:
  """(the report's claim, ours with its seed spread) for `fig`; effects
  are at the last evaluated iteration."""
  md = runs["md"]
  ds = difficulties(md)

  def end(cs, key):  # the mean over seeds, at the last iteration
    return float(np.mean(_last(cs, key)))

  def diff(a, b, key):  # a - b at the last iteration, per seed
    return stat(_last(a, key) - _last(b, key))

  def gain(cs, key):  # last - first iteration, per seed
    return stat(_last(cs, key) - _first(cs, key))

  if fig == "fig5":
    per_d = ", ".join(f"{d}: {end(md, f'mean_length_d{d}'):.1f}" for d in ds)
    return [(
      "Accuracy and response length grow together over RL iterations; "
      "harder problems grow longer responses",
      f"pass@1 {np.mean(_first(md, 'pass1')):.3f} -> {end(md, 'pass1'):.3f} "
      f"(gain {gain(md, 'pass1')}); mean tokens "
      f"{np.mean(_first(md, 'mean_length')):.1f} -> "
      f"{end(md, 'mean_length'):.1f} (gain {gain(md, 'mean_length')}); "
      f"final mean tokens per chain length {per_d}",
    )]  # fmt: skip
  if fig == "fig6":
    return [(
      "Accuracy rises with response length over training (positive slope "
      "of accuracy on length)",
      f"slope {stat([s * 100 for s in slopes(md)])} pass@1 per 100 tokens "
      "(per-seed least-squares fits over the checkpoints)",
    )]  # fmt: skip
  if fig == "fig8":
    sm = runs["small"]
    return [(
      "The larger model is more token-efficient: at equal length it is "
      "more accurate; the smaller one needs longer CoT to approach it",
      f"final pass@1 base - small {diff(md, sm, 'pass1')}; final mean "
      f"tokens base {end(md, 'mean_length'):.1f}, small "
      f"{end(sm, 'mean_length'):.1f}; pass@1 per 1k tokens base - small "
      f"{diff(md, sm, 'acc_per_1k_tokens')}",
    )]  # fmt: skip
  if fig == "fig9":
    cu = runs["curriculum"]
    hard = [f"pass1_d{d}" for d in ds[-2:]]
    h_cu = np.mean([_last(cu, k) for k in hard], axis=0)
    h_md = np.mean([_last(md, k) for k in hard], axis=0)
    return [(
      "Curriculum (easy then hard) beats uniform sampling after the switch",
      f"final pass@1 curriculum - uniform: all {diff(cu, md, 'pass1')}; "
      f"hardest two lengths {stat(h_cu - h_md)}",
    )]  # fmt: skip
  if fig == "fig10":
    re_ = runs["rest"]
    per = "; ".join(f"{d} steps {diff(md, re_, f'pass1_d{d}')}" for d in ds)
    return [(
      "Mirror descent beats ReST (no negative gradients) at every "
      "difficulty",
      f"final pass@1 mirror descent - ReST: all {diff(md, re_, 'pass1')}; "
      f"{per}",
    )]  # fmt: skip
  if fig == "length_penalty":
    on, wu = runs["lp_on"], runs["lp_warmup"]
    ends = ", ".join(
      f"{name} ({end(cs, 'mean_length'):.1f}, {end(cs, 'pass1'):.3f})"
      for name, cs in (("off", md), ("on", on), ("warm-up", wu)))
    return [(
      "The length penalty shortens responses; from the start it slows "
      "training, after a warm-up it keeps accuracy (no figure in the report)",
      f"final (mean tokens, pass@1): {ends}; tokens on - off "
      f"{diff(on, md, 'mean_length')}, warm-up - off "
      f"{diff(wu, md, 'mean_length')}; pass@1 on - off "
      f"{diff(on, md, 'pass1')}, warm-up - off {diff(wu, md, 'pass1')}",
    )]  # fmt: skip
  raise ValueError(fig)


DRAW = dict(fig5=fig5, fig6=fig6, fig8=fig8, fig9=fig9, fig10=fig10,
            length_penalty=length_penalty)  # fmt: skip
KEYS = ("pass1", "pass2", "pass4", "greedy_acc", "mean_length", "p95_length",
        "acc_per_1k_tokens")  # fmt: skip


def figure(fig: str, workdir: str, seeds: Sequence[int], *,
           config: str = CONFIG, runlocal: bool = False,
           command: str = "") -> dict[str, Any]:  # fmt: skip
  """Draws `fig` from the finished runs under `workdir` (made at the
  runlocal size or not): its PNG, CSV and markdown; returns what the
  markdown says."""
  exp = experiment(config)
  check_size(workdir, runlocal)
  arms = FIGURES[fig]
  at = exp.switch(runlocal)
  runs = {a: [curve(workdir, s, a, exp, at) for s in seeds] for a in arms}
  diff_keys = [f"{k}_d{d}" for d in difficulties(runs["md"])
               for k in ("pass1", "mean_length", "p95_length")]  # fmt: skip
  base = os.path.join(workdir, fig)
  curves_csv(base + ".csv", runs, (*KEYS, *diff_keys), seeds)
  DRAW[fig](runs, base + ".png", switch=at)
  own = sorted(f"seed_{s}/{a}" for s in seeds for a in needed(arms, exp.ARMS))
  wall = sum(arm_wall(os.path.join(os.path.abspath(workdir), k)) for k in own)
  out = dict(figure=fig, seeds=list(seeds), claims=claims(fig, runs),
             wall_s=wall, runs=own, command=command)  # fmt: skip
  with open(base + ".md", "w") as f:
    f.write(markdown(out))
  return out


def markdown(out: dict[str, Any]) -> str:
  w = out["wall_s"]
  lines = [f"## {out['figure']} ({len(out['seeds'])} seeds: "
           f"{', '.join(map(str, out['seeds']))})", ""]  # fmt: skip
  if out["command"]:
    lines += [f"    {out['command']}", ""]
  for paper, ours in out["claims"]:
    lines += [f"- report: {paper}", f"- k15: {ours}"]
  lines += ["", f"Compute: {len(out['runs'])} runs, {w / 60:.1f} min of "
            "wall time summed over them (each run's wall_time.json; with "
            "--jobs N, N of them ran at once)."]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # noqa: PLC0415

  p = argparse.ArgumentParser(prog="python -m k15.figures",
                              description=__doc__.split("\n")[0])
  p.add_argument("figure", choices=(*FIGURES, "all"))
  p.add_argument("--workdir", required=True)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--config", default=CONFIG)
  p.add_argument("--jobs", type=int, default=1,
                 help="runs at once (2 fills a 2-core machine)")
  p.add_argument("--runlocal", action="store_true",
                 help="the smoke size (tests, notebooks)")
  p.add_argument("--plot_only", action="store_true",
                 help="draw from finished runs; run nothing")
  a = p.parse_args(argv)
  figs = list(FIGURES) if a.figure == "all" else [a.figure]
  try:
    _plt()  # before any run: the figures need matplotlib
    seeds = sweep.parse_seeds(a.seeds)
    command = "python -m k15.figures " + " ".join(argv or sys.argv[1:])
    t0 = time.time()
    walls = {}
    if not a.plot_only:
      arms = sorted({x for f in figs for x in FIGURES[f]})
      walls = run_arms(a.config, a.workdir, seeds, arms,
                       runlocal=a.runlocal, jobs=a.jobs)  # fmt: skip
    for f in figs:
      out = figure(f, a.workdir, seeds, config=a.config,
                   runlocal=a.runlocal, command=command)  # fmt: skip
      print(markdown(out), flush=True)
    print(f"figures: {time.time() - t0:.0f} s wall for this command "
          f"({len(walls)} runs made)", flush=True)
  except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
    print(f"k15.figures: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
