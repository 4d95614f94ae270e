"""The RL stage: the report's iterations (PAPER.md §1-4).

One iteration i: draw new prompts (uniform / curriculum / prioritized),
sample k responses each from pi_theta_i with the jitted sampler, at most
`rollout.budget` new tokens per trajectory, together with the unfinished
trajectories of earlier iterations (partial rollouts, `rollout.partial`);
take the groups whose k samples have all finished, score them with the
reward entry point, shape rewards with the length penalty and the repeat
penalty, form the mean-reward baseline per group, take pi_theta_i's
log-probs of every token as the reference, reset the optimizer, and take
several minibatch steps of the mirror-descent loss.

New prompts per iteration (partial rollouts on): `prompts_per_iter` minus
the finished groups still waiting from the previous iteration (the trainer
takes at most `prompts_per_iter` groups per iteration, oldest first). Groups
finish at the rate they start, so once the buffer has filled (about
max_len / budget iterations) about `prompts_per_iter` groups finish per
iteration, and a backlog of finished groups throttles new ones rather than
growing. With partial rollouts off every group finishes in the iteration it
starts, which is the plain loop.

Dynamic sampling (`rollout.oversample` = m > 1, not in the report): m times
as many groups are drawn and scored, and the update takes `prompts_per_iter`
of them, those whose k rewards differ first; the rest are dropped once their
success rates have reached the prompt sampler.

`r` is the `pipeline.Run` holding the settings, tokenizer, mesh and writer.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from k15 import (
  curriculum,
  faults,
  objective,
  pipeline,
  rollout,
  sharding,
  train,
)
from k15 import metrics as metrics_lib
from k15 import rewards as rewards_lib
from k15 import sampler as sampler_lib
from k15 import tokenizer as tokenizer_lib

_LOSS_KEYS = (
  "tokens_BxT",
  "seg_BxT",
  "loss_mask_BxT",
  "sample_weight_B",
  "behaviour_logp_BxT",
  "ref_logp_BxT",
  "advantages_B",
)


def run_rl_stage(r, sft_state):
  """The report's RL iterations from the SFT weights."""
  s = r.s
  difficulty = np.array([p.difficulty for p in r.problems["rl"]])
  prompt_sampler = curriculum.PromptSampler(difficulty, s.data, s.seed)
  buffer = rollout.RolloutBuffer(s.rollout.k, partial=s.rollout.partial)
  ck = r.checkpointer("rl")
  sampler_abs = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype)
    for k, v in prompt_sampler.state_dict().items()
  }
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
      {k: np.asarray(v) for k, v in tree["sampler"].items()}
    )
    skips = host.get("skips", 0)
    if "buffer" in host:  # the groups in flight (partial rollouts)
      buffer.load_state_dict(host["buffer"])
  bar = metrics_lib.Progress(s.rl.iterations, "rl", initial=start)
  for it in range(start, s.rl.iterations):
    state, m, skips = rl_iteration(r, state, it, prompt_sampler, skips, buffer)
    r.writer.write("rl", it + 1, m)
    pipeline._check_skips("rl", it + 1, skips, s.rl.max_consecutive_skips, ck)
    bar.update(1, acc=m["accuracy"], len=m["response_length"])
    pipeline._periodic_save(
      r,
      ck,
      "rl",
      it + 1,
      last=it + 1 == s.rl.iterations,
      every=s.ckpt.every,
      skips=skips,
      buffer=buffer.state_dict(),
      tree=dict(train=state, sampler=prompt_sampler.state_dict()),
    )
  bar.close()
  faults.point("rl", s.rl.iterations, "eval")
  r.results["rl"] = r.evaluate(state.params, "rl")
  r.writer.write("eval", 0, {f"rl/{k}": v for k, v in r.results["rl"].items()})
  pipeline._save(
    ck,
    s.rl.iterations,
    dict(train=state, sampler=prompt_sampler.state_dict()),
    pipeline._host_state(
      "rl", s.rl.iterations, True, r, buffer=buffer.state_dict()
    ),
  )
  ck.close()


def _response_len(longest: int, budget: int, cap: int) -> int:
  """Columns of the training rows: a few compiled shapes, no retrace per
  iteration (multiples of 16 up to the budget, of the budget beyond)."""
  if longest <= budget:
    return min(pipeline._round_up(max(longest, 1), 16), budget)
  return min(pipeline._round_up(longest, budget), cap)


def _new_prompts(r, it: int, n: int, prompt_sampler):
  idx = prompt_sampler.sample(it, n) if n else np.zeros(0, np.int64)
  prompts = [
    r.tok.encode(tokenizer_lib.format_prompt(r.problems["rl"][i].question))
    for i in idx
  ]
  return idx, prompts


