"""Vision-text joint RL on a text/image mix, end to end on a laptop CPU.

  python -m k15.main --config experiments/vision.py --workdir /tmp/k15_vis
  python -m k15.main --config experiments/vision.py --seeds 0,1,2 \
      --workdir /tmp/k15_vis_seeds
  python -m k15.main --config experiments/vision.py:runlocal --workdir /tmp/v

The mix (`k15/tasks/visual.py`): arithmetic chains mod 10 as text
(`arith`), the same questions drawn as images (`rendered`), counting the
shapes of one colour (`count`), which of two shapes is further left or
higher (`spatial`), and reading a bar chart (`chart`); one fifth each. A
6-pixel cell is one glyph or shape, and one patch of the tower.

Stages, as the report's appendix B.4 orders them: a character tokenizer ->
`sft`, the language-only warm-up on the text rows -> `tower`, the ViT and
projector trained on the image rows with the LM frozen -> `joint`, every
param on the mix (`joint.image_share` of each batch are image rows) ->
`rl`, vision-text joint RL on the mixed prompt set -> `control`, the joint
SFT continued for as many steps as RL took. Every stage is evaluated on the
held-out mix: pass@1 per task and per modality (`pass1_<task>`,
`pass1_text`, `pass1_image`); `pass1_arith` and `pass1_rendered` are the
same questions as text and as images.

As in `experiments/tiny.py`, the warm-up questions stop at level 3 (chains
of 2-3 steps, 1-2 shapes to count, 2-3 bars, few distractors) while RL and
the evaluation range over levels 2-6: imitation of the short traces does
not write longer chains of thought, and RL, rewarded on every level, can.
What the model must *see* is taught at every level, though: 512
perception rows per image task (`task.visual.captions`: a rendered chain
transcribed, a scene's shapes listed by colour, row and column, a chart's
bars by colour and height), none of them answering a question. Scenes are
3 x 3 cells, and the tower's position table starts at stddev 1.0
(`model.vision.pos_init`): at SigLIP's 0.02 the tower never learned where
a shape is (docs/vision.md has the probes).

Rendered questions get 1536 warm-up problems (`task.visual.rendered_sft`),
three times the others': with the even share the joint SFT of seed 1 did
not read the glyphs and RL lost to the control there.

Results (README, "The vision experiment"; seeds 0-2, 11 min 40 s for a
seed alone on 2 cores): image pass@1 joint SFT 0.336 -> RL 0.455, SFT
control 0.351; RL beats the control on every seed (+0.110, +0.112,
+0.090), and with the dots on Eigen (the second numerics setting) by
+0.117, +0.173, +0.208, in spatial and chart above all; text 0.46 ->
0.69. Count barely moves, and rendered questions do not share the text
gain on the default numerics (RL 0.34 vs 0.69 as text).

Variants: `runlocal` (a ~1 minute smoke run), `seed=N`, `prompts=DIR`:
the prompts from files instead (`task.name="jsonl"`: DIR/sft.jsonl,
rl.jsonl and eval.jsonl, rows with `image` fields; README, "Image rows in
prompt files"), e.g. the mix itself written out by
`visual.write_prompt_files`.
"""

from k15 import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0, prompts="")
  c = config_lib.ml_collections.ConfigDict()
  c.name = "vision"
  c.seed = arg.seed
  c.stages = ("sft", "tower", "joint", "rl", "control")

  cell = 6  # pixels per glyph / shape = the tower's patch
  c.task = dict(name="visual", min_steps=2, max_steps=6, ops="+-",
                max_operand=3, sft_max_steps=3, num_sft=2560,
                num_rl=10240, num_eval=500, seed=0,
                visual=dict(tasks=("arith", "rendered", "count", "spatial",
                                   "chart"), cell=cell, grid=3, wrap=0,
                            captions=512, rendered_sft=1536))
  c.tokenizer = dict(kind="sentencepiece", vocab_size=64, path="")
  # a chart is at most 3 x 6 cells, a rendered chain 1 x 13
  c.model = dict(vocab_size=0, num_layers=2, d_model=128, num_heads=4,
                 num_kv_heads=2, head_dim=32, mlp_dim=512, max_len=80,
                 attention="dense", emb_init_scale=0.02,
                 vision=dict(patch_size=cell, channels=3, max_patches=18,
                             width=64, num_layers=2, num_heads=2,
                             mlp_dim=128, pos_grid=16, pos_init=1.0,
                             projector="mlp"))
  c.sampler = dict(temperature=1.0, top_k=0, top_p=1.0)
  c.rollout = dict(k=8, prompts_per_iter=32, prompt_len=40, budget=32,
                   max_len=72, gen_rows=256, oversample=4)
  c.rl = dict(iterations=100, loss="mirror_descent", tau=0.1,
              baseline="mean", num_minibatches=4, epochs=1,
              reset_optimizer=True)
  c.length_penalty = dict(schedule="off", weight=0.0, warmup=0)
  c.reward = dict(kind="verifier", ckpt="", threshold=0.5)
  c.data = dict(strategy="uniform", balance=True)
  c.sft = dict(steps=300, batch_size=32, lr=1e-3, eps=1e-8, image_share=0.0)
  c.tower = dict(steps=150, batch_size=32, lr=1e-3, eps=1e-8)
  c.joint = dict(steps=1000, batch_size=32, lr=1e-3, eps=1e-8,
                 image_share=0.8)
  c.optim = dict(lr=3e-4, b1=0.9, b2=0.95, eps=3e-4, weight_decay=0.0,
                 grad_clip=1.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1)
  c.ckpt = dict(every=10, keep=3, async_save=True)
  c.eval = dict(num_samples=4, temperature=1.0, greedy=True)
  # eval.every > 0: RL also evaluates every N iterations (held-out curves)
  c.eval.update(every=0, every_problems=64)

  if arg.prompts:  # the same stages on prompt files with image rows
    c.task = dict(name="jsonl", data_dir=arg.prompts,
                  sft_files=("sft.jsonl",), rl_files=("rl.jsonl",),
                  eval_files=("eval.jsonl",), default_kind="exact")
  if arg.runlocal:
    if not arg.prompts:
      c.task.update(num_sft=160, num_rl=320, num_eval=40)
      c.task.visual.update(captions=8, rendered_sft=96)
    c.model.update(d_model=64, mlp_dim=128, num_layers=1)
    c.model.vision.update(width=32, num_layers=1, mlp_dim=64)
    c.rollout.update(k=4, prompts_per_iter=8, gen_rows=32, oversample=2)
    c.rl.update(iterations=3, num_minibatches=2)
    for stage in ("sft", "tower", "joint"):
      c[stage].update(steps=6, batch_size=8)
    c.ckpt.update(every=2)
    c.eval.update(num_samples=2)
  return c
