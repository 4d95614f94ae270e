"""Checkpoints of the whole run state with orbax.

A checkpoint has two items: `state` (the TrainState pytree plus any numpy
arrays of host state, e.g. per-prompt success statistics) and `host` (JSON:
stage, iteration, counters, results). Saves are asynchronous; orbax writes a
step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
save interrupted by a crash is never picked up (the leftover directory is
reported and removed when the next run opens the manager). The manager keeps
the newest `keep` steps.

Restore checks the saved tree against the config first: a parameter whose
shape or dtype differs, or that only one side has, fails with its path (the
checkpoint was written with another config; nothing is touched). A step that
is unreadable (corrupt or partial files) is reported and the previous step is
used; the unreadable one is moved to `<directory>.unreadable/` so that the
resumed run can write that step again. Nothing here deletes a checkpoint
except orbax's keep policy after a successful save.

Another run's checkpoints (a stage's initial weights, `k15.sources`) are
read without a manager: `committed_steps`, `read_host` and `restore_params`
never create, clean up or move anything in that run's directory, which may
still be running.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from k15 import faults

_TMP = ".orbax-checkpoint-tmp"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 10  # RL iterations between saves (and at every stage end)
  keep: int = 3
  async_save: bool = True

  def __post_init__(self):
    if self.every < 1:
      raise ValueError(f"ckpt.every={self.every}: must be >= 1")
    if self.keep < 1:
      raise ValueError(
        f"ckpt.keep={self.keep}: must be >= 1 (the newest "
        "checkpoint is what a restart resumes from)"
      )


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message names file and field."""


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  # Registered up front so a fresh process can read item metadata (shapes)
  # before it restores anything.
  reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item, save, restore in (
    ("state", ocp.args.StandardSave, ocp.args.StandardRestore),
    ("host", ocp.args.JsonSave, ocp.args.JsonRestore),
  ):
    reg.add(item, save)
    reg.add(item, restore)
  return reg


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (state, host) items."""

  def __init__(
    self, directory: str, cfg: CheckpointConfig = CheckpointConfig()
  ):
    self.directory = os.path.abspath(directory)
    parent = os.path.dirname(self.directory)
    if not os.path.isdir(parent):
      raise FileNotFoundError(
        f"checkpoint: parent directory {parent} does not exist"
      )
    stale = sorted(glob.glob(os.path.join(self.directory, f"*{_TMP}*")))
    if stale and jax.process_index() == 0:
      logging.warning(
        "checkpoint: removing %d half-written checkpoint(s) left by an "
        "interrupted save (never used): %s",
        len(stale),
        ", ".join(os.path.basename(p) for p in stale),
      )
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        create=True,
        cleanup_tmp_directories=True,
      ),
      handler_registry=_registry(),
    )

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, host: dict) -> None:
    """Starts an async save of `step`; `wait`/`close` block until written."""
    faults.dump(os.path.basename(self.directory), step, state)
    self._mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)
      ),
      force=True,
    )
    faults.point(
      os.path.basename(self.directory), step, "save", ckpt_dir=self.directory
    )

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def restore(
    self, abstract_state: Any, step: int | None = None
  ) -> tuple[int, Any, dict] | None:
    """(step, state, host) of `step` or the newest readable checkpoint.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct (with shardings) or
    arrays, giving the structure, shapes and placement to restore into.
    Returns None when there is no checkpoint at all. Raises CheckpointError
    when the checkpoint does not match `abstract_state` or none is readable.
    """
    steps = self.steps() if step is None else [step]
    if not steps:
      return None
    target = jax.tree.map(_abstract, abstract_state)
    unreadable: list[tuple[int, str]] = []
    for s in reversed(steps):
      try:
        meta = self._mngr.item_metadata(s)
        saved = meta["state"] if meta is not None else None
      except Exception as e:  # noqa: BLE001 - report and fall back
        saved, why = None, e
      else:
        why = None
      if saved is None:
        unreadable.append((s, f"no readable metadata ({why!r:.300})"))
        continue
      _check_compatible(saved, target, self.directory, s)
      try:
        out = self._mngr.restore(
          s,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()
          ),
        )
        host = out["host"]
        if not isinstance(host, dict):
          raise TypeError(f"host item is {type(host).__name__}, not a dict")
      except Exception as e:  # noqa: BLE001 - report and fall back
        unreadable.append((s, repr(e)[:300]))
        continue
      if unreadable:
        self._set_aside(unreadable, s)
      return s, out["state"], host
    raise CheckpointError(
      f"checkpoint: no readable checkpoint in {self.directory}: "
      + "; ".join(f"step {s}: {why}" for s, why in unreadable)
      + ". Nothing was changed; move the directory aside to start this "
      "stage afresh."
    )

  def _set_aside(self, unreadable: list[tuple[int, str]], used: int) -> None:
    """Moves unreadable newer steps out of the manager's view (kept)."""
    aside = self.directory + ".unreadable"
    for s, why in unreadable:
      dest = os.path.join(aside, str(s))
      n = 1
      while os.path.exists(dest):
        dest, n = os.path.join(aside, f"{s}.{n}"), n + 1
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        os.rename(os.path.join(self.directory, str(s)), dest)
      logging.error(
        "checkpoint: step %d in %s is unreadable (%s); resuming from step "
        "%d. The unreadable step was moved to %s.",
        s,
        self.directory,
        why,
        used,
        dest,
      )
    if jax.process_count() > 1:  # every host sees the move before reload
      multihost_utils.sync_global_devices("k15 checkpoint set aside")
    self._mngr.reload()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


