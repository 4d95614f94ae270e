"""Policy-optimisation objectives of k1.5 and the baselines it is compared to.

The report's method is online policy mirror descent (PAPER.md §1.2-1.3): at
iteration i the policy pi_theta_i that sampled the rollouts is the reference,
and several gradient steps minimise a squared surrogate whose gradient is
(minus) the report's Eq. 3,

  (1/k) sum_j [ grad log pi(y_j|x) (r_j - rbar) - tau/2 grad rho_j^2 ],
  rho_j = log pi_theta(y_j|x) - log pi_theta_i(y_j|x)   (sequence level).

Baselines for the report's ablations share the interface: plain REINFORCE
with a group-mean baseline, ReST (a supervised step on the best correct sample
of each prompt, no negative gradients) and GRPO (PPO-clipped token ratios with
group-normalised advantages, optional k3 KL).

Long2short's DPO (PAPER.md §6) has its own config (`DPOConfig`), pair rule
(`dpo_pairs`) and loss (`dpo_loss`): preferences between a model's own
samples, against the frozen starting model.

Two halves:
- host side (numpy): `advantages`, the length reward of PAPER.md §2 and its
  schedule, `shaped_rewards`, `dpo_pairs`. Inputs are P x K (prompts x
  samples per prompt).
- device side (jnp, jittable with `cfg` static): `loss`, `dpo_loss`. Inputs
  are B x T (rows x token positions); B is any flattening of P x K,
  possibly padded.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("mirror_descent", "reinforce", "rest", "grpo")
BASELINES = ("mean", "logmeanexp")
SCHEDULES = ("off", "constant", "linear")
_GRPO_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The loss fields of the `rl` section (static: jitted code takes it by
  keyword; `stages.rl.RLConfig` adds the loop's fields to it).

  loss: "mirror_descent" (the report) | "reinforce" | "rest" | "grpo".
  tau: the KL / l2 coefficient of mirror descent (report Eq. 2-3), and the
    temperature of the logmeanexp baseline.
  baseline: "mean" (the report) | "logmeanexp" (see `advantages`).
  normalize_length: sequence log-prob is the sum over response tokens (False,
    the report's Eq. 3) or their mean (True, length-normalised ablation).
  clip_eps: PPO ratio clip for "grpo".
  kl_coef: weight of the k3 KL estimator against `ref_logp` for "grpo".
  """

  loss: str = "mirror_descent"
  tau: float = 0.1
  baseline: str = "mean"
  normalize_length: bool = False
  clip_eps: float = 0.2
  kl_coef: float = 0.0

  def __post_init__(self):
    if self.loss not in KINDS:
      raise ValueError(f"rl.loss={self.loss!r}; expected one of {KINDS}")
    if not self.tau > 0:
      raise ValueError(f"rl.tau={self.tau!r}; must be > 0")
    if self.baseline not in BASELINES:
      raise ValueError(
        f"rl.baseline={self.baseline!r}; expected one of {BASELINES}"
      )
    if not self.clip_eps >= 0:
      raise ValueError(f"rl.clip_eps={self.clip_eps!r}; must be >= 0")
    if not self.kl_coef >= 0:
      raise ValueError(f"rl.kl_coef={self.kl_coef!r}; must be >= 0")


@dataclasses.dataclass(frozen=True)
class LengthPenaltyConfig:
  """The `length_penalty` section: the schedule of `length_penalty_weight`."""

  schedule: str = "off"  # off | constant | linear
  weight: float = 0.0
  warmup: int = 0
  ramp: int = 0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(
        f"length_penalty.schedule={self.schedule!r}; expected one of "
        f"{SCHEDULES}"
      )


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """DPO's loss and pair rule (static: jitted code takes it by keyword; the
  `dpo` section, `stages.dpo.DPOStageConfig`, adds the stage's fields).

  beta: the DPO temperature; the implicit reward of a response is beta *
    (its sequence log-prob - the reference's).
  ratio: a correct response at least `ratio` times as long as the positive
    is a negative (the report: "1.5 times longer").
  """

  beta: float = 0.1
  ratio: float = 1.5

  def __post_init__(self):
    if not self.beta > 0:
      raise ValueError(f"dpo.beta={self.beta!r}; must be > 0")
    if not self.ratio >= 1:
      raise ValueError(f"dpo.ratio={self.ratio!r}; must be >= 1")


