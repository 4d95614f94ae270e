"""Real rewards drive RL: JSONL math rows are judged by math-verify and code
rows by the sandbox, inside the RL loop, shown by counters on the real
verifiers (`WorkerPool.map`, which ships (gold, answer) pairs to
math-verify's processes, and `Sandbox.run_many`). Only the policy is
scripted (its responses are fixed texts), so what each trajectory earns is
known. Also: a verifier's timeout in the loop scores 0 and is counted by
cause; a missing sandbox, a bad prompt row and an overlong prompt stop the
run at startup with the exact message."""

import collections
import json
import os
import shutil

import jax
import numpy as np
import pytest

from k15 import config_lib, pipeline, rollout, sampler, train
from k15 import tokenizer as tokenizer_lib
from k15.rewards import isolation, sandbox, workers
from k15.stages import rl
from k15.tasks import functions, word_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXED = os.path.join(ROOT, "experiments", "mixed.py")
REASON = sandbox.unavailable_reason()
needs_sandbox = pytest.mark.skipif(bool(REASON), reason=f"no sandbox: {REASON}")


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _rows(n_math=4, n_code=4):
  math = [p.to_row() for p in word_problems.generate(n_math, seed=5,
                                                     min_steps=1,
                                                     max_steps=3)]  # fmt: skip
  code = [p.to_row() for p in functions.generate(n_code, seed=5)]
  return math, code


def _config(data_dir, **over):
  c = config_lib.load(MIXED, "runlocal")
  c.task.update(make=(), data_dir=str(data_dir), rl_files=("m.jsonl",
                "c.jsonl"), sft_files=("m.jsonl", "c.jsonl"),
                eval_files=("m.jsonl",), rl_weights=(0.5, 0.5))  # fmt: skip
  c.rollout.update(k=4, prompts_per_iter=4, gen_rows=16, oversample=1)
  c.rl.update(num_minibatches=2)
  c.sft.update(batch_size=8)
  c.reward.update(math_workers=2, code_workers=2)
  return config_lib.override(c, **over)


@pytest.fixture
def data(tmp_path):
  math, code = _rows()
  _write(tmp_path / "m.jsonl", math)
  _write(tmp_path / "c.jsonl", code)
  return tmp_path, math, code


class Spy:
  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, *args, **kwargs):
    self.calls.append(args)
    return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch):
  out = dict(math=Spy(workers.WorkerPool.map),
             code=Spy(sandbox.Sandbox.run_many))  # fmt: skip
  monkeypatch.setattr(workers.WorkerPool, "map",
                      lambda *a, **k: out["math"](*a, **k))  # fmt: skip
  monkeypatch.setattr(sandbox.Sandbox, "run_many",
                      lambda *a, **k: out["code"](*a, **k))  # fmt: skip
  return out


def _script(monkeypatch, ctx, texts):
  """The policy answers problem i's j-th sample with texts(problem, j)."""
  by_prompt = {
    tuple(ctx.tok.encode(tokenizer_lib.format_prompt(p.question))): p
    for p in ctx.problems["rl"]
  }
  seen = collections.Counter()

  def generate_segments(params, requests, rng, **kw):
    del params, rng, kw
    out = []
    for r in requests:
      p = by_prompt[tuple(r.prompt)]
      j = seen[p.question]
      seen[p.question] += 1
      ids = np.array(ctx.tok.encode(texts(p, j)) + [ctx.tok.eos_id], np.int32)
      z = np.zeros(len(ids), np.float32)
      out.append(rollout.Generation(list(r.prompt), ids, z - 1.0, z - 1.0,
                                    sampler.STOPPED))  # fmt: skip
    return out

  monkeypatch.setattr(rl.rollout, "generate_segments", generate_segments)


def _start(ctx):
  state = train.init_state(jax.random.key(0), model=ctx.s.model, tx=ctx.tx,
                           mesh=ctx.mesh)  # fmt: skip
  return rl.STAGE.start(ctx, {"sft": state})


