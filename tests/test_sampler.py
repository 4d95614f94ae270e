"""k15.sampler: the while_loop sampler against a plain Python-loop reference,
stop / budget / cache-end rules, filtering, chunked decoding, repeats."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import model as model_lib
from k15 import sampler
from k15.model import Decoder, ModelConfig
from k15.sampler import BUDGET, MAX_LEN, REPEAT, RUNNING, STOPPED

PAD = 0
CFG = ModelConfig(
  vocab_size=24,
  num_layers=2,
  d_model=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  mlp_dim=32,
  max_len=64,
  emb_init_scale=0.15,
)
P, BUDGET_N = 6, 12
PROMPTS = [
  [5, 9, 3],
  [7],
  [1, 2, 3, 4, 5, 6],
  [11, 4],
  [8, 8, 9, 10],
  [13, 2, 20],
]


@functools.lru_cache
def _random_params():
  return nn.unbox(model_lib.init_params(jax.random.key(3), model=CFG))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, tokens_BxT, seg_BxT, *, cfg):
  pos_BxT = model_lib.positions_from_segments(seg_BxT)
  return Decoder(cfg).apply(params, tokens_BxT, pos_BxT, seg_BxT)[0]


def _reference(
  params, prompts, rng, *, cfg, sampling, budget, cache_len, model=CFG
):
  """Re-runs the full forward for every new token (no KV cache).

  Sequences sit in a fixed [B, bucket + budget] buffer (left-padded prompt,
  then generated tokens, then segment-0 padding), so one compiled forward
  serves every step. Token t (0-based) is drawn with fold_in(rng, t), as
  the sampler's prefill (t = 0) and decode step t do. Temperature-only
  sampling is re-implemented here (drawing with jax.random.categorical or
  sampler.sample_cdf, as sampling.method says; sample_cdf's distribution is
  pinned in tests/test_rollout.py); top-k / top-p are tested separately.
  """
  assert sampling.top_k == 0 and sampling.top_p == 1.0
  toks_BxP, seg_BxP = sampler.left_pad(prompts, P, PAD)
  B = len(prompts)
  buf = np.concatenate([toks_BxP, np.full((B, budget), PAD, np.int32)], 1)
  seg = np.concatenate([seg_BxP, np.zeros((B, budget), np.int32)], 1)
  out = np.full((B, budget), PAD, np.int32)
  logp = np.zeros((B, budget), np.float32)
  slp = np.zeros((B, budget), np.float32)
  status = np.full(B, RUNNING)
  length = np.zeros(B, np.int32)
  for t in range(budget):
    running = status == RUNNING
    if not running.any():
      break
    logits_BxV = np.asarray(_forward(params, buf, seg, cfg=model))[:, P + t - 1]
    lp_BxV = np.asarray(jax.nn.log_softmax(logits_BxV))
    if sampling.temperature == 0:
      tok = logits_BxV.argmax(-1)
      s_BxV = np.zeros_like(lp_BxV)
    else:
      x = jnp.asarray(logits_BxV / sampling.temperature)
      key = jax.random.fold_in(rng, t)
      if sampling.method == "gumbel":
        tok = np.asarray(jax.random.categorical(key, x))
      else:
        tok = np.asarray(sampler.sample_cdf(key, x))
      s_BxV = np.asarray(jax.nn.log_softmax(x))
    for b in np.flatnonzero(running):
      out[b, t], logp[b, t], slp[b, t] = (
        tok[b],
        lp_BxV[b, tok[b]],
        s_BxV[b, tok[b]],
      )
      length[b] += 1
      if tok[b] in sampling.stop_tokens:
        status[b] = STOPPED
      elif length[b] >= budget:
        status[b] = BUDGET
      elif P + length[b] >= cache_len:
        status[b] = MAX_LEN
      else:  # fed back at the next step
        buf[b, P + t], seg[b, P + t] = tok[b], 1
  return dict(
    tokens=out, logp=logp, sample_logp=slp, length=length, status=status
  )


def _generate(
  params,
  prompts,
  rng,
  *,
  sampling,
  budget=BUDGET_N,
  cache_len=P + BUDGET_N,
  model=CFG,
  bucket=P,
):
  toks, seg = sampler.left_pad(prompts, bucket, PAD)
  st = sampler.generate(
    params,
    toks,
    seg,
    rng,
    model=model,
    cfg=sampling,
    budget=budget,
    cache_len=cache_len,
    pad_id=PAD,
  )
  return jax.device_get(
    dict(
      tokens=st.tokens,
      logp=st.logp,
      sample_logp=st.sample_logp,
      length=st.length,
      status=st.status,
      step=st.step,
    )
  )


def _assert_same(got, want):
  np.testing.assert_array_equal(got["status"], want["status"])
  np.testing.assert_array_equal(got["length"], want["length"])
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_allclose(got["logp"], want["logp"], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(
    got["sample_logp"], want["sample_logp"], atol=2e-5, rtol=1e-5
  )


def _assert_padded_after_length(res):
  for b, n in enumerate(res["length"]):
    assert (res["tokens"][b, n:] == PAD).all()
    assert (res["logp"][b, n:] == 0).all()
    assert (res["sample_logp"][b, n:] == 0).all()


def _matches_reference(sampling, rng):
  """The sampler's result on PROMPTS, asserted equal to `_reference`'s."""
  params = _random_params()
  got = _generate(params, PROMPTS, rng, sampling=sampling)
  want = _reference(
    params,
    PROMPTS,
    rng,
    cfg=CFG,
    sampling=sampling,
    budget=BUDGET_N,
    cache_len=P + BUDGET_N,
  )
  _assert_same(got, want)
  return got


@pytest.mark.parametrize("method", ["cdf", "gumbel"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_matches_python_loop_reference(temperature, method):
  params = _random_params()
  sampling = sampler.SamplingConfig(
    temperature=temperature, stop_tokens=(4, 17), method=method
  )
  rng = jax.random.key(42)
  got = _matches_reference(sampling, rng)
  _assert_padded_after_length(got)
  # the test has power: rows stop at different times, others hit the budget
  assert set(got["status"]) == {STOPPED, BUDGET}, got["status"]
  assert len(set(got["length"][got["status"] == STOPPED])) > 1
  # the sampling distribution differs from the model's iff temperature != 1
  n = got["length"]
  real = np.arange(BUDGET_N)[None] < n[:, None]
  if temperature == 1.0:
    np.testing.assert_allclose(
      got["sample_logp"][real], got["logp"][real], atol=1e-5
    )
  else:
    assert not np.allclose(
      got["sample_logp"][real], got["logp"][real], atol=1e-2
    )
  # same rng, same draws; another rng, other draws
  again = _generate(params, PROMPTS, rng, sampling=sampling)
  np.testing.assert_array_equal(again["tokens"], got["tokens"])
  other = _generate(params, PROMPTS, jax.random.key(7), sampling=sampling)
  assert not np.array_equal(other["tokens"], got["tokens"])


@pytest.mark.parametrize("live_chunk", [4, 7])
def test_attending_over_live_chunks_matches_the_reference(live_chunk):
  """decode runs one while_loop per chunk of cache slots, attending over
  the slots written so far (rounded up to the chunk): the same tokens and
  log-probs as the no-cache reference. Chunk 4 of an 18-slot cache with a
  6-slot prompt skips one loop and splits the prompt's chunk."""
  sampling = sampler.SamplingConfig(
    temperature=1.0, stop_tokens=(4, 17), live_chunk=live_chunk
  )
  assert len(sampler.live_bounds(P + BUDGET_N, live_chunk)) >= 3
  got = _matches_reference(sampling, jax.random.key(42))
  assert set(got["status"]) == {STOPPED, BUDGET}, got["status"]


