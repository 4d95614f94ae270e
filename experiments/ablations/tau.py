"""Ablation: the mirror-descent coefficient tau (report Eq. 2-3).

tau weighs the squared log-ratio to pi_theta_i (and, with
baseline=logmeanexp, sets the tau log-mean-exp estimate of tau log Z).
With one gradient step per iteration tau has no effect (the first step is
REINFORCE), so it matters through tiny's several minibatch steps per
iteration. Everything else is experiments/tiny.py (loaded from it).

  for t in 0.01 0.03 0.1 0.3 1.0; do
    python -m k15.main \
        --config experiments/ablations/tau.py:tau=$t \
        --workdir /tmp/k15_ablations/tau_$t
  done
  python -m k15.main \
      --config experiments/ablations/tau.py:tau=1.0,baseline=logmeanexp \
      --workdir /tmp/k15_ablations/tau_1.0_lme
  python -m k15.main \
      --config experiments/ablations/tau.py:tau=0.01,runlocal \
      --workdir /tmp/k15_ablations/tau_runlocal

Variants: tau=0.1, baseline=mean|logmeanexp, seed=N, runlocal. Plot rl
`accuracy`, `rho_sq` / `rho_abs` (how far each iteration moves from
pi_theta_i) per step, and eval `rl/pass1` against tau.
"""

from k15 import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, tau=0.1, baseline="mean", seed=0, runlocal=False
  )
  # rl.tau and rl.baseline are checked where they are defined
  # (objective.LossConfig), before any work starts.
  c = config_lib.load_base(
    "experiments/tiny.py", runlocal=arg.runlocal, seed=arg.seed
  )
  c.name = f"ablation_tau_{arg.tau:g}_{arg.baseline}"
  c.stages = ("sft", "rl")
  c.rl.update(loss="mirror_descent", tau=arg.tau, baseline=arg.baseline)
  return c
