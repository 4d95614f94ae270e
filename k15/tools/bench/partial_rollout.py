"""Rollout throughput with and without partial rollouts on long-tailed
response lengths.

`python -m k15.tools.bench partial_rollout [--groups 128] [--budget 64]
  [--max_response 512] [--layers 4 --d_model 384 ...]`

Workload: a random-weight model; every trajectory has a target length drawn
from a lognormal (median `--median` tokens, sigma `--sigma`, capped at
`--max_response`): most responses are short, a few are very long. The
sampler ends a trajectory exactly there (its per-trajectory cap, so it
finishes as "cut by length"; no stop token is ever drawn). Each iteration
runs the RL loop's rollout half, `stages.rl.iteration`'s policy and the
same `rollout.RolloutBuffer` / `generate_segments` calls (no scoring or
training):

- without partial rollouts: `prompts_per_iter` new groups of k, budget =
  max_response, so a call decodes until its longest row is done;
- with partial rollouts: budget `--budget`; a cut trajectory is carried to
  the next iteration (re-prefilled in blocks of `--continue_rows` rows of
  their own, `--rows` of them decoded together); new groups =
  prompts_per_iter minus the finished groups still waiting; at most
  prompts_per_iter groups leave per iteration.

Both run until `--groups` groups have finished (the same number of finished
trajectories). Useful tokens = the response tokens of finished
trajectories. Compilation is excluded (every bucket is compiled first). The
load average is printed; rates are given by wall time and by this process's
CPU time (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import numpy as np

from k15 import model as model_lib
from k15 import rollout, sampler


def _lengths(rng, n, args) -> np.ndarray:
  x = np.exp(rng.normal(np.log(args.median), args.sigma, n))
  return np.clip(np.round(x), 1, args.max_response).astype(int)


def run(params, cfg, args, *, partial: bool) -> dict:
  """Iterations until `args.groups` groups have finished; per-iteration
  rows and totals."""
  P, K = args.prompts_per_iter, args.k
  budget = args.budget if partial else args.max_response
  max_len = args.prompt + args.max_response
  gen = rollout.GenConfig(
    rows=args.rows,
    prompt_buckets=(args.prompt,),
    budget=budget,
    cache_len=max_len,
    continue_buckets=(
      rollout.continue_buckets(args.prompt, budget, max_len) if partial else ()
    ),
    continue_rows=args.continue_rows if partial else 0,
  )
  samp = sampler.SamplingConfig(
    temperature=1.0, method=args.method, live_chunk=args.live_chunk
  )
  kw = dict(model=cfg, sampling=samp, gen=gen, pad_id=0)
  # compile every bucket (and every merge of two continued blocks) once,
  # outside the timed loop; one new token per row, so decode exits at once
  def req(b):
    return rollout.Request([1] * args.prompt, [1] * (b - args.prompt), 1)

  for b in gen.buckets:
    rollout.generate_segments(params, [req(b)], jax.random.key(0), **kw)
  cb, n = gen.continue_buckets, gen.continue_rows
  if n and gen.rows >= 2 * n:
    for i, bi in enumerate(cb):
      for bj in cb[i:]:
        reqs = [req(bi)] * n + [req(bj)] * n
        rollout.generate_segments(params, reqs, jax.random.key(0), **kw)
  # the same sequence of groups (prompt, k target lengths) for both runs
  data_rng = np.random.default_rng(args.seed)
  n_max = args.groups + 16 * P
  prompts_all = data_rng.integers(2, cfg.vocab_size, (n_max, args.prompt))
  caps_all = [_lengths(data_rng, K, args) for _ in range(n_max)]
  started = 0
  buf = rollout.RolloutBuffer(K, partial=partial)
  its, done_groups, it = [], 0, 0
  t0, c0 = time.perf_counter(), time.process_time()
  while done_groups < args.groups:
    ti, ci = time.perf_counter(), time.process_time()
    n_new = max(P - buf.num_finished(), 0)
    new = range(started, started + n_new)
    started += n_new
    buf.start(
      new,
      [prompts_all[i].tolist() for i in new],
      it,
      [caps_all[i] for i in new],
    )
    todo, reqs = buf.requests()
    gens = rollout.generate_segments(params, reqs, jax.random.key(it), **kw)
    buf.record(todo, gens, it)
    groups = buf.pop_finished(min(P, args.groups - done_groups))
    done_groups += len(groups)
    its.append(
      dict(
        rows=len(reqs),
        carried=sum(not t.finished for _, t in todo),
        finished_groups=len(groups),
        useful=sum(len(t.response) for g in groups for t in g.members),
        generated=sum(len(g.response) for g in gens),
        wall=time.perf_counter() - ti,
        cpu=time.process_time() - ci,
      )
    )
    it += 1
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  useful = sum(i["useful"] for i in its)
  return dict(its=its, wall=wall, cpu=cpu, useful=useful)


def _row(name, r, cores) -> tuple[str, ...]:
  its = r["its"]
  n = len(its)
  return (
    name,
    str(n),
    f"{sum(i['finished_groups'] for i in its) / n:.1f}",
    f"{np.mean([i['rows'] for i in its]):.0f}",
    f"{r['wall'] / n:.2f}",
    f"{r['useful'] / r['wall']:.0f}",
    f"{r['useful'] / (r['cpu'] / cores):.0f}",
    f"{r['useful'] / max(sum(i['generated'] for i in its), 1):.2f}",
  )


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog="python -m k15.tools.bench partial_rollout")
  p.add_argument("--groups", type=int, default=128, help="finished groups")
  p.add_argument("--prompts_per_iter", type=int, default=16)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--rows", type=int, default=32, help="rows per call")
  p.add_argument(
    "--continue_rows",
    type=int,
    default=8,
    help="rollout.continue_rows with partial rollouts (0: share calls)",
  )
  p.add_argument("--prompt", type=int, default=16)
  p.add_argument("--budget", type=int, default=64)
  p.add_argument("--max_response", type=int, default=512)
  p.add_argument("--median", type=float, default=32.0)
  p.add_argument("--sigma", type=float, default=1.1)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=384)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--mlp", type=int, default=1536)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument(
    "--method", default=sampler.SamplingConfig().method, help="sampler.method"
  )
  p.add_argument(
    "--live_chunk",
    type=int,
    default=sampler.SamplingConfig().live_chunk,
    help="sampler.live_chunk",
  )
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  cfg = model_lib.ModelConfig(
    vocab_size=args.vocab,
    num_layers=args.layers,
    d_model=args.d_model,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.head_dim,
    mlp_dim=args.mlp,
    max_len=args.prompt + args.max_response,
    emb_init_scale=0.02,
  )
  cores = os.cpu_count() or 1
  load0 = os.getloadavg()
  lens = _lengths(np.random.default_rng(123), 100_000, args)
  print(
    f"model: {cfg.num_params() / 1e6:.1f}M params; {args.prompts_per_iter} "
    f"prompts x k={args.k} per iteration, {args.rows} rows per sampler "
    f"call ({args.continue_rows or args.rows} for continued rows); "
    f"response lengths: median {np.median(lens):.0f}, mean "
    f"{lens.mean():.0f}, p99 {np.percentile(lens, 99):.0f}, max "
    f"{args.max_response}; partial budget {args.budget}; until "
    f"{args.groups} groups ({args.groups * args.k} trajectories) finished;"
    f" load average {load0[0]:.1f} on {cores} cores",
    flush=True,
  )
  params = nn.unbox(model_lib.init_params(jax.random.key(0), model=cfg))
  res = {}
  for partial in (False, True):
    res[partial] = run(params, cfg, args, partial=partial)
    r = res[partial]
    print(
      f"partial={partial}: {len(r['its'])} iterations, {r['wall']:.1f} s "
      f"wall, {r['cpu']:.1f} s CPU, {r['useful']} useful tokens",
      flush=True,
    )
  head = (
    "rollout",
    "iterations",
    "finished groups / iter",
    "rows / iter",
    "wall s / iter",
    "useful tok/s",
    "useful tok/s (CPU time)",
    "useful / generated",
  )
  rows = [
    _row("without partial rollouts (budget = max)", res[False], cores),
    _row(f"partial rollouts (budget {args.budget})", res[True], cores),
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  speed = (res[True]["useful"] / res[True]["wall"]) / (
    res[False]["useful"] / res[False]["wall"]
  )
  speed_cpu = (res[True]["useful"] / res[True]["cpu"]) / (
    res[False]["useful"] / res[False]["cpu"]
  )
  load1 = os.getloadavg()
  print()
  print("\n".join(lines))
  print(
    f"\npartial rollouts: {speed:.2f}x useful tokens/s by wall time, "
    f"{speed_cpu:.2f}x by CPU time. Both runs start the same sequence of "
    "groups; with partial rollouts the long ones finish later, so its "
    "finished groups are the shorter ones (fewer useful tokens, which "
    "counts against it), and tokens of groups still in flight at the end "
    "are generated but not useful. Load "
    f"average (1 min) before / after: {load0[0]:.1f} / {load1[0]:.1f}."
  )
  print("\nper iteration (partial): rows, carried, finished groups, wall s:")
  print(
    " ".join(
      f"{i['rows']}/{i['carried']}/{i['finished_groups']}/{i['wall']:.1f}"
      for i in res[True]["its"]
    )
  )


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
