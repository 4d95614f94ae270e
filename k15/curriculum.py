"""Which prompts an RL iteration trains on (report §2.3.4, PAPER.md §3.2).

Two signals, composable:
- curriculum: a difficulty label per problem restricts the eligible set over
  iterations. The report's Fig. 9 ablation: the whole mixed set for a warm-up,
  then only hard problems from iteration 24 (of 44). An optional multi-stage
  schedule caps the difficulty instead (easy first, harder admitted later).
- prioritized: per-problem success rates s_i, tracked online from every
  finished group, weight problem i by max(1 - s_i, floor), so unsolved
  problems are drawn more often and solved ones are still revisited.

"curriculum+prioritized" applies the curriculum's eligible set, then the
priority weights within it. Host-side numpy only (no JAX); the statistics are
a dict of arrays that the run checkpoints; draws are a pure function of
(seed, iteration, statistics), so a resumed run draws the same prompts.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

STRATEGIES = ("uniform", "curriculum", "prioritized", "curriculum+prioritized")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Prompt-sampling settings.

  strategy: "uniform" | "curriculum" | "prioritized" |
    "curriculum+prioritized".
  transition_iter, hard_min: two-phase curriculum (the report's Fig. 9):
    iterations < transition_iter sample the whole set, iterations >= it only
    problems with difficulty >= hard_min.
  stages: optional multi-stage easy->hard schedule ((iter, max_difficulty),
    ...) with increasing iters; from `iter` on, problems with difficulty <=
    max_difficulty are eligible (the whole set before the first stage). When
    given it replaces transition_iter / hard_min.
  prior: success rate assumed for a problem never observed.
  ema: 0 -> s_i is the running mean over all samples observed for problem i;
    > 0 -> per finished group s_i <- (1 - ema) s_i + ema * group mean, the
    first group setting s_i to its mean.
  floor: minimum priority weight, so solved problems are revisited.
  balance: draw every difficulty label among the eligible problems equally
    often (each problem weighted by 1 / the eligible count of its label),
    the report's "balanced difficulty" of its prompt set (§2.1) for a set
    whose labels are not; composes with the priority weights.
  """

  strategy: str = "uniform"
  transition_iter: int = 24
  hard_min: int = 1
  stages: tuple = ()
  prior: float = 0.5
  ema: float = 0.0
  floor: float = 0.05
  balance: bool = False

  def __post_init__(self):
    def bad(field, why):
      value = getattr(self, field)
      raise ValueError(f"data.{field}={value!r}: {why}")

    if self.strategy not in STRATEGIES:
      bad("strategy", f"expected one of {STRATEGIES}")
    if self.transition_iter < 0:
      bad("transition_iter", "must be >= 0")
    if not 0.0 <= self.prior <= 1.0:
      bad("prior", "must be in [0, 1]")
    if not 0.0 <= self.ema < 1.0:
      bad("ema", "must be in [0, 1)")
    if not 0.0 <= self.floor <= 1.0:
      bad("floor", "must be in [0, 1]")
    try:
      stages = tuple((int(i), int(d)) for i, d in self.stages)
    except (TypeError, ValueError):
      bad("stages", "expected ((iteration, max_difficulty), ...)")
    iters = [i for i, _ in stages]
    if iters != sorted(set(iters)) or any(i < 0 for i in iters):
      bad("stages", "iterations must be >= 0 and strictly increasing")
    object.__setattr__(self, "stages", stages)

  @property
  def uses_curriculum(self) -> bool:
    return self.strategy.startswith("curriculum")

  @property
  def uses_priority(self) -> bool:
    return self.strategy.endswith("prioritized")


def _per_problem(x, n: int, default: float, name: str) -> np.ndarray:
  if x is None:
    return np.full(n, default, np.float64)
  x = np.asarray(x, np.float64)
  if x.shape != (n,):
    raise ValueError(f"{name} has shape {x.shape}, expected ({n},)")
  return x


def inclusion_probs(p_N: np.ndarray, n: int) -> np.ndarray:
  """Per-item inclusion probabilities pi_N (sum n, each <= 1) for drawing n
  distinct items as close to 'n draws from p' as possible: pi_i = n p_i, with
  items that would exceed 1 capped at 1 and the rest rescaled."""
  p_N = np.asarray(p_N, np.float64)
  pi_N = np.zeros_like(p_N)
  free_N = p_N > 0
  budget = float(n)
  while True:
    pi_N[free_N] = budget * p_N[free_N] / p_N[free_N].sum()
    over_N = free_N & (pi_N >= 1.0)
    if not over_N.any():
      return pi_N
    pi_N[over_N] = 1.0
    free_N &= ~over_N
    budget = n - float((~free_N & (pi_N >= 1.0)).sum())
    if budget <= 0 or not free_N.any():
      return pi_N