def test_live_bounds():
  assert sampler.live_bounds(768, 128) == (128, 256, 384, 512, 640, 768)
  assert sampler.live_bounds(700, 128) == (128, 256, 384, 512, 640, 700)
  assert sampler.live_bounds(56, 128) == (56,)
  assert sampler.live_bounds(768, 0) == (768,)
  with pytest.raises(ValueError, match="live_chunk"):
    sampler.SamplingConfig(live_chunk=-1)


def test_sampler_logp_equals_scoring_the_trajectory():
  """The log-probs kept while sampling are what the trainer recomputes."""
  params = _random_params()
  sampling = sampler.SamplingConfig(stop_tokens=(4, 17))
  got = _generate(params, PROMPTS, jax.random.key(1), sampling=sampling)
  responses = [got["tokens"][b, :n] for b, n in enumerate(got["length"])]
  from k15 import rollout

  batch = rollout.to_batch(
    PROMPTS, responses, prompt_len=P, response_len=BUDGET_N, pad_id=PAD
  )
  lp_BxT = np.asarray(
    jax.jit(model_lib.sequence_logprobs, static_argnames="model")(
      params, batch["tokens_BxT"], batch["seg_BxT"], model=CFG
    )
  )
  mask = batch["loss_mask_BxT"]
  real = np.arange(BUDGET_N)[None] < got["length"][:, None]
  np.testing.assert_allclose(
    lp_BxT[mask], got["logp"][real], atol=2e-5, rtol=1e-5
  )


