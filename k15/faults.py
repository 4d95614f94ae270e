"""Test-only fault injection: kill or poison a run at a named point.

The resume and NaN-guard tests (`tests/test_resume.py`, `tests/test_faults.py`)
run the main command in a subprocess and need to hit exact points of it: the
middle of a rollout, of an update, of an asynchronous checkpoint save. Two
environment variables, which nothing but tests sets (they are not config
fields, so no experiment can turn them on):

  K15_TEST_KILL_AT=<stage>:<step>:<phase>[:TERM]
      SIGKILL (or SIGTERM) this process when it reaches `phase` of `step`
      (the 1-based step that its metrics and checkpoint carry) in `stage`.
      Phases: `rollout` (after generation, before scoring), `update` (after
      the first minibatch update was dispatched), `save` (while the async
      save of `step` is writing its temporary directory), `eval` (before the
      stage's final evaluation).
  K15_TEST_NAN_AT=<stage>:<step>[:<minibatch>][,...]
      NaN advantages in that RL step's minibatch (every minibatch when none
      is given), so the update is non-finite and must be skipped.
  K15_TEST_DUMP_DIR=<dir>
      At every checkpoint save, each process writes the arrays it holds of
      the saved tree to <dir>/<stage>.<step>.p<process>.npz (its own
      replica of replicated arrays), so the multi-host test can check that
      the processes agree with each other and with a 1-process run.

Unset, every hook is one dictionary lookup.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import time

KILL_ENV = "K15_TEST_KILL_AT"
NAN_ENV = "K15_TEST_NAN_AT"
DUMP_ENV = "K15_TEST_DUMP_DIR"


def point(stage: str, step: int, phase: str, *, ckpt_dir: str = "") -> None:
  """Signals this process if K15_TEST_KILL_AT names (stage, step, phase)."""
  spec = os.environ.get(KILL_ENV)
  if not spec:
    return
  parts = spec.split(":")
  if parts[:3] != [stage, str(step), phase]:
    return
  sig = signal.SIGTERM if parts[3:] == ["TERM"] else signal.SIGKILL
  if phase == "save":
    # The async save has begun; wait until it is writing, not yet renamed.
    pattern = os.path.join(ckpt_dir, f"{step}.orbax-checkpoint-tmp*")
    deadline = time.time() + 60
    while not glob.glob(pattern) and time.time() < deadline:
      time.sleep(0.0005)
  print(
    f"k15 fault injection: {sig.name} at {stage}:{step}:{phase}",
    file=sys.stderr,
    flush=True,
  )
  os.kill(os.getpid(), sig)
  if sig == signal.SIGKILL:
    time.sleep(600)  # the signal is delivered before this returns


def nan_at(stage: str, step: int, minibatch: int) -> bool:
  """Whether K15_TEST_NAN_AT poisons this (stage, step, minibatch)."""
  spec = os.environ.get(NAN_ENV)
  if not spec:
    return False
  for item in spec.split(","):
    parts = item.strip().split(":")
    if parts[:2] == [stage, str(step)] and (
      len(parts) == 2 or parts[2] == str(minibatch)
    ):
      return True
  return False


def dump(stage: str, step: int, tree) -> None:
  """Writes this process's view of `tree` if K15_TEST_DUMP_DIR is set."""
  out = os.environ.get(DUMP_ENV)
  if not out:
    return
  import jax  # noqa: PLC0415 - only tests get here
  import numpy as np  # noqa: PLC0415

  from k15 import sharding  # noqa: PLC0415

  arrays = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, jax.Array) and x.is_fully_replicated:
      x = x.addressable_data(0)  # this process's own copy
    arrays[jax.tree_util.keystr(path)] = np.asarray(sharding.gather(x))
  name = f"{stage}.{step}.p{jax.process_index()}.npz"
  np.savez(os.path.join(out, name), **arrays)
