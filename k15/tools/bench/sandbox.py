"""Throughput of the code sandbox: executions per second.

`python -m k15.tools.bench sandbox [--n 300] [--workers 1,2,4,6,8] [--repeat 2]`

Two workloads, each run through `Sandbox.run_many` with several pool sizes
(sandboxes in flight):
- trivial: `pass` as the whole program (sandbox + interpreter start-up);
- humaneval: the 164 canonical HumanEval solutions against their tests
  ("judge" mode: the tests and the program in two processes).
Every execution is a full fresh sandbox (setpriv, unshare's PID namespace,
prlimit, bwrap with all namespaces, seccomp, the harness). The report's own
sandbox starts 120 containers/s on 16 cores (PAPER.md §5.3); our target is
>= 50/s on 2 cores.
Best of `--repeat` runs. The machine may be shared: the load average is
printed, and with other work running the numbers understate capacity.
"""

import argparse
import os
import time

from k15.rewards import code, sandbox
from k15.tasks import humaneval


def _rate(box, jobs, workers, repeat) -> tuple[float, int]:
  best, ok = 0.0, 0
  for _ in range(repeat):
    t0 = time.perf_counter()
    res = box.run_many(jobs, workers=workers)
    dt = time.perf_counter() - t0
    best = max(best, len(jobs) / dt)
    ok = sum(r.passed for r in res)
  return best, ok


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m k15.tools.bench sandbox")
  parser.add_argument("--n", type=int, default=300, help="trivial runs")
  parser.add_argument("--workers", default="", help="pool sizes, e.g. 2,6")
  parser.add_argument("--repeat", type=int, default=2)
  args = parser.parse_args(argv)
  sandbox.check_available()
  default = sandbox.default_workers()
  sizes = [int(w) for w in args.workers.split(",") if w] or sorted(
    {1, os.cpu_count() or 1, default}
  )
  box = sandbox.Sandbox(limits=sandbox.Limits(timeout_s=20.0))
  trivial = [sandbox.Job("pass")] * args.n
  items = humaneval.load()
  he_jobs = [code.make_job(it, it["prompt"] + it["canonical_solution"])
             for it in items]  # fmt: skip
  box.run_many(trivial[:8])  # warm up (seccomp filters, page cache)
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"cores: {os.cpu_count()}, default pool: {default} in flight, "
        f"load average before: {load}")  # fmt: skip
  print(f"{'workers':>8} {'trivial/s':>10} {'humaneval/s':>12} "
        f"{'humaneval ok':>13}")  # fmt: skip
  for w in sizes:
    triv, triv_ok = _rate(box, trivial, w, args.repeat)
    he, he_ok = _rate(box, he_jobs, w, args.repeat)
    assert triv_ok == len(trivial), f"trivial runs failed: {triv_ok}"
    print(f"{w:>8} {triv:>10.1f} {he:>12.1f} {he_ok:>9}/{len(he_jobs)}")
