"""experiments/ablations/*.py: every arm builds and validates, with and
without runlocal; arms differ from each other and from experiments/tiny.py
only where the ablation says; config_lib.load_base."""

import glob
import os

import pytest

from k15 import config_lib, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join(ROOT, "experiments", "ablations")
TINY = os.path.join(ROOT, "experiments", "tiny.py")
VOCAB = 40  # the chains task's character tokenizer

# file -> (arms, the config fields the arms may change besides `name`)
ARMS = {
  "length_penalty.py": (["lp=on", "lp=off"], {"length_penalty"}),
  "curriculum.py": (
    ["strategy=curriculum", "strategy=uniform"],
    {"data", "rl.iterations"},
  ),
  "prioritized.py": (
    [
      "strategy=prioritized",
      "strategy=uniform",
      "strategy=curriculum+prioritized",
    ],
    {"data"},
  ),
  "policy_loss.py": (
    ["loss=mirror_descent", "loss=rest", "loss=grpo", "loss=reinforce"],
    {"rl.loss", "rl.kl_coef"},
  ),
  "tau.py": (
    ["tau=0.01", "tau=0.1", "tau=1.0", "tau=1.0,baseline=logmeanexp"],
    {"rl.tau", "rl.baseline", "rl.loss"},
  ),
}
VARIANTS = [
  (f, arm + run)
  for f, (arms, _) in ARMS.items()
  for arm in arms
  for run in ("", ",runlocal")
]


def _load(name, arg):
  return config_lib.load(os.path.join(ABLATIONS, name), arg)


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _changed(a, b):
  fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
  return {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}


def test_every_ablation_file_is_covered():
  files = {os.path.basename(p) for p in glob.glob(f"{ABLATIONS}/*.py")}
  assert files == set(ARMS)


@pytest.mark.parametrize("name,arg", VARIANTS)
def test_arm_validates(name, arg):
  c = _load(name, arg)
  s = pipeline.settings(c)
  pipeline.settings(c, vocab_size=VOCAB, num_devices=8)
  pipeline.settings(c, vocab_size=VOCAB, num_devices=1)
  assert s.stages == ("sft", "rl")
  tiny = config_lib.load(TINY, "runlocal" if "runlocal" in arg else "")
  allowed = ARMS[name][1] | {"name", "stages"}
  changed = _changed(c, tiny)
  assert all(k in allowed or k.split(".")[0] in allowed for k in changed), (
    changed - allowed
  )
  if "runlocal" in arg:
    assert s.rl.iterations <= 3 and s.sft.steps <= 10


def test_length_penalty_arms():
  on, off = (
    _load("length_penalty.py", "lp=on"),
    _load("length_penalty.py", "lp=off"),
  )
  s_on, s_off = pipeline.settings(on), pipeline.settings(off)
  assert s_on.length_penalty.schedule == "constant"
  assert s_on.length_penalty.weight == 0.5
  assert s_on.length_penalty.warmup == s_on.rl.iterations // 3 > 0
  assert s_off.length_penalty.schedule == "off"
  assert _changed(on, off) == {
    "name",
    "length_penalty.schedule",
    "length_penalty.weight",
    "length_penalty.warmup",
  }
  local = pipeline.settings(_load("length_penalty.py", "lp=on,runlocal"))
  # the penalty switches on inside the runlocal run
  assert 0 < local.length_penalty.warmup < local.rl.iterations
  with pytest.raises(ValueError, match="lp='maybe'"):
    _load("length_penalty.py", "lp=maybe")


def test_curriculum_is_fig9():
  cur = pipeline.settings(_load("curriculum.py", "strategy=curriculum"))
  uni = pipeline.settings(_load("curriculum.py", "strategy=uniform"))
  assert (cur.rl.iterations, cur.data.transition_iter) == (44, 24)
  assert cur.data.strategy == "curriculum" and uni.data.strategy == "uniform"
  assert cur.data.hard_min == cur.task.max_steps - 1 > cur.task.min_steps
  assert uni.rl.iterations == 44
  local = pipeline.settings(_load("curriculum.py", "runlocal"))
  assert local.data.strategy == "curriculum"
  assert 0 < local.data.transition_iter < local.rl.iterations
  with pytest.raises(ValueError, match="strategy='hard'"):
    _load("curriculum.py", "strategy=hard")


def test_policy_loss_and_tau_arms():
  for loss in ARMS["policy_loss.py"][0]:
    s = pipeline.settings(_load("policy_loss.py", loss))
    assert s.rl.loss == loss.split("=")[1]
  with pytest.raises(ValueError, match="loss='ppo'"):
    _load("policy_loss.py", "loss=ppo")
  s = pipeline.settings(_load("tau.py", "tau=0.03,baseline=logmeanexp"))
  assert (s.rl.loss, s.rl.tau, s.rl.baseline) == (
    "mirror_descent",
    0.03,
    "logmeanexp",
  )
  with pytest.raises(ValueError, match=r"rl\.tau=0\.0"):
    pipeline.settings(_load("tau.py", "tau=0"))
  with pytest.raises(ValueError, match=r"rl\.baseline='max'"):
    pipeline.settings(_load("tau.py", "baseline=max"))


def test_prioritized_arms():
  s = pipeline.settings(_load("prioritized.py", "floor=0.1"))
  assert (s.data.strategy, s.data.floor) == ("prioritized", 0.1)
  with pytest.raises(ValueError, match="strategy='curriculum'"):
    _load("prioritized.py", "strategy=curriculum")


def test_load_base_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = config_lib.load_base(
    "experiments/tiny.py", runlocal=True, seed=3, control=False
  )
  want = config_lib.load(TINY, "runlocal,seed=3")
  assert c.to_dict() == want.to_dict()
  assert c.seed == 3
  assert (
    config_lib.load_base("experiments/tiny.py").to_dict()
    == config_lib.load(TINY, "").to_dict()
  )
  with pytest.raises(FileNotFoundError):
    config_lib.load_base("experiments/nope.py")


@pytest.mark.parametrize("name,arg", VARIANTS)
def test_every_arm_keeps_tinys_balanced_sampling(name, arg):
  # an ablation that replaces c.data wholesale drops tiny's balance=True,
  # and its baseline arm is then not tiny's tuned run
  assert _load(name, arg).data.balance is True
