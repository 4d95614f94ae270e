"""Exact resume: a run that is SIGKILLed at several points (mid rollout, mid
update, mid async checkpoint save, before a stage's final evaluation) and
preempted with SIGTERM, and restarted with the same command each time, ends
with the same parameters, checkpointed host state, summary and metrics.jsonl
records, bit for bit on CPU, as a run that was never interrupted.

Every run is `python -m k15.main` in a subprocess on the tiny runlocal config
with 4 RL iterations and a checkpoint after each, a length penalty (so that
RL updates are not zero), prioritized prompt sampling (the draws depend on the
checkpointed success statistics) and partial rollouts with a 16-token budget
(trajectories continue across iterations from the checkpointed buffer; the
first updates happen in step 3, when the first groups finish). Kill points
come from the test-only hook in `k15/faults.py` (K15_TEST_KILL_AT). Compiled
programs are shared across the subprocesses through JAX's persistent
compilation cache (K15_TEST_JAX_CACHE, default under the system temp dir), so
each restart costs start-up only.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny.py has no partial-rollout fields to override, so the test's config
# is a small experiment file built on it.
CONFIG = """
from k15 import config_lib


def get_config(arg=None):
  c = config_lib.load({tiny!r}, "runlocal")
  c.rl.iterations = 4
  c.ckpt.every = 1
  c.length_penalty.update(schedule="constant", weight=0.5)
  c.data.strategy = "prioritized"
  c.rollout.partial = True
  c.rollout.budget = 16
  return c
