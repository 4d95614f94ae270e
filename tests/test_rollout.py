"""k15.rollout: the partial-rollout buffer, continued generation, bucketed
sampler calls without retracing, training rows; the sampler's per-row
length limit, padding rows and inverse-CDF sampling that it relies on."""

import concurrent.futures
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import model as model_lib
from k15 import rewards, rollout, sampler, sampling
from k15 import tokenizer as tokenizer_lib
from k15.sampler import BUDGET, MAX_LEN, STOPPED
from k15.stages import rl

PAD = 0

# A deterministic "transition" model: next token = SUCC[current token]
# (1 -> 2 -> ... -> 15 -> 1), whatever came before, so continuing a
# trajectory from a re-prefilled context must give the same tokens.
V = 16
TCFG = model_lib.ModelConfig(
  vocab_size=V,
  num_layers=1,
  d_model=V,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  mlp_dim=16,
  max_len=64,
  tie_embeddings=False,
)
SUCC = [1] + [i + 1 for i in range(1, V - 1)] + [1]


@functools.lru_cache
def _transition_params():
  params = nn.unbox(model_lib.init_params(jax.random.key(0), model=TCFG))
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      jnp.ones_like(x) if "scale" in jax.tree_util.keystr(p) else x * 0
    ),
    params,
  )
  head = np.zeros((V, V), np.float32)
  head[np.arange(V), SUCC] = 10.0
  params["params"]["embedding"] = jnp.eye(V, dtype=jnp.float32)
  params["params"]["lm_head"] = jnp.asarray(head)
  return params


def _chain(start, n):
  out, t = [], start
  for _ in range(n):
    t = SUCC[t]
    out.append(t)
  return out


# A random model with real attention, for continuation vs one long call.
RCFG = model_lib.ModelConfig(
  vocab_size=24,
  num_layers=2,
  d_model=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=32,
  max_len=64,
  emb_init_scale=0.3,
)


@functools.lru_cache
def _random_params():
  return nn.unbox(model_lib.init_params(jax.random.key(3), model=RCFG))


GREEDY = sampler.SamplingConfig(temperature=0.0, stop_tokens=(5,))


# ---------------------------------------------------------------------------
# The buffer (host only)
# ---------------------------------------------------------------------------


def _gen(tokens, status, lp=-1.0):
  t = np.asarray(tokens, np.int32)
  return rollout.Generation(
    [], t, np.full(len(t), lp, np.float32), np.zeros(len(t), np.float32), status
  )