_FIX = (
  "; it was written with a different config (use another --workdir "
  "or the original config). Nothing was changed."
)


def _check_compatible(
  saved, target, directory: str, step: int, fix: str = _FIX
) -> None:
  """Raises naming the first array whose saved shape/dtype differs."""
  flat_saved = dict(_flatten(saved))
  flat_target = dict(_flatten(target))
  where = f"checkpoint step {step} in {directory} does not match the config"
  for path, want in flat_target.items():
    got = flat_saved.get(path)
    if got is None:
      raise CheckpointError(
        f"{where}: {path} is missing from the checkpoint{fix}"
      )
    shape = getattr(got, "shape", None)
    if shape is not None and tuple(shape) != tuple(want.shape):
      raise CheckpointError(
        f"{where}: {path} has shape {tuple(shape)} in the checkpoint but "
        f"{tuple(want.shape)} in the config{fix}"
      )
    dtype = getattr(got, "dtype", None)
    if dtype is not None and np.dtype(dtype) != np.dtype(want.dtype):
      raise CheckpointError(
        f"{where}: {path} has dtype {np.dtype(dtype)} in the checkpoint "
        f"but {np.dtype(want.dtype)} in the config{fix}"
      )
  extra = sorted(set(flat_saved) - set(flat_target))
  top = {p.split("/")[0] for p in flat_target}
  extra = [p for p in extra if p.split("/")[0] in top]
  if extra:
    raise CheckpointError(
      f"{where}: {extra[0]} is in the checkpoint but not in the config{fix}"
    )


def _flatten(tree) -> list[tuple[str, Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: hasattr(x, "shape")
  )[0]
  return [("/".join(_key(k) for k in path), leaf) for path, leaf in leaves]


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


# ---------------------------------------------------------------------------
# Read-only access to another run's checkpoints
# ---------------------------------------------------------------------------


def committed_steps(directory: str) -> list[int]:
  """Steps under `directory` whose save completed (no orbax temp dirs),
  ascending; [] when the directory does not exist. Creates nothing."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
      out.append(int(name))
  return sorted(out)


def read_host(directory: str, step: int) -> dict:
  """The host (JSON) item of `step`: stage, step, done, results, ..."""
  path = os.path.join(directory, str(step), "host", "metadata")
  try:
    with open(path) as f:
      host = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(
      f"checkpoint: cannot read {path} ({e!r:.200})"
    ) from None
  if not isinstance(host, dict):
    raise CheckpointError(f"checkpoint: {path} does not hold a JSON object")
  return host


def _params_metadata(directory: str, step: int) -> Any:
  path = os.path.join(directory, str(step), "state")
  try:
    handler = ocp.PyTreeCheckpointHandler()
    meta = handler.metadata(epath.Path(path)).tree
  except Exception as e:  # noqa: BLE001 - name the file
    raise CheckpointError(
      f"checkpoint: step {step} in {directory} is unreadable ({e!r:.300})"
    ) from None
  params = (
    meta.get("train", {}).get("params") if isinstance(meta, dict) else None
  )
  if not params:
    raise CheckpointError(
      f"checkpoint: step {step} in {directory} holds no train state params"
    )
  return params


def param_metadata(directory: str, step: int) -> dict[str, tuple]:
  """{parameter path: (shape, dtype name)} of `step`'s params, from the
  checkpoint's metadata (no array is read)."""
  return {
    path: (tuple(m.shape), str(np.dtype(m.dtype)))
    for path, m in flatten_paths(_params_metadata(directory, step))
  }


def flatten_paths(tree) -> list[tuple[str, Any]]:
  """[("a/b/c", leaf), ...]: every array-like leaf with its path."""
  return _flatten(tree)


def restore_params(directory: str, step: int, abstract_params: Any) -> Any:
  """The train state's params of `step` in `directory`, placed into the
  shardings of `abstract_params` (sharded ShapeDtypeStructs); the
  optimizer state and everything else in the checkpoint is not read.

  Raises CheckpointError naming the first parameter whose shape or dtype
  differs from `abstract_params`, or that only one side has.
  """
  path = os.path.join(directory, str(step), "state")
  target = {"train": {"params": jax.tree.map(_abstract, abstract_params)}}
  saved = {"train": {"params": _params_metadata(directory, step)}}
  _check_compatible(
    saved,
    target,
    directory,
    step,
    fix="; a run starting from it needs the same architecture in its "
    "model section.",
  )
  ckptr = ocp.PyTreeCheckpointer()
  restore_args = jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(
      sharding=x.sharding, global_shape=x.shape, dtype=x.dtype
    ),
    target,
  )
  out = ckptr.restore(
    path,
    args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True
    ),
  )
  return out["train"]["params"]
