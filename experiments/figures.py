"""The runs behind the paper's figures (`python -m k15.figures`), on tiny.

Every arm is experiments/tiny.py (loaded from it: task, model, sampling and
optimizer as tuned there) with RL evaluated on 128 held-out problems every
8 iterations (`eval.every`, the curves), and one change per arm. The arms of
one seed live side by side under ROOT and start from each other's
checkpoints (`config.init` = ROOT/<arm>:<stage>[@step]):

  sft         tiny's warm-up (400 SFT steps), shared by every RL arm
  md          mirror-descent RL from sft, 64 iterations        (Fig. 5, 6)
  rest        ReST instead of mirror descent, from sft         (Fig. 10)
  lp_on       the length penalty on from iteration 0, from sft (length pen.)
  lp_warmup   md until iteration 32, then the penalty on: md:rl@32
              continued for 32 iterations (the report's warm-up schedule)
  curriculum  md until iteration 32, then only the hardest chains (5-6
              steps): md:rl@32 continued for 32 iterations     (Fig. 9)
  small_sft   the warm-up of a smaller model (d_model 64: 0.13M parameters
              against md's 0.50M)                              (Fig. 8)
  small       mirror-descent RL of the small model             (Fig. 8)

The continued arms share the md run up to their switch, as the report's
Fig. 9 does: RL's optimizer is reset every iteration, so starting from
md's weights at iteration 32 is md's own next iteration (only the prompt
draws differ). Their iteration 0 is md's iteration 32 (`k15.figures`
offsets them).

  python -m k15.figures all --workdir /tmp/k15_fig --seeds 0,1,2
  python -m k15.main --config experiments/figures.py:arm=md,root=DIR \\
      --workdir DIR/md                                  # one arm (needs sft)

Variants: arm=<one above> (default sft, the one that needs no other arm),
root=DIR (where the other arms' workdirs are), seed=N, runlocal (the smoke
size the tests and notebooks run: 4 iterations, switch at 2).
"""

from k15 import config_lib

# arm -> the arms it starts from (the order they must run in)
ARMS = {
  "sft": (),
  "md": ("sft",),
  "rest": ("sft",),
  "lp_on": ("sft",),
  "lp_warmup": ("md",),
  "curriculum": ("md",),
  "small_sft": (),
  "small": ("small_sft",),
}
ITERATIONS, SWITCH, EVERY = 64, 32, 8
# the arms that continue md from its checkpoint at SWITCH
CONTINUED = ("lp_warmup", "curriculum")


def switch(runlocal: bool = False) -> int:
  """The iteration the continued arms leave md at."""
  return 2 if runlocal else SWITCH


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, arm="sft", root="", seed=0, runlocal=False)
  if arg.arm not in ARMS:
    raise ValueError(f"figures.py: arm={arg.arm!r}; one of {tuple(ARMS)}")
  if ARMS[arg.arm] and not arg.root:
    raise ValueError(
      f"figures.py: arm={arg.arm} starts from the {ARMS[arg.arm][0]} arm: "
      "give root=DIR, the directory holding its workdir"
    )
  root = arg.root.rstrip("/")
  c = config_lib.load_base(
    "experiments/tiny.py", runlocal=arg.runlocal, seed=arg.seed
  )
  c.name = f"figures_{arg.arm}"
  c.targets = {}
  iterations, at = (4, 2) if arg.runlocal else (ITERATIONS, SWITCH)
  every = 1 if arg.runlocal else EVERY
  c.rl.iterations = iterations
  # curves: the held-out eval every `every` iterations (and at 0); the
  # checkpoint the continued arms start from is kept
  c.eval.update(every=every, every_problems=16 if arg.runlocal else 128)
  c.ckpt.update(every=at, keep=iterations // at + 1)
  if arg.arm.startswith("small"):
    c.model.update(d_model=64, mlp_dim=256, num_heads=4, num_kv_heads=2,
                   head_dim=16)
  if arg.arm in ("sft", "small_sft"):
    c.stages = ("sft",)
    return c
  c.stages = ("rl",)
  c.init = f"{root}/{'small_sft' if arg.arm == 'small' else 'sft'}:sft"
  if arg.arm == "rest":
    c.rl.loss = "rest"
  elif arg.arm == "lp_on":
    # weight 0.5 keeps every correct answer above every wrong one
    c.length_penalty.update(schedule="constant", weight=0.5, warmup=0)
  elif arg.arm in CONTINUED:
    c.init = f"{root}/md:rl@{at}"
    c.rl.iterations = iterations - at
    if arg.arm == "lp_warmup":
      c.length_penalty.update(schedule="constant", weight=0.5, warmup=0)
    else:  # only the two hardest chain lengths from here on
      c.data.update(strategy="curriculum", transition_iter=0,
                    hard_min=c.task.max_steps - 1)
  return c
