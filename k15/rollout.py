"""Host side of generation: fixed-shape batches in, per-row results out.

`generate` runs the jitted sampler over any number of prompts in fixed
[rows, bucket] chunks (padding the last chunk with empty rows), so the
compiled prefill/decode are reused across calls and iterations. `to_batch`
lays prompt + response rows out the way the trainer scores them:

  tokens_BxT = [left-padded prompt (P) | response (N), right-padded]

with segment ids 1 on real tokens and a loss mask on the response tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from k15 import model as model_lib
from k15 import sampler


@dataclasses.dataclass(frozen=True)
class GenConfig:
  """Static shapes of one generation call."""

  rows: int  # sequences per sampler call (fixed; last chunk padded)
  prompt_buckets: tuple[int, ...]  # allowed left-padded prompt lengths P
  budget: int  # new tokens per sequence per call (N)
  cache_len: int  # S >= P + N

  def __post_init__(self):
    if self.cache_len < max(self.prompt_buckets) + self.budget:
      raise ValueError(
          f"cache_len={self.cache_len} < largest prompt bucket "
          f"{max(self.prompt_buckets)} + budget {self.budget}")


@dataclasses.dataclass
class Generation:
  prompt: list[int]
  response: np.ndarray  # [n] int32, includes the stop token if any
  logp: np.ndarray  # [n] model log-probs at temperature 1
  sample_logp: np.ndarray  # [n] under the sampling distribution
  status: int  # sampler.STOPPED / BUDGET / MAX_LEN / REPEAT


def generate(params, prompts: list[list[int]], rng: jax.Array, *,
             model: model_lib.ModelConfig, sampling: sampler.SamplingConfig,
             gen: GenConfig, pad_id: int, shard_fn=None) -> list[Generation]:
  """Samples one response per prompt. Deterministic for a given rng."""
  if not prompts:
    return []
  bucket = sampler.bucket_for(max(len(p) for p in prompts),
                              gen.prompt_buckets)
  out: list[Generation] = []
  for c, start in enumerate(range(0, len(prompts), gen.rows)):
    chunk = prompts[start:start + gen.rows]
    rows = chunk + [[]] * (gen.rows - len(chunk))
    toks, seg = sampler.left_pad(rows, bucket, pad_id)
    if shard_fn is not None:
      toks, seg = shard_fn((toks, seg))
    state = sampler.generate(
        params, toks, seg, jax.random.fold_in(rng, c), model=model,
        cfg=sampling, budget=gen.budget, cache_len=gen.cache_len,
        pad_id=pad_id)
    tokens, logp, slp, length, status = jax.device_get(
        (state.tokens, state.logp, state.sample_logp, state.length,
         state.status))
    for i in range(len(chunk)):
      n = int(length[i])
      out.append(Generation(list(chunk[i]), tokens[i, :n].copy(),
                            logp[i, :n].copy(), slp[i, :n].copy(),
                            int(status[i])))
  return out


def to_batch(prompts: list[list[int]], responses: list[np.ndarray], *,
             prompt_len: int, response_len: int, pad_id: int,
             rows: int | None = None) -> dict[str, np.ndarray]:
  """Training rows [prompt | response]; `rows` pads B with empty rows.

  Returns tokens_BxT, seg_BxT (1 on real tokens), loss_mask_BxT (response
  tokens) and sample_weight_B (0 on padding rows), T = prompt_len +
  response_len.
  """
  B = len(prompts) if rows is None else rows
  if len(prompts) > B:
    raise ValueError(f"{len(prompts)} rows do not fit a batch of {B}")
  T = prompt_len + response_len
  tokens = np.full((B, T), pad_id, np.int32)
  seg = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T), bool)
  weight = np.zeros((B,), np.float32)
  for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
    if len(p) > prompt_len or len(r) > response_len:
      raise ValueError(f"row {i}: prompt {len(p)} / response {len(r)} tokens "
                       f"exceed {prompt_len} / {response_len}")
    tokens[i, prompt_len - len(p):prompt_len] = p
    tokens[i, prompt_len:prompt_len + len(r)] = r
    seg[i, prompt_len - len(p):prompt_len + len(r)] = 1
    mask[i, prompt_len:prompt_len + len(r)] = True
    weight[i] = 1.0
  return dict(tokens_BxT=tokens, seg_BxT=seg, loss_mask_BxT=mask,
              sample_weight_B=weight)


def place_per_token(values: list[np.ndarray], *, prompt_len: int, T: int,
                    rows: int) -> np.ndarray:
  """Aligns per-response-token values (e.g. behaviour log-probs) to [B, T]."""
  out = np.zeros((rows, T), np.float32)
  for i, v in enumerate(values):
    out[i, prompt_len:prompt_len + len(v)] = v
  return out