def test_greedy_is_argmax_and_top_k_1_is_greedy():
  params = _random_params()
  greedy = sampler.SamplingConfig(temperature=0.0, stop_tokens=(4, 17))
  rng = jax.random.key(0)
  got = _generate(params, PROMPTS, rng, sampling=greedy)
  want = _reference(
    params,
    PROMPTS,
    rng,
    cfg=CFG,
    sampling=greedy,
    budget=BUDGET_N,
    cache_len=P + BUDGET_N,
  )
  _assert_same(got, want)
  # greedy does not depend on the rng
  other = _generate(params, PROMPTS, jax.random.key(5), sampling=greedy)
  np.testing.assert_array_equal(other["tokens"], got["tokens"])

  top1 = sampler.SamplingConfig(temperature=1.0, top_k=1, stop_tokens=(4, 17))
  t1 = _generate(params, PROMPTS, jax.random.key(9), sampling=top1)
  np.testing.assert_array_equal(t1["tokens"], got["tokens"])
  np.testing.assert_array_equal(t1["status"], got["status"])
  np.testing.assert_allclose(t1["logp"], got["logp"], atol=1e-6)
  np.testing.assert_allclose(t1["sample_logp"], 0.0, atol=1e-6)


PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # deliberately not sorted


def _draw(cfg, n=4000, seed=0):
  logits = jnp.log(jnp.asarray(np.tile(PROBS, (n, 1)), jnp.float32))
  tok, lp, slp = jax.jit(sampler.sample_token, static_argnums=2)(
    jax.random.key(seed), logits, cfg
  )
  return np.asarray(tok), np.asarray(lp), np.asarray(slp)


@pytest.mark.parametrize(
  "temperature, top_p, nucleus",
  [
    (1.0, 0.4, [1]),
    (1.0, 0.7, [1, 3]),
    (1.0, 0.9, [1, 3, 2]),
    (1.0, 0.99, [1, 3, 2, 0]),
    # the nucleus is taken on the tempered distribution: at T=2,
    # p ~ sqrt(PROBS) = [.12, .38, .21, .29] (rounded), so 0.45 needs two
    (2.0, 0.45, [1, 3]),
  ],
)
def test_top_p_keeps_the_nucleus(temperature, top_p, nucleus):
  cfg = sampler.SamplingConfig(temperature=temperature, top_p=top_p)
  tok, lp, slp = _draw(cfg)
  assert set(tok.tolist()) == set(nucleus)
  q = PROBS ** (1 / temperature)
  q = q / q.sum()
  q_nuc = q[nucleus] / q[nucleus].sum()
  freq = np.array([(tok == i).mean() for i in nucleus])
  np.testing.assert_allclose(freq, q_nuc, atol=0.03)
  np.testing.assert_allclose(lp, np.log(PROBS[tok]), atol=1e-5)
  q_tok = dict(zip(nucleus, q_nuc, strict=True))
  want_slp = np.log([q_tok[t] for t in tok.tolist()])
  np.testing.assert_allclose(slp, want_slp, atol=1e-5)


def test_top_k_keeps_the_k_largest():
  tok, lp, slp = _draw(sampler.SamplingConfig(top_k=2))
  assert set(tok.tolist()) == {1, 3}
  np.testing.assert_allclose((tok == 1).mean(), 0.5 / 0.8, atol=0.03)
  np.testing.assert_allclose(slp, np.log(PROBS[tok] / 0.8), atol=1e-5)
  np.testing.assert_allclose(lp, np.log(PROBS[tok]), atol=1e-5)


