"""Repeat detection (sampler.detect_repeat, the REPEAT status while
decoding) and its reward penalty (stages.rl.group_rewards)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import model as model_lib
from k15 import objective, sampler
from k15.sampler import REPEAT, STOPPED
from k15.stages import rl

_detect_jit = jax.jit(
  sampler.detect_repeat, static_argnames=("ngram", "window", "count")
)


def _detect(rows, *, ngram=3, count=4, window=64, N=128):
  """Rows padded to one [128k, N] shape: one compile per threshold set."""
  B = -(-len(rows) // 128) * 128
  toks = np.zeros((B, N), np.int32)
  for i, r in enumerate(rows):
    toks[i, : len(r)] = r
  length = np.zeros(B, np.int32)
  length[: len(rows)] = [len(r) for r in rows]
  out = _detect_jit(
    jnp.asarray(toks),
    jnp.asarray(length),
    ngram=ngram,
    window=window,
    count=count,
  )
  return np.asarray(out)[: len(rows)].tolist()


def _first_flag(seq, **kw):
  """Shortest prefix of seq that is flagged (None if none is)."""
  flags = _detect([seq[:n] for n in range(1, len(seq) + 1)], **kw)
  return next((n + 1 for n, f in enumerate(flags) if f), None)


@pytest.mark.parametrize(
  "period, ngram, count, want",
  [
    # a loop of period p >= ngram is flagged when its last n-gram has
    # appeared `count` times: (count - 1) * p + ngram tokens after the start
    ([1, 2, 3], 3, 4, 3 * 3 + 3),
    ([4, 5, 6, 7, 8], 3, 4, 3 * 5 + 3),
    ([4, 5, 6, 7, 8], 2, 3, 2 * 5 + 2),
    # short periods: occurrences may not overlap, so 2-token loops need
    # spacing 4 for trigrams
    ([9, 10], 3, 4, 3 * 4 + 3),
    # one token over and over: ngram * count tokens
    ([7], 3, 4, 12),
    ([7], 2, 5, 10),
  ],
)
def test_loops_are_caught_exactly_at_the_threshold(period, ngram, count, want):
  prefix = [20, 21, 22]
  seq = prefix + period * 20
  got = _first_flag(seq, ngram=ngram, count=count, window=64)
  assert got == len(prefix) + want


def test_run_of_one_token_shorter_than_ngram_times_count_is_not_a_loop():
  # "1000000": six zeros are not a loop at ngram=3, count=4 (overlapping
  # counting would have flagged it at the sixth token)
  digits = [30, 31] + [40] * 11
  assert _detect([digits]) == [False]
  assert _detect([digits + [40]]) == [True]


_TEXT = (
  "the model reads the problem , writes a plan , checks the plan against "
  "the problem and then writes the answer . if the answer is wrong the "
  "model goes back to the plan , finds the step that failed and tries "
  "another way ; the second way works and the model writes the final "
  "answer in the box at the end of the page ."
).split()


def test_varied_text_is_not_flagged():
  vocab = {w: i + 1 for i, w in enumerate(dict.fromkeys(_TEXT))}
  text = [vocab[w] for w in _TEXT]
  rng = np.random.default_rng(0)
  rows = [
    text,
    list(range(1, 61)),  # counting
    rng.integers(1, 50, 60).tolist(),
    [1, 2, 3] * 3 + [9],  # one occurrence short, then moved on
  ]
  # every prefix of every row, with the window and thresholds a run uses
  for row in rows:
    assert _first_flag(row, ngram=3, count=4, window=64) is None, row
  # the same text repeated is a loop
  assert _first_flag(text[:10] * 5, ngram=3, count=4, window=64) == 33


def test_window_and_count_are_honoured():
  loop_then_text = [1, 2, 3] * 4 + list(range(10, 30)) + [1, 2, 3]
  # four "1 2 3" in all, but only one in the last 12 tokens
  assert _detect([loop_then_text], window=12) == [False]
  assert _detect([loop_then_text], window=64) == [True]
  assert _detect([[1, 2, 3] * 4], count=5) == [False]
  assert _detect([[1, 2, 3] * 5], count=5) == [True]
  # only the row's last n-gram counts: an abandoned loop is not flagged
  assert _detect([[1, 2, 3] * 4 + [7, 8, 9]]) == [False]


def test_config_rejects_thresholds_that_can_never_fire():
  with pytest.raises(ValueError, match="repeat_window=8"):
    sampler.SamplingConfig(repeat_ngram=3, repeat_count=4, repeat_window=8)
  with pytest.raises(ValueError, match="repeat_count=0"):
    sampler.SamplingConfig(repeat_ngram=3, repeat_count=0)
  sampler.SamplingConfig(repeat_ngram=0, repeat_window=1)  # off: anything


# A deterministic "transition" model: next token = nxt[current token].
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


@functools.lru_cache
def _transition_params(nxt: tuple[int, ...]):
  params = nn.unbox(model_lib.init_params(jax.random.key(0), model=TCFG))
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: (
      jnp.ones_like(x) if "scale" in jax.tree_util.keystr(p) else x * 0
    ),
    params,
  )
  head = np.zeros((V, V), np.float32)
  head[np.arange(V), list(nxt)] = 10.0
  params["params"]["embedding"] = jnp.eye(V, dtype=jnp.float32)
  params["params"]["lm_head"] = jnp.asarray(head)
  return params


def test_decode_stops_a_looping_row_early_and_others_run_on():
  nxt = [1] + [i + 1 for i in range(1, V - 1)] + [1]
  nxt[9], nxt[10], nxt[11] = 10, 11, 9  # 9 -> 10 -> 11 -> 9 ...
  cfg = sampler.SamplingConfig(
    temperature=0.0,
    stop_tokens=(5,),
    repeat_ngram=3,
    repeat_count=3,
    repeat_window=16,
  )
  toks, seg = sampler.left_pad([[8], [2], [12]], 2, 0)
  st = sampler.generate(
    _transition_params(tuple(nxt)),
    toks,
    seg,
    jax.random.key(0),
    model=TCFG,
    cfg=cfg,
    budget=20,
    cache_len=22,
  )
  status, length = np.asarray(st.status), np.asarray(st.length)
  # row 0: 9 10 11 9 10 11 9 10 11 -> the 3rd "9 10 11" at length 9
  assert status.tolist() == [REPEAT, STOPPED, STOPPED]
  assert length.tolist() == [9, 3, 8]
  np.testing.assert_array_equal(
    np.asarray(st.tokens)[0, :10], [9, 10, 11] * 3 + [0]
  )


def test_repeat_penalty_enters_the_reward_and_the_baseline():
  correct_GxK = np.array([[1, 0, 0, 1]], np.float32)
  lengths_GxK = np.array([[5, 9, 9, 6]], np.float32)
  status_GxK = np.array([[STOPPED, REPEAT, STOPPED, STOPPED]])
  kw = dict(iteration=0, length_penalty=objective.LengthPenaltyConfig())
  kw["repeat_penalty"] = 0.5
  r_GxK = rl.group_rewards(correct_GxK, lengths_GxK, status_GxK, **kw)
  np.testing.assert_allclose(r_GxK, [[1, -0.5, 0, 1]])
  kw["repeat_penalty"] = 0.0
  r0_GxK = rl.group_rewards(correct_GxK, lengths_GxK, status_GxK, **kw)
  np.testing.assert_allclose(r0_GxK, correct_GxK)
  # with the penalty the repeating sample's advantage is the lowest
  adv = objective.advantages(
    r_GxK, correct_GxK, lengths_GxK, kind="mirror_descent"
  )
  assert adv[0].argmin() == 1 and adv[0, 1] < adv[0, 2]