"""
STAGES = ("sft", "rl", "control")
WALL_CLOCK = ("_time", "_per_s")  # metric keys that differ between runs


def _env(**extra):
  cache = os.environ.get("K15_TEST_JAX_CACHE") or os.path.join(
    tempfile.gettempdir(), f"k15-test-jax-cache-{os.getuid()}"
  )
  env = dict(os.environ)  # conftest's 8 fake CPU devices carry over
  for k in ("K15_TEST_KILL_AT", "K15_TEST_NAN_AT"):
    env.pop(k, None)
  env.update(
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    **extra,
  )
  return env


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "resume.py"
  path.write_text(CONFIG.format(tiny=os.path.join(REPO, "experiments/tiny.py")))
  return str(path)


def run_main(workdir, config, *args, timeout=300, **env):
  """Runs the main command; returns (returncode, stderr)."""
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "k15.main",
      f"--config={config}",
      *args,
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env=_env(**env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return p.returncode, p.stderr


def final_checkpoint(ckpt_dir):
  """(step, {path: numpy array}, host) of the newest step, read with orbax
  alone (a numpy target built from the saved metadata)."""
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  step_dir = os.path.join(ckpt_dir, str(steps[-1]))
  with ocp.StandardCheckpointer() as reader:
    meta = reader.metadata(os.path.join(step_dir, "state"))
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(
      lambda m: np.zeros(m.shape, m.dtype),
      dict(meta),
      is_leaf=lambda m: hasattr(m, "shape"),
    )
    state = reader.restore(os.path.join(step_dir, "state"), target)
  with open(os.path.join(step_dir, "host", "metadata")) as f:
    host = json.load(f)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return (
    steps[-1],
    {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat},
    host,
  )


def metric_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return [
    {k: v for k, v in r.items() if not k.endswith(WALL_CLOCK)} for r in recs
  ]


def assert_same_run(got_dir, want_dir):
  """Bitwise equal final state of every stage, host state, summary and
  metric records (wall-clock fields excluded)."""
  for stage in STAGES:
    g_step, g_arrays, g_host = final_checkpoint(f"{got_dir}/ckpt/{stage}")
    w_step, w_arrays, w_host = final_checkpoint(f"{want_dir}/ckpt/{stage}")
    assert g_step == w_step and g_host == w_host, (stage, g_host, w_host)
    assert g_host["done"], stage
    assert g_arrays.keys() == w_arrays.keys()
    for k, w in w_arrays.items():
      g = g_arrays[k]
      assert g.dtype == w.dtype and g.shape == w.shape, (stage, k)
      assert g.tobytes() == w.tobytes(), f"{stage} {k} differs"
  got, want = metric_records(got_dir), metric_records(want_dir)
  assert [(r["stage"], r["step"]) for r in got] == [
    (r["stage"], r["step"]) for r in want
  ]
  for g, w in zip(got, want, strict=True):
    assert g == w, (g, w)
  with (
    open(f"{got_dir}/summary.json") as f,
    open(f"{want_dir}/summary.json") as g,
  ):
    assert json.load(f) == json.load(g)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, config):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  rc, err = run_main(workdir, config)
  assert rc == 0, err[-3000:]
  recs = metric_records(workdir)
  rl = [r for r in recs if r["stage"] == "rl"]
  assert [r["step"] for r in rl] == [1, 2, 3, 4]
  # the state a resume must restore is really there: trajectories in flight
  # at every checkpoint, and RL updates that change the weights
  assert all(r["rollout/buffer_running"] > 0 for r in rl), rl
  # (the kill points below sit in steps 3-4, which must update the weights;
  # whether earlier groups already finish depends on the tiny task's tuning)
  assert all(r.get("grad_norm", 0) > 0 for r in rl[2:]), rl
  return workdir


# Where each run of the chain is stopped; each restart resumes from what the
# previous one left. `:TERM` sends SIGTERM (preemption) instead of SIGKILL.
POINTS = (
  # the final SFT save (after its eval was logged) is in flight
  "sft:10:save",
  # rollout of RL step 2 done, nothing of it recorded
  "rl:2:rollout",
  # preempted in RL step 3's update: it finishes step 3, checkpoints, exits 0
  "rl:3:update:TERM",
  # the first minibatch update of step 4 dispatched
  "rl:4:update",
  # after the last RL iteration (no checkpoint at the last step) before eval
  "rl:4:eval",
  # control's first checkpoint half written: the stage restarts afresh and
  # must drop the records the killed run logged
  "control:2:save",
)


def test_killed_and_preempted_runs_resume_exactly(
  tmp_path, config, uninterrupted
):
  workdir = str(tmp_path / "run")
  mid_save = False
  for point in (*POINTS, None):
    env = {"K15_TEST_KILL_AT": point} if point else {}
    rc, err = run_main(workdir, config, **env)
    if mid_save:  # the restart reported the interrupted save
      assert "half-written" in err, err[-3000:]
    if point is None:
      assert rc == 0, err[-3000:]
      break
    stage, step, phase, *term = point.split(":")
    ckpt = f"{workdir}/ckpt/{stage}"
    mid_save = phase == "save"
    if term:
      _check_preempted(workdir, point, rc, err)
      continue
    assert rc == -signal.SIGKILL, (point, rc, err[-3000:])
    assert f"SIGKILL at {point}" in err, (point, err[-3000:])
    if mid_save:  # killed mid-write: only the temporary dir exists
      assert os.path.isdir(f"{ckpt}/{step}.orbax-checkpoint-tmp"), os.listdir(
        ckpt
      )
      assert not os.path.exists(f"{ckpt}/{step}"), os.listdir(ckpt)
  for stage in STAGES:
    leftovers = [n for n in os.listdir(f"{workdir}/ckpt/{stage}") if "tmp" in n]
    assert not leftovers, (stage, leftovers)
  assert_same_run(workdir, uninterrupted)


def _check_preempted(workdir, point, rc, err):
  """SIGTERM during RL step N: exit 0 after checkpointing step N; nothing of
  step N + 1 or later stages was started."""
  stage, step = point.split(":")[:2]
  assert rc == 0, (point, err[-3000:])
  assert f"SIGTERM at {point[: -len(':TERM')]}" in err, err[-3000:]
  assert "preempted" in err, err[-3000:]
  names = os.listdir(f"{workdir}/ckpt/{stage}")
  steps = sorted(int(n) for n in names if n.isdigit())
  assert steps[-1] == int(step), steps
  recs = metric_records(workdir)
  assert (recs[-1]["stage"], recs[-1]["step"]) == (stage, int(step))
  assert not os.path.exists(f"{workdir}/ckpt/control")
  assert not os.path.exists(f"{workdir}/summary.json")
