"""Long2short (report §2.4, Fig. 7; PAPER.md §6): four ways to make a
long-CoT model answer in fewer tokens, on arithmetic chains mod 10.

One arm per run; the arms of one seed live side by side under ROOT and
start from each other's checkpoints (`config.init` = ROOT/<arm>:<stage>):

  short     SFT from scratch on the short format     " 7 9 6 7. answer: 7"
  long      short's weights, 600 SFT steps on the long format (1-3
            verification passes restating the chain, task.min_checks=1:
            " 7 9 6 7. 7 9 6 7. answer: 7"), then 20 RL iterations
            (length penalty off): the long-CoT model, long:rl
  merge     0.5 * long:rl + 0.5 * short:sft, no training
  merge_rs  shortest rejection sampling from merge:merge (n = 8 samples
            per prompt, SFT on the shortest correct of each)
  shortest  shortest rejection sampling from long:rl
  dpo       DPO from long:rl: the shortest correct of its 8 samples over
            its wrong longer ones and its correct ones >= 1.5x as long
  l2s_rl    long2short RL from long:rl: the length penalty from iteration
            0 and a much smaller rollout length (`rollout.budget`)

Every arm is evaluated alike: 256 held-out problems, pass@1 over 4 samples
at T = 1, responses of up to `eval.max_response` tokens.

  python -m k15.tools.long2short --config experiments/long2short.py \\
      --seeds 0,1,2 --workdir /tmp/k15_l2s          # every arm, the figure
  python -m k15.main --config experiments/long2short.py:arm=dpo,root=DIR \\
      --workdir DIR/dpo                             # one arm (needs long)

Tuning log (seed 1, the long arm from the same short:sft). With 0-3
passes per long trace (a quarter of them the short format) and 200 SFT
steps the long SFT reached pass@1 0.563 at 38.4 tokens, and RL dropped the
passes within 5 iterations (0.987 at 16.1 tokens, the short format: the
passes were where it erred, miscopying the chain). 1-3 passes and 200
steps: SFT 0.644 (39.3 tokens), RL 0.805 (26.7). 1-3 passes and 600 steps:
SFT 0.931 (37.3), RL 0.979 (33.4), 2.1x the short model's 16.1 tokens.
DPO from that model: 40 steps 0.800 (28.3 tokens), 20 steps 0.979 (28.4).

Variants: arm=<one above> (default short, the one that needs no other
arm), root=DIR (where the other arms' workdirs are),
seed=N, runlocal (the smoke size the tests run).
"""

from k15 import config_lib

# arm -> the arms it starts from (the order `sweep` runs them in)
ARMS = {
  "short": (),
  "long": ("short",),
  "merge": ("long", "short"),
  "merge_rs": ("merge",),
  "shortest": ("long",),
  "dpo": ("long",),
  "l2s_rl": ("long",),
}


