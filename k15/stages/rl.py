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

Image prompts (vision-text joint RL): a prompt's images travel with every
sampler request of its group and with its training rows (`ctx.prompt`);
the prompt set mixes text and image problems as the task gives them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from k15 import curriculum, faults, objective, rollout, sharding, train, vision
from k15 import images as images_lib
from k15 import rewards as rewards_lib
from k15 import sampler as sampler_lib
from k15.stages import common, sft

SEED = 22  # the rng stream of the iterations' sampling
_LOSS_KEYS = (
  "tokens_BxT",
  "seg_BxT",
  "loss_mask_BxT",
  "sample_weight_B",
  "behaviour_logp_BxT",
  "ref_logp_BxT",
  "advantages_B",
  *vision.IMAGE_KEYS,
)


@dataclasses.dataclass(frozen=True)
class RLConfig(objective.LossConfig):
  """The `rl` section: the loss's fields (`objective.LossConfig`: loss,
  tau, baseline, ...) and the loop's."""

  iterations: int = 40
  num_minibatches: int = 4
  epochs: int = 1
  reset_optimizer: bool = True
  max_consecutive_skips: int = 5

  def __post_init__(self):
    super().__post_init__()
    if self.iterations < 0:
      raise ValueError(f"rl.iterations={self.iterations} must be >= 0")
    for name in ("num_minibatches", "epochs", "max_consecutive_skips"):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Carry:
  """The loop's state. The prompt sampler's statistics and the buffer of
  groups in flight are host objects that each iteration updates."""

  state: train.TrainState
  prompts: curriculum.PromptSampler
  buffer: rollout.RolloutBuffer


def minibatch_rows(s) -> int:
  """Rows of one update: all of an iteration's k x prompts_per_iter rows
  (padded when fewer groups finished), split into rl.num_minibatches."""
  return s.rollout.k * s.rollout.prompts_per_iter // s.rl.num_minibatches


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


def _prompt_sampler(ctx: common.Context) -> curriculum.PromptSampler:
  """Over the RL set: each problem's difficulty label, and for prompt
  files its mixing weight and curated pass rate (the prioritized
  sampler's prior)."""
  problems = ctx.problems["rl"]
  rates = [getattr(p, "pass_rate", None) for p in problems]
  return curriculum.PromptSampler(
    np.array([p.difficulty for p in problems]),
    ctx.s.data,
    ctx.s.seed,
    weight_N=np.array([getattr(p, "weight", 1.0) for p in problems]),
    prior_N=np.array([np.nan if r is None else r for r in rates]),
  )


def _abstract(ctx: common.Context) -> dict:
  return dict(
    sampler={
      k: jax.ShapeDtypeStruct(v.shape, v.dtype)
      for k, v in _prompt_sampler(ctx).state_dict().items()
    }
  )


def _carry(ctx: common.Context, state: train.TrainState) -> Carry:
  ro = ctx.s.rollout
  return Carry(
    state,
    _prompt_sampler(ctx),
    rollout.RolloutBuffer(ro.k, partial=ro.partial),
  )


def _start(ctx: common.Context, states) -> Carry:
  # a copy: updates donate their input, and control starts from SFT too
  return _carry(ctx, jax.tree.map(jnp.copy, states[sft.warmup(ctx.s)]))


def _resume(ctx: common.Context, tree: dict, host: dict) -> Carry:
  carry = _carry(ctx, tree["train"])
  carry.prompts.load_state_dict(
    {k: np.asarray(v) for k, v in tree["sampler"].items()}
  )
  if "buffer" in host:  # the groups in flight (partial rollouts)
    carry.buffer.load_state_dict(host["buffer"])
  return carry


def _save(carry: Carry) -> tuple[dict, dict]:
  tree = dict(train=carry.state, sampler=carry.prompts.state_dict())
  return tree, dict(buffer=carry.buffer.state_dict())


