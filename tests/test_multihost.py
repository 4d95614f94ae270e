"""Multi-host: 2 processes x 4 CPU devices against 1 process x 8 devices.

`python -m k15.main --config experiments/tiny.py:runlocal` (SFT, RL, the
SFT control) runs as two local processes joined by `jax.distributed`
(coordinator on 127.0.0.1, gloo collectives) and, at the same time, as one
process with 8 fake devices; with tiny's mesh (data=-1) and (opt-in, see
MESHES) with (data=2, fsdp=2, tensor=2). At every checkpoint save each
process dumps the arrays it holds (`faults.dump`, test-only).

Pinned: both processes exit 0 and hold bitwise identical state at every
save; that state equals the 1-process run's to a few float32 ulps (see
MESHES; step counters, prompt-sampler statistics, sampled rollouts and
evaluation results exactly); metrics.jsonl and summary.json are written
once (by process 0) and equal the 1-process run's; each checkpoint step is
one orbax checkpoint (one host item, committed) with the 1-process run's
steps, and restoring it gives the dumped state exactly.
"""

import glob
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from k15 import checkpoint

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/tiny.py:runlocal"
# Meshes (config overrides) and the (rtol, atol) of 2x4 vs 1x8: 10x what
# was measured. Cross-process reductions run in gloo, which sums in another
# order than XLA:CPU's in-process collectives (sequential in device order),
# so the last bit differs from the first update on.
# data=-1 (tiny's own): every param and Adam moment at every save (up to 16
#   SFT / control steps) within 1e-7 + 1.05e-6 |x|.
# (data=2, fsdp=2, tensor=2): params split inside each process, data across
#   them; within 1e-7 + 7e-8 |x|. It doubles the test's time (~2.5 more
#   minutes on a loaded 2-core machine), so it runs with
#   K15_TEST_ALL_MESHES=1.
MESHES = {
  "data8": ([], (1e-5, 1e-7)),
  "dp_fsdp_tp": (
    ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
    (1e-5, 1e-7),
  ),
}
_ALL = bool(os.environ.get("K15_TEST_ALL_MESHES"))
PARAMS = [
  pytest.param(
    name,
    marks=pytest.mark.skipif(
      name != "data8" and not _ALL, reason="set K15_TEST_ALL_MESHES=1"
    ),
  )
  for name in MESHES
]
ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, dumps, devices, args, process_id=None, port=None, n=1):
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    K15_TEST_DUMP_DIR=str(dumps),
  )
  for k in ("K15_COORDINATOR", "K15_NUM_PROCESSES", "K15_PROCESS_ID"):
    env.pop(k, None)
  if process_id is not None:
    env.update(
      K15_COORDINATOR=f"127.0.0.1:{port}",
      K15_NUM_PROCESSES=str(n),
      K15_PROCESS_ID=str(process_id),
    )
  log = open(f"{workdir}.p{process_id or 0}.log", "w")
  cmd = [sys.executable, "-m", "k15.main", "--config", CONFIG]
  proc = subprocess.Popen(
    [*cmd, *args, "--workdir", str(workdir)],
    cwd=ROOT,
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  return proc, log


@pytest.fixture(scope="module", params=PARAMS)
def runs(request, tmp_path_factory):
  """(2-process workdir, its dumps, 1-process workdir, its dumps, tol)."""
  args, tol = MESHES[request.param]
  tmp = tmp_path_factory.mktemp(request.param)
  multi, one = tmp / "multi", tmp / "one"
  dm, d1 = tmp / "dumps_multi", tmp / "dumps_one"
  dm.mkdir()
  d1.mkdir()
  port = _free_port()
  procs = [_launch(multi, dm, 4, args, i, port, 2) for i in range(2)]
  procs.append(_launch(one, d1, 8, args))
  try:
    for p, _ in procs:
      p.wait(timeout=900)
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  logs = [f"{multi}.p0.log", f"{multi}.p1.log", f"{one}.p0.log"]
  for (p, _), path in zip(procs, logs, strict=True):
    if p.returncode:
      with open(path) as f:
        tail = f.read()[-3000:]
      pytest.fail(f"{path}: exit {p.returncode}\n{tail}")
  return multi, dm, one, d1, tol


def _dumps(d, process):
  out = {}
  for path in glob.glob(os.path.join(d, f"*.p{process}.npz")):
    name = os.path.basename(path).rsplit(".p", 1)[0]  # <stage>.<step>
    with np.load(path) as z:
      out[name] = dict(z)
  return out


def test_processes_agree_and_match_one_process(runs):
  multi, dm, one, d1, (rtol, atol) = runs
  p0, p1, ref = _dumps(dm, 0), _dumps(dm, 1), _dumps(d1, 0)
  # the same saves: sft every 2 steps, rl every 2 iterations, control every
  # step, and each stage's final step
  assert {"sft.10", "rl.3", "control.6", "sft.2"} <= set(ref)
  assert set(p0) == set(p1) == set(ref)
  worst = 0.0
  for name in sorted(ref):
    assert set(p0[name]) == set(p1[name]) == set(ref[name]), name
    for key, want in ref[name].items():
      a, b = p0[name][key], p1[name][key]
      # two processes, one global state: bitwise the same replicas
      np.testing.assert_array_equal(a, b, err_msg=f"{name} {key}")
      if not np.issubdtype(want.dtype, np.floating) or "count" in key:
        np.testing.assert_array_equal(a, want, err_msg=f"{name} {key}")
        continue
      # reduction-order noise scales with the tensor, not the element: an
      # element near 0 of a tensor of scale 0.25 may differ by 1e-6 after
      # Adam normalizes a near-zero gradient coordinate
      scale = float(np.abs(want).max())
      np.testing.assert_allclose(
        a, want, rtol=rtol, atol=max(atol, rtol * scale),
        err_msg=f"{name} {key}",
      )
      if scale > 0:
        worst = max(worst, float(np.abs(a - want).max() / scale))
  # training moved the params, so the comparison compares something
  emb = "['train'].params['params']['embedding']"
  assert not np.allclose(ref["control.6"][emb], ref["sft.2"][emb])
  print(f"2x4 vs 1x8: max |diff| / max |x| over all saves = {worst:.2e}")


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_metrics_and_summary_written_once_and_equal(runs):
  multi, _, one, _, (rtol, atol) = runs
  got, want = _records(multi), _records(one)
  # one writer: no record twice (eval records share step 0, not metrics)
  keys = [(r["stage"], r["step"], tuple(sorted(r))) for r in got]
  assert len(keys) == len(set(keys))
  assert keys == [(r["stage"], r["step"], tuple(sorted(r))) for r in want]
  for g, w in zip(got, want, strict=True):
    assert g.keys() == w.keys()
    for k in g:
      if k.endswith("time") or k.endswith("per_s"):
        continue
      if isinstance(w[k], float):
        np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol)
      else:
        assert g[k] == w[k], k
  with open(os.path.join(multi, "summary.json")) as f:
    s_multi = json.load(f)
  with open(os.path.join(one, "summary.json")) as f:
    s_one = json.load(f)
  # evaluation samples the same tokens: pass@1, lengths are exact
  assert s_multi == s_one