@needs_sandbox
def test_rl_rewards_come_from_math_verify_and_the_sandbox(
  data, spies, monkeypatch
):
  """One RL iteration on JSONL math and code groups of 4: samples 0 and 1 of
  each group answer right (the math row's gold is an int, fraction or
  decimal, the response an unevaluated expression: no string matches, so
  only math-verify can say yes), 2 and 3 wrong. The loop's rewards, its
  metrics and the prompt sampler's statistics all come from those
  verdicts."""
  tmp, math, code = data
  ctx = pipeline.make_context(_config(tmp), str(tmp / "run"))
  wrong_code = "```python\ndef f(xs):\n  return 12345\n```"

  def texts(p, j):
    if j < 2:
      return p.trace
    return " 1. \\boxed{0}" if p.domain == "math" else wrong_code

  _script(monkeypatch, ctx, texts)
  carry = _start(ctx)
  before = [np.array(x) for x in jax.tree.leaves(carry.state.params)]
  # iteration 0 draws 4 of the 8 problems; with weights 0.5/0.5 both
  # domains are represented whatever the draw (checked below)
  carry, m, skipped = rl.iteration(ctx, carry, 0)
  ctx.rewards.close()
  idx = np.flatnonzero(carry.prompts.state_dict()["count_N"])
  doms = collections.Counter(ctx.problems["rl"][i].domain for i in idx)
  assert sum(doms.values()) == 4 and set(doms) <= {"math", "code"}
  n_math, n_code = 4 * doms["math"], 4 * doms["code"]
  assert m["reward/math/n"] == n_math and m["reward/code/n"] == n_code
  assert m["reward/math/cause/ok"] == n_math / 2
  assert m["reward/code/cause/ok"] == n_code / 2
  assert m["reward/status/correct"] == (n_math + n_code) / 2
  assert m["accuracy"] == 0.5 and m["reward_time"] > 0
  # math-verify judged every distinct finished math answer the exact
  # comparator could not settle: all of them (no gold is written as an
  # expression), each (gold, answer) pair once per batch
  pairs = [pair for call in spies["math"].calls for pair in call[1]]
  golds = {p.question: p.answer for p in ctx.problems["rl"]}
  want = sorted(
    (golds[ctx.problems["rl"][i].question], e)
    for i in idx
    if ctx.problems["rl"][i].domain == "math"
    for e in [ctx.problems["rl"][i].trace.rpartition("\\boxed{")[2][:-1],
              "0"]
  )  # fmt: skip
  assert sorted(pairs) == want
  # the sandbox ran every distinct (program, tests) of the code samples:
  # each problem's reference and the wrong program, once each
  programs = [j.program for call in spies["code"].calls for j in call[1]]
  assert len(programs) == n_code / 2
  assert programs.count("def f(xs):\n  return 12345\n") == n_code / 4
  # each problem's success rate is its verdicts' mean
  st = carry.prompts.state_dict()
  np.testing.assert_array_equal(st["success_N"][idx], 2.0)
  assert skipped and not any(skipped)
  after = [np.array(x) for x in jax.tree.leaves(carry.state.params)]
  changed = [not np.array_equal(a, b) for a, b in zip(before, after,
                                                      strict=True)]
  assert all(changed), "the update was not applied"


@needs_sandbox
def test_verifier_timeouts_in_the_loop_score_zero_counted_by_cause(
  tmp_path, monkeypatch
):
  """A math answer whose check outlasts math-verify's own 3 s limit and a
  program that never returns (reward.code_timeout_s=1) score 0 as
  "timeout", counted per kind; the rest of the batch is scored."""
  math = [dict(question="Big?", answer="2^{2^{40}}", trace=" \\boxed{1}"),
          dict(question="Small?", answer="7", trace=" \\boxed{3+4}")]
  code = [functions.generate(2, seed=1)[i].to_row() for i in range(2)]
  _write(tmp_path / "m.jsonl", math)
  _write(tmp_path / "c.jsonl", code)
  cfg = _config(tmp_path)
  cfg.reward.update(code_timeout_s=1.0)
  ctx = pipeline.make_context(cfg, str(tmp_path / "run"))
  # never returns (int() is never 1); written in the tokenizer's pieces
  loop = "```python\ndef f(xs):\n  return sum(x for x in iter(int, 1))\n```"
  assert ctx.tok.decode(ctx.tok.encode(loop)) == loop

  def texts(p, j):
    del j
    if p.question == "Big?":
      return " \\boxed{2^{2^{41}}}"
    return loop if p.domain == "code" else p.trace

  _script(monkeypatch, ctx, texts)
  carry, m, _ = rl.iteration(ctx, _start(ctx), 0)
  ctx.rewards.close()
  # all four problems are drawn (4 prompts per iteration, 4 problems)
  assert m["reward/math/cause/timeout"] == 4  # "Big?" x 4 samples
  assert m["reward/math/cause/ok"] == 4  # "Small?": 3+4 == 7
  assert m["reward/code/cause/timeout"] == 8
  assert m["reward/status/timeout"] == 12
  assert m["reward/status/correct"] == 4
  assert m["accuracy"] == pytest.approx(4 / 16)


