"""Long2short (PAPER.md §6): model merging, shortest rejection sampling,
long2short RL and the frontier command; DPO has tests/test_dpo.py.

The unit tests pin each method's rule by hand. The end-to-end tests run
every arm of `experiments/long2short.py:runlocal` once, through the
frontier command (`k15.tools.long2short`, seed 0), and check what each
arm's run left behind: the merged weights are the average, the rejection
set holds the shortest correct response of each prompt, long2short RL
starts from long:rl with the penalty on at iteration 1 and no response
over its limit, and the frontier table has a row per arm.
"""

import csv
import dataclasses
import json
import os
import types

import jax
import numpy as np
import pytest

from k15 import (
  config_lib,
  objective,
  pipeline,
  rejection,
  sampler,
  sharding,
  sources,
  tasks,
  train,
)
from k15 import rewards as rewards_lib
from k15 import tokenizer as tokenizer_lib
from k15.rollout import buffer as buffer_lib
from k15.stages import merge, rl
from k15.tasks import arithmetic
from k15.tools import long2short

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L2S = os.path.join(ROOT, "experiments", "long2short.py")


def _arm(arm: str, extra: str = "runlocal"):
  return config_lib.load(L2S, f"arm={arm},root=/nowhere,{extra}")


# ----------------------------------------------------------------------------
# Model merging
# ----------------------------------------------------------------------------


def test_merge_average_by_hand():
  a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array(4.0, np.float32)}
  b = {"w": np.array([3.0, -2.0], np.float32), "b": np.array(0.0, np.float32)}
  out = jax.tree.map(np.asarray, merge.average(a, b, 0.5))
  np.testing.assert_allclose(out["w"], [2.0, 0.0])
  np.testing.assert_allclose(out["b"], 2.0)
  out = jax.tree.map(np.asarray, merge.average(a, b, 0.25))
  np.testing.assert_allclose(out["w"], [2.5, -1.0])  # .25 a + .75 b
  np.testing.assert_allclose(out["b"], 1.0)


def test_merge_names_the_tensor_that_differs():
  f32 = "float32"
  long = {"embed": ((40, 64), f32), "mlp/wi": ((64, 128), f32)}
  with pytest.raises(ValueError, match=r"mlp/wi is \(\(64, 256\).*in short"):
    merge.check_same_architecture(
      [long, {"embed": ((40, 64), f32), "mlp/wi": ((64, 256), f32)}],
      ["long", "short"],
    )
  with pytest.raises(ValueError, match="long has parameter mlp/wi but short"):
    merge.check_same_architecture(
      [long, {"embed": ((40, 64), f32)}], ["long", "short"]
    )
  merge.check_same_architecture([long, dict(long)], ["long", "short"])


def test_merge_config_needs_two_sources():
  with pytest.raises(ValueError, match="merge.alpha"):
    merge.MergeConfig(alpha=1.5)
  with pytest.raises(ValueError, match="two sources"):
    merge.MergeConfig(models=("a:rl",))
  cfg = config_lib.override(_arm("merge"), **{"merge.models": ()})
  with pytest.raises(ValueError, match="stage merge needs merge.models"):
    pipeline.settings(cfg, vocab_size=40, num_devices=8)


# ----------------------------------------------------------------------------
# Shortest rejection sampling and the long-CoT format
# ----------------------------------------------------------------------------


def _group(correct, lengths, finished=None):
  finished = np.ones(len(correct), bool) if finished is None else finished
  return rejection.Group(
    "q", [1, 2], [[7] * n for n in lengths], np.array(correct, bool),
    np.array(finished, bool),
  )  # fmt: skip


def test_shortest_correct_rule():
  # the shortest correct (a shorter wrong one does not count); ties: the
  # first drawn; a prompt with no correct response gives no example
  g = _group([0, 1, 1, 1, 0], [3, 9, 5, 5, 12])
  assert rejection.shortest(g) == 2
  assert rejection.shortest(_group([0, 0], [3, 4])) is None
  assert rejection.shortest_correct([g, _group([0, 0], [3, 4])]) == [
    ([1, 2], [7] * 5)
  ]
  st = rejection.stats([g, _group([0, 0], [3, 4])])
  assert st["prompts_with_correct"] == 1
  assert st["shortest_correct_length"] == 5


def test_long_format_restates_the_chain():
  """The long-CoT trace holds r copies of the chain before the answer; it
  verifies as the short one does, and with checks=3 (the experiment's
  long warm-up) it is at least 1.5x as long on average."""
  short = arithmetic.generate(200, seed=3, min_steps=2, max_steps=5,
                              ops="+-", max_operand=3)  # fmt: skip
  long = arithmetic.with_checks(short, 3, seed=4)
  passes = []
  for s, lg in zip(short, long, strict=True):
    head, _, tail = s.trace.rpartition(". answer:")
    r = lg.trace.count(head + ".") - 1
    assert lg.trace == head + ("." + head) * r + ". answer:" + tail
    assert arithmetic.verify(lg.trace, s.answer)
    passes.append(r)
  assert set(passes) == {0, 1, 2, 3}
  ratio = np.mean([len(p.trace) for p in long]) / np.mean(
    [len(p.trace) for p in short]
  )
  assert ratio >= 1.5
  assert arithmetic.with_checks(short, 0, seed=4) == short


