"""Held-out evaluation: pass@1 over n samples, greedy accuracy, lengths.

pass@1 is the mean over problems of the fraction of the n samples (at the
configured temperature, 1.0 as in the report's "total@temp_1.0") that are
correct; a response that did not finish (cut by budget or length, or stopped
for repeating) is wrong. Token efficiency is reported as mean response
length and accuracy per 1k tokens, for the long2short comparisons.

A problem set that mixes tasks (`visual`) also gets pass@1 per task
(`pass1_<task>`) and per modality (`pass1_text`, `pass1_image`: problems
without and with images).
"""

from __future__ import annotations

import dataclasses
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

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"eval.num_samples={self.num_samples} must be >= 1")


def score_responses(tok: tokenizer_lib.Tokenizer,
                    gens: Sequence[rollout.Generation],
                    rows: Sequence[dict],
                    pool: rewards.RewardPool) -> np.ndarray:
  """Each generation's reward from the reward entry point (rows[i] is
  gens[i]'s task row); one that did not stop by itself scores 0."""
  return rewards.score(
      rows, [tok.decode(g.response) for g in gens],
      [g.status == sampler.STOPPED for g in gens], pool=pool).scores


def evaluate(params, problems: Sequence, rng: jax.Array, *,
             tok: tokenizer_lib.Tokenizer, model, sampling: sampler.
             SamplingConfig, gen: rollout.GenConfig, cfg: EvalConfig,
             pool: rewards.RewardPool, shard_fn=None) -> dict[str, float]:
  """Held-out metrics of `params`; responses score through `pool` by the
  problems' own kinds (evaluation never asks a reward model)."""
  if cfg.max_problems:
    problems = problems[:cfg.max_problems]
  enc = [images_lib.encode_prompt(tok, p.question, getattr(p, "images", ()),
                                  model=model, where=f"eval problem {i}")
         for i, p in enumerate(problems)]
  prompts, imgs = [e[0] for e in enc], [e[1] for e in enc]
  rows = [p.to_item() for p in problems]
  n = cfg.num_samples
  samp = dataclasses.replace(sampling, temperature=cfg.temperature)
  gens = rollout.generate(params, [q for q in prompts for _ in range(n)],
                          rng, model=model, sampling=samp, gen=gen,
                          pad_id=tok.pad_id, shard_fn=shard_fn,
                          images=[im for im in imgs for _ in range(n)])
  correct_PxN = score_responses(tok, gens, [r for r in rows
                                            for _ in range(n)],
                                pool).reshape(len(problems), n)
  lengths = np.array([len(g.response) for g in gens], np.float32)
  out = dict(pass1=float(correct_PxN.mean()),
             mean_length=float(lengths.mean()),
             finished=float(np.mean([g.status == sampler.STOPPED
                                     for g in gens])))
  diffs = np.array([getattr(p, "difficulty", 0) for p in problems])
  for d in np.unique(diffs):
    out[f"pass1_d{int(d)}"] = float(correct_PxN[diffs == d].mean())
  out.update(per_task(correct_PxN, problems, [im is not None for im in imgs]))
  if cfg.greedy:
    greedy = dataclasses.replace(sampling, temperature=0.0)
    g_gens = rollout.generate(params, prompts, jax.random.fold_in(rng, 1),
                              model=model, sampling=greedy, gen=gen,
                              pad_id=tok.pad_id, shard_fn=shard_fn,
                              images=imgs)
    out["greedy_acc"] = float(score_responses(tok, g_gens, rows,
                                              pool).mean())
  out["acc_per_1k_tokens"] = out["pass1"] / max(out["mean_length"], 1) * 1e3
  return out


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