# ---------------------------------------------------------------------------
# A deterministic "transition" model: next token = nxt[current token].
# All block weights are zero, so the hidden state is the normalised one-hot
# embedding of the current token and the untied head picks nxt[token].
# ---------------------------------------------------------------------------

V = 16
TCFG = ModelConfig(
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


def _transition_params(nxt):
  params = nn.unbox(model_lib.init_params(jax.random.key(0), model=TCFG))
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      jnp.ones_like(x)
      if "scale" in jax.tree_util.keystr(p)
      else jnp.zeros_like(x)
    ),
    params,
  )
  head = np.zeros((V, V), np.float32)
  head[np.arange(V), nxt] = 10.0  # logit 40 after the norm: p ~ 1 - 1e-16
  params["params"]["embedding"] = jnp.eye(V, dtype=jnp.float32)
  params["params"]["lm_head"] = jnp.asarray(head)
  return params


# successor: 1 -> 2 -> ... -> 15 -> 1 (never the pad id 0)
SUCC = np.array([1] + [i + 1 for i in range(1, V - 1)] + [1])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_tokens_and_budget(temperature):
  params = _transition_params(SUCC)
  cfg = sampler.SamplingConfig(temperature=temperature, stop_tokens=(5, 12))
  prompts = [[3, 1], [5], [9, 6], [2, 3, 4], [13]]
  got = _generate(
    params,
    prompts,
    jax.random.key(0),
    sampling=cfg,
    budget=6,
    cache_len=20,
    model=TCFG,
    bucket=3,
  )
  np.testing.assert_array_equal(
    got["status"], [STOPPED, BUDGET, STOPPED, STOPPED, BUDGET]
  )
  np.testing.assert_array_equal(got["length"], [4, 6, 6, 1, 6])
  np.testing.assert_array_equal(
    got["tokens"],
    [
      [2, 3, 4, 5, 0, 0],  # the stop token is kept, then pad
      [6, 7, 8, 9, 10, 11],  # cut by the budget
      [7, 8, 9, 10, 11, 12],  # a stop on the last budget token is a stop
      [5, 0, 0, 0, 0, 0],
      [14, 15, 1, 2, 3, 4],
    ],
  )
  _assert_padded_after_length(got)
  np.testing.assert_allclose(got["logp"][got["tokens"] != 0], 0.0, atol=1e-5)


def test_early_exit_when_every_row_stopped():
  params = _transition_params(SUCC)
  cfg = sampler.SamplingConfig(temperature=0.0, stop_tokens=(5,))
  got = _generate(
    params,
    [[1], [3], [4]],
    jax.random.key(0),
    sampling=cfg,
    budget=40,
    cache_len=48,
    model=TCFG,
    bucket=2,
  )
  np.testing.assert_array_equal(got["length"], [4, 2, 1])
  assert (got["status"] == STOPPED).all()
  # prefill drew the first token; decode stopped after 3 more steps, not 39
  assert got["step"] == 3


@pytest.mark.parametrize("live_chunk", [0, 2])
def test_cache_end_stops_rows_with_max_len(live_chunk):
  params = _transition_params(SUCC)
  cfg = sampler.SamplingConfig(
    temperature=0.0, stop_tokens=(5,), live_chunk=live_chunk
  )
  # bucket 3 + 4 tokens fill the cache of 7 before the budget of 10
  got = _generate(
    params,
    [[3, 1], [5], [2, 3, 4]],
    jax.random.key(0),
    sampling=cfg,
    budget=10,
    cache_len=7,
    model=TCFG,
    bucket=3,
  )
  np.testing.assert_array_equal(got["status"], [STOPPED, MAX_LEN, STOPPED])
  np.testing.assert_array_equal(got["length"], [4, 4, 1])
  np.testing.assert_array_equal(got["tokens"][1, :5], [6, 7, 8, 9, 0])
  # a trajectory never outgrows the cache: bucket + length <= cache_len
  assert (3 + got["length"] <= 7).all()


