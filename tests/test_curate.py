"""Curation (k15.tools.curate_filters, k15.tools.curate): form filters,
pass rates from a real sampler, the N = 8 no-CoT filter, thresholds and
the report, responses judged through the reward entry point, the JSONL
reader, the command."""

import collections
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from k15 import config_lib, pipeline, rewards, rollout, sampler, train
from k15 import model as model_lib
from k15.tasks import chains
from k15.tools import curate
from k15.tools import curate_filters as filters
from k15.tools.curate_filters import CurateConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFF = dict(samples=0, no_cot_attempts=0)


# ---------------------------------------------------------------------------
# Form filters
# ---------------------------------------------------------------------------

DROPPED = [
  ("What is 1+2? (A) 2 (B) 3 (C) 4", "3", {}, "multiple_choice"),
  ("Which of the following is prime?", "5", {}, "multiple_choice"),
  ("Pick one.\nA. 4\nB. 5\nC. 6", "B", {}, "multiple_choice"),
  ("Pick one. Options: 4, 5", "5", {}, "multiple_choice"),
  ("What is 2+2?", "4", {"type": "Multiple-Choice"}, "multiple_choice"),
  ("What is 2+2?", "4", {"metadata": {"format": "mcq"}}, "multiple_choice"),
  ("What is 2+2?", "(B)", {}, "multiple_choice"),
  ("True or False: 7 is prime.", "True", {}, "true_false"),
  ("7 is prime (true/false)", "t", {}, "true_false"),
  ("Is 7 prime?", "Yes", {}, "true_false"),
  ("Is it true that 9 is prime?", "no.", {}, "true_false"),
  ("Is 7 prime?", "1", {"kind": "boolean"}, "true_false"),
  ("Prove that sqrt(2) is irrational.", "-", {}, "proof"),
  ("Let n > 1. Show that n^2 > n.", "-", {}, "proof"),
  ("Prove the AM-GM inequality for two numbers.", "-", {}, "proof"),
  ("Find x.", "2", {"metadata": {"question_type": "proof"}}, "proof"),
]
KEPT = [
  ("c>f a>c g>h f>b h>d | a", "b", {"kind": "exact"}),  # chains
  ("t>f | t", "f", {}),
  ("f>t | f", "t", {}),
  ("7+5*3-8", "8", {"difficulty": 3}),  # arithmetic
  ("Expand (A+B)^2 where A=1 and B=2.", "9", {}),
  ("Show your work: what is 3*4?", "12", {}),
  ("How many of the following words rhyme: cat, hat?", "2", {}),
  ("A train leaves at 3. Be careful.\nIt arrives at 5.", "2", {}),
  ("What is the truth value count?", "false positive", {}),
  ("Compute 2+2.", "4", {"type": "arithmetic", "metadata": {"a": 1}}),
]


@pytest.mark.parametrize("question,answer,extra,form", DROPPED)
def test_form_filter_drops(question, answer, extra, form):
  row = dict(question=question, answer=answer, **extra)
  got, why = filters.form_reason(row)
  assert got == form, why
  assert why
  # with that form's filter off, the row passes
  others = tuple(f for f in filters.FORMS if f != form)
  assert filters.form_reason(row, others)[0] is None


@pytest.mark.parametrize("question,answer,extra", KEPT)
def test_form_filter_keeps(question, answer, extra):
  assert filters.form_reason(
    dict(question=question, answer=answer, **extra)
  ) == (None, "")


def _no_model(prompts, **kw):
  raise AssertionError("the model must not be called")


