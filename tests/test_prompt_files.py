"""Prompt files end to end: the generators' formats (math answers only
math-verify can match, code checked by hidden tests, HumanEval), mixing
files by weight, curation feeding the curriculum and the prioritized
sampler, rejection sampling into an SFT set, and experiments/mixed.py
running in a subprocess."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from k15 import curriculum, rejection, rewards, tasks
from k15.rewards import sandbox
from k15.tasks import functions, jsonl, make_data, word_problems
from k15.tools import curate_filters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = sandbox.unavailable_reason()
needs_sandbox = pytest.mark.skipif(bool(REASON), reason=f"no sandbox: {REASON}")


def _write(path, rows):
  make_data.write_jsonl(str(path), rows)
  return str(path)


def _pool():
  return rewards.RewardPool(dict(math=dict(num_workers=2)))


def test_word_problem_answers_need_math_verify():
  """Gold traces score 1 only by math-verify's equivalence: the exact
  comparator ("exact" kind) gives every non-trivial one 0; the answers
  come in integer, fraction and decimal forms; noisy traces score 0."""
  ps = word_problems.generate(60, seed=3, min_steps=1, max_steps=4)
  rows = [p.to_row() for p in ps]
  forms = collections.Counter(
    "frac" if "\\frac" in r["answer"] else "dec" if "." in r["answer"]
    else "int" for r in rows)  # fmt: skip
  assert set(forms) == {"int", "frac", "dec"}, forms
  traces, done = [p.trace for p in ps], [True] * 60
  rng = np.random.default_rng(0)
  wrong = [word_problems.noisy_trace(p, rng) for p in ps]
  with _pool() as pool:
    good = rewards.score(rows, traces, done, pool=pool)
    exact = rewards.score([dict(r, kind="exact") for r in rows], traces,
                          done, pool=pool)  # fmt: skip
    noisy = rewards.score(rows, wrong, done, pool=pool)
  assert good.correct.all()
  assert all(r.info["by"] == "math_verify" for r in good.results)
  assert not exact.correct.any()
  assert noisy.correct.mean() < 0.1  # a changed number rarely keeps the value
  for p in ps:  # the expression's value is the gold's, in its form
    num, den = p.answer.removeprefix("\\frac{").rstrip("}"), "1"
    if "}{" in num:
      num, den = num.split("}{")
    assert eval(p.expression) == pytest.approx(float(num) / float(den))


@needs_sandbox
def test_function_tasks_reference_passes_noisy_fails_in_the_sandbox():
  ps = functions.generate(40, seed=2)
  rows = [p.to_row() for p in ps]
  rng = np.random.default_rng(1)
  with rewards.RewardPool() as pool:
    good = rewards.score(rows, [p.trace for p in ps], [True] * 40, pool=pool)
    noisy = rewards.score(rows, [functions.noisy_trace(p, rng) for p in ps],
                          [True] * 40, pool=pool)  # fmt: skip
  assert good.correct.all(), [r.info for r in good.results if not r.correct]
  assert noisy.correct.mean() <= 0.1
  assert {p.difficulty for p in ps} == {1, 2, 3}
  # the prompt's example is right
  for p in ps[:10]:
    ex = p.question.rpartition("Example: f(")[2]
    args, _, out = ex.partition(") == ")
    assert functions.run(p.parts, json.loads(args)) == json.loads(out)


def test_make_data_splits_and_manifest(tmp_path):
  kw = dict(seed=0, num_sft=50, num_rl=80, num_eval=30, min_steps=1,
            max_steps=3, sft_noise=0.5, max_operand=9)  # fmt: skip
  make_data.ensure(("math", "code"), str(tmp_path), **kw)
  load = lambda n: jsonl.load_problems([str(tmp_path / n)])  # noqa: E731
  m = {s: load(f"math_{s}.jsonl") for s in make_data.SPLITS}
  c = {s: load(f"code_{s}.jsonl") for s in make_data.SPLITS}
  assert [len(m[s]) for s in make_data.SPLITS] == [50, 80, 30]
  qs = [{p.question for p in m[s]} for s in make_data.SPLITS]
  assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])
  # held-out functions are in neither training set
  parts = lambda ps: {json.dumps(p.row["tests"]) for p in ps}  # noqa: E731
  assert not parts(c["eval"]) & (parts(c["sft"]) | parts(c["rl"]))
  assert all(p.trace for p in m["sft"] + c["sft"])
  assert not any(p.trace for p in m["rl"] + c["rl"] + m["eval"])
  assert {p.domain for p in m["rl"]} == {"math"}
  assert {p.kind for p in c["rl"]} == {"code"}
  # unchanged settings: nothing rewritten; other settings: regenerated
  stamp = os.stat(tmp_path / "math_rl.jsonl").st_mtime_ns
  make_data.ensure(("math",), str(tmp_path), **kw)
  assert os.stat(tmp_path / "math_rl.jsonl").st_mtime_ns == stamp
  make_data.ensure(("math",), str(tmp_path), **dict(kw, num_rl=81))
  assert len(load("math_rl.jsonl")) == 81


@needs_sandbox
def test_humaneval_as_a_prompt_file(tmp_path):
  make_data.ensure(("humaneval",), str(tmp_path))
  ps = jsonl.load_problems([str(tmp_path / "humaneval.jsonl")])
  assert len(ps) == 164
  assert {p.kind for p in ps} == {"code"} and {p.domain for p in ps} == {
    "humaneval"}  # fmt: skip
  from k15.tasks import humaneval

  canon = {h["task_id"]: h["canonical_solution"] for h in humaneval.load(3)}
  items = [p.to_item() for p in ps[:3]]
  with rewards.RewardPool() as pool:
    b = rewards.score(items, [canon[i["task_id"]] for i in items],
                      [True] * 3, pool=pool)  # fmt: skip
    wrong = rewards.score(items, ["    return None\n"] * 3, [True] * 3,
                          pool=pool)  # fmt: skip
  assert b.correct.all() and not wrong.correct.any()


def test_rl_files_mix_by_weight(tmp_path):
  a = _write(tmp_path / "a.jsonl", [dict(question=f"a{i}", answer="1")
                                    for i in range(30)])  # fmt: skip
  b = _write(tmp_path / "b.jsonl", [dict(question=f"b{i}", answer="1")
                                    for i in range(10)])  # fmt: skip
  ps = jsonl.load_problems([a, b], weights=(0.7, 0.3))
  ps_sampler = curriculum.PromptSampler(
    np.zeros(40), curriculum.SamplerConfig(), 0,
    weight_N=np.array([p.weight for p in ps]),
  )
  p = ps_sampler.probabilities(0)
  assert p[:30].sum() == pytest.approx(0.7) and p[30:].sum() == pytest.approx(
    0.3)
  draws = np.concatenate([ps_sampler.sample(i, 20) for i in range(200)])
  assert (draws >= 30).mean() == pytest.approx(0.3, abs=0.03)
  # a config's weights must match its files
  with pytest.raises(ValueError, match="task.rl_weights"):
    tasks.TaskConfig(name="jsonl", rl_files=("a", "b"), eval_files=("a",),
                     rl_weights=(1.0,))  # fmt: skip


def test_curation_feeds_the_curriculum_and_the_prioritized_sampler(tmp_path):
  """A prompt file curated with the reward entry point (a stub model that
  solves each row a known number of times out of 10): the trivial and
  easy-to-hack rows never reach the RL set; the kept rows' pass rates are
  their difficulty labels (curriculum) and their priors (prioritized)."""
  rows = [dict(question=f"Ann has {i} kg. How many?", answer=str(i),
               kind="math", id=i) for i in range(2, 12)]  # fmt: skip
  solves = {str(i): i - 2 for i in range(2, 12)}  # row i: i-2 of 10 right

  def sample_fn(prompts, *, seed, temperature, max_tokens):
    del seed, temperature
    out, seen = [], collections.Counter()
    for q in prompts:
      n = int(q.split("has ")[1].split(" ")[0])
      seen[q] += 1
      if max_tokens is not None:  # direct answers: right only for row 2
        out.append(rejection.Sample(f" {n if n == 2 else 0}", True))
        continue
      ok = seen[q] <= solves[str(n)]
      out.append(rejection.Sample(f" \\boxed{{{n if ok else 0}}}", True))
    return out

  cfg = curate_filters.CurateConfig(samples=10, trivial_pass_rate=0.9)
  with _pool() as pool:
    kept, dec = curate_filters.curate(rows, cfg=cfg, sample_fn=sample_fn,
                                      pool=pool)  # fmt: skip
  dropped = {rows[d.index]["id"]: d.reason for d in dec if d.reason}
  assert dropped == {2: "easy_to_hack", 11: "trivial"}
  path = _write(tmp_path / "curated.jsonl", kept)
  cfg = tasks.TaskConfig(name="jsonl", rl_files=(path,), eval_files=(path,),
                         sft_files=(path,))  # fmt: skip
  rl = cfg.splits(str(tmp_path))["rl"]
  assert [p.row["id"] for p in rl] == list(range(3, 11))
  assert [p.pass_rate for p in rl] == [(i - 2) / 10 for i in range(3, 11)]
  assert [p.difficulty for p in rl] == [round(10 - (i - 2)) for i in
                                        range(3, 11)]  # fmt: skip
  # what stages.rl builds from them
  sampler_cfg = curriculum.SamplerConfig(
    strategy="curriculum+prioritized", stages=((0, 5), (10, 10)), floor=0.0)
  ps = curriculum.PromptSampler(
    np.array([p.difficulty for p in rl]), sampler_cfg, 0,
    prior_N=np.array([p.pass_rate for p in rl]))
  np.testing.assert_allclose(ps.success_rates(), [p.pass_rate for p in rl])
  early = ps.probabilities(0)
  # easy first: only pass rates >= 0.5 are eligible before iteration 10,
  # weighted by 1 - pass rate
  easy = np.array([p.pass_rate >= 0.5 for p in rl])
  assert (early[~easy] == 0).all() and (early[easy] > 0).all()
  w = 1 - np.array([p.pass_rate for p in rl])[easy]
  np.testing.assert_allclose(early[easy], w / w.sum())
  assert (ps.probabilities(10) > 0).all()


def test_rejection_sampling_keeps_verified_responses(tmp_path):
  """n samples per prompt judged by the reward entry point: keep="all"
  keeps each distinct correct one, "shortest" the shortest; the rows load
  back as an SFT set (their `trace`)."""
  ps = word_problems.generate(3, seed=9, min_steps=2, max_steps=2)
  path = _write(tmp_path / "m.jsonl", [
    {k: v for k, v in p.to_row().items() if k != "trace"} for p in ps])
  problems = jsonl.load_problems([path])
  expr = {p.question: p.expression for p in ps}
  # per prompt: right (long), wrong, right (short, an equivalent form),
  # right again (a repeat), unfinished
  def sample_fn(prompts, *, seed, temperature, max_tokens):
    out = []
    for i, q in enumerate(prompts):
      e = expr[q[len("Q: "):-len("\nA:")]]
      j = i % 5
      text = [f" so it is ({e}). \\boxed{{{e}}}", " \\boxed{0}",
              f" \\boxed{{{e}}}", f" \\boxed{{{e}}}", f" \\boxed{{{e}}}"][j]
      out.append(rejection.Sample(text, j != 4, len(text)))
    return out

  with _pool() as pool:
    every = rejection.rejection_sample(problems, sample_fn, pool=pool, n=5)
    short = rejection.rejection_sample(problems, sample_fn, pool=pool, n=5,
                                       keep="shortest")  # fmt: skip
  assert every.report["correct"] == 9 and every.report["prompts_solved"] == 3
  assert every.report["statuses"]["not_finished"] == 3
  assert len(every.rows) == 6 and len(short.rows) == 3
  assert [r["trace"] for r in short.rows] == [f" \\boxed{{{p.expression}}}"
                                              for p in ps]  # fmt: skip
  out = _write(tmp_path / "rs.jsonl", short.rows)
  sft = jsonl.load_problems([out])
  assert [p.trace for p in sft] == [r["trace"] for r in short.rows]
  assert [p.answer for p in sft] == [p.answer for p in problems]


@needs_sandbox
def test_mixed_runlocal_runs_with_per_domain_results(tmp_path):
  """experiments/mixed.py:runlocal in a subprocess on one CPU device: the
  files are generated, every stage is evaluated per domain, and each RL
  iteration's rewards came from both backends."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split()
    if "xla_force_host_platform_device_count" not in f)  # fmt: skip
  p = subprocess.run(
    [sys.executable, "-m", "k15.main", "--config",
     "experiments/mixed.py:runlocal", "--workdir", str(tmp_path / "m")],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert p.returncode == 0, p.stderr[-3000:]
  summary = json.loads((tmp_path / "m" / "summary.json").read_text())
  for stage in ("sft", "rl", "control"):
    assert {"pass1_math", "pass1_code"} <= set(summary["results"][stage])
  assert "rl_minus_control_pass1_code" in summary
  assert (tmp_path / "m" / "data" / "code_rl.jsonl").exists()
  lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
  recs = [json.loads(x) for x in lines]
  rl = [r for r in recs if r.get("stage") == "rl" and "reward_time" in r]
  assert len(rl) == 2
  assert all(r["reward/math/n"] > 0 and r["reward/code/n"] > 0 for r in rl)


def test_rejection_sample_command(tmp_path):
  """`python -m k15.tools.rejection_sample` on a workdir's SFT checkpoint
  (random weights: the plumbing): every sample is judged, the kept rows
  are the verified ones, written as prompt-file rows with a report."""
  import jax

  from k15 import config_lib, pipeline, train

  config = config_lib.load(os.path.join(ROOT, "experiments/tiny.py"),
                           "runlocal")  # fmt: skip
  r = pipeline.make_context(config, str(tmp_path / "run"))
  state = train.init_state(jax.random.key(0), model=r.s.model, tx=r.tx,
                           mesh=r.mesh)  # fmt: skip
  ck = r.checkpointer("sft")
  ck.save(10, dict(train=state), dict(stage="sft", step=10, done=True))
  ck.close()
  r.writer.close()
  r.rewards.close()
  inp = _write(tmp_path / "in.jsonl", [
    dict(question=p.question, answer=p.answer, kind="exact")
    for p in r.problems["eval"][:3]])  # fmt: skip
  out = tmp_path / "rs.jsonl"
  p = subprocess.run(
    [sys.executable, "-m", "k15.tools.rejection_sample", "--config",
     "experiments/tiny.py:runlocal", "--workdir", str(tmp_path / "run"),
     "--input", inp, "--output", str(out), "--n", "4"],
    cwd=ROOT, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert p.returncode == 0, p.stderr[-3000:]
  rep = json.loads((tmp_path / "rs.report.json").read_text())
  assert (rep["prompts"], rep["samples"], rep["step"]) == (3, 12, 10)
  assert sum(rep["statuses"].values()) == 12
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(rows) == rep["kept"] <= rep["correct"]
  with rewards.RewardPool() as pool:  # every kept row verifies
    assert rewards.score(rows, [x["trace"] for x in rows], [True] * len(rows),
                         pool=pool).correct.all()  # fmt: skip
  assert "rejection sampling with" in p.stdout
