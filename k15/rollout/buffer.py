"""The partial-rollout buffer of an RL run, and the rows the trainer scores.

`RolloutBuffer` (PAPER.md §4): groups of k trajectories per prompt; every
trajectory keeps its tokens, the behaviour log-prob of each and the
iteration (policy version) that sampled it. A trajectory cut by the
per-iteration budget stays in the buffer and is continued next iteration
(re-prefilled under the new parameters); a group is handed to the trainer
only when all k members have finished, so its mean reward is a proper
baseline. It is plain Python + numpy and round-trips through JSON exactly
(the run checkpoints it).

`to_batch` lays prompt + response rows out the way the trainer scores them:

  tokens_BxT = [left-padded prompt (P) | response (N), right-padded]

with segment ids 1 on real tokens and a loss mask on the response tokens;
`response_len` picks N from a few widths, so the update compiles a few
shapes, not one per iteration.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence

import numpy as np

from k15 import sampler
from k15.rollout.generation import Generation, Request


def response_len(longest: int, *, budget: int, cap: int) -> int:
  """Columns of the training rows for responses of up to `longest` tokens:
  multiples of 16 up to the budget, of the budget beyond (up to `cap`)."""
  if longest <= budget:
    return min(-(-max(longest, 1) // 16) * 16, budget)
  return min(-(-longest // budget) * budget, cap)


@dataclasses.dataclass
class Trajectory:
  """One sample of a group; `status` is RUNNING until it has finished."""

  response: np.ndarray  # [n] int32
  logp: np.ndarray  # [n] f32 behaviour log-probs (model, temperature 1)
  version: np.ndarray  # [n] int32 iteration whose policy sampled the token
  cap: int  # response tokens it may take in all (max_len - prompt bucket)
  status: int = sampler.RUNNING

  @property
  def finished(self) -> bool:
    return self.status != sampler.RUNNING


@dataclasses.dataclass
class Group:
  """The k samples of one prompt; trained on once all have finished."""

  gid: int
  problem: int  # index into the RL problem set
  prompt: list[int]
  born: int  # iteration the group started
  members: list[Trajectory]

  @property
  def finished(self) -> bool:
    return all(t.finished for t in self.members)


def _enc(x: np.ndarray, dtype) -> str:
  return base64.b64encode(np.ascontiguousarray(x, dtype).tobytes()).decode()


def _dec(s: str, dtype) -> np.ndarray:
  return np.frombuffer(base64.b64decode(s), dtype).copy()


class RolloutBuffer:
  """Groups in flight, oldest first (see the module docstring).

  partial=False: a trajectory cut by the budget is final (status BUDGET),
  so every group finishes in the iteration it starts.
  """

  def __init__(self, k: int, *, partial: bool):
    self.k = k
    self.partial = partial
    self.groups: list[Group] = []
    self.next_gid = 0

  def start(
    self,
    problems: Sequence[int],
    prompts: Sequence[Sequence[int]],
    iteration: int,
    caps: Sequence[int | Sequence[int]],
  ) -> None:
    """New groups of k empty trajectories for problems[i]; caps[i] is the
    response cap of its members (one int, or one per member)."""
    for p, q, cap in zip(problems, prompts, caps, strict=True):
      cap_k = [cap] * self.k if np.ndim(cap) == 0 else list(cap)
      if len(cap_k) != self.k:
        raise ValueError(f"{len(cap_k)} caps for a group of {self.k}")
      members = [
        Trajectory(
          np.zeros(0, np.int32),
          np.zeros(0, np.float32),
          np.zeros(0, np.int32),
          int(c),
        )
        for c in cap_k
      ]
      self.groups.append(
        Group(self.next_gid, int(p), list(q), iteration, members)
      )
      self.next_gid += 1

  def running(self) -> list[tuple[Group, Trajectory]]:
    """Every unfinished trajectory, oldest group first."""
    return [(g, t) for g in self.groups for t in g.members if not t.finished]

  def requests(self) -> tuple[list[tuple[Group, Trajectory]], list[Request]]:
    todo = self.running()
    return todo, [
      Request(g.prompt, t.response, t.cap - len(t.response)) for g, t in todo
    ]

  def record(
    self,
    todo: Sequence[tuple[Group, Trajectory]],
    gens: Sequence[Generation],
    iteration: int,
  ) -> None:
    """Appends this iteration's segments; settles who has finished."""
    for (_, t), g in zip(todo, gens, strict=True):
      t.response = np.concatenate([t.response, g.response.astype(np.int32)])
      t.logp = np.concatenate([t.logp, g.logp.astype(np.float32)])
      t.version = np.concatenate(
        [t.version, np.full(len(g.response), iteration, np.int32)]
      )
      status = g.status
      if status == sampler.BUDGET and len(t.response) >= t.cap:
        status = sampler.MAX_LEN
      if status == sampler.BUDGET and self.partial:
        status = sampler.RUNNING  # carried over to the next iteration
      t.status = status

  def pop_finished(self, max_groups: int) -> list[Group]:
    """Up to `max_groups` finished groups, oldest first; removed."""
    done = [g for g in self.groups if g.finished][:max_groups]
    ids = {g.gid for g in done}
    self.groups = [g for g in self.groups if g.gid not in ids]
    return done

  def num_finished(self) -> int:
    return sum(g.finished for g in self.groups)

  def metrics(self, iteration: int) -> dict[str, float]:
    running = self.running()
    oldest = min(
      (int(t.version.min()) for _, t in running if len(t.version)),
      default=iteration,
    )
    return dict(
      buffer_groups=float(len(self.groups)),
      buffer_running=float(len(running)),
      buffer_finished_groups=float(self.num_finished()),
      buffer_oldest_age=float(iteration - oldest),
    )

  def state_dict(self) -> dict:
    """JSON-able and exact (arrays as base64 of their bytes)."""
    return dict(
      k=self.k,
      partial=self.partial,
      next_gid=self.next_gid,
      groups=[
        dict(
          gid=g.gid,
          problem=g.problem,
          prompt=g.prompt,
          born=g.born,
          members=[
            dict(
              response=_enc(t.response, "<i4"),
              logp=_enc(t.logp, "<f4"),
              version=_enc(t.version, "<i4"),
              cap=t.cap,
              status=t.status,
            )
            for t in g.members
          ],
        )
        for g in self.groups
      ],
    )

  def load_state_dict(self, d: dict) -> None:
    if int(d["k"]) != self.k:
      raise ValueError(
        f"rollout buffer: checkpoint has k={d['k']}, the config k={self.k}"
      )
    self.next_gid = int(d["next_gid"])
    self.groups = [
      Group(
        int(g["gid"]),
        int(g["problem"]),
        [int(x) for x in g["prompt"]],
        int(g["born"]),
        [
          Trajectory(
            _dec(t["response"], "<i4"),
            _dec(t["logp"], "<f4"),
            _dec(t["version"], "<i4"),
            int(t["cap"]),
            int(t["status"]),
          )
          for t in g["members"]
        ],
      )
      for g in d["groups"]
    ]