def draw(rng: np.random.Generator, p_N: np.ndarray, n: int) -> np.ndarray:
  """n indices with P(i drawn) = inclusion_probs(p, n)_i and no repeats when
  n <= #{p > 0}; otherwise n draws with replacement from p (expected count of
  i is n p_i either way). Random-order systematic sampling: permute, lay the
  pi_i end to end on [0, n) and take the items under u, u + 1, ..., u + n - 1;
  an interval of length <= 1 holds at most one of those points."""
  p_N = np.asarray(p_N, np.float64)
  p_N = p_N / p_N.sum()
  support = int((p_N > 0).sum())
  if n > support:
    return rng.choice(p_N.size, size=n, replace=True, p=p_N)
  pi_N = inclusion_probs(p_N, n)
  perm_N = rng.permutation(p_N.size)
  cum_N = np.cumsum(pi_N[perm_N])
  points_n = rng.uniform() + np.arange(n)
  # Rescale so rounding can never push the last point past the end.
  cum_N *= n / cum_N[-1]
  idx_n = np.searchsorted(cum_N, points_n, side="right")
  return perm_N[np.minimum(idx_n, p_N.size - 1)]


class PromptSampler:
  """Draws prompt indices for each RL iteration and tracks success rates.

  difficulty_N: integer difficulty label per problem (larger is harder).
  weight_N: base draw weight per problem (mixing prompt files by weight;
    default 1 each): the distribution over the eligible problems is
    proportional to it before balance and priority apply.
  prior_N: success rate assumed for problem i until it is observed, NaN
    for `cfg.prior` (default): a curated set's pass rates, so the
    prioritized sampler starts from the curation's estimate.
  """

  def __init__(
    self,
    difficulty_N: np.ndarray,
    cfg: SamplerConfig,
    seed: int,
    *,
    weight_N: np.ndarray | None = None,
    prior_N: np.ndarray | None = None,
  ):
    self.difficulty_N = np.asarray(difficulty_N).astype(np.int64)
    if self.difficulty_N.ndim != 1 or self.difficulty_N.size == 0:
      raise ValueError(
        f"difficulty_N must be a non-empty 1-D array, got shape "
        f"{self.difficulty_N.shape}"
      )
    self.cfg = cfg
    self.seed = int(seed)
    n = self.difficulty_N.size
    self.weight_N = _per_problem(weight_N, n, 1.0, "weight_N")
    if not (np.isfinite(self.weight_N).all() and (self.weight_N > 0).all()):
      raise ValueError("weight_N must be finite and > 0")
    prior_N = _per_problem(prior_N, n, np.nan, "prior_N")
    self.prior_N = np.where(np.isnan(prior_N), cfg.prior, prior_N)
    if ((self.prior_N < 0) | (self.prior_N > 1)).any():
      raise ValueError("prior_N must be in [0, 1] (or NaN)")
    self._count_N = np.zeros(n, np.int64)  # samples observed
    self._success_N = np.zeros(n, np.float64)  # sum of their 0/1 outcomes
    self._ema_N = self.prior_N.copy()  # used when cfg.ema > 0
    self._last = {}
    if cfg.uses_curriculum:
      checks = [cfg.transition_iter]
      checks = [i for i, _ in cfg.stages] if cfg.stages else checks
      for it in checks:
        if not self.eligible(it).any():
          raise ValueError(
            f"SamplerConfig: no problem is eligible from iteration {it} "
            f"(hard_min={cfg.hard_min}, stages={cfg.stages}, difficulty "
            f"labels {np.unique(self.difficulty_N).tolist()})"
          )

  @property
  def num_problems(self) -> int:
    return self.difficulty_N.size

  def eligible(self, iteration: int) -> np.ndarray:
    """Boolean N mask of the problems the curriculum allows at iteration."""
    cfg, d_N = self.cfg, self.difficulty_N
    if not cfg.uses_curriculum:
      return np.ones(d_N.shape, bool)
    if cfg.stages:
      active = [d for i, d in cfg.stages if i <= iteration]
      if not active:
        return np.ones(d_N.shape, bool)
      return d_N <= active[-1]
    if iteration < cfg.transition_iter:
      return np.ones(d_N.shape, bool)
    return d_N >= cfg.hard_min

  def success_rates(self) -> np.ndarray:
    """s_N: estimated success rate per problem; its prior where unseen."""
    seen_N = self._count_N > 0
    if self.cfg.ema > 0:
      return np.where(seen_N, self._ema_N, self.prior_N)
    mean_N = self._success_N / np.maximum(self._count_N, 1)
    return np.where(seen_N, mean_N, self.prior_N)

  def probabilities(self, iteration: int) -> np.ndarray:
    """p_N, the per-draw target distribution at iteration (sums to 1)."""
    w_N = self.eligible(iteration) * self.weight_N
    if self.cfg.balance:
      _, label_N = np.unique(self.difficulty_N, return_inverse=True)
      per_label = np.bincount(label_N, weights=w_N)
      w_N = w_N / np.maximum(per_label[label_N], 1.0)
    if self.cfg.uses_priority:
      prio_N = np.maximum(1.0 - self.success_rates(), self.cfg.floor)
      if (w_N * prio_N).sum() > 0:  # floor = 0 and all solved: stay uniform
        w_N = w_N * prio_N
    return w_N / w_N.sum()

  def sample(self, iteration: int, n: int, *, stream: int = 0) -> np.ndarray:
    """n problem indices for `iteration`, distinct when enough problems are
    eligible. The rng is derived from (seed, iteration, stream), so the draw
    depends only on those and the statistics; `stream` separates several
    draws within one iteration."""
    rng = np.random.default_rng([self.seed, int(iteration), int(stream)])
    p_N = self.probabilities(iteration)
    idx_n = draw(rng, p_N, int(n))
    self._last = dict(
      eligible=float((p_N > 0).sum()),
      hard_frac=float(
        (self.difficulty_N[idx_n] >= self.cfg.hard_min).mean() if n else 0.0
      ),
    )
    return idx_n

  def update(
    self, indices: np.ndarray, rewards: Sequence[np.ndarray] | np.ndarray
  ) -> None:
    """Record finished groups: problem indices[i] got the k 0/1 outcomes in
    rewards[i] (groups may differ in k). Repeated indices apply in order."""
    indices = np.asarray(indices).reshape(-1)
    if len(rewards) != indices.size:
      raise ValueError(
        f"update: {indices.size} indices but {len(rewards)} reward groups"
      )
    for i, r in zip(indices.tolist(), rewards, strict=True):
      r_k = np.asarray(r, np.float64).reshape(-1)
      if r_k.size == 0:
        continue
      if not 0 <= i < self.num_problems:
        raise IndexError(f"update: index {i} out of [0, {self.num_problems})")
      if ((r_k < 0) | (r_k > 1)).any():
        raise ValueError(f"update: rewards for problem {i} not in [0, 1]")
      if self.cfg.ema > 0:
        prev = self._ema_N[i] if self._count_N[i] else r_k.mean()
        self._ema_N[i] = (1 - self.cfg.ema) * prev + self.cfg.ema * r_k.mean()
      self._count_N[i] += r_k.size
      self._success_N[i] += r_k.sum()

  def state_dict(self) -> dict[str, np.ndarray]:
    """The statistics to checkpoint with the run (copies)."""
    return dict(
      count_N=self._count_N.copy(),
      success_N=self._success_N.copy(),
      ema_N=self._ema_N.copy(),
    )

  def load_state_dict(self, d: dict[str, np.ndarray]) -> None:
    for key, ref in self.state_dict().items():
      if key not in d:
        raise KeyError(f"sampler state is missing {key!r}")
      value = np.asarray(d[key])
      if value.shape != ref.shape:
        raise ValueError(
          f"sampler state {key!r} has shape {value.shape}, expected "
          f"{ref.shape} (one entry per problem)"
        )
    self._count_N = np.asarray(d["count_N"]).astype(np.int64)
    self._success_N = np.asarray(d["success_N"]).astype(np.float64)
    self._ema_N = np.asarray(d["ema_N"]).astype(np.float64)

  def metrics(self) -> dict[str, float]:
    """Scalars for logging: coverage and success of the problem set, and the
    eligible count / hard fraction of the latest `sample` call."""
    seen_N = self._count_N > 0
    s_N = self.success_rates()
    out = dict(
      seen_frac=float(seen_N.mean()),
      mean_success=float(s_N[seen_N].mean()) if seen_N.any() else 0.0,
      solved_frac=float((s_N[seen_N] >= 1.0).sum() / self.num_problems),
      unsolved_frac=float((s_N[seen_N] <= 0.0).sum() / self.num_problems),
    )
    out.update(self._last)
    return out