def test_min_checks_makes_every_trace_long():
  """task.min_checks=1 (the long arm): passes uniform in 1..checks, so no
  warm-up trace is in the short format; min_checks=0 draws as before; a
  min_checks outside 0..checks is a config error naming the field."""
  short = arithmetic.generate(200, seed=3, min_steps=2, max_steps=5,
                              ops="+-", max_operand=3)  # fmt: skip
  long = arithmetic.with_checks(short, 3, seed=4, min_checks=1)
  passes = {lg.trace.count(".") - 1 for lg in long}
  assert passes == {1, 2, 3}
  assert arithmetic.with_checks(short, 3, seed=4, min_checks=0) == (
    arithmetic.with_checks(short, 3, seed=4)
  )
  for bad in (-1, 4):
    with pytest.raises(ValueError, match="task.min_checks"):
      arithmetic.with_checks(short, 3, seed=4, min_checks=bad)
    with pytest.raises(ValueError, match="task.min_checks"):
      tasks.TaskConfig(name="arithmetic", checks=3, min_checks=bad)
  with pytest.raises(ValueError, match="task.min_checks"):
    tasks.TaskConfig(name="arithmetic", checks=0, min_checks=1)
  cfg = tasks.TaskConfig(name="arithmetic", num_sft=50, num_rl=10,
                         num_eval=10, checks=2, min_checks=2)
  assert {p.trace.count(".") - 1 for p in cfg.splits()["sft"]} == {2}
  long_arm = _arm("long", "seed=0")
  assert (long_arm.task.checks, long_arm.task.min_checks) == (3, 1)


# ----------------------------------------------------------------------------
# Long2short RL: a cut response scores as over-length, even when correct
# ----------------------------------------------------------------------------


def test_l2s_rl_config():
  """The penalty is on from iteration 0 and the rollout limit is much
  smaller than the long model's; the run starts from long:rl."""
  long, l2s = _arm("long", "seed=0"), _arm("l2s_rl", "seed=0")
  assert l2s.init == "/nowhere/long:rl" and tuple(l2s.stages) == ("rl",)
  s = pipeline.settings(l2s, vocab_size=40, num_devices=8)
  lp = s.length_penalty
  w0 = objective.length_penalty_weight(
    0, schedule=lp.schedule, weight=lp.weight, warmup=lp.warmup, ramp=lp.ramp
  )
  assert w0 > 0
  assert not s.rollout.partial  # a cut response is final, never continued
  assert 2 * s.rollout.budget <= long.rollout.budget
  # every arm is evaluated alike, with the long model's room
  assert s.eval.max_response == long.eval.max_response


def _l2s_ctx(problem):
  """What rl.score_groups reads: the l2s_rl arm's settings (k = 4), the
  problem, a tokenizer whose decode maps a response's first id to a text,
  and a reward pool with the tasks' verifiers."""
  s = pipeline.settings(_arm("l2s_rl"), vocab_size=40, num_devices=8)
  s = dataclasses.replace(s, rollout=dataclasses.replace(s.rollout, k=4))
  texts = {}

  class Tok:
    def decode(self, ids):
      return texts[int(ids[0])]

  return types.SimpleNamespace(
    s=s, tok=Tok(), problems={"rl": [problem]},
    rewards=rewards_lib.RewardPool(verifiers=tasks.verifiers()),
  ), texts  # fmt: skip


def test_l2s_rl_cut_response_scores_as_over_length():
  """Four samples of one prompt: two stopped (correct, 10 and 20 tokens),
  one stopped wrong (20), one cut at the limit (32 tokens) whose text
  holds the right answer. The cut one scores 0, and with the penalty on
  at iteration 0 it gets the longest sample's length reward, -0.5."""
  problem = arithmetic.generate(1, seed=0, min_steps=2, max_steps=2)[0]
  right = problem.trace  # the gold chain and answer
  ctx, texts = _l2s_ctx(problem)
  texts.update({1: right, 2: right, 3: problem.trace[:-1] + "x", 4: right})
  budget = ctx.s.rollout.budget
  members = []
  for tid, n, status in ((1, 10, sampler.STOPPED), (2, 20, sampler.STOPPED),
                         (3, 20, sampler.STOPPED),
                         (4, budget, sampler.BUDGET)):  # fmt: skip
    members.append(
      buffer_lib.Trajectory(
        np.full(n, tid, np.int32),
        np.zeros(n, np.float32),
        np.zeros(n, np.int32),
        budget,
        status,
      )  # fmt: skip
    )
  group = buffer_lib.Group(0, 0, [1], 0, members)
  try:
    sc, _ = rl.score_groups(ctx, 0, [group])
  finally:
    ctx.rewards.close()
  np.testing.assert_array_equal(sc.correct_GxK, [[1, 1, 0, 0]])
  w = ctx.s.length_penalty.weight
  # lambda = 0.5 - (len - 10) / (32 - 10): correct get it, wrong min(0, .)
  lam = 0.5 - (np.array([10, 20, 20, 32]) - 10) / 22
  want = np.array([1, 1, 0, 0]) + w * np.where(
    [1, 1, 0, 0], lam, np.minimum(0, lam)
  )
  np.testing.assert_allclose(sc.shaped_GxK, [want], rtol=1e-6)
  assert sc.shaped_GxK[0, 3] == pytest.approx(-0.5 * w)
  assert sc.shaped_GxK[0, 3] < sc.shaped_GxK[0, 2] <= 0