def test_repeat_detection_stops_looping_rows():
  nxt = SUCC.copy()
  nxt[7], nxt[8] = 8, 7  # 7 <-> 8 loops forever
  params = _transition_params(nxt)
  cfg = sampler.SamplingConfig(
    temperature=0.0,
    stop_tokens=(5,),
    repeat_ngram=2,
    repeat_count=3,
    repeat_window=16,
  )
  got = _generate(
    params,
    [[6], [2], [11]],
    jax.random.key(0),
    sampling=cfg,
    budget=8,
    cache_len=16,
    model=TCFG,
    bucket=2,
  )
  np.testing.assert_array_equal(got["status"], [REPEAT, STOPPED, BUDGET])
  # "7 8" occurs for the third time at length 6
  np.testing.assert_array_equal(got["tokens"][0, :7], [7, 8, 7, 8, 7, 8, 0])
  np.testing.assert_array_equal(got["length"], [6, 3, 8])


@pytest.mark.parametrize("live_chunk", [128, 5])
def test_decode_in_chunks_equals_one_call(live_chunk):
  params = _random_params()
  cfg = sampler.SamplingConfig(
    temperature=1.0, stop_tokens=(4, 17), live_chunk=live_chunk
  )
  rng = jax.random.key(42)
  one = _generate(params, PROMPTS, rng, sampling=cfg)
  toks, seg = sampler.left_pad(PROMPTS, P, PAD)
  st = sampler.prefill(
    params,
    toks,
    seg,
    rng,
    model=CFG,
    cfg=cfg,
    budget=BUDGET_N,
    cache_len=P + BUDGET_N,
    pad_id=PAD,
  )
  calls = 0
  sizes = []
  while bool((st.status == RUNNING).any()):
    st = sampler.decode(params, st, model=CFG, cfg=cfg, max_steps=3, pad_id=PAD)
    sizes.append(sampler.decode._cache_size())
    calls += 1
    assert calls <= BUDGET_N
    # a call stops after 3 steps; rows still running have 1 + 3 * calls
    assert int(st.step) == min(3 * calls, int(one["step"]))
    running = np.asarray(st.status) == RUNNING
    assert (np.asarray(st.length)[running] == 1 + 3 * calls).all()
  assert calls >= 3, "the budget should need several chunks"
  assert len(set(sizes)) == 1, "decode recompiled between chunks"
  got = jax.device_get(
    dict(
      tokens=st.tokens,
      logp=st.logp,
      sample_logp=st.sample_logp,
      length=st.length,
      status=st.status,
      step=st.step,
    )
  )
  _assert_same(got, one)
  assert got["step"] == one["step"]


# ---------------------------------------------------------------------------
# detect_repeat, left_pad, bucket_for
# ---------------------------------------------------------------------------


def _repeat(rows, ngram=3, window=64, count=4, N=None):
  N = N or max(len(r) for r in rows)
  toks = np.zeros((len(rows), N), np.int32)
  for i, r in enumerate(rows):
    toks[i, : len(r)] = r
  length = np.array([len(r) for r in rows], np.int32)
  return np.asarray(
    sampler.detect_repeat(
      jnp.asarray(toks),
      jnp.asarray(length),
      ngram=ngram,
      window=window,
      count=count,
    )
  )


def test_detect_repeat_catches_loops():
  loop = [9, 4, 2, 6] + [1, 2, 3] * 4
  out = _repeat([loop, [7] * 12, [5, 6] * 8], N=40)
  assert out.tolist() == [True, True, True]


def test_detect_repeat_ignores_varied_sequences():
  rng = np.random.default_rng(0)
  varied = rng.integers(1, 50, 60).tolist()
  counting = list(range(1, 61))
  three_times = [9, 4] + [1, 2, 3] * 3  # one short of count=4
  # "1 2 3" four times, but only once inside the last 12 tokens
  long_ago = [1, 2, 3] * 4 + list(range(10, 30)) + [1, 2, 3]
  out = _repeat([varied, counting, three_times, long_ago], window=12)
  assert out.tolist() == [False, False, False, False]
  # the same tokens without the window limit are a repeat
  assert _repeat([long_ago], window=64).tolist() == [True]


def test_detect_repeat_only_looks_at_the_last_ngram():
  # an earlier loop that the row has left is not flagged
  rows = [[1, 2, 3] * 4 + [7, 8, 9], [1, 2, 3] * 4]
  assert _repeat(rows, N=20).tolist() == [False, True]


