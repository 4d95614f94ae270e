"""`python -m k15.main` end to end in a subprocess: outputs, resume, bad input.

The runs use the test environment of conftest.py (JAX_PLATFORMS=cpu, 8 fake
CPU devices), so `experiments/tiny.py:runlocal` must divide over 8 devices.
"""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from k15 import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/tiny.py:runlocal"
# held-out curves: RL evaluates 8 problems after every 2nd iteration
EVERY = ("--config.eval.every=2", "--config.eval.every_problems=8")


def _main(*args, timeout=600):
  t0 = time.time()
  p = subprocess.run(
    [sys.executable, "-m", "k15.main", *args],
    cwd=ROOT,
    env=dict(os.environ),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return p, time.time() - t0


def _tail(p):
  return f"rc={p.returncode}\n--- stderr ---\n{p.stderr[-3000:]}"


def _snapshot(d):
  files = {}
  for root, _, names in os.walk(os.path.join(d, "ckpt")):
    for n in names:
      path = os.path.join(root, n)
      files[os.path.relpath(path, d)] = os.stat(path).st_mtime_ns
  with open(os.path.join(d, "metrics.jsonl")) as f:
    metrics = f.read()
  with open(os.path.join(d, "summary.json")) as f:
    summary = json.load(f)
  return dict(ckpt=files, metrics=metrics, summary=summary)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The command twice in one workdir: a fresh run, then a rerun."""
  d = str(tmp_path_factory.mktemp("main") / "run")
  first, t1 = _main("--config", CONFIG, "--workdir", d, *EVERY)
  assert first.returncode == 0, _tail(first)
  snap1 = _snapshot(d)
  second, t2 = _main("--config", CONFIG, "--workdir", d, *EVERY)
  assert second.returncode == 0, _tail(second)
  return dict(
    dir=d,
    first=first,
    second=second,
    t1=t1,
    t2=t2,
    snap1=snap1,
    snap2=_snapshot(d),
  )


def _expected_steps():
  c = config_lib.load(os.path.join(ROOT, CONFIG))
  epochs = c.rl.get("epochs", 1)
  return dict(
    sft=c.sft.steps,
    rl=c.rl.iterations,
    control=c.rl.iterations * c.rl.num_minibatches * epochs,
  )


@pytest.mark.slow
def test_run_writes_summary_with_all_results(runs):
  s = runs["snap1"]["summary"]
  res = s["results"]
  assert set(res) == {"sft", "rl", "control"}
  for stage, r in res.items():
    for key in ("pass1", "greedy_acc", "mean_length", "finished"):
      assert 0 <= r[key] <= (1 if key != "mean_length" else 1e9), (stage, key)
  assert s["rl_minus_sft_pass1"] == pytest.approx(
    res["rl"]["pass1"] - res["sft"]["pass1"]
  )
  assert s["rl_minus_control_pass1"] == pytest.approx(
    res["rl"]["pass1"] - res["control"]["pass1"]
  )
  # the summary table is printed too
  assert "rl_minus_sft_pass1" in runs["first"].stdout


@pytest.mark.slow
def test_run_writes_metrics_and_tensorboard(runs):
  d = runs["dir"]
  recs = [json.loads(line) for line in runs["snap1"]["metrics"].splitlines()]
  want = _expected_steps()
  for stage, n in want.items():
    steps = [r["step"] for r in recs if r["stage"] == stage]
    # eval.every > 0: RL's step 0 is the starting policy's held-out eval
    first = 0 if stage == "rl" else 1
    assert steps == list(range(first, n + 1)), (stage, steps)
  start, *rl = [r for r in recs if r["stage"] == "rl"]
  assert start["step"] == 0 and "heldout/pass1" in start
  assert all(k.startswith("heldout/") for k in start if "/" in k), start
  assert "reward" not in start and "loss" not in start
  for key in (
    "reward",
    "accuracy",
    "response_length",
    "loss",
    "rho_sq",
    "step_time",
    "gen_tokens_per_s",
  ):
    assert all(key in r for r in rl), key
  # eval.every=2 of 3 iterations: held-out metrics after iteration 2 only
  held = {r["step"]: r for r in rl if "heldout/pass1" in r}
  assert list(held) == [2], [r["step"] for r in rl]
  for key in ("pass1", "pass2", "greedy_acc", "mean_length", "p95_length"):
    assert 0 <= held[2][f"heldout/{key}"] <= (1e9 if "length" in key else 1)
  # per chain length: pass@1 with its bucket's mean and p95 length
  buckets = [k[len("heldout/pass1_d"):] for k in held[2]
             if k.startswith("heldout/pass1_d")]
  assert buckets
  for b in buckets:
    assert (held[2][f"heldout/mean_length_d{b}"]
            <= held[2][f"heldout/p95_length_d{b}"])
  assert held[2]["heldout/pass2"] >= held[2]["heldout/pass1"]
  evals = [r for r in recs if r["stage"] == "eval"]
  assert {k.split("/")[0] for r in evals for k in r if "/" in k} == {
    "sft",
    "rl",
    "control",
  }

  events = glob.glob(
    os.path.join(d, "tb", "**", "events.out.tfevents.*"), recursive=True
  )
  assert events, os.listdir(d)
  blob = b"".join(open(e, "rb").read() for e in events)
  for tag in (b"sft/loss", b"rl/reward", b"rl/accuracy", b"control/loss",
              b"rl/heldout/pass1"):
    assert tag in blob, tag


@pytest.mark.slow
def test_run_writes_checkpoints_per_stage(runs):
  d = runs["dir"]
  for stage, last in _expected_steps().items():
    ck = os.path.join(d, "ckpt", stage)
    steps = sorted(int(n) for n in os.listdir(ck) if n.isdigit())
    assert steps and steps[-1] == last, (stage, steps)
    assert os.path.isdir(os.path.join(ck, str(last), "state"))


@pytest.mark.slow
def test_rerun_resumes_instead_of_starting_over(runs):
  s1, s2 = runs["snap1"], runs["snap2"]
  assert s2["summary"] == s1["summary"]
  # nothing was trained or logged again: no duplicate metrics records
  assert s2["metrics"] == s1["metrics"]
  # and no checkpoint was rewritten or removed
  assert s2["ckpt"] == s1["ckpt"]


def test_missing_workdir_parent_is_named(tmp_path):
  parent = tmp_path / "no" / "such"
  p, _ = _main("--config", CONFIG, "--workdir", str(parent / "run"))
  assert p.returncode != 0
  assert str(parent) in p.stderr, _tail(p)
  assert "Traceback" not in p.stderr, _tail(p)
  assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(
  "args, named",
  [
    (["--config.model.d_modl=3"], "model.d_modl"),
    (["--config.model.d_model=big"], "model.d_model"),
  ],
)
def test_bad_override_is_named(tmp_path, args, named):
  d = tmp_path / "run"
  p, _ = _main("--config", CONFIG, "--workdir", str(d), *args)
  assert p.returncode != 0
  assert named in p.stderr, _tail(p)
  assert "Traceback" not in p.stderr, _tail(p)
  assert not d.exists()


def test_bad_variant_is_named(tmp_path):
  d = tmp_path / "run"
  p, _ = _main("--config", "experiments/tiny.py:runlocl", "--workdir", str(d))
  assert p.returncode != 0
  assert "runlocl" in p.stderr, _tail(p)
  assert not d.exists()