def _progress(m: dict) -> dict:
  return dict(acc=m["accuracy"], len=m["response_length"])


# ---------------------------------------------------------------------------
# Scoring: the one call into rewards/
# ---------------------------------------------------------------------------


def submit_scores(ctx, groups):
  """Starts scoring every member of `groups` (flat, in order): each row
  routed by its kind through the run's reward pool, or judged by
  config.reward's RM. Returns a Future of the `rewards.RewardBatch`: rule
  kinds (host processes: math-verify, sandboxes) score in the pool's
  thread while the caller dispatches device work; a reward model, which
  runs on the devices itself, scores before this returns."""
  trajs = [t for g in groups for t in g.members]
  problems = [ctx.problems["rl"][g.problem] for g in groups for _ in g.members]
  args = (
    [p.to_item() for p in problems],
    [ctx.tok.decode(t.response) for t in trajs],
    [t.status == sampler_lib.STOPPED for t in trajs],
  )
  judge = ctx.s.reward.judge
  if judge is None:
    return ctx.rewards.submit(*args)
  done = concurrent.futures.Future()
  done.set_result(rewards_lib.score(*args, pool=ctx.rewards, judge=judge))
  return done


# ---------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------


def iteration(ctx: common.Context, carry: Carry, it: int):
  """Iteration `it`: sample from pi_theta_i, score, k1.5 update.

  Returns (carry, metrics, skipped: one flag per optimizer update).
  """
  ro = ctx.s.rollout
  t_start = time.time()
  P, buffer = ro.prompts_per_iter, carry.buffer
  gen = ro.gen
  # dynamic sampling (rollout.oversample > 1): more groups than the update
  # takes; update() keeps P, those with a reward spread first
  n_new = max(ro.oversample * P - buffer.num_finished(), 0)
  idx, prompts = _new_prompts(ctx, it, n_new, carry.prompts)
  buffer.start(idx, prompts, it, [gen.max_response(len(q)) for q in prompts])
  todo, reqs = buffer.requests()
  reqs = [dataclasses.replace(q, images=ctx.prompt("rl", g.problem)[1])
          for (g, _), q in zip(todo, reqs, strict=True)]  # fmt: skip
  carried_in = sum(len(q.prefix) > 0 for q in reqs)
  gens = rollout.generate_segments(
    carry.state.params,
    reqs,
    ctx.rng(SEED, it),
    model=ctx.s.model,
    sampling=ctx.sampling,
    gen=gen,
    pad_id=ctx.tok.pad_id,
    shard_fn=ctx.shard,
  )
  buffer.record(todo, gens, it)
  t_gen = time.time() - t_start
  faults.point("rl", it + 1, "rollout")
  gen_tokens = float(sum(len(g.response) for g in gens))
  finished_now = sum(t.finished for _, t in todo)
  groups = buffer.pop_finished(ro.oversample * P)
  roll = dict(
    new_prompts=float(n_new),
    rows=float(len(reqs)),
    carried_in=float(carried_in),
    finished=float(finished_now),
    carried_over=float(len(reqs) - finished_now),
    gen_tokens=gen_tokens,
    groups_scored=float(len(groups)),
    groups_trained=float(min(len(groups), P)),  # see select_groups
    **buffer.metrics(it),
  )
  base = dict(
    gen_tokens_per_s=gen_tokens / max(t_gen, 1e-9),
    gen_time=t_gen,
    **{f"rollout/{k}": v for k, v in roll.items()},
  )
  if not groups:  # partial rollouts warming up: nothing finished yet
    nan = float("nan")
    m = dict(base, reward=nan, accuracy=nan, response_length=nan)
    return carry, dict(m, step_time=time.time() - t_start), ()
  state, out, skipped = update(ctx, carry, it, groups)
  carry.prompts.update([g.problem for g in groups], out.pop("_correct"))
  out.update(
    base,
    step_time=time.time() - t_start,
    **{f"sampler/{k}": v for k, v in carry.prompts.metrics().items()},
  )
  return dataclasses.replace(carry, state=state), out, skipped


