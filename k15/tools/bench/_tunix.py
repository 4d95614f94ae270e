"""Tunix's vanilla sampler on a Tunix Llama-3 of a k15 model's shape.

Only imported by `k15.tools.bench.sampler` when `import tunix` works (k15 does
not depend on Tunix). Calls the sampler's own jitted prefill and decode
(`Sampler._compiled_prefill_fn` / `_compiled_decode_fn`, what
`Sampler.__call__` runs) on token ids, so tokenizing and detokenizing
strings is not timed; temperature 1, top_p 1 (categorical sampling, like
k15's default), an end token that is never drawn, so every row decodes all
N tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.generate import sampler as tunix_sampler
from tunix.models.llama3 import model as llama3

from k15 import model as model_lib


class _Ids:
  """The tokenizer interface Tunix asks for; prompts are given as ids."""

  def encode(self, text, **kw):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw):
    return " ".join(str(i) for i in ids)

  def bos_id(self):
    return 0

  def eos_id(self):
    return 1

  def pad_id(self):
    return 0


def bench(
  cfg: model_lib.ModelConfig, prompts_BxP: np.ndarray, new: int, timer
) -> dict:
  """Times Tunix prefill + decode of `new` tokens; `timer(fn)` returns
  (result, wall seconds, cpu seconds) of one blocking call."""
  if cfg.dtype != "float32":
    return dict(error="run with --dtype float32 (the Tunix model is f32)")
  tcfg = llama3.ModelConfig(
    num_layers=cfg.num_layers,
    vocab_size=cfg.vocab_size,
    embed_dim=cfg.d_model,
    hidden_dim=cfg.mlp_dim,
    num_heads=cfg.num_heads,
    head_dim=cfg.head_dim,
    num_kv_heads=cfg.num_kv_heads,
    rope_theta=int(cfg.rope_theta),
    norm_eps=cfg.norm_eps,
    weight_tying=cfg.tie_embeddings,
  )
  model = llama3.Llama3(tcfg, rngs=nnx.Rngs(0))
  B, P = prompts_BxP.shape
  s = tunix_sampler.Sampler(
    model,
    _Ids(),
    tunix_sampler.CacheConfig(
      cache_size=P + new,
      num_layers=cfg.num_layers,
      num_kv_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
    ),
  )
  s.eos_ids = jnp.array([cfg.vocab_size + 1])  # never drawn
  ids = jnp.asarray(np.maximum(prompts_BxP, 2), jnp.int32)  # 0/1 pad/bos
  params = s._flattened_transformer_state

  def state():
    return s.init_sample_state(
      ids,
      total_sampling_steps=P + new,
      include_logits=False,
      forbidden_token_ids=None,
      temperature=1.0,
      top_p=1.0,
      top_k=None,
      seed=jax.random.PRNGKey(0),
      beam_size=None,
    )

  def prefill(st):
    return s._compiled_prefill_fn(params, st, None, echo=False)

  st = jax.block_until_ready(s._compiled_decode_fn(params, prefill(state())))
  del st  # compiled both
  st0, pre_wall, _ = timer(lambda: prefill(state()))
  start = int(st0.decoding_step)
  st, wall, cpu = timer(lambda: s._compiled_decode_fn(params, st0))
  steps = int(st.decoding_step) - start
  return dict(steps=steps, prefill_s=pre_wall, decode_wall=wall, decode_cpu=cpu)
