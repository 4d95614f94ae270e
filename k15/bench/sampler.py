"""Decode throughput of the k15 sampler against a no-cache baseline, the
machine's roofline and (where installed) Tunix's vanilla sampler.

`python -m k15.bench sampler [--batch 32 --prompt 256 --new 512]
  [--layers 8 --d_model 768 ...] [--nocache_steps 2] [--no_tunix]`

Dimension key: B batch, P prompt tokens, N new tokens, S = P + N cache.

One model (random weights, ~75M parameters by default: 8 layers, d 768,
GQA 12/4 heads, SwiGLU 2048, vocab 32k, tied embeddings), one run:
- k15: `sampler.prefill` + `sampler.decode` (no stop tokens, so every row
  decodes all N tokens); decode tokens/s = B * N / decode seconds.
- no-cache: a jitted, fixed-shape forward over the whole [B, S] buffer for
  every new token (left-aligned prompt, segment 0 on the unfilled tail), the
  baseline a KV cache is meant to beat. It costs the same every step, so we
  time `--nocache_steps` steps and report B / step seconds.
- roofline: per decode step t, max(FLOPs_t / F, bytes_t / W), with F the
  matmul FLOP/s and W the read bandwidth measured here, now; FLOPs_t = 2 B
  (matmul params) + 4 B L H Dh (P + t) attention, bytes_t = every parameter
  (the tied embedding is the logits head) + the live KV cache (P + t slots).
  The sum over the N steps is the fastest this machine could decode.
- tunix: `tunix.generate.sampler.Sampler` on a Tunix Llama-3 model of the
  same shape, if `import tunix` works.
The load average is printed: on a shared machine all rates understate it,
but the ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k15 import model as model_lib
from k15 import sampler


def _model(args) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(
    vocab_size=args.vocab,
    num_layers=args.layers,
    d_model=args.d_model,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.head_dim,
    mlp_dim=args.mlp,
    max_len=args.prompt + args.new,
    dtype=args.dtype,
    param_dtype=args.dtype,
    tie_embeddings=True,
    emb_init_scale=0.02,
  )


def _best(fn, repeat: int) -> float:
  """Min wall seconds of fn() (which must block) over `repeat` calls."""
  best = float("inf")
  for _ in range(repeat):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def measure_matmul_flops(dtype: str, n: int = 2048, repeat: int = 5) -> float:
  """FLOP/s of one jitted [n, n] @ [n, n] matmul (the compute roof)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = _best(lambda: f(a, a).block_until_ready(), repeat)
  return 2 * n**3 / t