def _new_prompts(ctx, it: int, n: int, prompt_sampler):
  idx = prompt_sampler.sample(it, n) if n else np.zeros(0, np.int64)
  return idx, [ctx.prompt("rl", int(i))[0] for i in idx]


def group_rewards(
  correct_GxK: np.ndarray,
  lengths_GxK: np.ndarray,
  status_GxK: np.ndarray,
  *,
  iteration: int,
  length_penalty: objective.LengthPenaltyConfig,
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


# ---------------------------------------------------------------------------
# The update on finished groups
# ---------------------------------------------------------------------------


class Scored(NamedTuple):
  """Finished groups' rewards (G x K) and what the update trains on."""

  correct_GxK: np.ndarray  # the reward system's 0/1
  lengths_GxK: np.ndarray
  status_GxK: np.ndarray
  shaped_GxK: np.ndarray  # + length and repeat penalties
  adv_GxK: np.ndarray
  keep: np.ndarray  # the (at most prompts_per_iter) groups trained on


def score_groups(ctx, it: int, groups, pending=None) -> tuple[Scored, dict]:
  """Rewards, shaping and advantages of every scored group; which to train
  on (dynamic sampling: those whose rewards differ first). `pending`: the
  Future of `submit_scores(ctx, groups)` when already started."""
  s, K, G = ctx.s, ctx.s.rollout.k, len(groups)
  t0 = time.time()
  scored_batch = (pending or submit_scores(ctx, groups)).result()
  correct, reward_metrics = scored_batch.scores, dict(scored_batch.metrics)
  reward_metrics["reward_wait_time"] = time.time() - t0
  trajs = [t for g in groups for t in g.members]
  lengths_GxK = np.array([len(t.response) for t in trajs], np.float32)
  status_GxK = np.array([t.status for t in trajs]).reshape(G, K)
  correct_GxK, lengths_GxK = correct.reshape(G, K), lengths_GxK.reshape(G, K)
  shaped_GxK = group_rewards(
    correct_GxK,
    lengths_GxK,
    status_GxK,
    iteration=it,
    length_penalty=s.length_penalty,
    repeat_penalty=s.rollout.repeat_penalty,
  )
  adv_GxK = objective.advantages(
    shaped_GxK,
    correct_GxK,
    lengths_GxK,
    kind=s.rl.loss,
    baseline=s.rl.baseline,
    tau=s.rl.tau,
  )
  keep = select_groups(
    np.ptp(shaped_GxK, axis=1) > 0, s.rollout.prompts_per_iter
  )
  scored = Scored(
    correct_GxK, lengths_GxK, status_GxK, shaped_GxK, adv_GxK, keep
  )
  return scored, reward_metrics


def update(ctx: common.Context, carry: Carry, it: int, groups):
  """Scores finished groups and takes the k1.5 update on them.

  Returns (state, metrics, skipped per minibatch update).
  """
  s, ro = ctx.s, ctx.s.rollout
  pending = submit_scores(ctx, groups)
  # With at most P groups every one is trained (no dynamic-sampling choice
  # waits on the rewards), so pi_theta_i's log-probs are dispatched to the
  # devices now and computed while the host scores; rewards only fill in
  # the advantages.
  early = None
  if len(groups) <= ro.prompts_per_iter:
    early = _layout(ctx, it, groups, np.zeros((len(groups), ro.k)))
    early_ref = dispatch_reference_logp(
      ctx, carry.state, early[0], len(groups) * ro.k
    )
  sc, reward_metrics = score_groups(ctx, it, groups, pending)
  # Reward and accuracy metrics cover every scored group; the update takes
  # at most P of them (dynamic sampling).
  trained = [groups[g] for g in sc.keep]
  n_real = len(trained) * ro.k
  adv = sc.adv_GxK[sc.keep]
  if early is not None:  # sc.keep is every group, in order
    batch, old_BxT = early
    batch["advantages_B"][:n_real] = adv.reshape(-1)
  else:
    batch, old_BxT = _layout(ctx, it, trained, adv)
    early_ref = dispatch_reference_logp(ctx, carry.state, batch, n_real)
  # pi_theta_i's log-probs of every token (older segments included) are
  # the reference of this iteration's problem.
  batch["ref_logp_BxT"] = np.concatenate(sharding.gather(early_ref))
  state = carry.state
  if s.rl.reset_optimizer:
    state = train.reset_optimizer(state, tx=ctx.tx)
  t_upd = time.time()
  state, step_metrics = minibatch_updates(ctx, state, it, batch, n_real)
  out = {
    k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]
  }
  t_upd = time.time() - t_upd
  out.update(_metrics(ctx, it, groups, trained, sc, batch, old_BxT, t_upd))
  out.update(reward_metrics)
  return state, out, tuple(bool(m["skipped"]) for m in step_metrics)