def rl_iteration(
  r,
  state,
  it: int,
  prompt_sampler,
  skips: int,
  buffer: rollout.RolloutBuffer | None = None,
):
  """One iteration i: sample from pi_theta_i, score, k1.5 update.

  `buffer` holds the groups in flight across iterations (a fresh one, i.e.
  no partial rollouts carried in, when None). Returns (state, metrics,
  consecutive skipped updates).
  """
  s = r.s
  ro = s.rollout
  t_start = time.time()
  rng = r.rng("rl", it)
  P, K = ro.prompts_per_iter, ro.k
  if buffer is None:
    buffer = rollout.RolloutBuffer(K, partial=ro.partial)
  gen = s.gen
  # dynamic sampling (rollout.oversample > 1): more groups than the update
  # takes; _train_on keeps P, those with a reward spread first
  n_new = max(ro.oversample * P - buffer.num_finished(), 0)
  idx, prompts = _new_prompts(r, it, n_new, prompt_sampler)
  buffer.start(idx, prompts, it, [gen.max_response(len(q)) for q in prompts])
  todo, reqs = buffer.requests()
  carried_in = sum(len(q.prefix) > 0 for q in reqs)
  gens = rollout.generate_segments(
    state.params,
    reqs,
    rng,
    model=s.model,
    sampling=r.sampling,
    gen=gen,
    pad_id=r.tok.pad_id,
    shard_fn=r.shard,
  )
  buffer.record(todo, gens, it)
  t_gen = time.time() - t_start
  faults.point("rl", it + 1, "rollout")
  gen_tokens = float(sum(len(g.response) for g in gens))
  finished_now = sum(t.finished for _, t in todo)
  roll = dict(
    new_prompts=float(n_new),
    rows=float(len(reqs)),
    carried_in=float(carried_in),
    finished=float(finished_now),
    carried_over=float(len(reqs) - finished_now),
    gen_tokens=gen_tokens,
  )

  groups = buffer.pop_finished(ro.oversample * P)
  roll.update(
    groups_scored=float(len(groups)),
    groups_trained=float(min(len(groups), P)),  # see select_groups
    **buffer.metrics(it),
  )
  roll = {f"rollout/{k}": v for k, v in roll.items()}
  base = dict(
    gen_tokens_per_s=gen_tokens / max(t_gen, 1e-9), gen_time=t_gen, **roll
  )
  if not groups:  # partial rollouts warming up: nothing finished yet
    nan = float("nan")
    return (
      state,
      dict(
        base,
        reward=nan,
        accuracy=nan,
        response_length=nan,
        step_time=time.time() - t_start,
      ),
      skips,
    )
  state, out, skips = _train_on(r, state, it, groups, skips)
  prompt_sampler.update([g.problem for g in groups], out.pop("_correct"))
  out.update(
    base,
    step_time=time.time() - t_start,
    **{f"sampler/{k}": v for k, v in prompt_sampler.metrics().items()},
  )
  return state, out, skips


def group_rewards(
  correct_GxK: np.ndarray,
  lengths_GxK: np.ndarray,
  status_GxK: np.ndarray,
  *,
  iteration: int,
  length_penalty,
  repeat_penalty: float,
) -> np.ndarray:
  """The reward the baseline and advantages see (G x K float32): the
  verifier's 0/1, plus the length reward after its warm-up, minus
  `repeat_penalty` for a trajectory stopped as a repeat."""
  lp = length_penalty
  shaped_GxK = objective.shaped_rewards(
    correct_GxK,
    correct_GxK,
    lengths_GxK,
    iteration=iteration,
    schedule=lp.schedule,
    weight=lp.weight,
    warmup=lp.warmup,
    ramp=lp.ramp,
  )
  repeat_GxK = np.asarray(status_GxK) == sampler_lib.REPEAT
  return shaped_GxK - np.float32(repeat_penalty) * repeat_GxK


def select_groups(spread_G: np.ndarray, max_groups: int) -> np.ndarray:
  """Indices of at most `max_groups` groups to train on, in their order:
  every group with a reward spread (`spread_G`) before any without, and
  among each kind the earlier (older) first."""
  spread_G = np.asarray(spread_G, bool)
  order = np.argsort(~spread_G, kind="stable")[:max_groups]
  return np.sort(order)