def test_form_duplicate_and_length_drops_need_no_model():
  rows = [dict(question=q, answer=a, **e) for q, a, e, _ in DROPPED]
  rows += [
    dict(question="c>f a>c | a", answer="f"),
    dict(question="c>f a>c | a", answer="f", id="dup"),
    dict(question="x" * 50, answer="y"),
  ]
  kept, dec = filters.curate(
    rows,
    cfg=CurateConfig(**OFF),
    sample_fn=_no_model,
    fits=lambda t: len(t) < 40,
  )
  assert [d.reason for d in dec] == [f for *_, f in DROPPED] + [
    None,
    "duplicate",
    "too_long",
  ]
  assert kept == [rows[len(DROPPED)]]  # no pass rate when samples=0
  rep = filters.report(rows, dec, CurateConfig(**OFF))
  assert rep["counts"] == dict(
    input=len(rows),
    kept=1,
    dropped=dict(
      multiple_choice=7, true_false=5, proof=4, duplicate=1, too_long=1
    ),
  )
  dup = [x for x in rep["dropped"] if x["reason"] == "duplicate"][0]
  assert dup["id"] == "dup" and dup["row"] == len(DROPPED) + 2
  assert "row 17" in dup["detail"]


# ---------------------------------------------------------------------------
# Pass rates from the real sampler with a random model
# ---------------------------------------------------------------------------

CHARS = "abcdefghijklmnop>|:.,QA \n"


class CharTok:
  """One id per character (pad 0, bos 1, eos 2): no sentencepiece needed."""

  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 3 + len(CHARS)

  def encode(self, text):
    return [3 + CHARS.index(c) for c in text]

  def decode(self, ids):
    return "".join(
      CHARS[i - 3] for i in map(int, ids) if 3 <= i < self.vocab_size
    )


MODEL = model_lib.ModelConfig(
  vocab_size=32,
  num_layers=1,
  d_model=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=32,
  max_len=64,
  emb_init_scale=0.15,
)
GEN = rollout.GenConfig(rows=16, prompt_buckets=(32,), budget=12, cache_len=48)
# 4 of 32 tokens stop a row: a near-uniform random model finishes about 80%
# of its rows within 12 tokens, so both paths of the count are exercised.
SAMPLING = sampler.SamplingConfig(temperature=1.0, stop_tokens=(2, 7, 19, 29))


def _lenient_verify(response, answer):
  return bool(set(response) & set(answer))


# The reward backends the tests score through (rewards.score, by row kind).
CHAINS = rewards.RewardPool(verifiers={"chains": chains.verify})
LENIENT = rewards.RewardPool(verifiers={"lenient": _lenient_verify})


def test_pass_rate_equals_independent_count_of_the_same_samples():
  tok = CharTok()
  params = nn.unbox(model_lib.init_params(jax.random.key(5), model=MODEL))
  rows = [
    dict(question=q, answer=a, kind="lenient")
    for q, a in [
      ("c>f a>c | a", "fgh"),
      ("b>d | b", "dba"),
      ("g>h h>e | g", "e"),
      ("a>b b>c c>d | a", "abcdp"),
    ]
  ]
  fn = curate.model_sample_fn(
    params, tok=tok, model=MODEL, sampling=SAMPLING, gen=GEN
  )
  cfg = CurateConfig(samples=10, no_cot_attempts=0, temperature=1.0, seed=4)
  kept, dec = filters.curate(rows, cfg=cfg, sample_fn=fn, pool=LENIENT)
  rates = [d.pass_rate for d in dec]
  assert [r["difficulty_pass_rate"] for r in kept] == rates

  # Independently: the documented layout and seed, straight to the sampler.
  prompts = [tok.encode(filters.cot_prompt(r["question"])) for r in rows]
  gens = rollout.generate(
    params,
    [p for p in prompts for _ in range(10)],
    jax.random.key(cfg.seed + 1),
    model=MODEL,
    sampling=SAMPLING,
    gen=GEN,
    pad_id=0,
  )
  status = np.array([g.status for g in gens])
  assert (status == sampler.STOPPED).any() and (status != sampler.STOPPED).any()
  ok = np.array(
    [
      g.status == sampler.STOPPED and _lenient_verify(tok.decode(g.response), a)
      for g, a in zip(
        gens, [r["answer"] for r in rows for _ in range(10)], strict=True
      )
    ]
  ).reshape(4, 10)
  np.testing.assert_array_equal(rates, ok.mean(axis=1))
  assert len(set(rates)) > 1, "all prompts equally hard: the test is weak"
  # deterministic for the seed
  _, again = filters.curate(rows, cfg=cfg, sample_fn=fn, pool=LENIENT)
  assert [d.pass_rate for d in again] == rates