# ----------------------------------------------------------------------------
# Host side: advantages and the length penalty (numpy, P x K).
# ----------------------------------------------------------------------------


def logmeanexp_baseline(rewards_PxK: np.ndarray, tau: float) -> np.ndarray:
  """tau * log mean_j exp(r_j / tau) per prompt -> P; the report's estimate
  of tau log Z (PAPER.md §1.2). Shifted by the max so large 1/tau is stable;
  tends to the mean reward as tau -> inf and to the max as tau -> 0."""
  r_PxK = np.asarray(rewards_PxK, np.float64)
  m_P = r_PxK.max(axis=1)
  z_PxK = np.exp((r_PxK - m_P[:, None]) / tau)
  return m_P + tau * np.log(z_PxK.mean(axis=1))


def advantages(
  rewards_PxK: np.ndarray,
  correct_PxK: np.ndarray,
  lengths_PxK: np.ndarray,
  *,
  kind: str,
  baseline: str = "mean",
  tau: float = 0.1,
) -> np.ndarray:
  """Per-sample advantages (P x K float32) for `loss`'s `advantages_B`.

  mirror_descent / reinforce: r - b with b the per-prompt mean reward (the
    report's choice) or, for baseline="logmeanexp", tau log mean exp(r/tau).
  grpo: (r - mean) / (std + 1e-6), std over the prompt's K samples (ddof 0).
  rest: 1 on the best correct sample of each prompt (highest reward, ties
    broken by the shortest length, then the first), 0 elsewhere; prompts
    without a correct sample contribute nothing.
  `rewards_PxK` are the (possibly length-shaped) rewards; `correct_PxK` the
  verifier's 0/1 outcome; `lengths_PxK` response lengths in tokens.
  """
  r_PxK = np.asarray(rewards_PxK, np.float64)
  if r_PxK.ndim != 2:
    raise ValueError(f"rewards must be P x K, got shape {r_PxK.shape}")
  if kind in ("mirror_descent", "reinforce"):
    if baseline == "mean":
      b_P = r_PxK.mean(axis=1)
    elif baseline == "logmeanexp":
      b_P = logmeanexp_baseline(r_PxK, tau)
    else:
      raise ValueError(f"baseline={baseline!r}; expected one of {BASELINES}")
    return (r_PxK - b_P[:, None]).astype(np.float32)
  if kind == "grpo":
    mean_P, std_P = r_PxK.mean(axis=1), r_PxK.std(axis=1)
    return ((r_PxK - mean_P[:, None]) / (std_P[:, None] + _GRPO_EPS)).astype(
      np.float32
    )
  if kind == "rest":
    correct_PxK = np.asarray(correct_PxK).astype(bool)
    len_PxK = np.asarray(lengths_PxK, np.float64)
    w_PxK = np.zeros(r_PxK.shape, np.float32)
    for p in range(r_PxK.shape[0]):
      (idx,) = np.nonzero(correct_PxK[p])
      if idx.size == 0:
        continue
      # lexsort: last key is primary -> max reward, then min length, then idx.
      order = np.lexsort((idx, len_PxK[p, idx], -r_PxK[p, idx]))
      w_PxK[p, idx[order[0]]] = 1.0
    return w_PxK
  raise ValueError(f"kind={kind!r}; expected one of {KINDS}")


def length_reward(
  lengths_PxK: np.ndarray, correct_PxK: np.ndarray
) -> np.ndarray:
  """The report's length reward (PAPER.md §2), per prompt over its K samples.

  lambda = 0.5 - (len - min_len) / (max_len - min_len); a correct sample gets
  lambda, a wrong one min(0, lambda); all zeros for a prompt whose lengths are
  all equal (which includes K = 1). Returns P x K float32.
  """
  len_PxK = np.asarray(lengths_PxK, np.float64)
  correct_PxK = np.asarray(correct_PxK).astype(bool)
  if len_PxK.ndim != 2 or correct_PxK.shape != len_PxK.shape:
    raise ValueError(
      f"lengths {len_PxK.shape} and correct {correct_PxK.shape} must be the "
      "same P x K shape"
    )
  lo_P, hi_P = len_PxK.min(axis=1), len_PxK.max(axis=1)
  span_P = hi_P - lo_P
  safe_P = np.where(span_P > 0, span_P, 1.0)
  lam_PxK = 0.5 - (len_PxK - lo_P[:, None]) / safe_P[:, None]
  out_PxK = np.where(correct_PxK, lam_PxK, np.minimum(0.0, lam_PxK))
  out_PxK = np.where(span_P[:, None] > 0, out_PxK, 0.0)
  return out_PxK.astype(np.float32)


