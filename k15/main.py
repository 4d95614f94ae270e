"""`python -m k15.main --config experiments/<x>.py[:args] --workdir DIR`.

Flags become a locked config (unknown `--config.a.b=...` overrides fail);
multi-host runs initialise `jax.distributed` first; the rest is
`k15.pipeline.run`, which notebooks and tests import directly; with
`--seeds 0,1,2` it is `k15.sweep.run`, once per seed, with a results table.

`--dry_run [--dry_run.hbm_gib=95] [--dry_run.devices=64]` checks the config
against a pod instead of training (`k15.tools.plan`): it compiles the update
step and the sampler for the config's mesh on fake CPU devices, prints
per-device memory and FLOPs, and exits 1 when a program needs more than
hbm_gib.
"""

import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/tiny.py:runlocal",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (logs, "
                               "checkpoints); rerunning resumes.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", os.environ.get("K15_COORDINATOR"),
    "host:port of process 0 for multi-host runs (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("K15_NUM_PROCESSES", "1")),
    "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("K15_PROCESS_ID", "0")),
    "This process's index in a multi-host run.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Plan the config on fake CPU devices (k15.tools.plan): "
    "per-device memory and FLOPs; no training, nothing allocated.")
# absl accepts dots in flag names, so the dotted spelling is the flag itself;
# --dry_run_hbm_gib is an alias for shells and tools that dislike dots.
_DRY_RUN_HBM = flags.DEFINE_float(
    "dry_run.hbm_gib", None, "With --dry_run: per-device memory in GiB; exit "
    "1 when a program needs more (default: only report).")
flags.DEFINE_alias("dry_run_hbm_gib", "dry_run.hbm_gib")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run.devices", None, "With --dry_run: mesh size (default: the mesh's "
    "product, or 64 when an axis is -1).")
flags.DEFINE_alias("dry_run_devices", "dry_run.devices")
_SEEDS = flags.DEFINE_string(
    "seeds", None, "Run the experiment once per seed (e.g. 0,1,2 or 0-4), "
    "each in WORKDIR/seed_<n>, and write WORKDIR/results.{md,json}: mean, "
    "spread and every seed's numbers (k15.sweep).")
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["workdir", "dry_run"], lambda f: f["workdir"] is not None or f["dry_run"],
    "--workdir is required (except with --dry_run)")


def main(argv):
  del argv
  # orbax logs every save at INFO through absl; keep the console readable.
  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax  # noqa: PLC0415 - after flags, so XLA_FLAGS set by a launcher apply

  if _DRY_RUN.value:
    from k15.tools import plan  # noqa: PLC0415

    try:
      sys.exit(plan.main(_CONFIG.value, hbm_gib=_DRY_RUN_HBM.value,
                         num_devices=_DRY_RUN_DEVICES.value))
    except (ValueError, TypeError, KeyError) as e:
      sys.exit(f"k15: error: {e}")
  if _NUM_PROCESSES.value > 1:
    # CPU processes need a cross-process collective backend (gloo over TCP;
    # GPU/TPU bring their own). Set before the backend is first created.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  from k15 import (  # noqa: PLC0415
    checkpoint,
    config_lib,
    pipeline,
    sweep,
  )

  try:
    if _SEEDS.value is not None:
      command = " ".join(["python -m k15.main", *sys.argv[1:]])
      sweep.run(_CONFIG.value, _WORKDIR.value,
                sweep.parse_seeds(_SEEDS.value),
                about=sweep.environment(command, os.environ))
    else:
      pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, checkpoint.CheckpointError,
          FileNotFoundError) as e:
    # bad input: one line naming the field / path; anything else is a bug
    # and keeps its traceback
    sys.exit(f"k15: error: {e}")


def _parse_flags(argv):
  """absl's flag parsing, where an override of a field the config lacks
  (`--config.model.d_modl=3`) is a one-line error naming it; ml_collections
  raises a traceback that names only the last key."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    why = e
    while isinstance(why, BaseException) and why.args:
      why = why.args[0]
    why = str(why).replace("\n", " ")
    key = re.match(r"'([^']+)'", why)
    given = [a.partition("=")[0] for a in argv[1:]
             if a.startswith("--config.")]
    named = [g for g in given if key and key.group(1) in g.split(".")]
    sys.exit(f"k15: error: unknown config field {' '.join(named or given)}: "
             f"{why}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