# ---------------------------------------------------------------------------
# Stubs: the no-CoT filter and the thresholds
# ---------------------------------------------------------------------------


class Stub:
  """A "model" that knows `plan[question] = (answer, hit, cot_correct)`.

  Direct answers (prompt ends with the no-CoT prefix): right only on
  attempt `hit` (0-based; None: never). With chain of thought: the first
  `cot_correct` of the samples are right.
  """

  def __init__(self, plan, prefix=" answer:"):
    self.plan, self.prefix, self.calls = plan, prefix, []

  def __call__(self, prompts, *, seed, temperature, max_tokens):
    self.calls.append((list(prompts), seed, temperature, max_tokens))
    seen, out = collections.Counter(), []
    for p in prompts:
      j = seen[p]
      seen[p] += 1
      direct = p.endswith(self.prefix)
      q = p[len("Q: ") : -len("\nA:" + (self.prefix if direct else ""))]
      answer, hit, cot_correct = self.plan[q]
      if direct:
        out.append(filters.Sample(f" {answer if j == hit else 'z'}", True))
      else:
        ok = answer if j < cot_correct else "z"
        out.append(filters.Sample(f" x>y. answer: {ok}", True))
    return out


PLAN = {
  "q1 | a": ("b", 7, 5),  # guessed on the 8th attempt
  "q2 | a": ("c", 8, 5),  # only on the 9th
  "q3 | a": ("d", None, 10),  # never guessed; always solved
  "q4 | a": ("e", None, 9),
  "q5 | a": ("f", None, 0),
}
ROWS = [
  dict(question=q, answer=a, id=i, kind="chains")
  for i, (q, (a, *_)) in enumerate(PLAN.items())
]


def test_no_cot_filter_drops_a_guess_within_n_and_keeps_one_after():
  stub = Stub(PLAN)
  cfg = CurateConfig(samples=0)
  assert cfg.no_cot_attempts == 8
  kept, dec = filters.curate(ROWS, cfg=cfg, sample_fn=stub, pool=CHAINS)
  assert [d.reason for d in dec] == ["easy_to_hack", None, None, None, None]
  assert [d.no_cot_correct for d in dec] == [1, 0, 0, 0, 0]
  assert [r["id"] for r in kept] == [1, 2, 3, 4]
  # one call: 8 direct-answer attempts per prompt, short, at the prefix
  [(prompts, seed, temperature, max_tokens)] = stub.calls
  assert len(prompts) == 5 * 8 and all(p.endswith(" answer:") for p in prompts)
  assert max_tokens == cfg.no_cot_max_tokens
  assert (seed, temperature) == (cfg.seed, cfg.no_cot_temperature)
  # nine attempts reach q2's guess; a threshold of 2 correct keeps both
  _, dec9 = filters.curate(
    ROWS,
    cfg=CurateConfig(samples=0, no_cot_attempts=9),
    sample_fn=Stub(PLAN),
    pool=CHAINS,
  )
  assert [d.reason for d in dec9][:2] == ["easy_to_hack"] * 2
  _, dec2 = filters.curate(
    ROWS,
    cfg=CurateConfig(samples=0, no_cot_min_correct=2),
    sample_fn=Stub(PLAN),
    pool=CHAINS,
  )
  assert all(d.reason is None for d in dec2)


def test_no_cot_prefix_is_a_parameter_and_is_verified_with_the_response():
  # The stub's direct answer " b" verifies only as " answer:" + " b".
  stub = Stub(PLAN, prefix=" =>")
  _, dec = filters.curate(
    ROWS,
    cfg=CurateConfig(samples=0, no_cot_prefix=" =>"),
    sample_fn=stub,
    pool=CHAINS,
  )
  assert all(p.endswith(" =>") for p in stub.calls[0][0])
  assert all(d.reason is None for d in dec)  # " => b" has no answer marker