def _train_on(r, state, it: int, groups: list[rollout.Group], skips: int):
  """Scores finished groups and takes the k1.5 update on them."""
  s = r.s
  ro = s.rollout
  P, K, G = ro.prompts_per_iter, ro.k, len(groups)
  trajs = [t for g in groups for t in g.members]
  # routed by each problem's kind, or judged by config.reward's RM
  problems = [r.problems["rl"][g.problem] for g in groups for _ in range(K)]
  scored = rewards_lib.score(
    [p.to_item() for p in problems],
    [r.tok.decode(t.response) for t in trajs],
    [t.status == sampler_lib.STOPPED for t in trajs],
    pool=r.rewards,
    judge=s.reward.judge,
  )
  correct, reward_metrics = scored.scores, scored.metrics
  correct_GxK = correct.reshape(G, K)
  lengths_GxK = np.array([len(t.response) for t in trajs], np.float32).reshape(
    G, K
  )
  status_GxK = np.array([t.status for t in trajs]).reshape(G, K)
  lp = s.length_penalty
  shaped_GxK = group_rewards(
    correct_GxK,
    lengths_GxK,
    status_GxK,
    iteration=it,
    length_penalty=lp,
    repeat_penalty=ro.repeat_penalty,
  )
  repeat_GxK = status_GxK == sampler_lib.REPEAT
  adv_GxK = objective.advantages(
    shaped_GxK,
    correct_GxK,
    lengths_GxK,
    kind=s.rl.loss,
    baseline=s.rl.baseline,
    tau=s.rl.tau,
  )
  # Reward and accuracy metrics cover every scored group; the update takes
  # at most P of them, those whose rewards differ first (dynamic sampling).
  spread_G = np.ptp(shaped_GxK, axis=1) > 0
  keep = select_groups(spread_G, P)
  groups = [groups[g] for g in keep]
  train_adv_GxK = adv_GxK[keep]
  G = len(groups)
  # Rows are laid out for P groups whatever G is (padding rows weigh 0),
  # and responses take a few column counts: no retrace per iteration.
  rows = P * K
  N = _response_len(
    int(lengths_GxK[keep].max()), ro.budget, ro.max_len - ro.prompt_len
  )
  batch, old_BxT = rollout.training_batch(
    groups,
    train_adv_GxK,
    iteration=it,
    prompt_len=ro.prompt_len,
    response_len=N,
    rows=rows,
    pad_id=r.tok.pad_id,
    loss_segments=ro.loss_segments,
  )
  response_BxT = batch["response_BxT"]
  T = ro.prompt_len + N

  # pi_theta_i's log-probs of every token (older segments included) are
  # the reference of this iteration's problem.
  M = s.rl.num_minibatches
  mb = rows // M
  n_real = G * K
  ref = []
  for j in range(M):
    sl = slice(j * mb, (j + 1) * mb)
    if j * mb >= n_real:  # padding rows only
      ref.append(np.zeros((mb, T), np.float32))
      continue
    ref.append(
      train.score(
        state.params,
        r.shard(batch["tokens_BxT"][sl]),
        r.shard(batch["seg_BxT"][sl]),
        model=s.model,
      )
    )
  batch["ref_logp_BxT"] = np.concatenate(sharding.gather(ref))

  if s.rl.reset_optimizer:
    state = train.reset_optimizer(state, tx=r.tx)
  t_upd = time.time()
  order_rng = np.random.default_rng([s.seed, it, 7])
  pad_rows = np.arange(n_real, rows)
  step_metrics = []
  for _ in range(s.rl.epochs):
    perm = order_rng.permutation(n_real)
    for j in range(-(-n_real // mb)):
      sel = perm[j * mb : (j + 1) * mb]
      sel = np.concatenate([sel, pad_rows[: mb - len(sel)]])
      mbatch = {k: v[sel] for k, v in batch.items() if k in _LOSS_KEYS}
      if faults.nan_at("rl", it + 1, j):
        mbatch["advantages_B"] = np.full_like(mbatch["advantages_B"], np.nan)
      state, m = train.update_step(
        state, r.shard(mbatch), model=s.model, tx=r.tx, loss_cfg=s.loss
      )
      faults.point("rl", it + 1, "update")
      step_metrics.append(m)
  step_metrics = sharding.gather(step_metrics)
  for m in step_metrics:
    skips = skips + 1 if m["skipped"] else 0
  t_end = time.time()

  status = status_GxK.reshape(-1)
  loss_tok = batch["loss_mask_BxT"]
  oldest = (
    min(int(t.version.min()) for t in trajs if len(t.version))
    if (lengths_GxK.max() > 0)
    else it
  )
  out = {
    k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]
  }
  out.update(
    _correct=correct_GxK,
    reward=float(shaped_GxK.mean()),
    accuracy=float(correct_GxK.mean()),
    response_length=float(lengths_GxK.mean()),
    response_length_p95=float(np.percentile(lengths_GxK, 95)),
    length_penalty_weight=objective.length_penalty_weight(
      it, schedule=lp.schedule, weight=lp.weight, warmup=lp.warmup, ramp=lp.ramp
    ),
    frac_stopped=float(np.mean(status == sampler_lib.STOPPED)),
    frac_cut=float(
      np.mean((status == sampler_lib.BUDGET) | (status == sampler_lib.MAX_LEN))
    ),
    frac_repeat=float(np.mean(status == sampler_lib.REPEAT)),
    frac_zero_adv_groups=float(np.mean(np.all(adv_GxK == 0, axis=1))),
    frac_zero_adv_trained=float(np.mean(np.all(train_adv_GxK == 0, axis=1))),
    update_time=t_end - t_upd,
    **{
      "rollout/repeat_penalized": float(
        repeat_GxK.sum() * (ro.repeat_penalty > 0)
      ),
      "rollout/off_policy_token_frac": float(
        (loss_tok & old_BxT).sum() / max(loss_tok.sum(), 1)
      ),
      "rollout/old_token_frac": float(
        old_BxT.sum() / max(response_BxT.sum(), 1)
      ),
      "rollout/oldest_segment_age": float(it - oldest),
      "rollout/group_age": float(np.mean([it - g.born for g in groups])),
    },
    **reward_metrics,
  )
  return state, out, skips
