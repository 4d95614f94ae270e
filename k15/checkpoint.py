"""Checkpoints of the whole run state with orbax.

A checkpoint has two items: `state` (the TrainState pytree plus any numpy
arrays of host state, e.g. per-prompt success statistics) and `host` (JSON:
stage, iteration, counters, schedule positions). Orbax writes into a
temporary directory and renames it when complete, so a half-written
checkpoint is never picked up; saves are asynchronous and the manager keeps
the newest `keep`. Restore falls back to the previous step when the newest
is unreadable, and reports it; a shape mismatch with the config names the
parameter. Nothing here ever deletes a checkpoint except orbax's keep policy
after a successful save.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 10  # RL iterations between saves (and at every stage end)
  keep: int = 3
  async_save: bool = True


class CheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (state, host) items."""

  def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig()):
    self.directory = os.path.abspath(directory)
    parent = os.path.dirname(self.directory)
    if not os.path.isdir(parent):
      raise FileNotFoundError(f"checkpoint: parent directory {parent} does "
                              "not exist")
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
            create=True))

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, host: dict, *, force: bool = True
           ) -> None:
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
                    force=force)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[int, Any, dict] | None:
    """(step, state, host) of `step` or the newest readable checkpoint.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct (with shardings) or
    arrays, giving the structure, shapes and placement to restore into.
    Returns None when there is no checkpoint at all.
    """
    steps = self.steps() if step is None else [step]
    if not steps:
      return None
    target = jax.tree.map(_abstract, abstract_state)
    errors = []
    for s in reversed(steps):
      try:
        _check_shapes(self._mngr.item_metadata(s), target, self.directory, s)
        out = self._mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            host=ocp.args.JsonRestore()))
        if errors:
          logging.warning("checkpoint: restored step %d after skipping "
                          "unreadable newer ones: %s", s, "; ".join(errors))
        return s, out["state"], out["host"]
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - report and fall back
        msg = f"step {s} in {self.directory} is unreadable ({e!r:.300})"
        logging.error("checkpoint: %s", msg)
        errors.append(msg)
    raise CheckpointError("checkpoint: no readable checkpoint: "
                          + "; ".join(errors))


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _check_shapes(metadata, target, directory: str, step: int) -> None:
  """Raises naming the first array whose saved shape differs from config."""
  try:
    saved = metadata["state"]
  except (KeyError, TypeError):
    return
  if saved is None:
    return
  flat_saved = dict(_flatten(saved))
  for path, want in _flatten(target):
    got = flat_saved.get(path)
    shape = getattr(got, "shape", None)
    if got is not None and shape is not None and tuple(shape) != tuple(
        want.shape):
      raise CheckpointError(
          f"checkpoint step {step} in {directory} does not match the config: "
          f"{path} has shape {tuple(shape)} in the checkpoint but "
          f"{tuple(want.shape)} in the model")


def _flatten(tree) -> list[tuple[str, Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return [("/".join(_key(k) for k in path), leaf) for path, leaf in leaves]


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)