def test_pass_rate_thresholds_and_kept_rows():
  stub = Stub(PLAN)
  cfg = CurateConfig(
    no_cot_attempts=8, trivial_pass_rate=1.0, seed=3, temperature=0.7
  )
  kept, dec = filters.curate(ROWS, cfg=cfg, sample_fn=stub, pool=CHAINS)
  assert [d.reason for d in dec] == [
    "easy_to_hack",
    None,
    "trivial",
    None,
    None,
  ]
  # difficulty is sampled only for rows the no-CoT filter kept
  prompts, seed, temperature, max_tokens = stub.calls[1]
  assert len(prompts) == 4 * 10 and max_tokens is None
  assert (seed, temperature) == (4, 0.7)
  assert kept == [
    dict(ROWS[1], difficulty_pass_rate=0.5),
    dict(ROWS[3], difficulty_pass_rate=0.9),
    dict(ROWS[4], difficulty_pass_rate=0.0),
  ]
  _, dec = filters.curate(
    ROWS,
    cfg=CurateConfig(trivial_pass_rate=0.9, min_pass_rate=0.1),
    sample_fn=Stub(PLAN),
    pool=CHAINS,
  )
  assert [d.reason for d in dec] == [
    "easy_to_hack",
    None,
    "trivial",
    "trivial",
    "unsolved",
  ]
  rep = filters.report(ROWS, dec, cfg)
  assert rep["pass_rate"]["histogram"] == {
    "0.00": 1,
    "0.50": 1,
    "0.90": 1,
    "1.00": 1,
  }
  assert rep["pass_rate"]["mean_kept"] == 0.5
  table = filters.format_table(rep)
  assert "| dropped: trivial | 2 | 40.0% |" in table
  assert "| kept | 1 | 20.0% |" in table


def test_responses_are_judged_by_each_rows_kind(monkeypatch):
  """Curation scores through the reward entry point: a row without a kind
  takes `default_kind` (the run's task), an "exact" row its own rule; a row
  whose kind no backend scores is named before any sampling."""
  calls = []
  real = rewards.score

  def spy(rows, responses, finished, **kw):
    calls.append([r["kind"] for r in rows])
    return real(rows, responses, finished, **kw)

  monkeypatch.setattr(rewards, "score", spy)
  rows = [dict(ROWS[2], kind="exact"), {k: v for k, v in ROWS[3].items()
                                        if k != "kind"}]  # fmt: skip
  kept, dec = filters.curate(
    rows,
    cfg=CurateConfig(no_cot_attempts=0),
    sample_fn=Stub(PLAN),
    pool=CHAINS,
    default_kind="chains",
  )
  assert calls == [["exact"] * 10 + ["chains"] * 10]
  assert [d.pass_rate for d in dec] == [1.0, 0.9]  # " x>y. answer: d"
  assert "kind" not in kept[0]  # the rows are written as they came
  with pytest.raises(ValueError, match="row 2: unknown reward kind 'geo'"):
    filters.curate(
      [ROWS[0], dict(ROWS[1], kind="geo")],
      cfg=CurateConfig(),
      sample_fn=_no_model,
      pool=CHAINS,
    )


def test_config_checks():
  with pytest.raises(ValueError, match="curate.forms"):
    CurateConfig(forms=("essay",))
  with pytest.raises(ValueError, match="curate.trivial_pass_rate"):
    CurateConfig(trivial_pass_rate=1.5)
  with pytest.raises(ValueError, match="curate.no_cot_min_correct"):
    CurateConfig(no_cot_min_correct=0)


