"""k15.figures and experiments/figures.py: every arm validates and differs
from the md arm only where it says; curves (continued arms stitched onto
md's), seed statistics, the CSV and the markdown from hand-made runs; the
PNGs are drawn; a failed arm stops the runs with its log."""

import csv
import json
import os

import numpy as np
import pytest

from k15 import config_lib, figures, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "figures.py")


def _load(arg):
  return config_lib.load(EXP, arg)


@pytest.mark.parametrize("runlocal", [False, True])
@pytest.mark.parametrize("arm", list(figures.experiment(EXP).ARMS))
def test_every_arm_validates(arm, runlocal):
  c = _load(f"arm={arm},root=/r,seed=1" + ",runlocal" * runlocal)
  s = pipeline.settings(c, vocab_size=40, num_devices=1)
  assert s.seed == 1 and s.data.balance  # tiny's balanced sampling kept
  if arm.endswith("sft"):
    assert c.stages == ("sft",) and not c.init
    return
  assert c.stages == ("rl",) and s.eval.every > 0
  exp = figures.experiment(EXP)
  at = exp.switch(runlocal)
  if arm in exp.CONTINUED:
    assert c.init == f"/r/md:rl@{at}"
    assert c.rl.iterations == _load("arm=md,root=/r" + ",runlocal" * runlocal
                                    ).rl.iterations - at
  # md keeps the checkpoint the continued arms start from
  assert at % c.ckpt.every == 0 and c.ckpt.keep * at >= c.rl.iterations


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


@pytest.mark.parametrize("arm,fields", [
  ("rest", {"rl.loss"}),
  ("lp_on", {"length_penalty.schedule", "length_penalty.weight"}),
  ("lp_warmup", {"init", "rl.iterations", "length_penalty.schedule",
                 "length_penalty.weight"}),
  ("curriculum", {"init", "rl.iterations", "data.strategy",
                  "data.transition_iter", "data.hard_min"}),
  ("small", {"init", "model.d_model", "model.mlp_dim", "model.head_dim"}),
])
def test_arms_differ_from_md_only_where_they_say(arm, fields):
  md = _flat(_load("arm=md,root=/r").to_dict())
  other = _flat(_load(f"arm={arm},root=/r").to_dict())
  changed = {k for k in md | other if md.get(k) != other.get(k)} - {"name"}
  assert changed == fields


def test_arms_need_root_and_a_known_arm():
  with pytest.raises(ValueError, match="root=DIR"):
    _load("arm=md")
  with pytest.raises(ValueError, match="arm='bogus'"):
    _load("arm=bogus")


def test_needed_orders_dependencies_first():
  deps = figures.experiment(EXP).ARMS
  got = figures.needed(["lp_warmup", "small", "md"], deps)
  assert got == ["sft", "md", "lp_warmup", "small_sft", "small"]


def _fake_run(workdir, seed, arm, points):
  """A run's metrics.jsonl with held-out records {step: (pass1, length)}."""
  d = figures.arm_dir(workdir, seed, arm)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for step, (p, n) in points.items():
      rec = {"stage": "rl", "step": step, "heldout/pass1": p,
             "heldout/mean_length": n, "heldout/p95_length": n + 4,
             "heldout/acc_per_1k_tokens": p / n * 1e3}
      for d_ in (2, 3):
        rec |= {f"heldout/pass1_d{d_}": p / d_,
                f"heldout/mean_length_d{d_}": n * d_ / 2,
                f"heldout/p95_length_d{d_}": n * d_ / 2 + 2}
      f.write(json.dumps(rec) + "\n")
      if step:  # a training record without held-out keys
        f.write(json.dumps({"stage": "rl", "step": step, "loss": 1.0}) + "\n")
    f.write(json.dumps({"stage": "eval", "step": 0, "rl/pass1": 0.5}) + "\n")
  with open(os.path.join(d, "summary.json"), "w") as f:
    f.write("{}")
  with open(os.path.join(d, "wall_time.json"), "w") as f:
    json.dump({"wall_s": 60.0}, f)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  """Hand-made runs of every arm for seeds 0 and 1 at the runlocal size
  (switch at 2): md's pass@1 rises 0.1 per iteration, seed 1 0.2 above
  seed 0; the others are md shifted by a constant per arm."""
  w = str(tmp_path_factory.mktemp("fig"))
  shift = dict(md=0.0, rest=-0.05, lp_on=-0.1, small=-0.2)
  for seed in (0, 1):
    for arm, dp in shift.items():
      _fake_run(w, seed, arm, {i: (0.1 * i + 0.2 * seed + dp, 10.0 + i)
                               for i in range(5)})
    for arm in ("lp_warmup", "curriculum"):  # from md@2, 2 iterations
      _fake_run(w, seed, arm, {i: (0.3 + 0.2 * seed + 0.05 * i, 12.0 - i)
                               for i in range(3)})
    for arm in ("sft", "small_sft"):
      _fake_run(w, seed, arm, {})
  figures.check_size(w, runlocal=True)
  return w