def length_penalty_weight(
  iteration: int,
  *,
  schedule: str,
  weight: float,
  warmup: int,
  ramp: int = 0,
) -> float:
  """Weight of the length reward at RL `iteration` (0-based).

  "off": always 0. "constant" (the report: plain RL first, then a constant
  penalty): 0 for iteration < warmup, `weight` from iteration == warmup on.
  "linear": 0 before warmup, then weight * min(1, (iteration - warmup + 1) /
  ramp), so it is already non-zero at iteration == warmup and reaches
  `weight` at warmup + ramp - 1; ramp <= 1 is the constant schedule.
  """
  if schedule == "off":
    return 0.0
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; expected one of {SCHEDULES}")
  if iteration < warmup:
    return 0.0
  if schedule == "constant" or ramp <= 1:
    return float(weight)
  return float(weight) * min(1.0, (iteration - warmup + 1) / ramp)


def shaped_rewards(
  rewards_PxK: np.ndarray,
  correct_PxK: np.ndarray,
  lengths_PxK: np.ndarray,
  *,
  iteration: int,
  schedule: str,
  weight: float,
  warmup: int,
  ramp: int = 0,
) -> np.ndarray:
  """r + w(iteration) * length_reward: the reward the baseline and the
  advantages are computed from (PAPER.md §1.3). P x K float32."""
  w = length_penalty_weight(
    iteration, schedule=schedule, weight=weight, warmup=warmup, ramp=ramp
  )
  r_PxK = np.asarray(rewards_PxK, np.float32)
  if w == 0.0:
    return r_PxK.copy()
  return r_PxK + np.float32(w) * length_reward(lengths_PxK, correct_PxK)


def dpo_pairs(
  correct_K: np.ndarray, lengths_K: np.ndarray, *, ratio: float
) -> list[tuple[int, int]]:
  """Long2short DPO's (positive, negative) pairs among one prompt's K
  samples (PAPER.md §6), as sample indices.

  The positive is the shortest correct sample (the first drawn among
  equally short ones). The negatives are the longer samples: every wrong
  one strictly longer than the positive, and every correct one at least
  `ratio` times its length. A wrong sample no longer than the positive, and
  a correct one under `ratio` times its length (other shortest ones
  included), pair with nothing; a prompt with no correct sample gives [].
  """
  correct_K = np.asarray(correct_K).astype(bool)
  len_K = np.asarray(lengths_K, np.float64)
  if correct_K.shape != len_K.shape or correct_K.ndim != 1:
    raise ValueError(
      f"correct {correct_K.shape} and lengths {len_K.shape} must be [K]"
    )
  (idx,) = np.nonzero(correct_K)
  if idx.size == 0:
    return []
  pos = int(idx[np.argmin(len_K[idx])])
  neg = np.nonzero(
    np.where(correct_K, len_K >= ratio * len_K[pos], len_K > len_K[pos])
  )[0]
  return [(pos, int(j)) for j in neg if j != pos]


# ----------------------------------------------------------------------------
# Device side: the losses (jnp, B x T).
# ----------------------------------------------------------------------------