def test_buffer_carries_cut_rows_and_releases_whole_groups_oldest_first():
  buf = rollout.RolloutBuffer(2, partial=True)
  buf.start([7, 8], [[1, 2], [3]], iteration=0, caps=[6, 6])
  todo, reqs = buf.requests()
  got = [
    (g.problem, len(q.prefix), q.max_new)
    for (g, _), q in zip(todo, reqs, strict=True)
  ]
  assert got == [(7, 0, 6), (7, 0, 6), (8, 0, 6), (8, 0, 6)]
  buf.record(
    todo,
    [
      _gen([4, 5], STOPPED),
      _gen([4, 4, 4], BUDGET),  # carried
      _gen([9, 9, 9], BUDGET),
      _gen([6], STOPPED),
    ],
    iteration=0,
  )
  assert buf.num_finished() == 0 and buf.pop_finished(10) == []
  # iteration 1: a new group joins; the carried rows continue
  buf.start([9], [[2]], iteration=1, caps=[6])
  todo, reqs = buf.requests()
  got = [
    (g.problem, list(q.prefix), q.max_new)
    for (g, _), q in zip(todo, reqs, strict=True)
  ]
  assert got == [(7, [4, 4, 4], 3), (8, [9, 9, 9], 3), (9, [], 6), (9, [], 6)]
  buf.record(
    todo,
    [
      _gen([4, 5], STOPPED, lp=-2.0),
      _gen([9, 9, 9], BUDGET),  # reaches its cap of 6: cut by length
      _gen([1], STOPPED),
      _gen([1, 2], STOPPED),
    ],
    iteration=1,
  )
  assert buf.num_finished() == 3
  done = buf.pop_finished(2)
  assert [g.problem for g in done] == [7, 8]  # oldest first, at most 2
  a, b = done[0].members
  np.testing.assert_array_equal(b.response, [4, 4, 4, 4, 5])
  np.testing.assert_array_equal(b.version, [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(b.logp, [-1, -1, -1, -2, -2])
  assert (a.status, b.status) == (STOPPED, STOPPED)
  assert done[1].members[0].status == MAX_LEN
  assert buf.metrics(2)["buffer_finished_groups"] == 1.0
  assert [g.problem for g in buf.pop_finished(5)] == [9]
  assert buf.groups == []


def test_buffer_without_partial_rollouts_makes_budget_cuts_final():
  buf = rollout.RolloutBuffer(1, partial=False)
  buf.start([0], [[1]], iteration=3, caps=[100])
  todo, _ = buf.requests()
  buf.record(todo, [_gen([2, 2], BUDGET)], iteration=3)
  (g,) = buf.pop_finished(1)
  assert g.members[0].status == BUDGET


def test_buffer_state_round_trips_through_json_exactly():
  buf = rollout.RolloutBuffer(2, partial=True)
  buf.start([3, 4], [[1, 2, 3], [5]], iteration=0, caps=[9, 9])
  todo, _ = buf.requests()
  lp = np.float32([np.pi, -1e-30, 3.4e38])
  gens = [_gen([1, 2, 3], BUDGET), _gen([7], STOPPED)] * 2
  gens[0].logp = lp
  buf.record(todo, gens, iteration=0)
  again = rollout.RolloutBuffer(2, partial=True)
  again.load_state_dict(json.loads(json.dumps(buf.state_dict())))
  assert again.next_gid == buf.next_gid == 2
  for g, h in zip(buf.groups, again.groups, strict=True):
    assert (g.gid, g.problem, g.prompt, g.born) == (
      h.gid,
      h.problem,
      h.prompt,
      h.born,
    )
    for t, u in zip(g.members, h.members, strict=True):
      assert t.status == u.status and t.cap == u.cap
      for x, y in ((t.response, u.response), (t.version, u.version)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
      assert t.logp.tobytes() == u.logp.tobytes()  # bit for bit
  assert again.groups[0].members[0].logp.tobytes() == lp.tobytes()
  with pytest.raises(ValueError, match="k=2"):
    rollout.RolloutBuffer(4, partial=True).load_state_dict(buf.state_dict())


# ---------------------------------------------------------------------------
# Generation in segments
# ---------------------------------------------------------------------------


def test_generate_continues_cut_rows_to_a_stop_or_max_len():
  # prompt bucket 2, budget 4, max_len 14: up to 12 response tokens, in
  # up to 3 segments (continuation buckets 6 and 10)
  gen = rollout.GenConfig(
    rows=4,
    prompt_buckets=(2,),
    budget=4,
    cache_len=14,
    continue_buckets=rollout.continue_buckets(2, 4, 14),
  )
  assert gen.continue_buckets == (6, 10)
  prompts = [[3], [1, 6], [12], [2, 11]]
  out = rollout.generate(
    _transition_params(),
    prompts,
    jax.random.key(0),
    model=TCFG,
    sampling=GREEDY,
    gen=gen,
    pad_id=PAD,
  )
  want = [_chain(3, 2), _chain(6, 12), _chain(12, 8), _chain(11, 9)]
  assert [g.response.tolist() for g in out] == want
  assert [g.status for g in out] == [STOPPED, MAX_LEN, STOPPED, STOPPED]
  np.testing.assert_allclose(
    np.concatenate([g.logp for g in out]), 0.0, atol=1e-5
  )
  # without continuation buckets a row cut by the budget is final
  plain = rollout.generate(
    _transition_params(),
    prompts,
    jax.random.key(0),
    model=TCFG,
    sampling=GREEDY,
    gen=rollout.GenConfig(rows=4, prompt_buckets=(2,), budget=4, cache_len=14),
    pad_id=PAD,
  )
  assert [g.response.tolist() for g in plain] == [w[:4] for w in want]
  assert [g.status for g in plain] == [STOPPED, BUDGET, BUDGET, BUDGET]


def test_continuing_in_segments_equals_one_long_call():
  """Re-prefilling prompt + partial response (left-padded into a larger
  bucket) and decoding on reproduces one uninterrupted decode (greedy)."""
  params = _random_params()
  prompts = [[5, 9, 3], [7], [1, 2, 3, 4, 6], [11, 4]]
  cfg = sampler.SamplingConfig(temperature=0.0)
  one = rollout.generate_segments(
    params,
    [rollout.Request(p) for p in prompts],
    jax.random.key(0),
    model=RCFG,
    sampling=cfg,
    gen=rollout.GenConfig(rows=4, prompt_buckets=(6,), budget=12, cache_len=18),
    pad_id=PAD,
  )
  gen = rollout.GenConfig(
    rows=4,
    prompt_buckets=(6,),
    budget=6,
    cache_len=18,
    continue_buckets=(12,),
  )
  done = [np.zeros(0, np.int32)] * 4
  logp = [np.zeros(0, np.float32)] * 4
  for seg in range(2):
    part = rollout.generate_segments(
      params,
      [rollout.Request(p, d) for p, d in zip(prompts, done, strict=True)],
      jax.random.key(seg),
      model=RCFG,
      sampling=cfg,
      gen=gen,
      pad_id=PAD,
    )
    assert all(g.status == BUDGET for g in part)
    done = [
      np.concatenate([d, g.response]) for d, g in zip(done, part, strict=True)
    ]
    logp = [
      np.concatenate([x, g.logp]) for x, g in zip(logp, part, strict=True)
    ]
  for g, d, x in zip(one, done, logp, strict=True):
    np.testing.assert_array_equal(g.response, d)
    np.testing.assert_allclose(g.logp, x, atol=2e-5)


def _spy_generate(monkeypatch) -> list:
  """The (tokens shape, cache_len) of every `sampler.generate` call, as
  they happen."""
  calls = []
  real = sampler.generate

  def spy(params, toks, seg, rng, **kw):
    calls.append((toks.shape, kw["cache_len"]))
    return real(params, toks, seg, rng, **kw)

  monkeypatch.setattr(sampler, "generate", spy)
  return calls


def test_bucketed_calls_are_few_ordered_and_never_retrace(monkeypatch):
  calls = _spy_generate(monkeypatch)
  gen = rollout.GenConfig(
    rows=4,
    prompt_buckets=(2,),
    budget=4,
    cache_len=14,
    continue_buckets=(6, 10),
  )
  params = _transition_params()

  def iteration(reqs):
    out = rollout.generate_segments(
      params,
      reqs,
      jax.random.key(0),
      model=TCFG,
      sampling=GREEDY,
      gen=gen,
      pad_id=PAD,
    )
    for q, g in zip(reqs, out, strict=True):  # results in request order
      ctx = list(q.prompt) + list(q.prefix)
      want = _chain(ctx[-1], min(4, q.max_new))
      stop = want.index(5) + 1 if 5 in want else len(want)
      assert g.response.tolist() == want[:stop]
    return out

  R = rollout.Request
  # warm-up: each bucket's prefill and decode compile once
  for warm in (
    [R([6], (), 12)],
    [R([7, 8], range(9, 13), 8)],
    [R([2], range(3, 11), 4)],
  ):
    iteration(warm)
  sizes = (sampler.prefill._cache_size(), sampler.decode._cache_size())
  calls.clear()
  # new prompts and continued rows of other lengths and limits
  iteration(
    [
      R([9], range(10, 14), 8),
      R([1]),
      R([12, 13], (), 12),
      R([8], range(9, 16), 4),
      R([10, 11]),
      R([3]),
    ]
  )
  iteration([R([13], [14, 15], 10)])
  assert (sampler.prefill._cache_size(), sampler.decode._cache_size()) == (
    sizes
  ), "a new iteration retraced prefill or decode"
  # rows sorted by bucket into the fewest [4, bucket] calls, each at the
  # bucket of its longest row with a cache of bucket + budget
  assert calls == [((4, 2), 6), ((4, 10), 14), ((4, 6), 10)]


def _continue_and_check(reqs):
  """generate_segments on calls of 4 rows, continued rows in blocks of 2;
  every segment must follow the transition chain (greedy)."""
  gen = rollout.GenConfig(
    rows=4,
    prompt_buckets=(2,),
    budget=4,
    cache_len=14,
    continue_buckets=(6, 10),
    continue_rows=2,
  )
  out = rollout.generate_segments(
    _transition_params(),
    reqs,
    jax.random.key(0),
    model=TCFG,
    sampling=GREEDY,
    gen=gen,
    pad_id=PAD,
  )
  for q, g in zip(reqs, out, strict=True):
    want = _chain((list(q.prompt) + list(q.prefix))[-1], min(4, q.max_new))
    assert g.response.tolist() == want[: want.index(5) + 1 if 5 in want else 4]


def test_continued_rows_can_get_smaller_calls_of_their_own(monkeypatch):
  calls = _spy_generate(monkeypatch)
  R = rollout.Request
  reqs = [R([9], range(10, 14), 8), R([1]), R([12, 13]), R([8], [9, 10], 9),
          R([10, 11]), R([3]), R([2], [3], 9)]  # fmt: skip
  _continue_and_check(reqs)
  # fresh rows in calls of 4; continued rows (the 2-token context [2, 3]
  # fits the prompt bucket, so it rides with the fresh rows) in calls of 2
  assert calls == [((4, 2), 6), ((4, 2), 6), ((2, 6), 10)]


def test_continued_blocks_are_prefilled_apart_and_decoded_together(
  monkeypatch,
):
  prefills, merges = [], []
  real_prefill, real_merge = sampler.prefill, sampler.merge_rows

  def spy_prefill(params, toks, seg, rng, **kw):
    prefills.append((toks.shape, kw["cache_len"]))
    return real_prefill(params, toks, seg, rng, **kw)

  def spy_merge(states, rows, **kw):
    merges.append(([s.tokens.shape[0] for s in states], rows))
    return real_merge(states, rows, **kw)

  monkeypatch.setattr(sampler, "prefill", spy_prefill)
  monkeypatch.setattr(sampler, "merge_rows", spy_merge)
  R = rollout.Request
  reqs = [R([9], range(10, 14), 8), R([8], [9, 10], 9), R([2], [3, 4], 9),
          R([1], range(2, 9), 4), R([7], range(8, 14), 3)]  # fmt: skip
  _continue_and_check(reqs)
  # rows sorted by bucket (contexts 5, 3, 3 -> 6; 8, 7 -> 10) in blocks of
  # 2, each re-prefilled at the bucket of its longest row; two blocks per
  # decode of 4 rows, the last block alone
  assert prefills == [((2, 6), 10), ((2, 10), 14), ((2, 10), 14)]
  assert merges == [([2, 2], 4)]


def test_no_kv_cache_outlives_a_sampler_call():
  import gc

  gen = rollout.GenConfig(rows=4, prompt_buckets=(2,), budget=4, cache_len=14)
  params = _transition_params()
  before = {id(x) for x in jax.live_arrays()}
  out = rollout.generate_segments(
    params,
    [rollout.Request([3]), rollout.Request([6])],
    jax.random.key(0),
    model=TCFG,
    sampling=GREEDY,
    gen=gen,
    pad_id=PAD,
  )
  assert [len(g.response) for g in out] == [2, 4]
  gc.collect()
  S = 2 + 4  # bucket + budget
  cache_shapes = {(4, 1, 8, S), (4, 1, S, 8), (4, S)}
  left = [x.shape for x in jax.live_arrays() if id(x) not in before]
  assert not [s for s in left if tuple(s) in cache_shapes], left


# ---------------------------------------------------------------------------
# Sampler features the engine relies on
# ---------------------------------------------------------------------------


def test_per_row_limit_padding_rows_and_early_exit():
  toks, seg = sampler.left_pad([[1], [3], [9], []], 2, PAD)
  st = sampler.generate(
    _transition_params(),
    toks,
    seg,
    jax.random.key(0),
    model=TCFG,
    cfg=sampler.SamplingConfig(temperature=0.0, stop_tokens=(13,)),
    budget=8,
    cache_len=10,
    max_new_B=jnp.array([2, 8, 8, 8]),
  )
  # a limit equal to the budget is the row's cap: cut by length, not budget
  assert np.asarray(st.status).tolist() == [MAX_LEN, MAX_LEN, STOPPED, STOPPED]
  assert np.asarray(st.length).tolist() == [2, 8, 4, 0]
  # the empty row started stopped, so it did not keep the loop running
  assert int(st.step) == 7


def test_cdf_sampling_draws_from_the_filtered_distribution():
  V_ = 300  # blocks of 16: not a multiple of the block size
  rng = np.random.default_rng(0)
  logits = rng.normal(size=V_).astype(np.float32) - 8.0
  head = [3, 40, 41, 150, 200, 201, 240, 277, 298, 299]  # across blocks
  logits[head] = rng.uniform(0, 2, len(head))
  n = 20_000
  x = jnp.asarray(np.tile(logits, (n, 1)))
  for cfg in (
    sampler.SamplingConfig(method="cdf"),
    sampler.SamplingConfig(method="cdf", temperature=0.7, top_k=20),
  ):
    tok, _, slp = jax.jit(sampler.sample_token, static_argnums=2)(
      jax.random.key(1), x, cfg
    )
    tok = np.asarray(tok)
    q = np.asarray(jax.nn.softmax(sampling.filter_logits(x[:1], cfg)))[0]
    assert (q[tok] > 0).all(), "drew a filtered-out token"
    freq = np.bincount(tok, minlength=V_) / n
    tail = np.ones(V_, bool)
    tail[head] = False
    for f, p in [(freq[i], q[i]) for i in head] + [
      (freq[tail].sum(), q[tail].sum())
    ]:
      assert abs(f - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-4, (f, p)
    np.testing.assert_allclose(np.asarray(slp), np.log(q[tok]), atol=1e-4)
  # probability-0 tokens (and the padding of the last block) are never
  # drawn, wherever the uniform falls
  x1 = jnp.asarray([[0.0, -jnp.inf] * 6])
  toks = jax.vmap(lambda k: sampler.sample_cdf(k, x1)[0])(
    jax.random.split(jax.random.key(0), 500)
  )
  assert set(np.asarray(toks).tolist()) == {0, 2, 4, 6, 8, 10}


# ---------------------------------------------------------------------------
# Training rows
# ---------------------------------------------------------------------------


def _group(gid, prompt, members, born=0):
  ts = [
    rollout.Trajectory(
      np.asarray(r, np.int32),
      np.full(len(r), -0.5, np.float32),
      np.asarray(v, np.int32),
      99,
      STOPPED,
    )
    for r, v in members
  ]
  return rollout.Group(gid, gid, prompt, born, ts)


@pytest.mark.parametrize("segments", ["all", "current"])
def test_training_batch_masks_old_segments_and_pads_rows(segments):
  groups = [
    _group(0, [1, 2], [([3, 4, 5], [1, 2, 2]), ([6], [2])]),
    _group(1, [7], [([8, 9], [0, 1]), ([1, 2, 3, 4], [2, 2, 2, 2])]),
  ]
  adv = np.array([[0.5, -0.5], [1.0, -1.0]], np.float32)
  batch, old = rollout.training_batch(
    groups,
    adv,
    iteration=2,
    prompt_len=3,
    response_len=4,
    rows=6,
    pad_id=PAD,
    loss_segments=segments,
  )
  np.testing.assert_array_equal(batch["sample_weight_B"], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch["advantages_B"], [0.5, -0.5, 1, -1, 0, 0])
  np.testing.assert_array_equal(batch["tokens_BxT"][0], [0, 1, 2, 3, 4, 5, 0])
  resp = batch["response_BxT"][:, 3:]
  np.testing.assert_array_equal(
    old[:, 3:],
    resp
    & np.array(
      [
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0] * 4,
        [0] * 4,
      ],
      bool,
    ),
  )
  mask = batch["loss_mask_BxT"]
  assert not mask[:, :3].any() and not mask[4:].any()
  if segments == "all":
    np.testing.assert_array_equal(mask, batch["response_BxT"])
  else:
    np.testing.assert_array_equal(mask, batch["response_BxT"] & ~old)
  beh = batch["behaviour_logp_BxT"]
  np.testing.assert_array_equal(beh[batch["response_BxT"]], -0.5)
  assert (beh[~batch["response_BxT"]] == 0).all()


def test_training_row_widths_are_a_few_buckets():
  budget, cap = 48, 400
  width = lambda n: rollout.response_len(n, budget=budget, cap=cap)
  widths = {width(n) for n in range(1, cap + 1)}
  assert all(w >= 1 for w in widths)
  for n in range(1, cap + 1):
    assert width(n) >= n
  # multiples of 16 up to the budget, of the budget beyond it
  assert len(widths) == budget // 16 + -(-(cap - budget) // budget)


# ---------------------------------------------------------------------------
# The RL iteration with partial rollouts (in process, a toy run)
# ---------------------------------------------------------------------------


class _Tok:
  """Characters -> ids 2..21; 0 pads, 1 ends."""

  pad_id, eos_id, vocab_size = 0, 1, 24

  def encode(self, text):
    return [2 + ord(c) % 20 for c in text[-6:]]

  def decode(self, ids):
    return "".join(chr(97 + int(i) % 26) for i in ids)


def _toy_run(loss_segments: str, **rollout_kw):
  import dataclasses
  import types

  from k15 import pipeline, train
  from k15.tasks.arithmetic import Problem

  cfg = dict(
    seed=0,
    stages=("rl",),
    model=dict(
      vocab_size=24,
      num_layers=1,
      d_model=32,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
      mlp_dim=32,
      max_len=32,
      emb_init_scale=0.5,
    ),
    rollout=dict(
      dict(
        k=2,
        prompts_per_iter=4,
        prompt_len=8,
        budget=4,
        max_len=20,
        gen_rows=8,
        partial=True,
        loss_segments=loss_segments,
      ),
      **rollout_kw,
    ),
    rl=dict(iterations=6, num_minibatches=2),
    mesh=dict(data=1, fsdp=1, tensor=1, context=1),
  )
  s = pipeline.settings(cfg, vocab_size=24)
  tok = _Tok()
  problems = [Problem(f"q{i}", "a", 1 + i % 3, "") for i in range(40)]
  tx = train.make_optimizer(s.optim)
  params = nn.unbox(model_lib.init_params(jax.random.key(1), model=s.model))
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )
  ctx = types.SimpleNamespace(  # what stages.rl.iteration reads
    s=s,
    rng=lambda seed, step: jax.random.fold_in(jax.random.key(7), step),
    problems={"rl": problems},
    # common.Context.prompt for text problems: ids, no images
    prompt=lambda split, i: (
      tok.encode(tokenizer_lib.format_prompt(problems[i].question)), None
    ),
    tok=tok,
    sampling=dataclasses.replace(s.sampler, stop_tokens=(1,)),
    shard=lambda tree: tree,
    rewards=rewards.RewardPool(
      verifiers={"arithmetic": lambda text, answer: text[:1] == "b"}
    ),
    tx=tx,
  )
  return ctx, state


def _iterate(ctx, state, buf, sampler_, its):
  carry = rl.Carry(state, sampler_, buf)
  out = []
  for it in its:
    carry, m, _ = rl.iteration(ctx, carry, it)
    out.append(m)
  return carry.state, out


def test_rl_iterations_with_partial_rollouts():
  """Carry-over bookkeeping, the new-prompt policy, off-policy tokens in
  the loss (loss_segments="all"; "current" is pinned by the batch test
  above), and resuming from a JSON copy of the buffer."""
  from k15 import curriculum

  r, state = _toy_run("all")
  difficulty = np.array([p.difficulty for p in r.problems["rl"]])
  ps = curriculum.PromptSampler(difficulty, r.s.data, 0)
  buf = rollout.RolloutBuffer(2, partial=True)
  state, ms = _iterate(r, state, buf, ps, range(3))
  # resume from a JSON copy of the buffer (and copies of the rest): the
  # continuation is the same as going on without the round trip
  snap = json.loads(json.dumps(buf.state_dict()))
  ps_snap = ps.state_dict()
  state_snap = jax.tree.map(jnp.copy, state)
  state, rest = _iterate(r, state, buf, ps, range(3, 6))
  buf2 = rollout.RolloutBuffer(2, partial=True)
  buf2.load_state_dict(snap)
  ps.load_state_dict(ps_snap)
  _, again = _iterate(r, state_snap, buf2, ps, range(3, 6))
  drop = ("time", "per_s")
  for a, b in zip(rest, again, strict=True):
    a = {k: v for k, v in a.items() if not any(d in k for d in drop)}
    b = {k: v for k, v in b.items() if not any(d in k for d in drop)}
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_equal(a[k], b[k], err_msg=k)
  ms += rest
  carried = [m["rollout/carried_over"] for m in ms]
  pairs = zip(ms[1:], carried[:-1], strict=True)
  assert all(m["rollout/carried_in"] == c for m, c in pairs)
  assert sum(carried) > 0, "the budget should cut some trajectories"
  trained = [m["rollout/groups_trained"] for m in ms]
  assert max(trained) <= 4 and sum(trained) >= 8
  # new prompts = 4 minus the finished groups waiting
  for m, prev in zip(ms[1:], ms[:-1], strict=True):
    assert (
      m["rollout/new_prompts"] == 4 - prev["rollout/buffer_finished_groups"]
    )
  old = [m["rollout/old_token_frac"] for m in ms if "loss" in m]
  off = [m["rollout/off_policy_token_frac"] for m in ms if "loss" in m]
  assert max(old) > 0, "some trained trajectories span iterations"
  assert off == old


def test_select_groups_puts_groups_with_a_spread_first():
  spread = np.array([False, True, False, True, True, False])
  np.testing.assert_array_equal(rl.select_groups(spread, 2), [1, 3])
  np.testing.assert_array_equal(rl.select_groups(spread, 4), [0, 1, 3, 4])
  np.testing.assert_array_equal(rl.select_groups(spread, 9), range(6))
  np.testing.assert_array_equal(rl.select_groups(~spread, 3), [0, 2, 5])


def test_dynamic_sampling_scores_more_groups_than_it_trains(monkeypatch):
  """rollout.oversample=3: 12 new groups per iteration are scored (their
  success rates all reach the prompt sampler), 4 are trained, those with a
  reward spread first."""
  from k15 import curriculum

  r, state = _toy_run("all", partial=False, oversample=3)

  def submit(rows, responses, finished):
    # k=2 rows per group, in order: groups 0, 4, 8 get rewards (1, 0)
    i = np.arange(len(rows))
    ok = (i % 2 == 0) & (i // 2 % 4 == 0)
    results = [rewards.RewardResult(float(x), bool(x), "ok") for x in ok]
    done = concurrent.futures.Future()
    done.set_result(
      rewards.RewardBatch(tuple(results), ("arithmetic",) * len(i), {})
    )
    return done

  # the RL stage scores through its pool's submit (rewards in a thread)
  monkeypatch.setattr(r.rewards, "submit", submit)
  difficulty = np.array([p.difficulty for p in r.problems["rl"]])
  ps = curriculum.PromptSampler(difficulty, r.s.data, 0)
  buf = rollout.RolloutBuffer(2, partial=False)
  state, ms = _iterate(r, state, buf, ps, range(4))
  for m in ms:
    assert m["rollout/new_prompts"] == 12
    assert m["rollout/groups_trained"] == 4
    zero_all = m["frac_zero_adv_groups"]
    zero_trained = m["frac_zero_adv_trained"]
    # 3 of the 12 scored groups have a spread, and all 3 are trained
    assert zero_all == pytest.approx(9 / 12)
    assert zero_trained == pytest.approx(1 / 4)
  assert ps.state_dict()["count_N"].sum() == 4 * 12 * 2
