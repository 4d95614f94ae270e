"""Reward models on the chains task: a chain-of-thought generative verifier
and a scalar-head RM, trained from scratch on rule-labelled pairs.

  python -m k15.tools.train_rm --config experiments/reward_model.py \\
      --workdir /tmp/k15_rm
  python -m k15.tools.train_rm \\
      --config experiments/reward_model.py:runlocal --workdir /tmp/k15_rm

Each kind lands in WORKDIR/<kind>/ (rm.json with its held-out evaluation,
tokenizer, params); use one as the RL reward of an experiment with

  python -m k15.main --config experiments/tiny.py --workdir /tmp/t \\
      --config.reward.kind=cot_rm --config.reward.ckpt=/tmp/k15_rm/cot_rm

Data: one (question, reference, response) pair per problem, the response a
gold trace, a trace with a sloppy middle step but the right answer, a wrong
final answer, a wrong last step, a truncated trace or one with two answers;
the label is the task's rule verifier (half the pairs are correct). The CoT
RM imitates " final X=ref X." + {"correct": true}; the scalar RM
learns the label by binary cross-entropy.

Results (accuracy against the rule verifier on held-out pairs): see RESULTS
below, filled in from a run of this file.

Variants: `runlocal` (a short CPU run), `kind=cot_rm|scalar_rm|both`,
`task=chains|arithmetic` (train on the RL experiment's task), `steps=N`,
`seed=N`.
"""

from k15 import config_lib

RESULTS = """(filled in from a run)"""


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, runlocal=False, kind="both", task="chains", steps=0, seed=0
  )
  c = config_lib.ml_collections.ConfigDict()
  c.name = "reward_model"
  c.seed = arg.seed
  c.init = ""  # "" (random) | a HF checkpoint dir | an RM directory
  kinds = ("cot_rm", "scalar_rm") if arg.kind == "both" else (arg.kind,)

  c.task = dict(
    name=arg.task, min_steps=2, max_steps=6, num_train=4096, num_eval=512,
    ops="+-*", max_operand=9, seed=0,
  )  # fmt: skip
  c.model = dict(
    vocab_size=0, num_layers=2, d_model=128, num_heads=4, num_kv_heads=2,
    head_dim=32, mlp_dim=512, max_len=160, attention="dense",
    emb_init_scale=0.02,
  )  # fmt: skip
  c.rm = dict(
    kinds=kinds, steps=600, batch_size=32, budget=48, rows=64,
    threshold=0.5, vocab_size=64, log_every=25, scalar_init="cot_rm",
  )  # fmt: skip
  c.optim = dict(lr=2e-3, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0,
                 warmup_steps=20)  # fmt: skip
  c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1)

  if arg.runlocal:
    c.task.update(max_steps=3, num_train=1024, num_eval=128)
    c.model.update(d_model=64, mlp_dim=256, max_len=128)
    c.rm.update(steps=100, rows=32)
  if arg.steps:
    c.rm.steps = arg.steps
  return c