def _masked_sum(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  # where, not multiply: padding positions may hold -inf / nan log-probs.
  return jnp.where(mask_BxT, x_BxT, 0.0).sum(axis=-1)


def loss(
  logp_BxT: jax.Array, batch: dict, *, cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar loss and metrics for one (mini)batch of B response rows.

  logp_BxT: current policy's log-probs of the sampled tokens (temperature 1).
  batch:
    loss_mask_BxT: which response tokens enter the loss (bool or 0/1).
    ref_logp_BxT: log-probs of pi_theta_i, the iteration's reference.
    behaviour_logp_BxT: log-probs of the policy that sampled each token (only
      "grpo" reads it; mirror descent is off-policy by construction).
    advantages_B: from `advantages`, flattened; a constant here.
    sample_weight_B (optional): 0 for padding rows, default 1.

  Sequence log-prob s_b = sum of masked token log-probs (mean over them when
  cfg.normalize_length); rho_b = s_b(logp) - s_b(ref_logp).

  mirror_descent, form (a) of PAPER.md §1.3: l_b = (A_b - tau rho_b)^2 /
    (2 tau), whose gradient -(A_b - tau rho_b) grad rho_b equals
    -[A_b grad log pi - tau/2 grad rho_b^2], i.e. minus the summand of Eq. 3.
  reinforce: l_b = -A_b s_b.
  For both, loss = sum_b w_b l_b / sum_b w_b (mean over the real samples;
  with K samples per prompt this is the mean over prompts of Eq. 3's 1/k sum).
  rest: loss = -sum_b w_b A_b s_b / #{b: w_b A_b > 0}; A is the 0/1 selection
    of `advantages(kind="rest")`, so this is the mean NLL of the selected
    samples (0 if none).
  grpo: per token -min(ratio A, clip(ratio, 1 +- eps) A) + kl_coef * k3 with
    ratio = exp(logp - behaviour_logp), k3 = exp(ref - logp) - (ref - logp) -
    1; averaged over a row's masked tokens, then over real rows (GRPO's
    sequence-mean of token means); normalize_length only changes its rho
    metrics.
  Padding rows (w_b = 0) are masked out entirely, so they may hold junk.
  Metrics: loss, rho_abs (mean |rho|), rho_sq (mean rho^2, a KL proxy),
  advantage (mean A), entropy_proxy (-mean masked token logp), token_frac
  (masked tokens / (real rows * T)); plus selected (rest), clip_frac (grpo).
  """
  ref_BxT = batch["ref_logp_BxT"]
  adv_B = jax.lax.stop_gradient(batch["advantages_B"].astype(jnp.float32))
  w_B = batch.get("sample_weight_B")
  w_B = jnp.ones(adv_B.shape, jnp.float32) if w_B is None else w_B
  w_B = w_B.astype(jnp.float32)
  # Padding rows may hold anything (even -inf): mask them out entirely.
  mask_BxT = batch["loss_mask_BxT"].astype(bool) & (w_B > 0)[:, None]
  # where, not multiply: 0 * nan is nan, so junk advantages must go too.
  adv_B = jnp.where(w_B > 0, adv_B, 0.0)
  n_real = jnp.maximum(w_B.sum(), 1.0)
  wmean = lambda x_B: (w_B * x_B).sum() / n_real

  ntok_B = mask_BxT.sum(axis=-1).astype(jnp.float32)
  seq_logp_B = _masked_sum(logp_BxT, mask_BxT)
  seq_ref_B = _masked_sum(ref_BxT, mask_BxT)
  if cfg.normalize_length:
    seq_logp_B = seq_logp_B / jnp.maximum(ntok_B, 1.0)
    seq_ref_B = seq_ref_B / jnp.maximum(ntok_B, 1.0)
  rho_B = seq_logp_B - jax.lax.stop_gradient(seq_ref_B)

  metrics = {}
  if cfg.loss == "mirror_descent":
    l_B = (adv_B - cfg.tau * rho_B) ** 2 / (2.0 * cfg.tau)
    value = wmean(l_B)
  elif cfg.loss == "reinforce":
    value = wmean(-adv_B * seq_logp_B)
  elif cfg.loss == "rest":
    sel_B = w_B * jnp.maximum(adv_B, 0.0)  # never a negative gradient
    n_sel = (sel_B > 0).sum().astype(jnp.float32)
    value = -(sel_B * seq_logp_B).sum() / jnp.maximum(n_sel, 1.0)
    metrics["selected"] = n_sel
  elif cfg.loss == "grpo":
    beh_BxT = jax.lax.stop_gradient(batch["behaviour_logp_BxT"])
    ref_sg_BxT = jax.lax.stop_gradient(ref_BxT)
    diff_BxT = jnp.where(mask_BxT, logp_BxT - beh_BxT, 0.0)
    ratio_BxT = jnp.exp(diff_BxT)
    a_Bx1 = adv_B[:, None]
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    tok_BxT = -jnp.minimum(ratio_BxT * a_Bx1, clipped_BxT * a_Bx1)
    if cfg.kl_coef > 0:
      d_BxT = jnp.where(mask_BxT, ref_sg_BxT - logp_BxT, 0.0)
      tok_BxT = tok_BxT + cfg.kl_coef * (jnp.exp(d_BxT) - d_BxT - 1.0)
    per_seq_B = _masked_sum(tok_BxT, mask_BxT) / jnp.maximum(ntok_B, 1.0)
    value = wmean(per_seq_B)
    clipped_tok = jnp.where(mask_BxT, jnp.abs(ratio_BxT - 1) > cfg.clip_eps, 0)
    metrics["clip_frac"] = (w_B[:, None] * clipped_tok).sum() / jnp.maximum(
      (w_B[:, None] * mask_BxT).sum(), 1.0
    )
  else:
    raise ValueError(f"rl.loss={cfg.loss!r}; expected one of {KINDS}")

  rho_sg_B = jax.lax.stop_gradient(rho_B)
  tok_w_BxT = w_B[:, None] * mask_BxT
  n_tok = jnp.maximum(tok_w_BxT.sum(), 1.0)
  T = mask_BxT.shape[-1]
  metrics.update(
    loss=value,
    rho_abs=wmean(jnp.abs(rho_sg_B)),
    rho_sq=wmean(rho_sg_B**2),
    advantage=wmean(adv_B),
    entropy_proxy=-(
      jnp.where(mask_BxT, jax.lax.stop_gradient(logp_BxT), 0.0) * w_B[:, None]
    ).sum()
    / n_tok,
    token_frac=tok_w_BxT.sum() / jnp.maximum(n_real * T, 1.0),
  )
  return value, metrics


def dpo_loss(
  logp_BxT: jax.Array, batch: dict, *, cfg: DPOConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The DPO loss of P pairs laid out as B = 2P rows: row 2p holds pair
  p's positive (chosen), row 2p + 1 its negative (rejected).

  logp_BxT: the policy's log-probs of the rows' tokens.
  batch:
    loss_mask_BxT: the response tokens.
    ref_logp_B: the frozen reference's sequence log-prob of each row.
    sample_weight_B (optional): 0 on padding pairs (both rows), default 1.

  With s = the masked sum of logp (the sequence log-prob) and
  m_p = beta * [(s_w - ref_w) - (s_l - ref_l)], the loss is the mean over
  real pairs of -log sigmoid(m_p) = softplus(-m_p); its gradient in s_w is
  -beta sigmoid(-m_p) / P (and the opposite in s_l).
  Metrics: loss, margin (mean m_p / beta), pair_accuracy (share with
  m_p > 0), chosen_reward / rejected_reward (mean beta (s - ref)).
  """
  B = logp_BxT.shape[0]
  if B % 2:
    raise ValueError(f"dpo_loss: {B} rows is not a whole number of pairs")
  w_B = batch.get("sample_weight_B")
  w_B = jnp.ones((B,), jnp.float32) if w_B is None else w_B
  w_P = w_B[0::2].astype(jnp.float32)
  mask_BxT = batch["loss_mask_BxT"].astype(bool) & (w_B > 0)[:, None]
  ref_B = jax.lax.stop_gradient(batch["ref_logp_B"].astype(jnp.float32))
  r_B = cfg.beta * (_masked_sum(logp_BxT, mask_BxT) - ref_B)
  r_B = jnp.where(w_B > 0, r_B, 0.0)  # padding rows may hold junk
  chosen_P, rejected_P = r_B[0::2], r_B[1::2]
  margin_P = chosen_P - rejected_P
  n = jnp.maximum(w_P.sum(), 1.0)
  wmean = lambda x_P: (w_P * x_P).sum() / n
  value = wmean(jax.nn.softplus(-margin_P))
  sg = jax.lax.stop_gradient
  return value, dict(
    loss=value,
    margin=wmean(sg(margin_P)) / cfg.beta,
    pair_accuracy=wmean((sg(margin_P) > 0).astype(jnp.float32)),
    chosen_reward=wmean(sg(chosen_P)),
    rejected_reward=wmean(sg(rejected_P)),
  )