def _layout(ctx, it: int, trained, adv_GxK: np.ndarray):
  """(batch, old_BxT) of the trained groups (`rollout.training_batch`).
  Rows are laid out for P groups whatever their number (padding rows
  weigh 0), and responses take a few widths (rollout.response_len): no
  retrace per iteration."""
  ro = ctx.s.rollout
  longest = max(len(t.response) for g in trained for t in g.members)
  rows = ro.prompts_per_iter * ro.k
  batch, old_BxT = rollout.training_batch(
    trained,
    adv_GxK,
    iteration=it,
    prompt_len=ro.prompt_len,
    response_len=ro.response_len(longest),
    rows=rows,
    pad_id=ctx.tok.pad_id,
    loss_segments=ro.loss_segments,
  )
  n_real = len(trained) * ro.k
  imgs = images_lib.pack_or_none(
    [ctx.prompt("rl", g.problem)[1] for g in trained for _ in range(ro.k)]
    + [None] * (rows - n_real),
    ctx.s.model.vision,
  )
  batch.update(imgs or {})
  return batch, old_BxT


def reference_logp(ctx, state, batch: dict, n_real: int) -> np.ndarray:
  """Per-token log-probs of the batch under `state` (pi_theta_i), one
  minibatch at a time; rows past `n_real` (padding only) are zeros."""
  return np.concatenate(
    sharding.gather(dispatch_reference_logp(ctx, state, batch, n_real))
  )


def dispatch_reference_logp(ctx, state, batch: dict, n_real: int) -> list:
  """`reference_logp` without waiting: one array per minibatch (device
  arrays still computing; zeros for padding-only minibatches)."""
  mb = minibatch_rows(ctx.s)
  ref = []
  for j in range(ctx.s.rl.num_minibatches):
    sl = slice(j * mb, (j + 1) * mb)
    if j * mb >= n_real:  # padding rows only
      ref.append(np.zeros((mb,) + batch["tokens_BxT"].shape[1:], np.float32))
      continue
    imgs = vision.images_of(batch)
    ref.append(
      train.score(
        state.params,
        ctx.shard(batch["tokens_BxT"][sl]),
        ctx.shard(batch["seg_BxT"][sl]),
        model=ctx.s.model,
        images=None if imgs is None else ctx.shard(
          {k: v[sl] for k, v in imgs.items()}
        ),
      )
    )
  return ref


def minibatch_updates(ctx, state, it: int, batch: dict, n_real: int):
  """rl.epochs passes over the real rows in minibatches (a fixed order per
  iteration), each padded with padding rows to the minibatch size.
  Returns (state, per-update metrics)."""
  s = ctx.s
  mb = minibatch_rows(s)
  order_rng = np.random.default_rng([s.seed, it, 7])
  pad_rows = np.arange(n_real, len(batch["advantages_B"]))
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
        state, ctx.shard(mbatch), model=s.model, tx=ctx.tx, loss_cfg=s.rl
      )
      faults.point("rl", it + 1, "update")
      step_metrics.append(m)
  return state, sharding.gather(step_metrics)


