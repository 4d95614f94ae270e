"""Jitted sampling with an explicit KV cache: `prefill` then `decode`.

`rules`: how a token is drawn (temperature, top-k / top-p, cdf or Gumbel
draws) and when a row stops (stop tokens, budget, length, repeats).
`loop`: the jitted prefill, the while_loop decode over live chunks of the
cache, and merging prefilled blocks into one decode call. The forward pass
is the model's own (`k15.model.decode_step`).
"""

from k15.sampler.loop import (
  SamplingState,
  bucket_for,
  decode,
  generate,
  left_pad,
  live_bounds,
  merge_rows,
  prefill,
)
from k15.sampler.rules import (
  BUDGET,
  MAX_LEN,
  METHODS,
  REPEAT,
  RUNNING,
  STATUS_NAMES,
  STOPPED,
  SamplingConfig,
  detect_repeat,
  sample_cdf,
  sample_token,
)

__all__ = [
  "BUDGET",
  "MAX_LEN",
  "METHODS",
  "REPEAT",
  "RUNNING",
  "STATUS_NAMES",
  "STOPPED",
  "SamplingConfig",
  "SamplingState",
  "bucket_for",
  "decode",
  "detect_repeat",
  "generate",
  "left_pad",
  "live_bounds",
  "merge_rows",
  "prefill",
  "sample_cdf",
  "sample_token",
]
