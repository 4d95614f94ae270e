"""Ablation: curriculum vs uniform prompt sampling (report Fig. 9, §3.5).

The report's curriculum: the whole mixed-difficulty set for a warm-up, then
only hard problems from iteration 24 of 44; the baseline samples the mixed
set uniformly throughout. Task, model and optimiser are experiments/tiny.py
(loaded from it); "hard" is difficulty >= hard_min (default: the task's
two hardest levels, max_steps - 1).

  python -m k15.main \
      --config experiments/ablations/curriculum.py:strategy=curriculum \
      --workdir /tmp/k15_ablations/curriculum
  python -m k15.main \
      --config experiments/ablations/curriculum.py:strategy=uniform \
      --workdir /tmp/k15_ablations/curriculum_uniform
  python -m k15.main \
      --config experiments/ablations/curriculum.py:runlocal \
      --workdir /tmp/k15_ablations/curriculum_runlocal

Variants: strategy=curriculum|uniform, iterations=44, transition=24,
hard_min=N (0: task.max_steps - 1), seed=N, runlocal (transition after the
first of tiny's runlocal iterations). Training `accuracy` changes meaning at
the switch (hard prompts only), so compare arms on eval `rl/pass1` and
`rl/pass1_d{d}`; `sampler/hard_frac`/`sampler/eligible` show the switch.
"""

from k15 import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    strategy="curriculum",
    iterations=44,
    transition=24,
    hard_min=0,
    seed=0,
    runlocal=False,
  )
  if arg.strategy not in ("curriculum", "uniform"):
    raise ValueError(
      f"curriculum.py: strategy={arg.strategy!r}; expected curriculum | uniform"
    )
  c = config_lib.load_base(
    "experiments/tiny.py", runlocal=arg.runlocal, seed=arg.seed
  )
  c.name = f"ablation_curriculum_{arg.strategy}"
  c.stages = ("sft", "rl")
  transition = arg.transition
  if arg.runlocal:
    transition = 1
  else:
    c.rl.iterations = arg.iterations
  # update, not replace: tiny's data.balance=True stays on in both arms
  c.data.update(
    strategy=arg.strategy,
    transition_iter=transition,
    hard_min=arg.hard_min or c.task.max_steps - 1,
  )
  return c
