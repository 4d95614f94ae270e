"""Decode throughput of the k15 sampler against a no-cache baseline, the
machine's roofline and (where installed) Tunix's vanilla sampler.

`python -m k15.tools.bench sampler [--batch 32 --prompt 256 --new 512]
  [--layers 8 --d_model 768 ... --dtype float32 --cache_dtype '']
  [--nocache_steps 2] [--live_chunk 128]
  [--only k15,gumbel,whole,tunix,nocache]`

Dimension key: B batch, P prompt tokens, N new tokens, S = P + N cache.

One model (random weights, ~75M parameters by default: 8 layers, d 768,
GQA 12/4 heads, SwiGLU 2048, vocab 32k, tied embeddings), one run:
- k15: `sampler.prefill` + `sampler.decode` (no stop tokens, so every row
  decodes all N tokens); decode tokens/s = B * N / decode seconds. Three
  rows: the defaults (cdf draws, attention over the live cache in chunks
  of `--live_chunk` slots), gumbel draws (`jax.random.categorical`), and
  cdf over the whole cache every step (live_chunk=0).
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
    cache_dtype=args.cache_dtype,
    tie_embeddings=True,
    emb_init_scale=0.02,
  )


def _timer(fn):
  """(result, wall seconds, process CPU seconds) of one blocking call."""
  c0, t0 = time.process_time(), time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0, time.process_time() - c0


def _best(fn, repeat: int) -> tuple[float, float]:
  """Min (wall, cpu) seconds of fn() over `repeat` calls."""
  runs = [_timer(fn)[1:] for _ in range(repeat)]
  return min(r[0] for r in runs), min(r[1] for r in runs)


def measure_matmul(dtype: str, n: int = 2048, repeat: int = 5):
  """(wall, cpu) seconds of one jitted [n, n] @ [n, n] matmul with f32
  accumulation, and its FLOPs: the compute roof."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  return _best(lambda: f(a, a), repeat), 2 * n**3


def measure_bandwidth(nbytes: int = 512 * 2**20, repeat: int = 5):
  """(wall, cpu) seconds of a jitted sum over a large f32 array, and the
  bytes it reads: the memory roof."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  return _best(lambda: f(x), repeat), nbytes


def roofline_seconds(
  cfg: model_lib.ModelConfig,
  *,
  batch: int,
  prompt: int,
  steps: int,
  flops_per_s: float,
  bytes_per_s: float,
) -> tuple[float, float, float]:
  """(seconds, FLOPs, bytes) of decode steps 1..steps at the roofline.

  Step t (1-based; prefill drew token 0) feeds token t-1 and attends over
  prompt + t keys.
  """
  L, H, K, Dh = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  item = jnp.dtype(cfg.dtype).itemsize
  n_params = cfg.num_params()
  matmul_params = n_params - cfg.d_model * (2 * L + 1)  # minus norm scales
  secs = flops = nbytes = 0.0
  for t in range(1, steps + 1):
    live = prompt + t
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
  return toks.astype(np.int32)


def bench_k15(
  params, cfg, args, method: str, live_chunk: int
) -> dict[str, float]:
  """Prefill + N-1 decode steps of the k15 sampler (no stop tokens)."""
  toks = jnp.asarray(_prompts(args, cfg))
  seg = jnp.ones_like(toks)
  sc = sampler.SamplingConfig(
    temperature=1.0, method=method, live_chunk=live_chunk
  )
  kw = dict(
    model=cfg, cfg=sc, budget=args.new, cache_len=args.prompt + args.new
  )
  dec = functools.partial(
    sampler.decode, params, model=cfg, cfg=sc, max_steps=args.new
  )
  rng = jax.random.key(0)
  # compile both without decoding: a state whose rows all stopped leaves
  # the loop at once, and is the same executable
  st = sampler.prefill(params, toks, seg, rng, **kw)
  jax.block_until_ready(
    dec(st.replace(status=jnp.full_like(st.status, sampler.STOPPED)))
  )
  del st
  st0, pre, _ = _timer(lambda: sampler.prefill(params, toks, seg, rng, **kw))
  st, wall, cpu = _timer(functools.partial(dec, st0))
  del st0  # donated
  steps = int(st.step)
  assert steps == args.new - 1 and int(st.length.min()) == args.new
  del st  # free the cache before the next phase
  return dict(steps=steps, prefill_s=pre, decode_wall=wall, decode_cpu=cpu)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1, 2))
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
  """`--nocache_steps` steps of the fixed-shape no-cache baseline (every
  step costs the same: the forward always covers all P + N slots)."""
  toks = _prompts(args, cfg)
  pad = ((0, 0), (0, args.new))
  buf = jnp.asarray(np.pad(toks, pad))
  seg = jnp.asarray(np.pad(np.ones_like(toks), pad))
  rng = jax.random.key(0)
  step = functools.partial(_nocache_step, params, rng=rng, cfg=cfg)
  buf, seg = jax.block_until_ready(step(buf, seg, args.prompt))
  wall = cpu = 0.0
  for i in range(1, args.nocache_steps + 1):
    (buf, seg), w, c = _timer(
      functools.partial(step, buf, seg, args.prompt + i)
    )
    wall, cpu = wall + w, cpu + c
  return dict(steps=args.nocache_steps, decode_wall=wall, decode_cpu=cpu)


def bench_tunix(cfg, args, timer) -> dict[str, float] | str:
  """Tunix's vanilla sampler on a Tunix Llama-3 model of the same shape."""
  try:
    from k15.tools.bench import _tunix  # noqa: PLC0415
  except ImportError as e:
    return f"not importable ({e})"
  out = _tunix.bench(cfg, _prompts(args, cfg), args.new, timer)
  return out.get("error") or out


