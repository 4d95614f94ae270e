"""Reward models on the accelerator (report §2.3.5, PAPER.md §5.5): the
`rewards.Judge` that the reward entry point asks, loaded from an RM
directory.

- CoT RM (`kind="cot_rm"`): any k15 decoder continues the RM template
  (`rewards.judge.TEMPLATE`) with short reasoning and a JSON verdict, e.g.
  ` final b=ref b.` then a new line and `{"correct": true}`. Generation is
  greedy through the jitted sampler in fixed [rows, bucket] chunks; the
  verdict is parsed strictly (`rewards.judge.parse_verdict`): anything
  malformed scores 0 (counted, never guessed).
- Scalar RM (`kind="scalar_rm"`): `ScalarHead` wraps `model.Decoder`; the
  hidden state at each row's last real token goes through a linear head to
  a logit of P(correct).

`python -m k15.tools.train_rm` trains them and writes RM directories
(`save`); an RL run uses one with `reward.kind` / `reward.ckpt`
(`RewardConfig`, `build`). The model lives here, above the rewards
package, so that `k15/rewards/` never imports a model or the sampler; it
runs in the trainer's process, between the policy's generation and its
update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k15 import checkpoint as ckpt_lib
from k15 import config_lib, rollout, sharding
from k15 import model as model_lib
from k15 import sampler as sampler_lib
from k15 import tokenizer as tokenizer_lib
from k15.rewards import judge as judge_lib
from k15.rewards import sandbox
from k15.rewards.base import RewardResult

RM_KINDS = judge_lib.RM_KINDS
REWARD_KINDS = ("verifier", *RM_KINDS)
META = "rm.json"


# ---------------------------------------------------------------------------
# The scalar-head RM
# ---------------------------------------------------------------------------


def last_real(x_BxTx_: jax.Array, seg_BxT: jax.Array) -> jax.Array:
  """x at each row's last real (seg != 0) token, so left and right padding
  give the same result."""
  T = seg_BxT.shape[1]
  last_B = T - 1 - jnp.argmax(seg_BxT[:, ::-1] != 0, axis=1)
  return jnp.take_along_axis(
    x_BxTx_, last_B.reshape(-1, *([1] * (x_BxTx_.ndim - 1))), axis=1
  )[:, 0]


class ScalarHead(nn.Module):
  """Decoder + value head: tokens -> one logit of P(correct) per row.

  Params are {"decoder": <Decoder params>, "head": {kernel [D, 1], bias}};
  the head starts at zero, so a fresh RM says p = 0.5 everywhere.
  """

  cfg: model_lib.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, seg_BxT: jax.Array) -> jax.Array:
    pos_BxT = model_lib.positions_from_segments(seg_BxT)
    h_BxTxD, _ = model_lib.Decoder(self.cfg, name="decoder")(
      tokens_BxT, pos_BxT, seg_BxT, return_hidden=True
    )
    h_BxD = last_real(h_BxTxD, seg_BxT).astype(jnp.float32)
    zeros = nn.initializers.zeros
    head = nn.Dense(
      1,
      kernel_init=nn.with_logical_partitioning(zeros, ("embed", None)),
      bias_init=nn.with_logical_partitioning(zeros, (None,)),
      dtype=jnp.float32,
      param_dtype=jnp.dtype(self.cfg.param_dtype),
      name="head",
    )
    return head(h_BxD)[:, 0]


def decoder_params(params: Any) -> Any:
  """The Decoder's params inside a ScalarHead's (what `Decoder.apply`
  takes)."""
  return {"params": params["params"]["decoder"]}


def _init_boxed(rng: jax.Array, *, kind: str, model: model_lib.ModelConfig):
  tokens = jnp.zeros((1, 8), jnp.int32)
  if kind == "scalar_rm":
    return ScalarHead(model).init(rng, tokens, jnp.ones_like(tokens))
  return model_lib.Decoder(model).init(
    rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens)
  )


def _unbox(tree: Any) -> Any:
  """Drops the logical-axis boxes without a sharding constraint (`nn.unbox`
  would apply one, which fails on abstract or host values under a mesh
  context, as inside a run)."""
  return jax.tree.map(
    lambda x: (
      x.unbox(apply_constraint=False)
      if isinstance(x, nn.meta.AxisMetadata)
      else x
    ),
    tree,
    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
  )


def param_shardings(kind: str, model: model_lib.ModelConfig, mesh) -> Any:
  boxed = jax.eval_shape(
    functools.partial(_init_boxed, kind=kind, model=model), jax.random.key(0)
  )
  return sharding.param_shardings(boxed, mesh)


def init_params(
  rng: jax.Array,
  *,
  kind: str,
  model: model_lib.ModelConfig,
  mesh,
  decoder: Any | None = None,
) -> Any:
  """Fresh RM params, born sharded; `decoder` ({"params": ...}, e.g. a
  policy's or an imported checkpoint's) replaces the random decoder."""
  shardings = param_shardings(kind, model, mesh)
  init = functools.partial(_init_boxed, kind=kind, model=model)
  params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  if decoder is None:
    return params
  dec = _unbox(decoder)
  if kind == "scalar_rm":
    params = {"params": {**params["params"], "decoder": dec["params"]}}
  else:
    params = dec
  return jax.device_put(params, shardings)


@functools.partial(jax.jit, static_argnames=("model",))
def scalar_logits(
  params,
  tokens_BxT: jax.Array,
  seg_BxT: jax.Array,
  *,
  model: model_lib.ModelConfig,
) -> jax.Array:
  """[B] logits of P(correct) for RM-template rows (any padding side)."""
  return ScalarHead(model).apply(params, tokens_BxT, seg_BxT)


def scalar_batch(
  rows: Sequence[tuple[list[int], bool]],
  *,
  length: int,
  pad_id: int,
  batch_rows: int | None = None,
) -> dict[str, np.ndarray]:
  """Left-padded RM-template rows with labels; `batch_rows` pads B."""
  B = batch_rows or len(rows)
  prompts = [list(p) for p, _ in rows] + [[]] * (B - len(rows))
  tokens, seg = sampler_lib.left_pad(prompts, length, pad_id)
  label = np.zeros(B, np.float32)
  weight = np.zeros(B, np.float32)
  for i, (_, y) in enumerate(rows):
    label[i], weight[i] = float(y), 1.0
  return dict(
    tokens_BxT=tokens, seg_BxT=seg, label_B=label, sample_weight_B=weight
  )


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# ---------------------------------------------------------------------------
# A trained RM as a judge
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RewardModel:
  """A loaded RM, a `rewards.Judge`: `judge(items, responses)` scores
  finished responses.

  Items carry "question" (or "prompt") and "answer" (the reference).
  Responses whose template does not fit the RM's context score 0
  ("too_long") without running the model. CoT: score 1 for a valid
  {"correct": true}, 0 for false ("judged_wrong") or a malformed verdict
  ("malformed", the parser's cause in info["why"]). Scalar: score 1 when
  sigmoid(logit) > threshold, with p in info.
  """

  kind: str
  model: model_lib.ModelConfig
  params: Any
  tok: tokenizer_lib.Tokenizer
  budget: int = 48  # CoT: tokens of reasoning + verdict
  rows: int = 64  # rows per device call (fixed shapes)
  threshold: float = 0.5
  mesh: Any = None

  def __post_init__(self):
    if self.kind not in RM_KINDS:
      raise ValueError(f"rm: kind={self.kind!r}; known {RM_KINDS}")
    self.max_prompt = self.model.max_len - (
      self.budget if self.kind == "cot_rm" else 0
    )
    if self.max_prompt < 8:
      raise ValueError(
        f"rm: model.max_len={self.model.max_len} "
        f"leaves no room for prompts (budget {self.budget})"
      )
    # a few prompt buckets: short batches do not pay for the longest
    m = self.max_prompt
    self.buckets = tuple(sorted({min(m, _round_up(m * f // 4, 8))
                                 for f in (2, 3)} | {m}))  # fmt: skip
    if self.mesh is not None and self.rows % sharding.batch_divisor(self.mesh):
      raise ValueError(
        f"rm: rows={self.rows} is not divisible by the mesh's data*fsdp"
      )
    self.sampling = sampler_lib.SamplingConfig(
      temperature=0.0, stop_tokens=(self.tok.eos_id,)
    )

  def _shard(self, tree):
    if self.mesh is None:
      return tree
    return sharding.shard_batch(tree, self.mesh)

  def judge(
    self, items: Sequence[dict[str, Any]], responses: Sequence[str]
  ) -> list[RewardResult]:
    out: list[RewardResult | None] = [None] * len(items)
    todo: list[tuple[int, list[int]]] = []
    for i, (item, resp) in enumerate(zip(items, responses, strict=True)):
      ids = self.tok.encode(judge_lib.item_prompt(item, resp))
      if len(ids) > self.max_prompt:
        out[i] = RewardResult(0.0, False, "too_long", {"tokens": len(ids)})
        continue
      todo.append((i, ids))
    judge = self._judge_cot if self.kind == "cot_rm" else self._judge_scalar
    for (i, _), res in zip(todo, judge([ids for _, ids in todo]), strict=True):
      out[i] = res
    return out  # type: ignore[return-value]

  def _judge_cot(self, prompts: list[list[int]]) -> list[RewardResult]:
    if not prompts:
      return []
    gen = rollout.GenConfig(
      rows=self.rows,
      prompt_buckets=self.buckets,
      budget=self.budget,
      cache_len=self.model.max_len,
    )
    gens = rollout.generate(
      self.params, prompts, jax.random.key(0), model=self.model,
      sampling=self.sampling, gen=gen, pad_id=self.tok.pad_id,
      shard_fn=self._shard if self.mesh is not None else None,
    )  # fmt: skip
    return [
      judge_lib.verdict_result(
        self.tok.decode(g.response), g.status == sampler_lib.STOPPED
      )
      for g in gens
    ]

  def _judge_scalar(self, prompts: list[list[int]]) -> list[RewardResult]:
    if not prompts:
      return []
    length = sampler_lib.bucket_for(max(len(p) for p in prompts), self.buckets)
    probs = []
    for s in range(0, len(prompts), self.rows):
      chunk = prompts[s : s + self.rows]
      b = scalar_batch(
        [(p, False) for p in chunk],
        length=length,
        pad_id=self.tok.pad_id,
        batch_rows=self.rows,
      )
      b = self._shard({k: b[k] for k in ("tokens_BxT", "seg_BxT")})
      logits = scalar_logits(
        self.params, b["tokens_BxT"], b["seg_BxT"], model=self.model
      )
      z = np.asarray(jax.device_get(logits), np.float64)[: len(chunk)]
      probs.extend((1.0 / (1.0 + np.exp(-z))).tolist())
    return [judge_lib.probability_result(p, self.threshold) for p in probs]


def save(
  directory: str,
  *,
  kind: str,
  params: Any,
  model: model_lib.ModelConfig,
  tok_files: Sequence[str],
  meta: dict[str, Any],
) -> None:
  """Writes an RM directory: params (orbax), the tokenizer files, rm.json
  (written last: a directory without it is incomplete)."""
  os.makedirs(directory, exist_ok=True)
  ck = ckpt_lib.Checkpointer(
    os.path.join(directory, "params"),
    ckpt_lib.CheckpointConfig(keep=1, async_save=False),
  )
  ck.save(0, dict(params=params), {"kind": kind})
  ck.close()
  names = []
  for f in tok_files:
    if jax.process_index() == 0:
      shutil.copyfile(f, os.path.join(directory, os.path.basename(f)))
    names.append(os.path.basename(f))
  if jax.process_index() == 0:
    meta = dict(
      meta, kind=kind, model=dataclasses.asdict(model), tokenizer=names[0]
    )
    tmp = os.path.join(directory, META + ".tmp")
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(directory, META))


def load(
  directory: str,
  *,
  mesh=None,
  rows: int | None = None,
  threshold: float | None = None,
  **overrides: Any,
) -> RewardModel:
  """The RM saved in `directory` (by `save` / the training CLI); params are
  placed on `mesh` (default: the first device) by the logical-axis rules."""
  path = os.path.join(directory, META)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"rm: no {META} in {directory} (not a "
      "finished RM directory; train one with python "
      "-m k15.tools.train_rm)"
    )
  with open(path) as f:
    meta = json.load(f)
  model = config_lib.to_dataclass(
    model_lib.ModelConfig, meta["model"], f"{path}:model"
  )
  kind = meta["kind"]
  tok = tokenizer_lib.load(os.path.join(directory, meta["tokenizer"]))
  placed = mesh if mesh is not None else one_device_mesh()
  boxed = jax.eval_shape(
    functools.partial(_init_boxed, kind=kind, model=model), jax.random.key(0)
  )
  abstract = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
    _unbox(boxed),
    sharding.param_shardings(boxed, placed),
  )
  ck = ckpt_lib.Checkpointer(os.path.join(directory, "params"))
  out = ck.restore(dict(params=abstract))
  ck.close()
  if out is None:
    raise FileNotFoundError(f"rm: no params in {directory}")
  return RewardModel(
    kind=kind, model=model, params=out[1]["params"], tok=tok,
    budget=int(overrides.get("budget", meta.get("budget", 48))),
    rows=int(rows or meta.get("rows", 64)),
    threshold=float(threshold if threshold is not None
                    else meta.get("threshold", 0.5)),
    mesh=mesh,
  )  # fmt: skip


def one_device_mesh():
  return sharding.make_mesh(
    dict(data=1, fsdp=1, tensor=1, context=1), devices=jax.devices()[:1]
  )


# ---------------------------------------------------------------------------
# The RL run's reward model
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """config.reward: what scores RL rollouts.

  kind: "verifier" (the task's rule, the default) | "cot_rm" | "scalar_rm";
  ckpt: the RM directory (`python -m k15.tools.train_rm`);
  threshold: scalar RM only, p(correct) above which a response scores 1.
  The rule verifier is always computed too, for the agreement metrics, and
  evaluation always uses the rule.
  math_workers / code_workers: math-verify processes / concurrent
    sandboxes (0: the defaults, the machine's cores);
  math_timeout_s: per-answer limit on math-verify (a worker past it is
    killed; the answer scores 0 as a "timeout");
  code_timeout_s / code_memory_mb: wall-clock and address-space limits of
    one program's run against all its tests (past them: "timeout" /
    "memory", score 0).
  """

  kind: str = "verifier"
  ckpt: str = ""
  threshold: float = 0.5
  math_workers: int = 0
  math_timeout_s: float = 10.0
  code_workers: int = 0
  code_timeout_s: float = 10.0
  code_memory_mb: int = 512

  def __post_init__(self):
    if self.kind not in REWARD_KINDS:
      raise ValueError(
        f"reward.kind={self.kind!r}; expected one of {REWARD_KINDS}"
      )
    for name in ("math_workers", "code_workers"):
      if getattr(self, name) < 0:
        raise ValueError(f"reward.{name}={getattr(self, name)} must be >= 0")
    for name in ("math_timeout_s", "code_timeout_s", "code_memory_mb"):
      if not getattr(self, name) > 0:
        raise ValueError(f"reward.{name}={getattr(self, name)} must be > 0")
    if self.kind in RM_KINDS and not self.ckpt:
      raise ValueError(
        f"reward.kind={self.kind!r} needs reward.ckpt (an RM directory)"
      )

  def backends(self) -> dict[str, dict[str, Any]]:
    """`RewardPool(cfg)`: the math and code backends' settings (training
    settings: the code reward never allows fakeable test modes)."""
    limits = sandbox.Limits(
      timeout_s=self.code_timeout_s, memory_mb=self.code_memory_mb
    )
    return dict(
      math=dict(timeout_s=self.math_timeout_s,
                num_workers=self.math_workers or None),
      code=dict(limits=limits, workers=self.code_workers or None),
    )  # fmt: skip

  @property
  def judge(self) -> str | None:
    """The `judge=` of `rewards.score`: the RM kind, None for the rule."""
    return None if self.kind == "verifier" else self.kind


def from_cfg(
  kind: str,
  *,
  ckpt: str = "",
  params: Any = None,
  model: model_lib.ModelConfig | None = None,
  tok: tokenizer_lib.Tokenizer | None = None,
  **kw: Any,
) -> RewardModel:
  """A reward model of `kind` to give to `rewards.RewardPool(judges=...)`:
  from an RM directory (`ckpt`, with `load`'s keywords) or in-memory
  `params`, `model` and `tok` (with `RewardModel`'s fields)."""
  if ckpt:
    rm = load(ckpt, **kw)
    if rm.kind != kind:
      raise ValueError(f"reward kind {kind!r} but {ckpt} holds a {rm.kind}")
    return rm
  if params is None or model is None or tok is None:
    raise ValueError(
      f"reward kind {kind!r} needs ckpt= (an RM directory) or params=, "
      "model= and tok="
    )
  return RewardModel(kind=kind, model=model, params=params, tok=tok, **kw)


def build(
  cfg: RewardConfig, *, mesh=None, rows: int = 64
) -> RewardModel | None:
  """The RM of `cfg` (None for the rule verifier)."""
  if cfg.judge is None:
    return None
  return from_cfg(
    cfg.kind, ckpt=cfg.ckpt, mesh=mesh, rows=rows, threshold=cfg.threshold
  )


class _LazyJudge:
  """A judge whose RM loads on its first call: inside the run's mesh
  context, and only in runs that score with it."""

  def __init__(self, cfg: RewardConfig, mesh, rows: int):
    self.kind = cfg.kind
    self._load = lambda: build(cfg, mesh=mesh, rows=rows)
    self._rm: RewardModel | None = None

  def judge(self, items, responses):
    if self._rm is None:
      self._rm = self._load()
    return self._rm.judge(items, responses)


def lazy_judges(cfg: RewardConfig, *, mesh=None, rows: int = 64) -> dict:
  """`RewardPool(judges=...)` for config.reward, loaded on first use."""
  return {} if cfg.judge is None else {cfg.kind: _LazyJudge(cfg, mesh, rows)}


def judges(rm: RewardModel | None) -> dict[str, RewardModel]:
  """`RewardPool(judges=...)` for a run's RM (none for the rule)."""
  return {} if rm is None else {rm.kind: rm}
