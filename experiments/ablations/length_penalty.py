"""Ablation: the length penalty on vs off (report §2.3.3, PAPER.md §2).

Everything else is experiments/tiny.py (loaded from it, so its tuned values
carry over). lp=on is the report's schedule: plain RL for `warmup`
iterations (default a third of rl.iterations), then a constant length reward
of weight `weight` (not given in the report; 0.5 keeps every correct answer
above every wrong one). lp=off is tiny's RL as is.

  python -m k15.main \
      --config experiments/ablations/length_penalty.py:lp=on \
      --workdir /tmp/k15_ablations/lp_on
  python -m k15.main \
      --config experiments/ablations/length_penalty.py:lp=off \
      --workdir /tmp/k15_ablations/lp_off
  python -m k15.main \
      --config experiments/ablations/length_penalty.py:lp=on,runlocal \
      --workdir /tmp/k15_ablations/lp_runlocal

Variants: lp=on|off, weight=0.5, warmup=N (-1: rl.iterations // 3),
seed=N, runlocal. Plot rl `response_length` and `accuracy` per step, with
`length_penalty_weight` marking the switch; eval `rl/mean_length`,
`rl/pass1`, `rl/acc_per_1k_tokens`.
"""

from k15 import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, lp="on", weight=0.5, warmup=-1, seed=0, runlocal=False
  )
  c = config_lib.load_base(
    "experiments/tiny.py", runlocal=arg.runlocal, seed=arg.seed
  )
  c.name = f"ablation_length_penalty_{arg.lp}"
  c.stages = ("sft", "rl")
  if arg.lp == "on":
    warmup = c.rl.iterations // 3 if arg.warmup < 0 else arg.warmup
    c.length_penalty.update(
      schedule="constant", weight=arg.weight, warmup=warmup
    )
  elif arg.lp == "off":
    c.length_penalty.update(schedule="off", weight=0.0, warmup=0)
  else:
    raise ValueError(f"length_penalty.py: lp={arg.lp!r}; expected on | off")
  return c
