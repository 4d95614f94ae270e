"""Ablation: mirror descent vs ReST vs GRPO (report Fig. 10, §3.5).

The report compares its mirror-descent RL with ReST (supervised steps on
the best correct sample per prompt: no negative gradients); GRPO (group-
normalised advantage, PPO-clipped ratio) and plain REINFORCE with the mean
baseline are further arms on the same data. Everything else is
experiments/tiny.py (loaded from it, which itself takes `loss=`), so the
arms differ only in the loss.

  python -m k15.main \
      --config experiments/ablations/policy_loss.py:loss=mirror_descent \
      --workdir /tmp/k15_ablations/loss_md
  python -m k15.main \
      --config experiments/ablations/policy_loss.py:loss=rest \
      --workdir /tmp/k15_ablations/loss_rest
  python -m k15.main \
      --config experiments/ablations/policy_loss.py:loss=grpo \
      --workdir /tmp/k15_ablations/loss_grpo
  python -m k15.main \
      --config experiments/ablations/policy_loss.py:loss=rest,runlocal \
      --workdir /tmp/k15_ablations/loss_runlocal

Variants: loss=mirror_descent|rest|grpo|reinforce, kl_coef=0.0 (grpo),
seed=N, runlocal. Plot rl `accuracy` and `response_length` per step and
eval `rl/pass1` (Fig. 10 plots accuracy against iterations).
"""

from k15 import config_lib

LOSSES = ("mirror_descent", "rest", "grpo", "reinforce")


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, loss="mirror_descent", kl_coef=0.0, seed=0, runlocal=False
  )
  if arg.loss not in LOSSES:
    raise ValueError(
      f"policy_loss.py: loss={arg.loss!r}; expected one of {LOSSES}"
    )
  c = config_lib.load_base(
    "experiments/tiny.py", runlocal=arg.runlocal, seed=arg.seed, loss=arg.loss
  )
  c.name = f"ablation_policy_loss_{arg.loss}"
  c.stages = ("sft", "rl")
  c.rl.kl_coef = arg.kl_coef
  return c