# ----------------------------------------------------------------------------
# Every arm end to end, through the frontier command (seed 0, runlocal)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("l2s"))
  out = long2short.run(L2S, "runlocal", d, [0])
  return dict(dir=d, root=os.path.join(d, "seed_0"), out=out)


def _metrics(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["stage"] == stage]


def _params(spec):
  """The params of a run's checkpoint, DIR:stage (the runlocal model with
  the run's own vocabulary)."""
  tok = tokenizer_lib.load(
    os.path.join(spec.rpartition(":")[0], "tokenizer.model")
  )
  s = pipeline.settings(_arm("merge"), vocab_size=tok.vocab_size, num_devices=8)
  mesh = sharding.make_mesh(s.mesh)
  tx = train.make_optimizer(s.optim)
  abstract = train.sharded_abstract_state(s.model, tx, mesh).params
  params = sources.load_params(
    sources.parse(spec), model=s.model, abstract_params=abstract
  )
  return jax.tree.map(np.asarray, params)


def test_frontier_table_has_every_arm(frontier):
  d = frontier["dir"]
  with open(os.path.join(d, "frontier.csv")) as f:
    rows = list(csv.DictReader(f))
  arms = [arm for arm, _ in long2short.arm_configs(L2S, "runlocal", d, 0)]
  assert (
    [r["arm"] for r in rows]
    == arms
    == ["short", "long", "merge", "merge_rs", "shortest", "dpo", "l2s_rl"]
  )
  for r in rows:
    p, n = float(r["pass1"]), float(r["mean_length"])
    assert 0 <= p <= 1 and n > 0
    assert float(r["acc_per_1k_tokens"]) == pytest.approx(
      p / max(n, 1) * 1e3, rel=1e-4
    )
  assert {"short": "sft", "long": "rl", "merge": "merge", "dpo": "dpo",
          "l2s_rl": "rl", "shortest": "rs"}.items() <= {
    r["arm"]: r["stage"] for r in rows}.items()  # fmt: skip
  md = open(os.path.join(d, "frontier.md")).read()
  assert "| l2s_rl | rl |" in md and "python -m k15.tools.long2short" in md
  pytest.importorskip("matplotlib")
  assert os.path.getsize(os.path.join(d, "frontier.png")) > 1000


def test_merge_arm_is_the_average(frontier):
  root = frontier["root"]
  got = _params(f"{root}/merge:merge")
  long, short = _params(f"{root}/long:rl"), _params(f"{root}/short:sft")
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, long, short)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
    got, want,
  )  # fmt: skip
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(long), jax.tree.leaves(short), strict=True)
  )


def test_rs_arms_train_on_the_shortest_correct(frontier):
  for arm in ("shortest", "merge_rs"):
    workdir = os.path.join(frontier["root"], arm)
    groups = rejection.read(os.path.join(workdir, "data", "rs.jsonl"))
    assert len(groups) == 16 and all(len(g.responses) == 8 for g in groups)
    # a response that did not stop by itself is never correct
    assert not any((g.correct & ~g.finished).any() for g in groups)
    data = _metrics(workdir, "rs")[0]
    assert data["data/prompts_with_correct"] == sum(
      rejection.shortest(g) is not None for g in groups
    )
    assert len(_metrics(workdir, "rs")) == 1 + 4  # sampling, then 4 steps


def test_l2s_rl_arm_runs_under_its_limit(frontier):
  workdir = os.path.join(frontier["root"], "l2s_rl")
  it = _metrics(workdir, "rl")
  assert len(it) == 2
  budget = _arm("l2s_rl").rollout.budget
  for m in it:
    assert m["length_penalty_weight"] == 0.5  # from iteration 1 on
    assert m["response_length_p95"] <= budget
  # it started from the long model's RL weights, not from scratch: the
  # long arm's params are loadable as its source, and the run's tokenizer
  # is the long run's
  long_tok = os.path.join(frontier["root"], "long", "tokenizer.model")
  mine = os.path.join(workdir, "tokenizer.model")
  assert open(long_tok, "rb").read() == open(mine, "rb").read()
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert set(summary["results"]) == {"rl"}
