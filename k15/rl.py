"""The RL stage: the report's iterations (PAPER.md §1-4).

One iteration i: draw prompts (uniform / curriculum / prioritized), sample k
responses each from pi_theta_i with the jitted sampler, score them with the
task's verifier, shape rewards with the length penalty, form the mean-reward
baseline per prompt, take pi_theta_i's log-probs as the reference, reset the
optimizer, and take several minibatch steps of the mirror-descent loss.
`r` is the `pipeline.Run` holding the settings, tokenizer, mesh and writer.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from k15 import (
  curriculum,
  evaluate,
  faults,
  objective,
  pipeline,
  rollout,
  train,
)
from k15 import metrics as metrics_lib
from k15 import sampler as sampler_lib
from k15 import tokenizer as tokenizer_lib


def run_rl_stage(r, sft_state):
  """The report's RL iterations from the SFT weights."""
  s = r.s
  difficulty = np.array([p.difficulty for p in r.problems["rl"]])
  prompt_sampler = curriculum.PromptSampler(difficulty, s.data, s.seed)
  ck = r.checkpointer("rl")
  sampler_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                 for k, v in prompt_sampler.state_dict().items()}
  restored = pipeline._restore_or(r, "rl", ck, dict(sampler=sampler_abs))
  if restored is not None and restored[2].get("done"):
    ck.close()
    return
  if restored is None:
    # a copy: updates donate their input, and control starts from SFT too
    state = jax.tree.map(jnp.copy, pipeline._need_sft_state(r, sft_state))
    start, skips = 0, 0
  else:
    start, tree, host = restored
    state = tree["train"]
    prompt_sampler.load_state_dict(
        {k: np.asarray(v) for k, v in tree["sampler"].items()})
    skips = host.get("skips", 0)
  bar = metrics_lib.Progress(s.rl.iterations, "rl", initial=start)
  for it in range(start, s.rl.iterations):
    state, m, skips = rl_iteration(r, state, it, prompt_sampler, skips)
    r.writer.write("rl", it + 1, m)
    pipeline._check_skips("rl", it + 1, skips, s.rl.max_consecutive_skips,
                          ck)
    bar.update(1, acc=m["accuracy"], len=m["response_length"])
    pipeline._periodic_save(
        r, ck, "rl", it + 1, last=it + 1 == s.rl.iterations,
        every=s.ckpt.every, skips=skips,
        tree=dict(train=state, sampler=prompt_sampler.state_dict()))
  bar.close()
  faults.point("rl", s.rl.iterations, "eval")
  r.results["rl"] = r.evaluate(state.params, "rl")
  r.writer.write("eval", 0, {f"rl/{k}": v for k, v in
                             r.results["rl"].items()})
  pipeline._save(ck, s.rl.iterations, dict(train=state,
                                  sampler=prompt_sampler.state_dict()),
        pipeline._host_state("rl", s.rl.iterations, True, r))
  ck.close()


