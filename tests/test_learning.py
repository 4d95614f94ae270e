"""RL learns: SFT -> RL -> held-out evaluation raises pass@1 by a clear margin.

`experiments/tiny.py:quick` end to end, in a subprocess on one CPU device
(what a user's laptop runs; the 8 fake devices of conftest.py would only
slow it down). Half of its warm-up traces end in a wrong answer, so the
warm-up answers its own (mostly right) chain of thought only about half
the time; 12 iterations of the report's
mirror-descent loss close much of that gap. The margin below is one that
seeds 0-4 clear with room to spare under both numerics settings we check
(docs/tiny.md). A loss with its sign flipped, advantages forced to zero,
or an update that is never applied each fail this test.
"""

import json
import os
import subprocess
import sys

import pytest

from k15 import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/tiny.py:quick"
# the config's own bar, which `--seeds 0-4` checks on every seed: 0.20,
# cleared by +0.32 to +0.52 on seeds 0-4 under both numerics settings
MARGIN = config_lib.load(os.path.join(ROOT, CONFIG)).targets.rl_minus_sft_pass1


def _one_device_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(
      f for f in flags if "xla_force_host_platform_device_count" not in f)
  return env


@pytest.mark.slow
def test_rl_raises_heldout_pass1(tmp_path):
  workdir = tmp_path / "quick"
  p = subprocess.run(
      [sys.executable, "-m", "k15.main", "--config",
       CONFIG, "--workdir", str(workdir)],
      cwd=ROOT, env=_one_device_env(), capture_output=True, text=True,
      timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(workdir / "summary.json") as f:
    res = json.load(f)["results"]
  sft, rl = res["sft"]["pass1"], res["rl"]["pass1"]
  assert rl - sft >= MARGIN, (
      f"RL did not learn: held-out pass@1 {sft:.3f} after the warm-up, "
      f"{rl:.3f} after RL (needs +{MARGIN})")