def _metrics(ctx, it, groups, trained, sc: Scored, batch, old_BxT,
             update_time: float) -> dict:  # fmt: skip
  """What an iteration reports about its scored and trained groups."""
  ro, lp = ctx.s.rollout, ctx.s.length_penalty
  status = sc.status_GxK.reshape(-1)
  trajs = [t for g in groups for t in g.members]
  loss_tok, response_BxT = batch["loss_mask_BxT"], batch["response_BxT"]
  oldest = it
  if sc.lengths_GxK.max() > 0:
    oldest = min(int(t.version.min()) for t in trajs if len(t.version))
  cut = (status == sampler_lib.BUDGET) | (status == sampler_lib.MAX_LEN)
  repeat_GxK = sc.status_GxK == sampler_lib.REPEAT
  rollout_metrics = {
    "repeat_penalized": float(repeat_GxK.sum() * (ro.repeat_penalty > 0)),
    "off_policy_token_frac": float(
      (loss_tok & old_BxT).sum() / max(loss_tok.sum(), 1)
    ),
    "old_token_frac": float(old_BxT.sum() / max(response_BxT.sum(), 1)),
    "oldest_segment_age": float(it - oldest),
    "group_age": float(np.mean([it - g.born for g in trained])),
  }
  return dict(
    _correct=sc.correct_GxK,
    reward=float(sc.shaped_GxK.mean()),
    accuracy=float(sc.correct_GxK.mean()),
    response_length=float(sc.lengths_GxK.mean()),
    response_length_p95=float(np.percentile(sc.lengths_GxK, 95)),
    length_penalty_weight=objective.length_penalty_weight(
      it, schedule=lp.schedule, weight=lp.weight, warmup=lp.warmup, ramp=lp.ramp
    ),
    frac_stopped=float(np.mean(status == sampler_lib.STOPPED)),
    frac_cut=float(np.mean(cut)),
    frac_repeat=float(np.mean(status == sampler_lib.REPEAT)),
    frac_zero_adv_groups=float(np.mean(np.all(sc.adv_GxK == 0, axis=1))),
    frac_zero_adv_trained=float(
      np.mean(np.all(sc.adv_GxK[sc.keep] == 0, axis=1))
    ),
    update_time=update_time,
    **{f"rollout/{k}": v for k, v in rollout_metrics.items()},
  )


def step(ctx: common.Context, carry: Carry, it: int):
  """RL iteration `it`, then, every `eval.every` iterations, the held-out
  metrics of the updated policy on the first `eval.every_problems`
  problems as "heldout/<metric>" (curves over iterations). Before the
  first iteration the starting policy's are written as step 0, so a curve
  starts where RL does."""
  every = ctx.s.eval.every
  if every and it == 0:
    ctx.writer.write("rl", 0, _heldout(ctx, carry.state.params))
  carry, m, skipped = iteration(ctx, carry, it)
  if every and (it + 1) % every == 0:
    m = {**m, **_heldout(ctx, carry.state.params)}
  return carry, m, skipped


def _heldout(ctx: common.Context, params) -> dict[str, float]:
  t0 = time.time()
  held = ctx.evaluate(params, ctx.s.eval.every_problems)
  return {**{f"heldout/{k}": v for k, v in held.items()},
          "heldout/time": time.time() - t0}  # fmt: skip


STAGE = common.Stage(
  name="rl",
  needs=lambda s: (sft.warmup(s),),
  num_steps=lambda s: s.rl.iterations,
  save_every=lambda s: s.ckpt.every,
  start=_start,
  resume=_resume,
  step=step,
  save=_save,
  abstract=_abstract,
  progress=_progress,
)
