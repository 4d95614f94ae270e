"""`python -m k15.main --config experiments/<x>.py[:args] --workdir DIR`.

Flags become a locked config (unknown `--config.a.b=...` overrides fail);
multi-host runs initialise `jax.distributed` first; the rest is
`k15.pipeline.run`, which notebooks and tests import directly.
"""

import os
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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # orbax logs every save at INFO through absl; keep the console readable.
  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax  # noqa: PLC0415 - after flags, so XLA_FLAGS set by a launcher apply

  if _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  from k15 import pipeline  # noqa: PLC0415

  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    sys.exit(f"k15: error: {e}")


if __name__ == "__main__":
  app.run(main)