def _num(x: float) -> str:
  return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m k15.tools.bench sampler")
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
  p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
  p.add_argument(
    "--cache_dtype", default="", help="model.cache_dtype ('' = --dtype)"
  )
  p.add_argument("--nocache_steps", type=int, default=2)
  p.add_argument(
    "--live_chunk",
    type=int,
    default=sampler.SamplingConfig().live_chunk,
    help="sampler.live_chunk of the k15 rows (the 'whole' row uses 0)",
  )
  p.add_argument(
    "--only", default="k15,gumbel,whole,tunix,nocache", help="rows to run"
  )
  args = p.parse_args(argv)
  only = set(filter(None, args.only.split(",")))
  cfg = _model(args)
  cores = os.cpu_count() or 1
  load0 = os.getloadavg()
  print(
    f"model: {cfg.num_params() / 1e6:.1f}M params ({args.layers} layers, "
    f"d {args.d_model}, heads {args.heads}/{args.kv_heads}x{args.head_dim}, "
    f"mlp {args.mlp}, vocab {args.vocab}, {args.dtype}); B={args.batch} "
    f"P={args.prompt} N={args.new}; {jax.devices()[0].platform} x"
    f"{jax.device_count()}, {cores} cores; load average {load0[0]:.1f}",
    flush=True,
  )
  params = nn.unbox(model_lib.init_params(jax.random.key(0), model=cfg))
  (mm_wall, mm_cpu), mm_flops = measure_matmul(args.dtype)
  (bw_wall, bw_cpu), bw_bytes = measure_bandwidth()
  steps = args.new - 1
  roof = {}
  # "wall": rates as measured; "cpu": per second of the cores this process
  # actually got (process CPU time / cores), robust to other jobs' load
  for kind, mm_s, bw_s in (
    ("wall", mm_wall, bw_wall),
    ("cpu", mm_cpu / cores, bw_cpu / cores),
  ):
    secs, fl, by = roofline_seconds(
      cfg,
      batch=args.batch,
      prompt=args.prompt,
      steps=steps,
      flops_per_s=mm_flops / mm_s,
      bytes_per_s=bw_bytes / bw_s,
    )
    roof[kind] = args.batch * steps / secs
    print(
      f"roofline ({kind}): matmul {mm_flops / mm_s / 1e9:.0f} GFLOP/s, "
      f"read {bw_bytes / bw_s / 1e9:.1f} GB/s -> {1e3 * secs / steps:.1f} "
      f"ms/step ({fl / steps / 1e9:.2f} GFLOP, {by / steps / 1e6:.0f} MB "
      "per step on average)",
      flush=True,
    )
  res: dict[str, dict | str] = {}
  for key, method, chunk in (
    ("k15", "cdf", args.live_chunk),
    ("gumbel", "gumbel", args.live_chunk),
    ("whole", "cdf", 0),
  ):
    if key in only:
      res[key] = bench_k15(params, cfg, args, method, chunk)
      print(f"{key}: {res[key]}", flush=True)
  if "tunix" in only:
    del params
    res["tunix"] = bench_tunix(cfg, args, _timer)
    print(f"tunix: {res['tunix']}", flush=True)
    params = nn.unbox(model_lib.init_params(jax.random.key(0), model=cfg))
  if "nocache" in only:
    res["nocache"] = bench_nocache(params, cfg, args)
    print(f"no-cache: {res['nocache']}", flush=True)
  names = dict(
    k15=f"k15 sampler (defaults: cdf, live_chunk={args.live_chunk})",
    gumbel=f"k15 sampler (method=gumbel, live_chunk={args.live_chunk})",
    whole="k15 sampler (cdf, live_chunk=0: whole cache every step)",
    tunix="Tunix vanilla sampler (Llama-3 model, same shape)",
    nocache="no-cache baseline (full forward per token)",
  )
  rate = {
    k: {
      kind: args.batch
      * r["steps"]
      / (r[f"decode_{kind}"] / (cores if kind == "cpu" else 1))
      for kind in ("wall", "cpu")
    }
    for k, r in res.items()
    if isinstance(r, dict)
  }
  base = rate.get("nocache")
  head = (
    "sampler",
    "decode tok/s",
    "ms/step",
    "of roofline",
    "tok/s (CPU time)",
    "of roofline (CPU time)",
    "vs no-cache",
  )
  rows = [
    (
      "roofline (measured F, W)",
      _num(roof["wall"]),
      _num(1e3 * args.batch / roof["wall"]),
      "1.00",
      _num(roof["cpu"]),
      "1.00",
      "",
    )
  ]
  for key in ("k15", "gumbel", "whole", "tunix", "nocache"):
    if key not in res:
      continue
    if isinstance(res[key], str):
      rows.append((names[key], "n/a", "", "", "", "", res[key]))
      continue
    w, c = rate[key]["wall"], rate[key]["cpu"]
    vs = f"{c / base['cpu']:.1f}x" if base else ""
    rows.append(
      (
        names[key],
        _num(w),
        _num(1e3 * args.batch / w),
        f"{w / roof['wall']:.2f}",
        _num(c),
        f"{c / roof['cpu']:.2f}",
        vs,
      )
    )
  load1 = os.getloadavg()
  print()
  print(_table(rows, head))
  print(
    f"\nload average (1 min) before / after: {load0[0]:.1f} / {load1[0]:.1f} "
    f"on {cores} cores. CPU-time columns divide by the CPU time this "
    "process got (over all cores), so they discount other jobs; the no-cache"
    f" rate is from {args.nocache_steps} of its fixed-cost steps."
  )


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