def measure_bandwidth(nbytes: int = 512 * 2**20, repeat: int = 5) -> float:
  """Read bytes/s of a jitted sum over a large f32 array (the memory roof)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  return nbytes / _best(lambda: f(x).block_until_ready(), repeat)


def roofline_seconds(
  cfg: model_lib.ModelConfig,
  *,
  batch: int,
  prompt: int,
  new: int,
  flops_per_s: float,
  bytes_per_s: float,
) -> tuple[float, float, float]:
  """(seconds, total FLOPs, total bytes) of N decode steps at the roofline."""
  L, H, K, Dh = (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
  item = jnp.dtype(cfg.dtype).itemsize
  n_params = cfg.num_params()
  matmul_params = n_params - cfg.d_model * (2 * L + 1)  # minus norm scales
  secs = flops = nbytes = 0.0
  for t in range(new):
    live = prompt + t + 1  # keys attended by this step's token
    f = 2 * batch * matmul_params + 4 * batch * L * H * Dh * live
    b = n_params * jnp.dtype(cfg.param_dtype).itemsize + (
      2 * L * batch * live * K * Dh * item
    )
    secs += max(f / flops_per_s, b / bytes_per_s)
    flops += f
    nbytes += b
  return secs, flops, nbytes


def _prompts(args, cfg):
  rng = np.random.default_rng(1)
  toks = rng.integers(1, cfg.vocab_size, (args.batch, args.prompt))
  return (
    jnp.asarray(toks, jnp.int32),
    jnp.ones((args.batch, args.prompt), jnp.int32),
  )


def bench_k15(params, cfg, args) -> dict[str, float]:
  """Prefill + N decode steps of the k15 sampler; best of `--repeat`."""
  toks, seg = _prompts(args, cfg)
  sc = sampler.SamplingConfig(temperature=1.0)
  kw = dict(
    model=cfg, cfg=sc, budget=args.new, cache_len=args.prompt + args.new
  )
  rng = jax.random.key(0)
  # compile both without decoding: a state whose rows all stopped exits the
  # loop at once, and is the same compiled executable
  st = sampler.prefill(params, toks, seg, rng, **kw)
  st = st.replace(status=jnp.full_like(st.status, sampler.STOPPED))
  jax.block_until_ready(
    sampler.decode(params, st, model=cfg, cfg=sc, max_steps=args.new)
  )
  best_pre = best_dec = float("inf")
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    st = jax.block_until_ready(sampler.prefill(params, toks, seg, rng, **kw))
    t1 = time.perf_counter()
    st = jax.block_until_ready(
      sampler.decode(params, st, model=cfg, cfg=sc, max_steps=args.new)
    )
    t2 = time.perf_counter()
    best_pre, best_dec = min(best_pre, t1 - t0), min(best_dec, t2 - t1)
    assert int(st.length.min()) == args.new, "a row stopped early"
    del st  # free the cache before the next phase
  steps = args.new - 1  # prefill sampled the first token
  return dict(
    prefill_s=best_pre,
    decode_s=best_dec,
    tok_s=args.batch * steps / best_dec,
    step_ms=1e3 * best_dec / steps,
  )


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def _nocache_step(params, buf_BxS, seg_BxS, t, rng, *, cfg):
  """One token for every row by a full forward over the whole buffer."""
  pos_BxS = model_lib.positions_from_segments(seg_BxS)
  h_BxSxD, _ = model_lib.Decoder(cfg).apply(
    params, buf_BxS, pos_BxS, seg_BxS, return_hidden=True
  )
  h_BxD = jax.lax.dynamic_index_in_dim(h_BxSxD, t - 1, 1, keepdims=False)
  logits_BxV = model_lib.Decoder(cfg).apply(
    params, h_BxD[:, None], method=model_lib.Decoder.logits
  )[:, 0]
  tok_B = jax.random.categorical(jax.random.fold_in(rng, t), logits_BxV)
  buf_BxS = jax.lax.dynamic_update_slice_in_dim(
    buf_BxS, tok_B[:, None].astype(jnp.int32), t, axis=1
  )
  seg_BxS = jax.lax.dynamic_update_slice_in_dim(
    seg_BxS, jnp.ones_like(seg_BxS[:, :1]), t, axis=1
  )
  return buf_BxS, seg_BxS


def bench_nocache(params, cfg, args) -> dict[str, float]:
  toks, seg = _prompts(args, cfg)
  S = args.prompt + args.new
  pad = ((0, 0), (0, args.new))
  buf, seg = jnp.pad(toks, pad), jnp.pad(seg, pad)
  rng = jax.random.key(0)
  buf, seg = jax.block_until_ready(
    _nocache_step(params, buf, seg, args.prompt, rng, cfg=cfg)
  )
  best = float("inf")
  for i in range(1, args.nocache_steps + 1):
    t = min(args.prompt + i, S - 1)
    t0 = time.perf_counter()
    buf, seg = jax.block_until_ready(
      _nocache_step(params, buf, seg, t, rng, cfg=cfg)
    )
    best = min(best, time.perf_counter() - t0)
  return dict(step_ms=1e3 * best, tok_s=args.batch / best)


def bench_tunix(cfg, args) -> dict[str, float] | str:
  """Tunix's vanilla sampler on a Tunix Llama-3 model of the same shape."""
  try:
    from k15.bench import _tunix  # noqa: PLC0415
  except ImportError as e:
    return f"not importable ({e})"
  return _tunix.bench(cfg, args)


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m k15.bench sampler")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=256)
  p.add_argument("--new", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--d_model", type=int, default=768)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--mlp", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=32_000)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeat", type=int, default=1)
  p.add_argument("--nocache_steps", type=int, default=2)
  p.add_argument("--no_tunix", action="store_true")
  p.add_argument("--only", default="", help="comma list: k15,nocache,tunix")
  args = p.parse_args(argv)
  only = set(filter(None, args.only.split(","))) or {"k15", "nocache", "tunix"}
  if args.no_tunix:
    only.discard("tunix")
  cfg = _model(args)
  load0 = os.getloadavg()
  print(
    f"model: {cfg.num_params() / 1e6:.1f}M params ({args.layers} layers,"
    f" d {args.d_model}, heads {args.heads}/{args.kv_heads}x"
    f"{args.head_dim}, mlp {args.mlp}, vocab {args.vocab}, {args.dtype});"
    f" B={args.batch} P={args.prompt} N={args.new}; devices "
    f"{jax.devices()[0].platform} x{jax.device_count()}; load average "
    f"{load0[0]:.1f}",
    flush=True,
  )
  params = nn.unbox(model_lib.init_params(jax.random.key(0), model=cfg))
  flops = measure_matmul_flops(args.dtype)
  bw = measure_bandwidth()
  roof_s, roof_f, roof_b = roofline_seconds(
    cfg,
    batch=args.batch,
    prompt=args.prompt,
    new=args.new - 1,
    flops_per_s=flops,
    bytes_per_s=bw,
  )
  steps = args.new - 1
  roof_tok_s = args.batch * steps / roof_s
  print(
    f"measured: matmul {flops / 1e9:.1f} GFLOP/s, read bandwidth "
    f"{bw / 1e9:.1f} GB/s; roofline {1e3 * roof_s / steps:.1f} ms/step "
    f"({roof_f / steps / 1e9:.2f} GFLOP, {roof_b / steps / 1e6:.0f} MB "
    "per step)",
    flush=True,
  )
  rows = [
    ("roofline", f"{roof_tok_s:.0f}", f"{1e3 * roof_s / steps:.1f}", "1.00", "")
  ]
  res = {}
  if "k15" in only:
    res["k15"] = k = bench_k15(params, cfg, args)
    print(f"k15: {k}", flush=True)
  if "nocache" in only:
    res["nocache"] = nc = bench_nocache(params, cfg, args)
    print(f"no-cache: {nc}", flush=True)
  if "tunix" in only:
    res["tunix"] = bench_tunix(cfg, args)
    print(f"tunix: {res['tunix']}", flush=True)
  base = res.get("nocache", {}).get("tok_s")
  names = dict(
    k15="k15 sampler (KV cache, while_loop)",
    nocache="no-cache baseline (full forward per token)",
    tunix="Tunix vanilla sampler",
  )
  for key in ("k15", "tunix", "nocache"):
    r = res.get(key)
    if r is None:
      continue
    if isinstance(r, str):
      rows.append((names[key], "n/a", "n/a", "n/a", r))
      continue
    note = f"{r['tok_s'] / base:.1f}x no-cache" if base else ""
    rows.append(
      (
        names[key],
        f"{r['tok_s']:.0f}",
        f"{r['step_ms']:.1f}",
        f"{r['tok_s'] / roof_tok_s:.2f}",
        note,
      )
    )
  load1 = os.getloadavg()
  print()
  print(
    _table(rows, ("sampler", "decode tok/s", "ms/step", "of roofline", "note"))
  )
  print(
    f"\nload average (1 min) before / after: {load0[0]:.1f} / "
    f"{load1[0]:.1f} on {os.cpu_count()} cores"
  )


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
