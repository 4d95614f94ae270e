"""Time and peak memory of attention forward+backward vs sequence length.

`python -m k15.tools.bench attention [--lengths 2048,4096] [--out table.md]`

Dimension key: B batch, L tokens (T = S = L), H heads, Dh head dim.

Each (impl, L) runs in a fresh subprocess so that its max RSS is its own;
"ring" runs with 8 fake CPU devices (`--xla_force_host_platform_device_count`)
and the zigzag layout. Workload: causal self-attention, B = 1, one segment,
float32 (bf16 matmuls are emulated and slow on CPU), loss = sum(out * w),
gradients wrt q, k, v. Reported memory: XLA's compiled temp buffers (from
`memory_analysis()`, summed over devices for ring) and the worker process's
max RSS (which includes the ~0.3 GiB JAX runtime). No config is run when its
compiled buffers exceed --mem_limit_gib or 80% of MemAvailable, and dense is
not even compiled when its [B, H, L, L] f32 scores alone exceed 16 GiB: the
row says how much it would need.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

_AXES = ("data", "fsdp", "tensor", "context")
_GIB = 2**30
_SCORES_LIMIT_GIB = 16.0


def _available_gib() -> float:
  """MemAvailable now: the machine is shared, so never plan past it."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024 / _GIB
  except OSError:
    pass
  return float("inf")


def _worker(args) -> dict:
  """One config in this process; returns the measurements."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from k15 import attention

  L, H, Dh = args.length, args.heads, args.head_dim
  result = dict(impl=args.impl, L=L)
  scores_gib = H * L * L * 4 / _GIB
  if args.impl == "dense" and scores_gib > _SCORES_LIMIT_GIB:
    return dict(result, skipped=f"scores alone need {scores_gib:.0f} GiB")

  rng = np.random.default_rng(0)
  q, k, v, w = (
    jnp.asarray(rng.normal(size=(1, L, H, Dh)), jnp.float32) for _ in range(4)
  )
  pos = np.arange(L)[None].astype(np.int32)
  seg = np.ones((1, L), np.int32)
  mesh = None
  if args.impl == "ring":
    n = jax.device_count()
    mesh = jax.make_mesh((1, 1, 1, n), _AXES)
    perm = attention.zigzag_permutation(L, n)  # balanced causal work
    pos, seg = pos[:, perm], seg[:, perm]
    x_sh = NamedSharding(mesh, P(None, "context"))
    q, k, v, w = (jax.device_put(x[:, perm], x_sh) for x in (q, k, v, w))
    pos, seg = (jax.device_put(x, x_sh) for x in (pos, seg))
  pos, seg = jnp.asarray(pos), jnp.asarray(seg)

  def loss(q, k, v):
    out = attention.attend(
      q,
      k,
      v,
      q_pos_BxT=pos,
      q_seg_BxT=seg,
      kv_pos_BxS=pos,
      kv_seg_BxS=seg,
      impl=args.impl,
      block_q=args.block,
      block_kv=args.block,
      mesh=mesh,
    )
    return (out * w).sum()

  step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  t0 = time.perf_counter()
  compiled = step.lower(q, k, v).compile()
  result["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  devices = jax.device_count() if args.impl == "ring" else 1
  temp_gib = devices * mem.temp_size_in_bytes / _GIB
  io_gib = (
    devices * (mem.argument_size_in_bytes + mem.output_size_in_bytes) / _GIB
  )
  result.update(temp_gib=temp_gib, io_gib=io_gib)
  limit_gib = min(args.mem_limit_gib, 0.8 * _available_gib())
  if temp_gib + io_gib > limit_gib:
    return dict(
      result,
      skipped=f"needs {temp_gib + io_gib:.1f} GiB (limit {limit_gib:.1f})",
    )
  times = []
  for _ in range(args.repeats if L <= 8192 else 1):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - t0)
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB
  return dict(result, time_s=min(times), rss_gib=rss_gib)


def _run_one(impl: str, L: int, args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  )
  env["PYTHONPATH"] = os.pathsep.join(
    p for p in (root, env.get("PYTHONPATH")) if p
  )
  if impl == "ring":
    env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={args.ring_devices}"
    )
  cmd = [
    sys.executable,
    "-m",
    "k15.tools.bench.attention",
    "--worker",
    f"--impl={impl}",
    f"--length={L}",
    f"--heads={args.heads}",
    f"--head_dim={args.head_dim}",
    f"--block={args.block}",
    f"--mem_limit_gib={args.mem_limit_gib}",
    f"--repeats={args.repeats}",
  ]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return dict(impl=impl, L=L, skipped=f"failed (rc {proc.returncode}) {tail}")
  return json.loads(lines[-1])


def _table(rows: list[dict], args) -> str:
  head = (
    f"attention fwd+bwd, causal, B=1, H={args.heads}, Dh={args.head_dim}, "
    f"float32, block {args.block}, CPU ({os.cpu_count()} cores); ring: "
    f"{args.ring_devices} fake devices, zigzag layout\n\n"
    "| impl | L | fwd+bwd s | XLA temp GiB | args+outs GiB | max RSS GiB |"
    "\n| --- | ---: | ---: | ---: | ---: | ---: |"
  )
  lines = [head]
  for r in rows:
    if "skipped" in r:
      lines.append(
        f"| {r['impl']} | {r['L']} | skipped: {r['skipped']} | | | |"
      )
      continue
    lines.append(
      f"| {r['impl']} | {r['L']} | {r['time_s']:.2f} | {r['temp_gib']:.3f} "
      f"| {r['io_gib']:.3f} | {r['rss_gib']:.2f} |"
    )
  return "\n".join(lines) + "\n"


def _parse(argv: list[str]):
  p = argparse.ArgumentParser(prog="python -m k15.tools.bench attention")
  p.add_argument("--lengths", default="2048,4096,8192,16384,32768")
  p.add_argument("--impls", default="dense,blockwise,ring")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--ring_devices", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument(
    "--mem_limit_gib",
    type=float,
    default=14.0,
    help="skip a config whose compiled buffers exceed this or 80%% of "
    "MemAvailable (the machine is shared)",
  )
  p.add_argument("--out", default=None, help="also write the table here")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--impl", help=argparse.SUPPRESS)
  p.add_argument("--length", type=int, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: list[str]) -> None:
  args = _parse(argv)
  if args.worker:
    print(json.dumps(_worker(args)), flush=True)
    return
  rows = []
  for impl in args.impls.split(","):
    for L in (int(x) for x in args.lengths.split(",")):
      rows.append(_run_one(impl, L, args))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  table = _table(rows, args)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table)


if __name__ == "__main__":
  main(sys.argv[1:])
