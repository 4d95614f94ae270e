"""k15.tools.probe: a stage decoded on its problems, accuracy per task and
level, the failed responses shown.

The run is a fake one (tests/test_sources.py's way): the vision runlocal
config, its tokenizer and one random `joint` checkpoint, no training.
"""

import os

import jax
import numpy as np
import pytest

from k15 import checkpoint as ckpt_lib
from k15 import config_lib, pipeline, sampler, sharding, tasks, train
from k15 import tokenizer as tokenizer_lib
from k15.rollout import generation
from k15.tools import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION = os.path.join(ROOT, "experiments", "vision.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("probe") / "run")
  os.makedirs(os.path.join(d, "ckpt"))
  config = config_lib.load(VISION, "runlocal")
  task = tasks.get("visual")
  tok = tokenizer_lib.train_sentencepiece(
    task.tokenizer_corpus(), 64, **task.TOKENIZER)
  tok.save(os.path.join(d, "tokenizer.model"))
  s = pipeline.settings(config, vocab_size=tok.vocab_size, num_devices=1)
  state = train.init_state(jax.random.key(0), model=s.model,
                           tx=train.make_optimizer(s.optim),
                           mesh=sharding.make_mesh(s.mesh))  # fmt: skip
  ck = ckpt_lib.Checkpointer(os.path.join(d, "ckpt", "joint"))
  ck.save(3, dict(train=state), dict(stage="joint", done=True))
  ck.close()
  return dict(dir=d, config=config, tok=tok,
              eval=s.task.splits(d)["eval"])  # fmt: skip


def test_every_problem_counted_by_task_and_level(run):
  rep = probe.probe(run["config"], f"{run['dir']}:joint", show=2)
  want: dict = {}
  for p in run["eval"]:
    want[p.task, p.difficulty] = want.get((p.task, p.difficulty), 0) + 1
  assert {k: n for k, (_, n) in rep.counts.items()} == want
  assert list(dict.fromkeys(t for t, _ in rep.counts)) == list(
    dict.fromkeys(p.task for p in run["eval"]))  # the mix's order
  per_task = [f.task for f in rep.failures]
  assert all(per_task.count(t) <= 2 for t in per_task)
  wrong = sum(n - c for c, n in rep.counts.values())
  assert len(rep.failures) == sum(
    min(2, sum(n - c for (t, _), (c, n) in rep.counts.items() if t == task))
    for task in dict.fromkeys(per_task))
  assert wrong >= len(rep.failures) > 0  # a random model fails
  traces = {p.trace for p in run["eval"]}
  assert all(f.want in traces for f in rep.failures)
  table = rep.table().splitlines()
  assert table[0].split()[:3] == ["task", "n", "L2"]
  assert len(table) == 1 + len({t for t, _ in rep.counts})


def test_scores_the_responses_as_evaluation_does(run, monkeypatch):
  """Responses that are the reference trace for every other problem:
  exactly those count as right, per task and level."""
  tok = run["tok"]
  probs = [p for p in run["eval"] if p.task == "chart"]

  def fake(params, prompts, rng, **kw):
    del params, rng, kw
    assert len(prompts) == len(probs)
    out = []
    for i, p in enumerate(probs):
      text = p.trace if i % 2 == 0 else " 7."
      ids = np.array(tok.encode(text) + [tok.eos_id], np.int32)
      z = np.zeros(len(ids), np.float32)
      out.append(generation.Generation([], ids, z, z, sampler.STOPPED))
    return out

  monkeypatch.setattr(generation, "generate", fake)
  rep = probe.probe(run["config"], f"{run['dir']}:joint", task="chart",
                    show=1)  # fmt: skip
  want: dict = {}
  for i, p in enumerate(probs):
    c, n = want.get(p.difficulty, (0, 0))
    want[p.difficulty] = (c + (i % 2 == 0), n + 1)
  assert rep.counts == {("chart", lv): v for lv, v in want.items()}
  assert rep.accuracy("chart") == pytest.approx((len(probs) + 1) // 2
                                                / len(probs))  # fmt: skip
  (f,) = rep.failures
  assert f.got == " 7." and f.task == "chart"


def test_bad_task_split_or_checkpoint_named(run, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"--task='nope'.*count"):
    probe.probe(run["config"], f"{run['dir']}:joint", task="nope")
  with pytest.raises(config_lib.ConfigError, match="--split='test'"):
    probe.probe(run["config"], f"{run['dir']}:joint", split="test")
  with pytest.raises((ValueError, FileNotFoundError), match="rl"):
    probe.probe(run["config"], f"{run['dir']}:rl")