# ---------------------------------------------------------------------------
# Training rows
# ---------------------------------------------------------------------------


def to_batch(
  prompts: list[list[int]],
  responses: list[np.ndarray],
  *,
  prompt_len: int,
  response_len: int,
  pad_id: int,
  rows: int | None = None,
) -> dict[str, np.ndarray]:
  """Training rows [prompt | response]; `rows` pads B with empty rows.

  Returns tokens_BxT, seg_BxT (1 on real tokens), loss_mask_BxT (response
  tokens) and sample_weight_B (0 on padding rows), T = prompt_len +
  response_len.
  """
  B = len(prompts) if rows is None else rows
  if len(prompts) > B:
    raise ValueError(f"{len(prompts)} rows do not fit a batch of {B}")
  T = prompt_len + response_len
  tokens = np.full((B, T), pad_id, np.int32)
  seg = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T), bool)
  weight = np.zeros((B,), np.float32)
  for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
    if len(p) > prompt_len or len(r) > response_len:
      raise ValueError(
        f"row {i}: prompt {len(p)} / response {len(r)} tokens "
        f"exceed {prompt_len} / {response_len}"
      )
    tokens[i, prompt_len - len(p) : prompt_len] = p
    tokens[i, prompt_len : prompt_len + len(r)] = r
    seg[i, prompt_len - len(p) : prompt_len + len(r)] = 1
    mask[i, prompt_len : prompt_len + len(r)] = True
    weight[i] = 1.0
  return dict(
    tokens_BxT=tokens, seg_BxT=seg, loss_mask_BxT=mask, sample_weight_B=weight
  )


def training_batch(
  groups: Sequence[Group],
  adv_GxK: np.ndarray,
  *,
  iteration: int,
  prompt_len: int,
  response_len: int,
  rows: int,
  pad_id: int,
  loss_segments: str = "all",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`to_batch` rows of finished groups' trajectories (padded to `rows`)
  with behaviour log-probs, advantages and the loss mask.

  loss_segments: "all" puts every response token in the loss; "current"
  only the tokens this iteration's policy sampled (the report: "certain
  segments can be excluded from loss computation"). Also returns
  old_BxT: response tokens sampled by an earlier policy (for metrics).
  The batch's response_BxT marks every response token (not a loss input).
  """
  if loss_segments not in ("all", "current"):
    raise ValueError(f"loss_segments={loss_segments!r}: all | current")
  trajs = [t for g in groups for t in g.members]
  T = prompt_len + response_len
  batch = to_batch(
    [g.prompt for g in groups for _ in g.members],
    [t.response for t in trajs],
    prompt_len=prompt_len,
    response_len=response_len,
    pad_id=pad_id,
    rows=rows,
  )
  batch["behaviour_logp_BxT"] = place_per_token(
    [t.logp for t in trajs], prompt_len=prompt_len, T=T, rows=rows
  )
  version_BxT = place_per_token(
    [t.version for t in trajs],
    prompt_len=prompt_len,
    T=T,
    rows=rows,
    dtype=np.int32,
  )
  response_BxT = batch["loss_mask_BxT"]
  batch["response_BxT"] = response_BxT
  if loss_segments == "current":
    batch["loss_mask_BxT"] = response_BxT & (version_BxT == iteration)
  adv_B = np.zeros(rows, np.float32)
  adv_B[: len(trajs)] = np.asarray(adv_GxK, np.float32).reshape(-1)
  batch["advantages_B"] = adv_B
  return batch, response_BxT & (version_BxT < iteration)


def place_per_token(
  values: list[np.ndarray],
  *,
  prompt_len: int,
  T: int,
  rows: int,
  dtype=np.float32,
) -> np.ndarray:
  """Aligns per-response-token values (e.g. behaviour log-probs) to [B, T]."""
  out = np.zeros((rows, T), dtype)
  for i, v in enumerate(values):
    out[i, prompt_len : prompt_len + len(v)] = v
  return out