def test_left_pad_and_bucket_for():
  toks, seg = sampler.left_pad([[4, 5], [6], []], 3, pad_id=0)
  np.testing.assert_array_equal(toks, [[0, 4, 5], [0, 0, 6], [0, 0, 0]])
  np.testing.assert_array_equal(seg, [[0, 1, 1], [0, 0, 1], [0, 0, 0]])
  with pytest.raises(ValueError, match="4 tokens exceeds bucket 3"):
    sampler.left_pad([[1, 2, 3, 4]], 3, pad_id=0)
  assert sampler.bucket_for(5, (16, 8)) == 8
  assert sampler.bucket_for(9, (16, 8)) == 16
  with pytest.raises(ValueError, match="largest prompt bucket 16"):
    sampler.bucket_for(17, (8, 16))


@pytest.mark.parametrize(
  "dtype, cache_dtype, want",
  [
    ("float32", "", "float32"),
    ("bfloat16", "", "bfloat16"),  # on CPU too: no backend rule
    ("bfloat16", "float32", "float32"),
  ],
)
def test_cache_dtype_comes_from_the_config(dtype, cache_dtype, want):
  """The decode cache that prefill hands to decode (what `--dry_run`
  plans) is in model.cache_dtype, "" meaning model.dtype."""
  model = dataclasses.replace(CFG, dtype=dtype, cache_dtype=cache_dtype)
  toks, seg = sampler.left_pad(PROMPTS, P, PAD)
  st = jax.eval_shape(
    functools.partial(
      sampler.prefill,
      model=model,
      cfg=sampler.SamplingConfig(),
      budget=BUDGET_N,
      cache_len=P + BUDGET_N,
    ),
    _random_params(),
    toks,
    seg,
    jax.random.key(0),
  )
  for x in st.cache["k"] + st.cache["v"]:
    assert x.dtype == jnp.dtype(want)


def test_prefill_rejects_a_cache_shorter_than_the_prompt():
  cfg = sampler.SamplingConfig()
  toks, seg = sampler.left_pad([[1, 2]], 4, PAD)
  with pytest.raises(ValueError, match="cache_len=4"):
    sampler.prefill(
      _random_params(),
      toks,
      seg,
      jax.random.key(0),
      model=CFG,
      cfg=cfg,
      budget=2,
      cache_len=4,
    )


def test_merged_blocks_decode_as_one_call_at_the_longest_bucket():
  """Blocks prefilled at their own buckets and merged (`merge_rows`) decode
  exactly as their rows left-padded into one call at the longest bucket."""
  params = _random_params()
  sc = sampler.SamplingConfig(temperature=0.0, stop_tokens=(4,), live_chunk=4)
  short, long = [[5, 9, 3], [7]], [[1, 2, 3, 4, 5, 6], [11, 4, 8]]
  kw = dict(model=CFG, cfg=sc, budget=BUDGET_N, pad_id=PAD)
  want = _generate(params, short + long, jax.random.key(0), sampling=sc)
  states = []
  for prompts, bucket in ((short, 3), (long, P)):
    toks, seg = sampler.left_pad(prompts, bucket, PAD)
    states.append(
      sampler.prefill(
        params, toks, seg, jax.random.key(0), cache_len=bucket + BUDGET_N, **kw
      )
    )
  # one empty row after them: it starts stopped and stays empty
  merged = sampler.merge_rows(states, 5, pad_id=PAD)
  assert int(merged.index) == P
  assert merged.cache["k"][0].shape[-1] == P + BUDGET_N
  st = sampler.decode(
    params, merged, model=CFG, cfg=sc, max_steps=BUDGET_N, pad_id=PAD
  )
  got = jax.device_get(
    dict(tokens=st.tokens, logp=st.logp, length=st.length, status=st.status)
  )
  for k in ("tokens", "length", "status"):
    np.testing.assert_array_equal(got[k][:4], want[k], err_msg=k)
  np.testing.assert_allclose(got["logp"][:4], want["logp"], atol=1e-5)
  assert (got["length"][4], got["status"][4]) == (0, STOPPED)
  assert (got["tokens"][4] == PAD).all()
  with pytest.raises(ValueError, match="do not fit"):
    sampler.merge_rows(states, 3)
  # placements compile per (block, call) shape, not per combination
  n = sampler._place_rows._cache_size()
  sampler.merge_rows([states[1], states[0]], 5, pad_id=PAD)
  assert sampler._place_rows._cache_size() == n
