"""Metrics: TensorBoard scalars, a JSONL copy, a progress bar, summaries.

Only process 0 writes. The JSONL file (`metrics.jsonl`) is the source the
figure scripts read; every record carries `stage` and `step`. On resume the
writer drops records at or past the resumed step, so the curves continue
without duplicates.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np


def _scalar(v: Any) -> float | None:
  try:
    f = float(np.asarray(v))
  except (TypeError, ValueError):
    return None
  return f


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch when it is installed (about 6 s at every
  start-up, paid again by each restart of a preempted run) although we log
  only floats; torch is hidden for that import and stays importable.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      self._tb = _summary_writer()(os.path.join(workdir, "tb"))

  def truncate(self, stage: str, step: int) -> None:
    """Drops records of `stage` at or after `step` (and of later stages).

    Called on resume so a rerun from a checkpoint rewrites those records.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    keep, dropping = [], False
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue  # a torn last line from a crash
        if rec.get("stage") == stage and rec.get("step", -1) >= step:
          dropping = True
        if not dropping:
          keep.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    rec: dict[str, Any] = {"stage": stage, "step": int(step)}
    for k, v in metrics.items():
      f = _scalar(v)
      if f is None:
        continue
      rec[k] = f if math.isfinite(f) else str(f)
      if self._tb is not None and math.isfinite(f):
        self._tb.add_scalar(f"{stage}/{k}", f, step)
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


class Progress:
  """A one-line progress bar with ETA (tqdm), quiet off process 0."""

  def __init__(self, total: int, desc: str, initial: int = 0):
    self._bar = None
    self._t0 = time.time()
    if jax.process_index() == 0:
      from tqdm import tqdm  # noqa: PLC0415

      self._bar = tqdm(total=total, initial=initial, desc=desc,
                       dynamic_ncols=True, mininterval=1.0)

  def update(self, n: int = 1, **postfix: Any) -> None:
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v)
                             for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def summary_table(rows: dict[str, dict[str, float]]) -> str:
  """Markdown table: one row per name, one column per metric."""
  cols: list[str] = []
  for r in rows.values():
    cols += [c for c in r if c not in cols]
  lines = ["| run | " + " | ".join(cols) + " |",
           "|---|" + "---|" * len(cols)]
  for name, r in rows.items():
    cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else
             str(r.get(c, "")) for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
