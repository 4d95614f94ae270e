"""Ablation: prioritized vs uniform prompt sampling (report §2.3.4).

Prioritized sampling tracks each problem's success rate s_i online and
draws problems with probability proportional to max(1 - s_i, floor); the
baseline draws uniformly. Everything else is experiments/tiny.py (loaded
from it, so its tuned values carry over).

  python -m k15.main \
      --config experiments/ablations/prioritized.py:strategy=prioritized \
      --workdir /tmp/k15_ablations/prioritized
  python -m k15.main \
      --config experiments/ablations/prioritized.py:strategy=uniform \
      --workdir /tmp/k15_ablations/prioritized_uniform
  python -m k15.main \
      --config experiments/ablations/prioritized.py:runlocal \
      --workdir /tmp/k15_ablations/prioritized_runlocal

Variants: strategy=prioritized|uniform|curriculum+prioritized, floor=0.05,
prior=0.5, seed=N, runlocal. Plot rl `accuracy` (on the drawn prompts, so
lower under prioritization by design), `sampler/mean_success`,
`sampler/solved_frac`, and eval `rl/pass1`.
"""

from k15 import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, strategy="prioritized", floor=0.05, prior=0.5, seed=0, runlocal=False
  )
  if arg.strategy not in ("prioritized", "uniform", "curriculum+prioritized"):
    raise ValueError(
      f"prioritized.py: strategy={arg.strategy!r}; expected "
      "prioritized | uniform | curriculum+prioritized"
    )
  c = config_lib.load_base(
    "experiments/tiny.py", runlocal=arg.runlocal, seed=arg.seed
  )
  c.name = f"ablation_prioritized_{arg.strategy}"
  c.stages = ("sft", "rl")
  # update, not replace: tiny's data.balance=True stays on in every arm
  c.data.update(strategy=arg.strategy, floor=arg.floor, prior=arg.prior)
  return c
