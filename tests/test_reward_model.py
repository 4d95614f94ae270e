"""Reward models: strict verdicts (k15.rewards.judge), rule-labelled data
and the scalar RM step (k15.tools.train_rm), the value head (last real
token, padding invariance), the CoT RM plumbing and save/load (k15.rm),
RMs judging through the reward entry point, and (slow) a briefly trained
CoT RM that beats chance on held-out pairs."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import (
  config_lib,
  pipeline,
  rewards,
  rm,
  rollout,
  sampler,
  sharding,
  train,
)
from k15 import model as model_lib
from k15 import tokenizer as tokenizer_lib
from k15.rewards import judge
from k15.rewards.base import RewardResult
from k15.tasks import arithmetic, chains
from k15.tools import train_rm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = model_lib.ModelConfig(
  vocab_size=48,
  num_layers=1,
  d_model=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=64,
  max_len=96,
  emb_init_scale=0.3,
)
TX = train.make_optimizer(train.OptimConfig(lr=1e-2))


def _mesh1():
  return sharding.make_mesh(
    dict(data=1, fsdp=1, tensor=1, context=1), devices=jax.devices()[:1]
  )


@pytest.fixture(scope="module")
def problems():
  return chains.splits(
    seed=0, num_sft=256, num_rl=0, num_eval=64, min_steps=1, max_steps=3
  )


@pytest.fixture(scope="module")
def tok(problems):
  ex = train_rm.make_examples(problems["sft"], chains, seed=0)
  corpus = list(chains.tokenizer_corpus(n=200)) + [
    judge.rm_prompt(e.question, e.reference, e.response)
    + judge.cot_target(e.reasoning, e.label)
    for e in ex
  ]
  corpus += [judge.cot_target(" x", b) for b in (True, False)]
  t = tokenizer_lib.train_sentencepiece(corpus, 64, **chains.TOKENIZER)
  assert t.vocab_size <= CFG.vocab_size
  return t


# ---------------------------------------------------------------------------
# Strict verdict parsing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "text, want",
  [
    (' final b=ref b.\n{"correct": true}', True),
    (' final c!=ref b.\n{"correct": false}\n  ', False),
    ('{"correct":true}', True),
    # braces that start no JSON object (LaTeX) may appear in the reasoning
    ('\\frac{1}{2} equals 0.5 {"correct": true}', True),
    ('{"correct": false, "why": "x"}', False),
  ],
)
def test_parse_verdict_valid(text, want):
  v = judge.parse_verdict(text)
  assert (v.correct, v.cause) == (want, "ok")


@pytest.mark.parametrize(
  "text, cause",
  [
    ("", "no_json"),
    ("the answer is right, so true", "no_json"),
    ('{"correct": tru}', "no_json"),  # not JSON at all
    ('{"correct": true', "no_json"),  # unterminated
    ('{"correct": true} so it is right', "trailing_text"),
    ('```json\n{"correct": true}\n```', "trailing_text"),
    ('{"correct": false} {"correct": true}', "several_objects"),
    ('first {"a": 1} then {"correct": true}', "several_objects"),
    ('{"correct": 1}', "not_boolean"),
    ('{"correct": "true"}', "not_boolean"),
    ('{"correct": null}', "not_boolean"),
    ('{"correct": {"correct": true}}', "not_boolean"),
    ('{"verdict": true}', "no_correct_key"),
    ('{"correct": false, "correct": true}', "duplicate_key"),
    ("{" * 65 + '"correct": true}', "too_many_braces"),
  ],
)
def test_parse_verdict_malformed(text, cause):
  v = judge.parse_verdict(text)
  assert v.correct is None
  assert v.cause == cause


def test_cot_target_round_trips_through_the_parser():
  for label in (True, False):
    v = judge.parse_verdict(judge.cot_target(" final a=ref a.", label))
    assert v == judge.Verdict(label, "ok")


# ---------------------------------------------------------------------------
# Training data labelled by the rule verifier
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", [chains, arithmetic])
def test_examples_are_labelled_by_the_rule(task):
  probs = task.splits(
    seed=1, num_sft=600, num_rl=0, num_eval=1, min_steps=2, max_steps=5
  )["sft"]
  ex = train_rm.make_examples(probs, task, seed=3)
  assert len(ex) == len(probs)
  by_kind = {}
  for e, p in zip(ex, probs, strict=True):
    assert e.label == task.verify(e.response, p.answer)
    assert e.reference == p.answer
    by_kind.setdefault(e.kind, set()).add(e.label)
    # the CoT target's reasoning states what the rule decided
    assert ("=ref" in e.reasoning and "!=" not in e.reasoning) == e.label
  assert by_kind == {
    "gold": {True},
    "sloppy": {True},
    "wrong_answer": {False},
    "wrong_step": {False},
    "truncated": {False},
    "several": {False},
  }
  assert 0.4 < np.mean([e.label for e in ex]) < 0.6
  # sloppy responses really differ from the gold trace (where they can)
  sloppy = [
    (e, p) for e, p in zip(ex, probs, strict=True) if e.kind == "sloppy"
  ]
  assert np.mean([e.response != p.trace for e, p in sloppy]) > 0.5


# ---------------------------------------------------------------------------
# The scalar-head RM
# ---------------------------------------------------------------------------


def _scalar_params(seed=0):
  """Random decoder and a random (non-zero) head, so the output depends on
  the hidden state it reads."""
  params = rm.init_params(
    jax.random.key(seed), kind="scalar_rm", model=CFG, mesh=_mesh1()
  )
  head = params["params"]["head"]
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  head = dict(
    kernel=jax.random.normal(k1, head["kernel"].shape),
    bias=jax.random.normal(k2, head["bias"].shape),
  )
  return {"params": {**params["params"], "head": head}}


def test_value_head_reads_the_last_real_token_padding_invariant():
  params = _scalar_params()
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(3, CFG.vocab_size, n)) for n in (5, 9, 12, 7)]
  T = 16
  left_t, left_s = sampler.left_pad(seqs, T, 0)
  right_t = np.zeros_like(left_t)
  right_s = np.zeros_like(left_s)
  for i, s in enumerate(seqs):
    right_t[i, : len(s)] = s
    right_s[i, : len(s)] = 1
  left = rm.scalar_logits(params, left_t, left_s, model=CFG)
  right = rm.scalar_logits(params, right_t, right_s, model=CFG)
  np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-5)
  # = head(decoder hidden state at the last real token) of the unpadded row
  dec = rm.decoder_params(params)
  head = params["params"]["head"]

  @jax.jit
  def unpadded(toks):
    h, _ = model_lib.Decoder(CFG).apply(
      dec,
      toks,
      jnp.arange(toks.shape[1])[None],
      jnp.ones_like(toks),
      return_hidden=True,
    )
    return h[0, -1] @ head["kernel"][:, 0] + head["bias"][0]

  for i in (0, 2):
    want = unpadded(jnp.asarray([seqs[i]]))
    np.testing.assert_allclose(left[i], want, rtol=1e-4, atol=1e-4)
  # the last real token matters; a padding token does not
  changed = right_t.copy()
  changed[0, len(seqs[0]) - 1] = (changed[0, len(seqs[0]) - 1] + 1) % 40 + 3
  assert not np.isclose(
    rm.scalar_logits(params, changed, right_s, model=CFG)[0], right[0]
  )
  junk = right_t.copy()
  junk[0, len(seqs[0]) :] = 7
  np.testing.assert_allclose(
    rm.scalar_logits(params, junk, right_s, model=CFG), right, atol=1e-5
  )


def test_fresh_scalar_rm_says_one_half_and_reuses_decoder_params():
  dec = model_lib.init_params(jax.random.key(3), model=CFG)
  params = rm.init_params(
    jax.random.key(0), kind="scalar_rm", model=CFG, mesh=_mesh1(), decoder=dec
  )
  got = rm.decoder_params(params)["params"]
  want = jax.tree.map(np.asarray, nn_unbox(dec)["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)
  toks = np.ones((2, 8), np.int32)
  np.testing.assert_array_equal(
    rm.scalar_logits(params, toks, toks, model=CFG), [0.0, 0.0]
  )


def nn_unbox(tree):
  import flax.linen as nn

  return nn.unbox(tree)


def test_scalar_rm_step_lowers_the_loss_on_a_fixed_batch():
  rng = np.random.default_rng(1)
  rows = [
    (list(rng.integers(3, CFG.vocab_size, int(rng.integers(4, 12)))), y)
    for y in [True, False] * 4
  ]
  batch = rm.scalar_batch(rows, length=16, pad_id=0)
  params = rm.init_params(
    jax.random.key(0), kind="scalar_rm", model=CFG, mesh=_mesh1()
  )
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=TX.init(params)
  )
  loss_fn = jax.jit(functools.partial(train_rm.scalar_rm_loss, model=CFG))
  loss0, _ = loss_fn(state.params, batch)
  np.testing.assert_allclose(loss0, np.log(2.0), rtol=1e-6)
  for _ in range(15):
    state, m = train_rm.scalar_rm_step(state, batch, model=CFG, tx=TX)
    assert m["skipped"] == 0
  loss1, aux = loss_fn(state.params, batch)
  assert loss1 < 0.5 * loss0
  assert aux["accuracy"] == 1.0
  assert int(state.step) == 15
  # a row of weight 0 (padding) does not count
  padded = rm.scalar_batch(rows, length=16, pad_id=0, batch_rows=10)
  np.testing.assert_allclose(loss_fn(state.params, padded)[0], loss1, rtol=1e-5)


# ---------------------------------------------------------------------------
# The CoT RM as a reward function
# ---------------------------------------------------------------------------


def _items(problems, n, task=chains, seed=0):
  ex = train_rm.make_examples(problems[:n], task, seed=seed)
  items = [dict(question=e.question, answer=e.reference) for e in ex]
  return ex, items, [e.response for e in ex]


def test_cot_rm_runs_through_the_sampler_with_fixed_shapes(tok, problems):
  """A random model writes garbage: every finished pair is judged (and is
  malformed), unfinished ones are not run, and calls with other batch sizes
  reuse the compiled sampler."""
  params = rm.init_params(
    jax.random.key(0), kind="cot_rm", model=CFG, mesh=_mesh1()
  )
  model = rm.RewardModel(
    kind="cot_rm", model=CFG, params=params, tok=tok, budget=16, rows=8
  )
  fn = rewards.get_reward_fn("cot_rm", judge=model)
  ex, items, responses = _items(problems["eval"], 11)
  finished = [i != 2 for i in range(11)]
  out = fn(items, responses, finished)
  assert len(out) == 11
  assert out[2] == RewardResult(0.0, False, "truncated")
  for i, r in enumerate(out):
    if i != 2:
      assert r.cause in ("malformed", "ok", "judged_wrong")
      assert r.score == float(r.cause == "ok")
  assert any(r.cause == "malformed" for r in out)
  n_prefill = sampler.prefill._cache_size()
  n_decode = sampler.decode._cache_size()
  fn(items[:3], responses[:3], [True] * 3)
  assert sampler.prefill._cache_size() == n_prefill
  assert sampler.decode._cache_size() == n_decode
  # a template longer than the RM's context is not run
  long = fn(items[:1], ["a>b, " * 40], [True])
  assert long[0].cause == "too_long" and long[0].score == 0.0


def test_cot_rm_scores_its_parsed_verdicts(tok, problems, monkeypatch):
  """The judgement text -> RewardResult path, with canned generations."""
  canned = [
    ' final b=ref b.\n{"correct": true}',
    ' final c!=ref b.\n{"correct": false}',
    ' final b=ref b.\n{"correct": null}',
    ' final b=ref b.\n{"correct": true} {"correct": true}',
    ' final b=ref b.\n{"correct": true}',  # cut by the budget
  ]
  status = [sampler.STOPPED] * 4 + [sampler.BUDGET]

  def fake_generate(params, prompts, rng, **kw):
    assert len(prompts) == len(canned)
    return [
      rollout.Generation(
        p, np.asarray(tok.encode(t) + [tok.eos_id]), None, None, s
      )
      for p, t, s in zip(prompts, canned, status, strict=True)
    ]

  monkeypatch.setattr(rm.rollout, "generate", fake_generate)
  model = rm.RewardModel(
    kind="cot_rm", model=CFG, params=None, tok=tok, budget=16, rows=8
  )
  _, items, responses = _items(problems["eval"], 5)
  out = model.judge(items, responses)
  assert [r.cause for r in out] == [
    "ok",
    "judged_wrong",
    "malformed",
    "malformed",
    "malformed",
  ]
  assert [r.score for r in out] == [1.0, 0.0, 0.0, 0.0, 0.0]
  assert [r.info.get("why") for r in out[2:]] == [
    "not_boolean",
    "several_objects",
    "unfinished",
  ]
  m = judge.agreement_metrics(out, np.array([1, 1, 0, 1, 0]), "x/")
  assert m["x/accuracy"] == pytest.approx(3 / 5)
  assert m["x/false_pos"] == 0.0
  assert m["x/false_neg"] == pytest.approx(2 / 3)
  assert m["x/malformed"] == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------
# Save / load / registry / RL wiring
# ---------------------------------------------------------------------------


def test_save_load_round_trip_and_registry(tmp_path, tok, problems):
  path = str(tmp_path / "tok.model")
  tok.save(path)
  params = _scalar_params(seed=4)
  d = str(tmp_path / "scalar_rm")
  rm.save(
    d,
    kind="scalar_rm",
    params=params,
    model=CFG,
    tok_files=[path],
    meta=dict(rows=8, threshold=0.3),
  )
  loaded = rm.load(d)
  assert (loaded.kind, loaded.model, loaded.rows) == ("scalar_rm", CFG, 8)
  assert loaded.threshold == 0.3
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(loaded.params),
    jax.device_get(params),
  )
  _, items, responses = _items(problems["eval"], 6)
  judge_model = rm.from_cfg("scalar_rm", ckpt=d, threshold=0.5)
  fn = rewards.get_reward_fn("scalar_rm", judge=judge_model)
  res = fn(items, responses, [True] * 6)
  ids = [
    tok.encode(judge.rm_prompt(i["question"], i["answer"], r))
    for i, r in zip(items, responses, strict=True)
  ]
  b = rm.scalar_batch([(p, False) for p in ids], length=96, pad_id=0)
  p = jax.nn.sigmoid(rm.scalar_logits(params, b["tokens_BxT"], b["seg_BxT"],
                                      model=CFG))  # fmt: skip
  np.testing.assert_allclose([r.info["p"] for r in res], p, rtol=1e-5)
  assert [r.score for r in res] == [float(x > 0.5) for x in p]
  with pytest.raises(ValueError, match="holds a scalar_rm"):
    rm.from_cfg("cot_rm", ckpt=d)
  with pytest.raises(FileNotFoundError, match="rm.json"):
    rm.load(str(tmp_path))


def test_reward_config_in_settings():
  tiny = config_lib.load(os.path.join(ROOT, "experiments", "tiny.py"),
                         "runlocal")  # fmt: skip
  s = pipeline.settings(tiny)
  assert s.reward == rm.RewardConfig()  # default: the task's verifier
  cfg = tiny.to_dict()
  cfg["reward"] = dict(kind="cot_rm", ckpt="/some/dir")
  assert pipeline.settings(cfg).reward.kind == "cot_rm"
  cfg["reward"] = dict(kind="cot_rm")
  with pytest.raises(ValueError, match="reward.ckpt"):
    pipeline.settings(cfg)
  cfg["reward"] = dict(kind="llm_judge", ckpt="x")
  with pytest.raises(ValueError, match="reward.kind"):
    pipeline.settings(cfg)
  cfg["reward"] = dict(kind="verifier", ckpts="x")
  with pytest.raises(ValueError, match="reward.ckpts"):
    pipeline.settings(cfg)


def test_entry_point_scores_by_the_rule_unless_an_rm_judges(tok, problems):
  """rewards.score: the rows' own kind (the chains rule) by default; with
  judge="cot_rm" the injected RM's judgement, unfinished responses never
  reaching it, plus its agreement with the rule."""
  ex, _, responses = _items(problems["eval"], 8)
  probs = problems["eval"][:8]
  rows = [p.to_item() for p in probs]
  assert {r["kind"] for r in rows} == {"chains"}
  finished = [i != 0 for i in range(8)]
  want = [float(e.label and i != 0) for i, e in enumerate(ex)]

  class Always:
    kind = "cot_rm"
    seen = []

    def judge(self, items, responses):
      self.seen += [i["answer"] for i in items]
      return [RewardResult(1.0, True, "ok") for _ in items]

  pool = rewards.RewardPool(
    verifiers={"chains": chains.verify}, judges={"cot_rm": Always()}
  )
  rule = rewards.score(rows, responses, finished, pool=pool)
  np.testing.assert_array_equal(rule.scores, want)
  assert rule.kinds == ("chains",) * 8 and rule.statuses[0] == "not_finished"
  assert "reward/rule_accuracy" not in rule.metrics
  got = rewards.score(rows, responses, finished, pool=pool, judge="cot_rm")
  assert Always.seen == [p.answer for p in probs[1:]]
  np.testing.assert_array_equal(got.scores, [0.0] + [1.0] * 7)
  m = got.metrics
  assert m["reward/rule_accuracy"] == pytest.approx(np.mean(want))
  assert m["reward/cot_rm/accuracy"] == pytest.approx(
    np.mean(got.scores == np.asarray(want))
  )
  assert m["reward/cot_rm/false_neg"] == 0.0
  assert m["reward/cot_rm/cause/truncated"] == 1.0
  assert m["reward/chains/n"] == 8.0


def test_experiment_config_validates():
  path = os.path.join(ROOT, "experiments", "reward_model.py")
  for arg in ("", "runlocal", "kind=cot_rm,steps=7"):
    s = train_rm.settings(config_lib.load(path, arg), vocab_size=41)
    assert s.model.vocab_size == 48
  assert s.rm.kinds == ("cot_rm",) and s.rm.steps == 7
  bad = config_lib.load(path, "runlocal").to_dict()
  bad["rm"]["kinds"] = ("cot_rm", "llm")
  with pytest.raises(ValueError, match="rm.kinds"):
    train_rm.settings(bad)


# ---------------------------------------------------------------------------
# Training end to end
# ---------------------------------------------------------------------------


def _small_rm_config(steps, kinds):
  cfg = config_lib.load(
    os.path.join(ROOT, "experiments", "reward_model.py"), "runlocal"
  )
  cfg.task.update(max_steps=2, num_train=4096, num_eval=128)
  cfg.model.update(d_model=64, mlp_dim=256, num_layers=2, max_len=112)
  cfg.rm.update(kinds=kinds, steps=steps, batch_size=32, rows=32,
                log_every=steps)  # fmt: skip
  cfg.optim.update(lr=3e-3)
  return cfg


def test_run_writes_loadable_rms(tmp_path):
  """Two steps of each kind: directories that load, evaluation recorded."""
  cfg = _small_rm_config(2, ("cot_rm", "scalar_rm"))
  cfg.task.update(num_train=64, num_eval=8)
  out = train_rm.run(cfg, str(tmp_path), mesh=_mesh1())
  for kind in ("cot_rm", "scalar_rm"):
    ev = out[kind]["eval"]
    assert ev["n"] == 8 and 0.0 <= ev["accuracy"] <= 1.0
    loaded = rm.load(str(tmp_path / kind))
    assert loaded.kind == kind
    assert os.path.exists(tmp_path / kind / "metrics.jsonl")


@pytest.mark.slow
def test_briefly_trained_cot_rm_beats_chance(tmp_path):
  """A tiny CoT RM trained for a few hundred steps agrees with the rule
  verifier on held-out pairs far more often than always answering the
  majority label, with well-formed verdicts. (Around step 400-500 it also
  starts to compare the final answer with the reference; before that its
  edge comes from spotting missing and multiple answers.)"""
  cfg = _small_rm_config(400, ("cot_rm",))
  out = train_rm.run(cfg, str(tmp_path), mesh=_mesh1())
  ev = out["cot_rm"]["eval"]
  majority = max(ev["label_mean"], 1 - ev["label_mean"])
  assert ev["accuracy"] > majority + 0.15, ev
  assert ev["malformed"] < 0.1, ev


@pytest.mark.slow
def test_rl_stage_takes_its_reward_from_an_rm(tmp_path):
  """tiny:runlocal with reward.kind=scalar_rm: the RL loop scores rollouts
  with the RM (on the run's 8-device mesh) and logs its agreement with the
  rule verifier; evaluation stays with the rule."""
  rm_cfg = _small_rm_config(2, ("scalar_rm",))
  tiny = config_lib.load(os.path.join(ROOT, "experiments", "tiny.py"),
                         "runlocal")  # fmt: skip
  rm_cfg.task.update(
    name=tiny.task.name,
    min_steps=tiny.task.min_steps,
    max_steps=tiny.task.max_steps,
    num_train=64,
    num_eval=8,
  )
  rm_cfg.model.update(max_len=256)
  train_rm.run(rm_cfg, str(tmp_path / "rm"), mesh=_mesh1())
  cfg = config_lib.override(
    tiny,
    **{
      "reward.kind": "scalar_rm",
      "reward.ckpt": str(tmp_path / "rm" / "scalar_rm"),
      "stages": ("sft", "rl"),
      "sft.steps": 2,
      "rl.iterations": 1,
    },
  )
  pipeline.run(cfg, str(tmp_path / "run"))
  from k15 import metrics

  recs = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  rl_rec = [r for r in recs if r["stage"] == "rl"][-1]
  for key in ("accuracy", "false_pos", "false_neg", "malformed", "too_long"):
    assert f"reward/scalar_rm/{key}" in rl_rec, sorted(rl_rec)
  assert "reward/rule_accuracy" in rl_rec
  # a 2-step scalar RM (p close to 1/2): its 0/1 rewards are the RL accuracy
  assert 0.0 <= rl_rec["accuracy"] <= 1.0