def test_bad_prompt_row_stops_the_run_at_startup_naming_file_and_line(data):
  tmp, math, _ = data
  _write(tmp / "m.jsonl", [math[0], math[1], '{"question": "x"}'])
  with pytest.raises(config_lib.ConfigError) as e:
    pipeline.make_context(_config(tmp), str(tmp / "run"))
  assert str(e.value) == f"{tmp / 'm.jsonl'}:3: missing field 'answer'"
  assert not os.path.exists(tmp / "run" / "tokenizer.model")


def test_fakeable_code_row_stops_the_run_at_load(data):
  tmp, _, code = data
  row = dict(code[0], tests=["assert f([]) == 0"])
  row.pop("entry_point")
  row.pop("test_mode")
  _write(tmp / "c.jsonl", [code[1], row])
  with pytest.raises(config_lib.ConfigError) as e:
    pipeline.make_context(_config(tmp), str(tmp / "run"))
  assert str(e.value).startswith(
    f"{tmp / 'c.jsonl'}:2: test_mode: test mode 'assert' runs the tests "
    "inside the program's process, where it can fake a pass"
  )


def test_missing_sandbox_stops_a_run_with_code_rows_at_startup(
  data, monkeypatch
):
  """bwrap is not on this machine (as far as the sandbox can tell): a run
  whose files hold code rows fails before any work, saying how to install
  it, instead of scoring every program 0."""
  tmp, math, _ = data
  real_which = shutil.which

  def which(name, *a, **k):
    return None if name == "bwrap" else real_which(name, *a, **k)

  monkeypatch.setattr(isolation.shutil, "which", which)
  monkeypatch.setattr(isolation, "tools", isolation.tools.__wrapped__)
  monkeypatch.setattr(sandbox, "_probe", sandbox._probe.__wrapped__)
  with pytest.raises(config_lib.ConfigError) as e:
    pipeline.make_context(_config(tmp), str(tmp / "run"))
  assert str(e.value) == (
    "config: 4 code rows (first: "
    f"{tmp / 'c.jsonl'}:1) are scored in the code sandbox, which cannot "
    "run here: `bwrap` not found (apt-get install bubblewrap); refusing to "
    "run untrusted code without a sandbox. Install it with `apt-get "
    "install bubblewrap` (Debian/Ubuntu; the kernel must allow "
    "unprivileged user namespaces, see k15/rewards/sandbox.py), or drop "
    "the code files from task.rl_files / task.eval_files."
  )
  assert not os.path.exists(tmp / "run" / "tokenizer.model")
  # math-only files need no sandbox
  cfg = _config(tmp)
  cfg.task.update(rl_files=("m.jsonl",), rl_weights=(), sft_files=(
      "m.jsonl",))  # fmt: skip
  pipeline.make_context(cfg, str(tmp / "run2")).rewards.close()


def test_prompt_longer_than_the_bucket_is_named(data):
  tmp, math, _ = data
  long = dict(math[0], question="Ann has 2 kg of rice. " * 12 + "How many?")
  _write(tmp / "m.jsonl", [math[1], long])
  with pytest.raises(config_lib.ConfigError, match=r"m\.jsonl:2: the prompt "
                     r"is \d+ tokens, more than rollout\.prompt_len=48"):
    pipeline.make_context(_config(tmp), str(tmp / "run"))