# ---------------------------------------------------------------------------
# Files and the command
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "line,message",
  [
    ("{bad", "p.jsonl:2: not valid JSON"),
    ("[1, 2]", "p.jsonl:2: expected a JSON object"),
    ('{"answer": "1"}', "p.jsonl:2: field 'question'"),
    ('{"question": "q"}', "p.jsonl:2: field 'answer'"),
    (
      '{"question": "q", "answer": 1, "difficulty": "hard"}',
      "p.jsonl:2: field 'difficulty'",
    ),
  ],
)
def test_read_prompts_names_the_bad_line(tmp_path, line, message):
  path = tmp_path / "p.jsonl"
  path.write_text('{"question": "q0", "answer": 3}\n' + line + "\n")
  with pytest.raises(ValueError, match=message):
    curate.read_prompts(str(path))


def test_read_prompts_types(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(
    '{"question": "q", "answer": 3, "x": [1]}\n\n'
    '{"question": "r", "answer": true, "difficulty": 2}\n'
  )
  assert curate.read_prompts(str(path)) == [
    dict(question="q", answer="3", x=[1]),
    dict(question="r", answer="true", difficulty=2),
  ]


def _workdir_with_random_sft_checkpoint(workdir):
  """A run directory as the sft stage leaves it (tokenizer + checkpoint),
  with random weights: enough for the command's plumbing."""
  config = config_lib.load(
    os.path.join(ROOT, "experiments/tiny.py"), "runlocal"
  )
  r = pipeline.make_context(config, str(workdir))
  state = train.init_state(
    jax.random.key(0), model=r.s.model, tx=r.tx, mesh=r.mesh
  )
  ck = r.checkpointer("sft")
  ck.save(10, dict(train=state), dict(stage="sft", step=10, done=True))
  ck.close()
  r.writer.close()
  return r.problems["eval"]


def test_command_end_to_end_on_20_rows(tmp_path):
  problems = _workdir_with_random_sft_checkpoint(tmp_path / "run")
  rows = [p.to_item() for p in problems[:13]]
  rows += [
    dict(question="a>b | a (A) b (B) c", answer="b"),
    dict(question="x", answer="y", metadata=dict(type="mcq")),
    dict(question="True or False: a>b", answer="true"),
    dict(question="a>b b>c | a", answer="no"),
    dict(question="Prove that a>b.", answer="b"),
    dict(rows[0], id="again"),  # duplicate
    dict(question="a>b " * 20 + "| a", answer="b"),
  ]  # too long
  assert len(rows) == 20
  inp, out = tmp_path / "prompts.jsonl", tmp_path / "curated.jsonl"
  inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "k15.tools.curate",
      "--config",
      "experiments/tiny.py:runlocal",
      "--workdir",
      str(tmp_path / "run"),
      "--input",
      str(inp),
      "--output",
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rep = json.loads((tmp_path / "curated.report.json").read_text())
  dropped = rep["counts"]["dropped"]
  assert {
    k: dropped.get(k)
    for k in ("multiple_choice", "true_false", "proof", "duplicate", "too_long")
  } == dict(multiple_choice=2, true_false=2, proof=1, duplicate=1, too_long=1)
  assert rep["counts"]["input"] == 20
  assert rep["model"]["step"] == 10
  assert rep["model"]["checkpoint"].endswith(os.path.join("ckpt", "sft"))
  kept = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(kept) == rep["counts"]["kept"]
  assert (
    rep["counts"]["kept"]
    + dropped.get("easy_to_hack", 0)
    + dropped.get("trivial", 0)
    == 13
  )
  # kept rows: the input rows, in order, plus a pass rate out of 10
  originals = [json.dumps(r, sort_keys=True) for r in rows]
  pos = [
    originals.index(
      json.dumps(
        {k: v for k, v in r.items() if k != "difficulty_pass_rate"},
        sort_keys=True,
      )
    )
    for r in kept
  ]
  assert pos == sorted(pos) and max(pos, default=0) < 13
  for r in kept:
    assert r["difficulty_pass_rate"] * 10 == round(
      r["difficulty_pass_rate"] * 10
    )
  assert "| kept |" in proc.stdout and "dropped: duplicate" in proc.stdout