def sweep(arg=None) -> list[tuple[str, str]]:
  """(arm, config arg) of every arm, each after the arms it starts from;
  `arg` (e.g. "runlocal") is added to each."""
  extra = f",{arg}" if arg else ""
  return [(arm, f"arm={arm}{extra}") for arm in ARMS]


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, arm="short", root="", seed=0, runlocal=False)
  if arg.arm not in ARMS:
    raise ValueError(f"long2short.py: arm={arg.arm!r}; one of {tuple(ARMS)}")
  if ARMS[arg.arm] and not arg.root:
    raise ValueError(
      f"long2short.py: arm={arg.arm} starts from the "
      f"{' and '.join(ARMS[arg.arm])} arm(s): give root=DIR, the directory "
      "holding their workdirs"
    )
  root = arg.root.rstrip("/")
  c = config_lib.ml_collections.ConfigDict()
  c.name = f"long2short_{arg.arm}"
  c.seed = arg.seed
  c.init = ""
  c.stages = ("sft",)
  # 2-5 steps of +d / -d mod 10, d in 1..3; warm-up traces of every length
  # (here the warm-up teaches the task; long2short is about the format)
  c.task = dict(name="arithmetic", min_steps=2, max_steps=5, ops="+-",
                max_operand=3, sft_max_steps=0, num_sft=2048, num_rl=4096,
                num_eval=256, checks=0, seed=0)
  c.tokenizer = dict(kind="sentencepiece", vocab_size=40, path="")
  c.model = dict(vocab_size=0, num_layers=2, d_model=128, num_heads=4,
                 num_kv_heads=2, head_dim=32, mlp_dim=512, max_len=96,
                 attention="dense", emb_init_scale=0.02)
  c.sampler = dict(temperature=1.0, top_k=0, top_p=1.0)
  # long responses: 5 steps with 3 passes is 57 tokens
  c.rollout = dict(k=8, prompts_per_iter=32, prompt_len=24, budget=64,
                   max_len=88, gen_rows=256, oversample=2)
  c.rl = dict(iterations=20, loss="mirror_descent", tau=0.1, baseline="mean",
              num_minibatches=4, epochs=1, reset_optimizer=True)
  c.length_penalty = dict(schedule="off", weight=0.0, warmup=0)
  c.reward = dict(kind="verifier", ckpt="", threshold=0.5)
  c.data = dict(strategy="uniform", balance=True)
  c.sft = dict(steps=400, batch_size=32, lr=1e-3, eps=1e-8)
  c.optim = dict(lr=3e-4, b1=0.9, b2=0.95, eps=3e-4, weight_decay=0.0,
                 grad_clip=1.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1)
  c.ckpt = dict(every=10, keep=3, async_save=True)
  c.eval = dict(num_samples=4, temperature=1.0, greedy=True,
                max_response=64)
  # eval.every > 0: RL also evaluates every N iterations (held-out curves)
  c.eval.update(every=0, every_problems=64)
  c.merge = dict(models=(), alpha=0.5)
  c.rs = dict(n=8, num_prompts=256, steps=100, batch_size=32, lr=1e-3,
              eps=1e-8, temperature=1.0)
  # beta and the pair rule (1.5x) as in the report; the reference is the
  # starting model (long:rl). The pairs separate easily (a negative is the
  # positive plus restated passes): at optim.lr (3e-4) x 100 steps the
  # loss reached 0 by step 20 and the chosen responses' log-probs fell
  # with the rejected ones (seed 0: pass@1 0.98 -> 0.13); hence a 6x
  # smaller step, and 20 steps: about one pass over the pairs (seed 1:
  # 303 pairs from 256 prompts; 40 steps, two passes, ended with the
  # chosen responses' implicit reward negative and pass@1 0.979 -> 0.800;
  # 20 steps kept 0.979 and shortened 33.4 -> 28.4 tokens).
  c.dpo = dict(beta=0.1, ratio=1.5, n=8, num_prompts=256, steps=20,
               batch_size=16, lr=5e-5, eps=0.0, temperature=1.0)

  if arg.arm == "long":
    c.init = f"{root}/short:sft"
    c.stages = ("sft", "rl")
    c.task.update(checks=3, min_checks=1)
    c.sft.update(steps=600)
  elif arg.arm == "merge":
    c.stages = ("merge",)
    c.merge.update(models=(f"{root}/long:rl", f"{root}/short:sft"))
  elif arg.arm in ("merge_rs", "shortest"):
    c.stages = ("rs",)
    c.init = f"{root}/merge:merge" if arg.arm == "merge_rs" else (
      f"{root}/long:rl")  # fmt: skip
  elif arg.arm == "l2s_rl":
    c.stages = ("rl",)
    c.init = f"{root}/long:rl"
    # the length penalty from iteration 0, and responses over 32 tokens
    # (half the long model's limit) cut: not finished, so never correct
    c.length_penalty.update(schedule="constant", weight=0.5, warmup=0)
    c.rollout.update(budget=32, max_len=56)
  elif arg.arm == "dpo":
    c.stages = ("dpo",)
    c.init = f"{root}/long:rl"

  if arg.runlocal:
    c.task.update(num_sft=256, num_rl=256, num_eval=32, min_steps=2,
                  max_steps=3, max_operand=2)
    c.model.update(d_model=64, mlp_dim=128, num_layers=1)
    c.rollout.update(k=4, prompts_per_iter=8, gen_rows=32, oversample=1)
    c.rl.update(iterations=2, num_minibatches=2)
    c.sft.update(steps=60 if arg.arm == "short" else 20, batch_size=16,
                 lr=3e-3)
    c.rs.update(num_prompts=16, steps=4, batch_size=8)
    c.dpo.update(num_prompts=16, steps=4, batch_size=4)
    c.ckpt.update(every=2)
    c.eval.update(num_samples=2)
  return c
