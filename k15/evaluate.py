"""Held-out evaluation: pass@1 over n samples, greedy accuracy, lengths.

pass@1 is the mean over problems of the fraction of the n samples (at the
configured temperature, 1.0 as in the report's "total@temp_1.0") that are
correct; a response that did not finish (cut by budget or length, or stopped
for repeating) is wrong. Prompt-file problems also report it per domain
(`pass1_math`, `pass1_code`, ...), and per difficulty label (`pass1_d<d>`,
with that bucket's `mean_length_d<d>` and `p95_length_d<d>`). Token
efficiency is reported as mean response length and accuracy per 1k tokens,
for the long2short comparisons.

A problem set that mixes tasks (`visual`) also gets pass@1 per task
(`pass1_<task>`) and per modality (`pass1_text`, `pass1_image`: problems
without and with images).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import numpy as np

from k15 import images as images_lib
from k15 import rewards, rollout, sampler
from k15 import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_samples: int = 4
  temperature: float = 1.0
  greedy: bool = True
  max_problems: int = 0  # 0 = all
  # > 0: response tokens an evaluation sample may take, whatever the RL
  # rollout's limit (long2short RL trains under a much smaller one, and is
  # judged like the models it is compared with); 0: the rollout's
  max_response: int = 0
  # > 0: the RL stage also evaluates every `every` iterations (metrics
  # "heldout/..."), on the first `every_problems` held-out problems (0: the
  # same set as the final evaluation), so a run has curves, not one point
  every: int = 0
  every_problems: int = 64

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"eval.num_samples={self.num_samples} must be >= 1")
    if self.every < 0:
      raise ValueError(f"eval.every={self.every} must be >= 0")
    if self.every_problems < 0:
      raise ValueError(
          f"eval.every_problems={self.every_problems} must be >= 0")
    if self.max_response < 0:
      raise ValueError(
          f"eval.max_response={self.max_response} must be >= 0")

  def gen(self, rollout_gen: rollout.GenConfig) -> rollout.GenConfig:
    """The sampler shapes of evaluation: the rollout's, or one segment of
    max_response tokens after the prompt bucket."""
    if not self.max_response:
      return rollout_gen
    bucket = max(rollout_gen.prompt_buckets)
    return rollout.GenConfig(
        rows=rollout_gen.rows, prompt_buckets=(bucket,),
        budget=self.max_response, cache_len=bucket + self.max_response)


def submit_scores(tok: tokenizer_lib.Tokenizer,
                  gens: Sequence[rollout.Generation], rows: Sequence[dict],
                  pool: rewards.RewardPool
                  ) -> concurrent.futures.Future[rewards.RewardBatch]:
  """Scores each generation against its row (rows[i] is gens[i]'s) through
  the reward entry point, in the pool's background thread; one that did
  not stop by itself scores 0."""
  return pool.submit(
      rows, [tok.decode(g.response) for g in gens],
      [g.status == sampler.STOPPED for g in gens])


def score_responses(tok: tokenizer_lib.Tokenizer,
                    gens: Sequence[rollout.Generation],
                    rows: Sequence[dict],
                    pool: rewards.RewardPool) -> np.ndarray:
  """Each generation's reward (blocking `submit_scores`)."""
  return submit_scores(tok, gens, rows, pool).result().scores


def domains(metrics: dict[str, float]) -> list[str]:
  """The domains an evaluation reported (its `pass1_<domain>` keys)."""
  return [k[len("pass1_"):] for k in metrics
          if k.startswith("pass1_") and not _DIFFICULTY_KEY.match(k)]


_DIFFICULTY_KEY = re.compile(r"pass1_d\d+$")


def evaluate(params, problems: Sequence, rng: jax.Array, *,
             tok: tokenizer_lib.Tokenizer, model, sampling: sampler.
             SamplingConfig, gen: rollout.GenConfig, cfg: EvalConfig,
             pool: rewards.RewardPool, shard_fn=None) -> dict[str, float]:
  """Held-out metrics of `params`; responses score through `pool` by the
  problems' own kinds (evaluation never asks a reward model). Problems
  with a `domain` (prompt files) also get pass1_<domain> and
  greedy_acc_<domain>. The samples are scored in the pool's thread while
  the greedy responses are generated."""
  if cfg.max_problems:
    problems = problems[:cfg.max_problems]
  gen = cfg.gen(gen)
  enc = [images_lib.encode_problem(tok, p, model=model,
                                   where=f"eval problem {i}")
         for i, p in enumerate(problems)]
  prompts, imgs = [e[0] for e in enc], [e[1] for e in enc]
  rows = [p.to_item() for p in problems]
  n = cfg.num_samples
  samp = dataclasses.replace(sampling, temperature=cfg.temperature)
  gens = rollout.generate(params, [q for q in prompts for _ in range(n)],
                          rng, model=model, sampling=samp, gen=gen,
                          pad_id=tok.pad_id, shard_fn=shard_fn,
                          images=[im for im in imgs for _ in range(n)])
  sampled = submit_scores(tok, gens, [r for r in rows for _ in range(n)],
                          pool)
  greedy_P = None
  if cfg.greedy:
    greedy = dataclasses.replace(sampling, temperature=0.0)
    g_gens = rollout.generate(params, prompts, jax.random.fold_in(rng, 1),
                              model=model, sampling=greedy, gen=gen,
                              pad_id=tok.pad_id, shard_fn=shard_fn,
                              images=imgs)
    greedy_P = score_responses(tok, g_gens, rows, pool)
  correct_PxN = sampled.result().scores.reshape(len(problems), n)
  lengths = np.array([len(g.response) for g in gens], np.float32)
  out = dict(pass1=float(correct_PxN.mean()),
             **{f"pass{k}": float(pass_at_k(correct_PxN, k).mean())
                for k in _powers_of_two(2, n)},
             mean_length=float(lengths.mean()),
             p95_length=float(np.percentile(lengths, 95)),
             finished=float(np.mean([g.status == sampler.STOPPED
                                     for g in gens])))
  diffs = np.array([getattr(p, "difficulty", 0) for p in problems])
  lengths_PxN = lengths.reshape(len(problems), n)
  for d in np.unique(diffs):
    out[f"pass1_d{int(d)}"] = float(correct_PxN[diffs == d].mean())
    out[f"mean_length_d{int(d)}"] = float(lengths_PxN[diffs == d].mean())
    out[f"p95_length_d{int(d)}"] = float(
        np.percentile(lengths_PxN[diffs == d], 95))
  doms = np.array([getattr(p, "domain", "") for p in problems])
  for dom in sorted(set(doms.tolist()) - {""}):
    out[f"pass1_{dom}"] = float(correct_PxN[doms == dom].mean())
    if greedy_P is not None:
      out[f"greedy_acc_{dom}"] = float(greedy_P[doms == dom].mean())
  out.update(per_task(correct_PxN, problems, [im is not None for im in imgs]))
  if greedy_P is not None:
    out["greedy_acc"] = float(greedy_P.mean())
  out["acc_per_1k_tokens"] = out["pass1"] / max(out["mean_length"], 1) * 1e3
  return out


def pass_at_k(correct_PxN: np.ndarray, k: int) -> np.ndarray:
  """Per problem, the unbiased pass@k of n >= k samples with c correct:
  1 - C(n - c, k) / C(n, k) (Chen et al. 2021), the chance that at least
  one of k samples drawn without replacement is correct."""
  n = correct_PxN.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"pass@{k} needs 1 <= k <= n={n} samples")
  c = (correct_PxN > 0).sum(axis=1)
  out = np.ones(len(c))
  for i, ci in enumerate(c):
    if n - ci >= k:  # else every draw of k holds a correct one
      out[i] = 1.0 - math.comb(n - int(ci), k) / math.comb(n, k)
  return out


def _powers_of_two(lo: int, hi: int) -> list[int]:
  return [2**j for j in range(hi.bit_length()) if lo <= 2**j <= hi]


def per_task(correct_PxN: np.ndarray, problems: Sequence,
             has_image: Sequence[bool]) -> dict[str, float]:
  """pass@1 per task and per modality, when the problems mix either."""
  out = {}
  tasks = np.array([getattr(p, "task", "") for p in problems])
  if len(set(tasks)) > 1:
    for t in dict.fromkeys(tasks):
      out[f"pass1_{t}"] = float(correct_PxN[tasks == t].mean())
  img = np.asarray(has_image, bool)
  if img.any() and not img.all():
    out["pass1_text"] = float(correct_PxN[~img].mean())
    out["pass1_image"] = float(correct_PxN[img].mean())
  return out
