"""Faults end to end through `python -m k15.main`: non-finite updates (NaN
injected with the test-only K15_TEST_NAN_AT hook of `k15/faults.py`), a
corrupt newest checkpoint, a checkpoint from another config, and config
errors that must fail before any work. In every case nothing already saved
is lost.

The runs are the tiny runlocal config (sft then 7 RL iterations of 2
minibatch updates, a checkpoint after each) in subprocesses sharing JAX's
persistent compilation cache with tests/test_resume.py.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from k15 import config_lib, pipeline
from k15.stages import rl as rl_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = (
  "--config=experiments/tiny.py:runlocal",
  "--config.stages=('sft', 'rl')",
  "--config.rl.iterations=7",
  "--config.rl.num_minibatches=2",
  "--config.ckpt.every=1",
  "--config.length_penalty.schedule=constant",
  "--config.length_penalty.weight=0.5",
)


def run_main(workdir, *args, **env):
  cache = os.environ.get("K15_TEST_JAX_CACHE") or os.path.join(
    tempfile.gettempdir(), f"k15-test-jax-cache-{os.getuid()}"
  )
  full_env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("K15_TEST_KILL_AT", "K15_TEST_NAN_AT")
  }
  full_env.update(
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    **env,
  )
  p = subprocess.run(
    [sys.executable, "-m", "k15.main", *ARGS, *args, f"--workdir={workdir}"],
    cwd=REPO,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return p.returncode, p.stderr


def records(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["stage"] == stage]


def files(*roots):
  """{path relative to the roots' parent: bytes} of every file below."""
  out = {}
  for root in roots:
    for d, _, names in os.walk(root):
      for n in names:
        p = os.path.join(d, n)
        with open(p, "rb") as f:
          out[os.path.relpath(p, os.path.dirname(root))] = f.read()
  return out


def read_state(step_dir):
  """The saved state arrays, read with orbax alone into numpy."""
  with ocp.StandardCheckpointer() as reader:
    meta = reader.metadata(os.path.join(step_dir, "state"))
    meta = dict(getattr(meta, "item_metadata", meta))
    target = jax.tree.map(
      lambda m: np.zeros(m.shape, m.dtype),
      meta,
      is_leaf=lambda m: hasattr(m, "shape"),
    )
    return reader.restore(os.path.join(step_dir, "state"), target)


def test_nan_updates_are_skipped_then_stop_the_run_and_checkpoints_survive(
  tmp_path,
):
  assert rl_stage.RLConfig().max_consecutive_skips == 5  # the plan below
  workdir = str(tmp_path / "run")
  ckpt = f"{workdir}/ckpt/rl"
  # RL step 2: its first minibatch is poisoned (one skip, the run goes on);
  # steps 4 (second minibatch), 5 and 6: 5 consecutive skips, the limit.
  rc, err = run_main(workdir, K15_TEST_NAN_AT="rl:2:0,rl:4:1,rl:5,rl:6")
  assert rc != 0
  assert "FloatingPointError: rl step 6: 5 consecutive updates had a " in err
  assert f"last good checkpoint (step 5) in {ckpt} is intact" in err, err
  rl = records(workdir, "rl")
  assert [r["step"] for r in rl] == [1, 2, 3, 4, 5, 6]  # the last is logged
  assert [r["skipped"] for r in rl] == [0, 0.5, 0, 0.5, 1, 1]
  assert rl[1]["loss"] == "nan" and rl[2]["grad_norm"] > 0
  assert sorted(os.listdir(ckpt)) == ["3", "4", "5"]  # keep=3, none lost
  # the last good checkpoint is complete and finite
  state = read_state(f"{ckpt}/5")
  for leaf in jax.tree.leaves(state["train"]):
    assert np.isfinite(leaf).all()
  with open(f"{ckpt}/5/host/metadata") as f:
    host = json.load(f)
  assert host["step"] == 5 and host["skips"] == 3 and not host["done"]

  # Corrupt that newest checkpoint: the rerun reports it, sets it aside
  # (kept, byte for byte), resumes from step 4 and rewrites step 5 on its
  # way to the end.
  data = f"{ckpt}/5/state/d"
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.seek(os.path.getsize(f.name) // 2)
      f.write(b"\xff\x00corrupt\x00\xff")
  before = files(ckpt)
  rc, err = run_main(workdir)
  assert rc == 0, err[-3000:]
  assert "step 5 in " in err and "is unreadable" in err, err[-3000:]
  assert "resuming from step 4" in err and "rl.unreadable/5" in err
  moved = files(ckpt + ".unreadable")
  for path, content in before.items():
    if path.startswith("rl/5/"):
      assert moved[path.replace("rl/5/", "rl.unreadable/5/", 1)] == content
  rl = records(workdir, "rl")
  assert [r["step"] for r in rl] == [1, 2, 3, 4, 5, 6, 7]  # each once
  assert [r["skipped"] for r in rl] == [0, 0.5, 0, 0.5, 0, 0, 0]
  with open(f"{ckpt}/7/host/metadata") as f:
    assert json.load(f)["done"]

  # The same workdir with another model width: fails naming the parameter
  # and its two shapes; not one file changes.
  before = files(f"{workdir}/ckpt")
  rc, err = run_main(workdir, "--config.model.d_model=32")
  assert rc != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith("k15: error: checkpoint step 10 in "), last
  assert "ckpt/sft does not match the config: train/" in last, last
  assert "has shape" in last and ", 64)" in last and ", 32)" in last, last
  assert files(f"{workdir}/ckpt") == before


def _config(**flat):
  """The runlocal config as a plain dict with dotted fields replaced (any
  type: the CLI's own type check is not what is under test)."""
  cfg = config_lib.load(os.path.join(REPO, "experiments/tiny.py"), "runlocal")
  cfg = cfg.to_dict()
  for dotted, value in flat.items():
    *parents, leaf = dotted.split(".")
    node = cfg
    for name in parents:
      node = node[name]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize(
  "flat, field",
  [
    ({"rl.num_minibatches": 0}, "rl.num_minibatches"),
    ({"rollout.k": 0}, "rollout.k"),
    ({"sft.batch_size": 0}, "sft.batch_size"),
    ({"ckpt.every": 0}, "ckpt.every"),
    ({"ckpt.keep": 0}, "ckpt.keep"),
    ({"rl.max_consecutive_skips": 0}, "rl.max_consecutive_skips"),
    ({"rl.iterations": -1}, "rl.iterations"),
    ({"stages": "sft"}, "stages"),
    ({"seed": "1"}, "seed"),
    ({"mesh.data": 2.0}, "mesh.data"),
    ({"mesh.data": 3}, "mesh"),  # 3 does not divide 8 devices
    ({"rollout.budget": 10_000}, "rollout.budget"),  # > max_len
    ({"rollout.gen_rows": 12}, "rollout.gen_rows"),  # not divisible by 8
    ({"rl.tau": "0.1"}, "rl.tau"),
  ],
)
def test_bad_config_names_the_field(flat, field):
  cfg = _config(**flat)
  with pytest.raises((ValueError, TypeError)) as e:
    pipeline.settings(cfg, vocab_size=40, num_devices=8)
  assert field in str(e.value), str(e.value)


def test_unknown_keys_name_the_field():
  with pytest.raises(ValueError, match=r"rl\.tua"):
    pipeline.settings(_config(**{"rl.tua": 0.1}))
  with pytest.raises(ValueError, match=r"config\.chekpoint"):
    pipeline.settings(_config(chekpoint={}))


def test_bad_config_fails_before_any_work(tmp_path):
  """The command exits naming the field before it creates the workdir,
  trains a tokenizer or compiles anything."""
  workdir = tmp_path / "run"
  rc, err = run_main(str(workdir), "--config.mesh.data=3")
  assert rc != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith("k15: error: mesh") and "8" in last, last
  assert not workdir.exists()