def test_curve_stitches_continued_arms_onto_md(fake):
  exp = figures.experiment(EXP)
  md = figures.curve(fake, 0, "md", exp, at=2)
  assert list(md) == [0, 1, 2, 3, 4]
  cu = figures.curve(fake, 0, "curriculum", exp, at=2)
  assert list(cu) == [0, 1, 2, 3, 4]
  assert cu[1] == md[1]  # md's own points before the switch
  assert cu[2]["pass1"] == pytest.approx(0.3)  # its step 0 = md's step 2
  assert cu[4]["pass1"] == pytest.approx(0.4)
  assert cu[4]["mean_length"] == 10.0


def test_stats_over_seeds(fake):
  exp = figures.experiment(EXP)
  cs = [figures.curve(fake, s, "md", exp, 2) for s in (0, 1)]
  its, v = figures.stack(cs, "pass1")
  assert list(its) == [0, 1, 2, 3, 4] and v.shape == (2, 5)
  m, s = figures.mean_std(v)
  np.testing.assert_allclose(m, 0.1 * its + 0.1)
  np.testing.assert_allclose(s, np.std([0.0, 0.2], ddof=1))
  # slope of pass@1 on length: 0.1 per token on both seeds
  np.testing.assert_allclose(figures.slopes(cs), [0.1, 0.1])
  assert figures.stat([1.0, 3.0]) == "+2.000 ± 1.414 [+1.000, +3.000]"


@pytest.mark.parametrize("fig", list(figures.FIGURES))
def test_figure_writes_png_csv_and_claims(fake, fig):
  out = figures.figure(fig, fake, [0, 1], config=EXP, runlocal=True)
  base = os.path.join(fake, fig)
  with open(base + ".png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(base + ".csv") as f:
    rows = list(csv.DictReader(f))
  assert {r["arm"] for r in rows} == set(figures.FIGURES[fig])
  md1 = [r for r in rows if (r["arm"], r["metric"], r["iteration"])
         == ("md", "pass1", "4")]
  assert len(md1) == 1 and float(md1[0]["mean"]) == pytest.approx(0.5)
  assert float(md1[0]["seed_1"]) == pytest.approx(0.6)
  text = open(base + ".md").read()
  assert "report:" in text and "k15:" in text and "2 seeds" in text
  assert out["wall_s"] == 60.0 * len(out["runs"])


def test_claims_carry_the_effects(fake):
  exp = figures.experiment(EXP)
  runs = {a: [figures.curve(fake, s, a, exp, 2) for s in (0, 1)]
          for a in ("md", "rest", "small", "lp_on", "lp_warmup")}
  (_, ours), = figures.claims("fig10", runs)
  assert "all +0.050 ± 0.000" in ours  # md - rest, the same on both seeds
  (_, ours), = figures.claims("fig8", runs)
  assert "base - small +0.200 ± 0.000" in ours
  (_, ours), = figures.claims("length_penalty", runs)
  assert "tokens on - off +0.000" in ours and "warm-up - off -4.000" in ours


def test_cli_plot_only(fake, capsys):
  assert figures.main(["fig9", "--workdir", fake, "--seeds", "0,1",
                       "--runlocal", "--plot_only", "--config", EXP]) == 0
  assert "curriculum - uniform" in capsys.readouterr().out


def test_a_workdir_keeps_one_size(fake):
  # the fixture's runs were drawn at the runlocal size
  with pytest.raises(ValueError, match="holds runlocal-size runs"):
    figures.figure("fig5", fake, [0, 1], config=EXP, runlocal=False)
  assert figures.main(["fig5", "--workdir", fake, "--seeds", "0,1",
                       "--plot_only", "--config", EXP]) == 1


def test_missing_heldout_records_are_named(fake, tmp_path):
  _fake_run(str(tmp_path), 0, "md", {})
  with pytest.raises(ValueError, match="no held-out records"):
    figures.curve(str(tmp_path), 0, "md", figures.experiment(EXP), 2)


def test_a_failed_arm_stops_with_its_log(tmp_path):
  exp = tmp_path / "bad.py"
  exp.write_text(
    "ARMS = {'a': (), 'b': ('a',)}\n"
    "def get_config(arg=None):\n"
    "  raise ValueError('bad.py: this arm cannot be built')\n"
  )
  with pytest.raises(RuntimeError, match="arm a seed 0 failed"):
    figures.run_arms(str(exp), str(tmp_path / "w"), [0], ["b"],
                     log=lambda _: None)
  assert "cannot be built" in (tmp_path / "w/seed_0/a/run.log").read_text()
  assert not (tmp_path / "w/seed_0/b").exists()  # never started