def test_checkpoints_written_once_and_restore_the_dumped_state(runs):
  multi, dm, one, _, _ = runs
  p0 = _dumps(dm, 0)
  for stage in ("sft", "rl", "control"):
    d_multi = os.path.join(multi, "ckpt", stage)
    d_one = os.path.join(one, "ckpt", stage)
    assert sorted(os.listdir(d_multi)) == sorted(os.listdir(d_one))
    assert not glob.glob(os.path.join(d_multi, "*tmp*"))
    last = max(int(s) for s in os.listdir(d_multi))
    step_dir = os.path.join(d_multi, str(last))
    # one orbax checkpoint: one commit, one host item, shards of both
    assert os.path.exists(os.path.join(step_dir, "commit_success.txt"))
    assert os.listdir(os.path.join(step_dir, "host")).count("metadata") == 1
    mngr = ocp.CheckpointManager(
      d_multi, handler_registry=checkpoint._registry()
    )
    meta = mngr.item_metadata(last)["state"]
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=ONE), meta
    )
    out = mngr.restore(
      last,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()
      ),
    )
    mngr.close()
    assert out["host"]["stage"] == stage and out["host"]["done"]
    dumped = {_canon(k): v for k, v in p0[f"{stage}.{last}"].items()}
    flat = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    assert {_canon(jax.tree_util.keystr(p)) for p, _ in flat} == set(dumped)
    for path, x in flat:
      key = _canon(jax.tree_util.keystr(path))
      np.testing.assert_array_equal(np.asarray(x), dumped[key], err_msg=key)


def _canon(key: str) -> str:
  """`['train'].step` (dataclass attribute) -> `['train']['step']` (orbax
  restores dataclasses and named tuples as dicts)."""
  return re.sub(r"\.(\w+)", r"['\1']", key)