def rl_iteration(r, state, it: int, prompt_sampler, skips: int):
  """One iteration i: sample from pi_theta_i, score, k1.5 update.

  Returns (state, metrics, consecutive skipped updates).
  """
  s = r.s
  t_start = time.time()
  rng = r.rng("rl", it)
  P, K = s.rollout.prompts_per_iter, s.rollout.k
  idx = prompt_sampler.sample(it, P)
  problems = [r.problems["rl"][i] for i in idx]
  prompts = [r.tok.encode(tokenizer_lib.format_prompt(p.question))
             for p in problems]
  rows = [q for q in prompts for _ in range(K)]
  gens = rollout.generate(state.params, rows, rng, model=s.model,
                          sampling=r.sampling, gen=s.gen, pad_id=r.tok.pad_id,
                          shard_fn=r.shard)
  t_gen = time.time() - t_start
  faults.point("rl", it + 1, "rollout")
  answers = [p.answer for p in problems for _ in range(K)]
  correct_PxK = evaluate.score_responses(r.tok, gens, answers,
                                         r.task.verify).reshape(P, K)
  lengths_PxK = np.array([len(g.response) for g in gens],
                         np.float32).reshape(P, K)
  lp = s.length_penalty
  shaped_PxK = objective.shaped_rewards(
      correct_PxK, correct_PxK, lengths_PxK, iteration=it,
      schedule=lp.schedule, weight=lp.weight, warmup=lp.warmup, ramp=lp.ramp)
  adv_PxK = objective.advantages(shaped_PxK, correct_PxK, lengths_PxK,
                                 kind=s.rl.loss, baseline=s.rl.baseline,
                                 tau=s.rl.tau)
  # Score only as many response columns as the longest response needs
  # (rounded to 16: a handful of compiled shapes, no per-iteration retrace).
  P_len = s.rollout.prompt_len
  N = min(pipeline._round_up(max(int(lengths_PxK.max()), 1), 16),
          s.rollout.budget)
  batch = rollout.to_batch(rows, [g.response for g in gens],
                           prompt_len=P_len, response_len=N,
                           pad_id=r.tok.pad_id)
  batch["behaviour_logp_BxT"] = rollout.place_per_token(
      [g.logp for g in gens], prompt_len=P_len, T=P_len + N, rows=len(rows))
  batch["advantages_B"] = adv_PxK.reshape(-1)

  # pi_theta_i's log-probs are the reference of this iteration's problem.
  M = s.rl.num_minibatches
  mb = len(rows) // M
  ref = []
  for j in range(M):
    sl = slice(j * mb, (j + 1) * mb)
    ref.append(train.score(state.params, r.shard(batch["tokens_BxT"][sl]),
                           r.shard(batch["seg_BxT"][sl]), model=s.model))
  batch["ref_logp_BxT"] = np.concatenate(jax.device_get(ref))

  if s.rl.reset_optimizer:
    state = train.reset_optimizer(state, tx=r.tx)
  t_upd = time.time()
  order_rng = np.random.default_rng([s.seed, it, 7])
  step_metrics = []
  for _ in range(s.rl.epochs):
    perm = order_rng.permutation(len(rows))
    for j in range(M):
      sel = perm[j * mb:(j + 1) * mb]
      mbatch = {k: v[sel] for k, v in batch.items()}
      if faults.nan_at("rl", it + 1, j):
        mbatch["advantages_B"] = np.full_like(mbatch["advantages_B"], np.nan)
      state, m = train.update_step(state, r.shard(mbatch), model=s.model,
                                   tx=r.tx, loss_cfg=s.loss)
      faults.point("rl", it + 1, "update")
      step_metrics.append(m)
  step_metrics = jax.device_get(step_metrics)
  for m in step_metrics:
    skips = skips + 1 if m["skipped"] else 0
  t_end = time.time()
  prompt_sampler.update(idx, correct_PxK)

  gen_tokens = float(lengths_PxK.sum())
  status = np.array([g.status for g in gens])
  out = {k: float(np.mean([m[k] for m in step_metrics]))
         for k in step_metrics[0]}
  out.update(
      reward=float(shaped_PxK.mean()), accuracy=float(correct_PxK.mean()),
      response_length=float(lengths_PxK.mean()),
      response_length_p95=float(np.percentile(lengths_PxK, 95)),
      length_penalty_weight=objective.length_penalty_weight(
          it, schedule=lp.schedule, weight=lp.weight, warmup=lp.warmup,
          ramp=lp.ramp),
      frac_stopped=float(np.mean(status == sampler_lib.STOPPED)),
      frac_cut=float(np.mean((status == sampler_lib.BUDGET)
                             | (status == sampler_lib.MAX_LEN))),
      frac_repeat=float(np.mean(status == sampler_lib.REPEAT)),
      frac_zero_adv_groups=float(np.mean(np.all(adv_PxK == 0, axis=1))),
      gen_tokens_per_s=gen_tokens / max(t_gen, 1e-9),
      gen_time=t_gen, update_time=t_end - t_upd, step_time=t_end - t_start,
      **{f"sampler/{k}": v for k, v in prompt_sampler.metrics().items()})
  return state, out, skips
