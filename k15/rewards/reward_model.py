"""Reward models for answers a rule cannot check (report §2.3.5, PAPER.md
§5.5): a chain-of-thought generative verifier and a classic scalar-head RM.

Both read (question, reference answer, response) in one text template,
reference last so that the judgement is written right after it:

  Q: <question>
  S: <response>
  R: <reference>
  V:

- CoT RM (`kind="cot_rm"`): any k15 decoder continues the template with short
  reasoning and a JSON verdict, e.g. ` final b=ref b.` then a new
  line and `{"correct": true}`. Generation is greedy through the jitted
  sampler in fixed [rows, bucket] chunks. `parse_verdict` is strict: exactly
  one JSON object, at the very end, with a boolean "correct"; anything else
  is malformed and scores 0 (counted, never guessed).
- Scalar RM (`kind="scalar_rm"`): `ScalarHead` wraps `model.Decoder`; the
  hidden state at each row's last real token goes through a linear head to a
  logit of P(correct); `scalar_rm_step` trains it with binary cross-entropy.

Training data come from a synthetic task whose rule verifier gives the
labels (`make_examples`: gold traces, traces with a sloppy step but the right
answer, wrong final answers, wrong last steps, truncated traces, several
answers); the CoT target's reasoning is what the rule did ("final X!=ref
Y"). `python -m k15.rewards.reward_model --config experiments/reward_model.py
--workdir DIR` trains each configured kind into `DIR/<kind>/` (rm.json,
tokenizer, params) and reports its accuracy against the rule verifier on
held-out pairs. An RL run uses one with `reward.kind` / `reward.ckpt`
(`RewardConfig`); `score` is what the RL loop calls.

Unlike the rule rewards these run on the accelerator (they are models), in
the trainer's process, between the policy's generation and its update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from k15 import checkpoint as ckpt_lib
from k15 import (
  config_lib,
  data,
  evaluate,
  rollout,
  sharding,
  tasks,
  train,
)
from k15 import metrics as metrics_lib
from k15 import model as model_lib
from k15 import sampler as sampler_lib
from k15 import tokenizer as tokenizer_lib
from k15.rewards.base import RewardResult, check_lengths

RM_KINDS = ("cot_rm", "scalar_rm")
REWARD_KINDS = ("verifier", *RM_KINDS)
TEMPLATE = "Q: {question}\nS: {response}\nR: {reference}\nV:"
META = "rm.json"


# ---------------------------------------------------------------------------
# Templates and the strict verdict parser
# ---------------------------------------------------------------------------


def rm_prompt(question: str, reference: str, response: str) -> str:
  return TEMPLATE.format(
    question=question, reference=reference, response=response
  )


def cot_target(reasoning: str, correct: bool) -> str:
  """What the CoT RM writes after the template (EOS follows)."""
  verdict = json.dumps({"correct": bool(correct)})
  return f"{reasoning}\n{verdict}"


@dataclasses.dataclass(frozen=True)
class Verdict:
  """correct: the judgement, None when malformed; cause: "ok" or why not."""

  correct: bool | None
  cause: str


_MAX_BRACES = 64  # more '{' than this in a verdict text is malformed
_DECODER = json.JSONDecoder()


class _DuplicateKey(ValueError):
  pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  keys = [k for k, _ in pairs]
  if len(keys) != len(set(keys)):
    raise _DuplicateKey(keys)
  return dict(pairs)


_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def parse_verdict(text: str) -> Verdict:
  """The verdict at the end of a CoT RM's output, parsed strictly.

  Valid: the text, trailing whitespace aside, ends with the one JSON object
  it contains, that object has no duplicate keys and its "correct" is a JSON
  boolean (other keys are ignored). Braces that do not start a JSON object
  (LaTeX, prose) may appear in the reasoning. Causes of malformed verdicts:
  no_json, several_objects, trailing_text, duplicate_key, no_correct_key,
  not_boolean, too_many_braces. Linear in the text for at most
  `_MAX_BRACES` braces.
  """
  body = text.rstrip()
  starts = [i for i, c in enumerate(body) if c == "{"]
  if len(starts) > _MAX_BRACES:
    return Verdict(None, "too_many_braces")
  spans: list[tuple[int, int]] = []
  for i in starts:
    if spans and i < spans[-1][1]:
      continue  # nested inside an object already found
    try:
      _, end = _DECODER.raw_decode(body, i)
    except ValueError:
      continue
    spans.append((i, end))
  if not spans:
    return Verdict(None, "no_json")
  if len(spans) > 1:
    return Verdict(None, "several_objects")
  start, end = spans[0]
  if end != len(body):
    return Verdict(None, "trailing_text")
  try:
    obj, _ = _STRICT_DECODER.raw_decode(body, start)
  except _DuplicateKey:
    return Verdict(None, "duplicate_key")
  if "correct" not in obj:
    return Verdict(None, "no_correct_key")
  if not isinstance(obj["correct"], bool):
    return Verdict(None, "not_boolean")
  return Verdict(obj["correct"], "ok")


# ---------------------------------------------------------------------------
# Training data from a synthetic task's rule verifier
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
  """One RM training/evaluation pair; `label` is the rule verifier's."""

  question: str
  reference: str
  response: str
  label: bool
  reasoning: str  # the CoT RM's target reasoning (what the rule did)
  kind: str  # how the response was made (see MIX)


# Response kinds and their shares: half are correct by the rule.
MIX = (
  ("gold", 0.3),  # the task's own trace
  ("sloppy", 0.2),  # a wrong or skipped middle step, right final answer
  ("wrong_answer", 0.15),  # right steps, another final answer
  ("wrong_step", 0.15),  # the last step goes wrong, and so the answer
  ("truncated", 0.1),  # cut before the answer
  ("several", 0.1),  # states two different answers
)
_ANSWER_SEP = ". answer: "


def rule_reasoning(task, response: str, reference: str) -> str:
  """The short reasoning the rule verifier's decision amounts to:
  " final X=ref X." / " final X!=ref Y." / " no final answer." / " several
  answers.". The comparison ("=" / "!=") comes right after the copied final
  answer, with the reference at a fixed distance in the prompt, so a small
  model compares two tokens it can locate by position alone."""
  found = task.ANSWER_RE.findall(response)
  if not found:
    return " no final answer."
  if len(set(found)) > 1:
    return " several answers."
  rel = "=" if found[-1] == reference else "!="
  return f" final {found[-1]}{rel}ref {reference}."


_STEP_SEP = re.compile(r"(,? )")


def _corrupt(
  kind: str,
  trace: str,
  answer: str,
  values: Sequence[str],
  rng: np.random.Generator,
) -> str:
  """A response of `kind` made from a gold trace 'steps. answer: X' whose
  steps are separated by ", " or " " and each end with their result (the
  synthetic tasks' formats: ' a>c, c>f. answer: f', ' 7 2 6. answer: 6')."""
  steps_text, sep, ans = trace.rpartition(_ANSWER_SEP)
  if not sep or ans != answer:
    raise ValueError(
      f"reward_model: trace {trace!r} does not end with '{_ANSWER_SEP}{answer}'"
    )
  parts = _STEP_SEP.split(steps_text)  # step, sep, step, ... ('' if leading)
  steps = [i for i in range(0, len(parts), 2) if parts[i]]
  other = str(rng.choice([v for v in values if v != answer]))
  if kind == "gold":
    return trace
  if kind == "sloppy":
    if len(steps) > 1:
      j = steps[int(rng.integers(0, len(steps) - 1))]
      if rng.random() < 0.5:
        del parts[j : j + 2]  # the step and the separator after it
      else:  # a wrong result mid-chain; the final step and answer are right
        last = parts[j][-1]
        parts[j] = parts[j][:-1] + str(
          rng.choice([v for v in values if v != last])
        )
    return "".join(parts) + _ANSWER_SEP + answer
  if kind == "wrong_answer":
    return steps_text + _ANSWER_SEP + other
  if kind == "wrong_step":
    j = steps[-1]
    parts[j] = parts[j][: len(parts[j]) - len(answer)] + other
    return "".join(parts) + _ANSWER_SEP + other
  if kind == "truncated":
    return trace[: int(rng.integers(1, len(steps_text) + 1))]
  if kind == "several":
    return trace + _ANSWER_SEP.lstrip(".") + other
  raise ValueError(f"reward_model: unknown response kind {kind!r}")


def make_examples(
  problems: Sequence, task, *, seed: int, mix: Sequence[tuple[str, float]] = MIX
) -> list[Example]:
  """One example per problem, its response kind drawn from `mix`; the label
  is always `task.verify` on the response (never assumed from the kind)."""
  rng = np.random.default_rng(seed)
  names = [k for k, _ in mix]
  probs = np.array([p for _, p in mix], np.float64)
  probs /= probs.sum()
  values = sorted({p.answer for p in problems})
  if len(values) < 2:
    raise ValueError("reward_model: problems need >= 2 distinct answers")
  out = []
  for p in problems:
    kind = names[int(rng.choice(len(names), p=probs))]
    response = _corrupt(kind, p.trace, p.answer, values, rng)
    label = bool(task.verify(response, p.answer))
    out.append(
      Example(
        p.question,
        p.answer,
        response,
        label,
        rule_reasoning(task, response, p.answer),
        kind,
      )
    )
  return out


def encode_cot(
  tok: tokenizer_lib.Tokenizer, ex: Example
) -> tuple[list[int], list[int]]:
  """(RM prompt ids, reasoning + verdict ids + EOS) for `train.sft_step`."""
  prompt = tok.encode(rm_prompt(ex.question, ex.reference, ex.response))
  return prompt, tok.encode(cot_target(ex.reasoning, ex.label)) + [tok.eos_id]


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


def scalar_rm_loss(
  params, batch: dict, *, model: model_lib.ModelConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean binary cross-entropy of the head's logits vs label_B."""
  logits_B = ScalarHead(model).apply(
    params, batch["tokens_BxT"], batch["seg_BxT"]
  )
  y_B = batch["label_B"].astype(jnp.float32)
  w_B = batch["sample_weight_B"].astype(jnp.float32)
  n = jnp.maximum(w_B.sum(), 1.0)
  loss = jnp.sum(w_B * optax.sigmoid_binary_cross_entropy(logits_B, y_B)) / n
  acc = jnp.sum(w_B * ((logits_B > 0) == (y_B > 0.5))) / n
  return loss, dict(loss=loss, accuracy=acc)


@functools.partial(
  jax.jit, static_argnames=("model", "tx"), donate_argnames=("state",)
)
def scalar_rm_step(
  state: train.TrainState, batch: dict, *, model: model_lib.ModelConfig, tx
) -> tuple[train.TrainState, dict[str, jax.Array]]:
  """One BCE step on rows (tokens_BxT, seg_BxT, label_B, sample_weight_B);
  a non-finite loss or gradient leaves the state unchanged."""
  (loss, metrics), grads = jax.value_and_grad(
    functools.partial(scalar_rm_loss, batch=batch, model=model), has_aux=True
  )(state.params)
  state, m = train._apply_if_finite(state, grads, loss, tx=tx)
  return state, {**metrics, **m}


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


# ---------------------------------------------------------------------------
# A trained RM as a reward function
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RewardModel:
  """A loaded RM; `rm(items, responses, finished)` is a `RewardFn`.

  Items carry "question" and "answer" (the reference). Unfinished responses
  score 0 ("truncated") without running the model, as do ones whose template
  does not fit the RM's context ("too_long"). CoT: score 1 for a valid
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
      raise ValueError(f"reward_model: kind={self.kind!r}; known {RM_KINDS}")
    self.max_prompt = self.model.max_len - (
      self.budget if self.kind == "cot_rm" else 0
    )
    if self.max_prompt < 8:
      raise ValueError(
        f"reward_model: model.max_len={self.model.max_len} "
        f"leaves no room for prompts (budget {self.budget})"
      )
    # a few prompt buckets: short batches do not pay for the longest
    m = self.max_prompt
    self.buckets = tuple(sorted({min(m, _round_up(m * f // 4, 8))
                                 for f in (2, 3)} | {m}))  # fmt: skip
    if self.mesh is not None and self.rows % sharding.batch_divisor(self.mesh):
      raise ValueError(
        f"reward_model: rows={self.rows} is not divisible by "
        f"the mesh's data*fsdp"
      )
    self.sampling = sampler_lib.SamplingConfig(
      temperature=0.0, stop_tokens=(self.tok.eos_id,)
    )

  def _shard(self, tree):
    if self.mesh is None:
      return tree
    return sharding.shard_batch(tree, self.mesh)

  def __call__(
    self,
    items: list[dict[str, Any]],
    responses: list[str],
    finished: list[bool],
  ) -> list[RewardResult]:
    check_lengths(items, responses, finished)
    out: list[RewardResult | None] = [None] * len(items)
    todo: list[tuple[int, list[int]]] = []
    for i, (item, resp, done) in enumerate(
      zip(items, responses, finished, strict=True)
    ):
      if not done:
        out[i] = RewardResult(0.0, False, "truncated")
        continue
      question = item.get("question", item.get("prompt"))
      ids = self.tok.encode(rm_prompt(str(question), str(item["answer"]), resp))
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
    out = []
    for g in gens:
      text = self.tok.decode(g.response)
      v = (parse_verdict(text) if g.status == sampler_lib.STOPPED
           else Verdict(None, "unfinished"))  # fmt: skip
      info = {"judgement": text}
      if v.correct is None:
        out.append(
          RewardResult(0.0, False, "malformed", {**info, "why": v.cause})
        )
      elif v.correct:
        out.append(RewardResult(1.0, True, "ok", info))
      else:
        out.append(RewardResult(0.0, False, "judged_wrong", info))
    return out

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
    out = []
    for p in probs:
      ok = p > self.threshold
      out.append(
        RewardResult(
          float(ok), bool(ok), "ok" if ok else "judged_wrong", {"p": float(p)}
        )
      )
    return out


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
      f"reward_model: no {META} in {directory} (not a "
      "finished RM directory; train one with python "
      "-m k15.rewards.reward_model)"
    )
  with open(path) as f:
    meta = json.load(f)
  model = config_lib.to_dataclass(
    model_lib.ModelConfig, meta["model"], f"{path}:model"
  )
  kind = meta["kind"]
  tok = tokenizer_lib.load(os.path.join(directory, meta["tokenizer"]))
  placed = mesh if mesh is not None else _one_device_mesh()
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
    raise FileNotFoundError(f"reward_model: no params in {directory}")
  return RewardModel(
    kind=kind, model=model, params=out[1]["params"], tok=tok,
    budget=int(overrides.get("budget", meta.get("budget", 48))),
    rows=int(rows or meta.get("rows", 64)),
    threshold=float(threshold if threshold is not None
                    else meta.get("threshold", 0.5)),
    mesh=mesh,
  )  # fmt: skip


def _one_device_mesh():
  return sharding.make_mesh(
    dict(data=1, fsdp=1, tensor=1, context=1), devices=jax.devices()[:1]
  )


# ---------------------------------------------------------------------------
# The RL loop's reward
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """config.reward: what scores RL rollouts.

  kind: "verifier" (the task's rule, the default) | "cot_rm" | "scalar_rm";
  ckpt: the RM directory (`python -m k15.rewards.reward_model`);
  threshold: scalar RM only, p(correct) above which a response scores 1.
  The rule verifier is always computed too, for the agreement metrics, and
  evaluation always uses the rule.
  """

  kind: str = "verifier"
  ckpt: str = ""
  threshold: float = 0.5

  def __post_init__(self):
    if self.kind not in REWARD_KINDS:
      raise ValueError(
        f"reward.kind={self.kind!r}; expected one of {REWARD_KINDS}"
      )
    if self.kind in RM_KINDS and not self.ckpt:
      raise ValueError(
        f"reward.kind={self.kind!r} needs reward.ckpt (an RM directory)"
      )


def from_cfg(
  kind: str,
  *,
  ckpt: str = "",
  params: Any = None,
  model: model_lib.ModelConfig | None = None,
  tok: tokenizer_lib.Tokenizer | None = None,
  **kw: Any,
) -> RewardModel:
  """The reward registry's constructor (`get_reward_fn("cot_rm", ...)`): an
  RM directory (`ckpt`, with `load`'s keywords) or in-memory `params`,
  `model` and `tok` (with `RewardModel`'s fields)."""
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
  if cfg.kind == "verifier":
    return None
  return from_cfg(
    cfg.kind, ckpt=cfg.ckpt, mesh=mesh, rows=rows, threshold=cfg.threshold
  )


def agreement_metrics(
  results: Sequence[RewardResult], rule: np.ndarray, prefix: str
) -> dict[str, float]:
  """How an RM's judgements compare with the rule verifier's (0/1) labels:
  accuracy, false positive / negative rates (over the rule's negatives /
  positives) and the fractions malformed / too long."""
  rm = np.array([r.score > 0 for r in results], bool)
  y = np.asarray(rule) > 0
  causes = [r.cause for r in results]
  n = max(len(results), 1)
  return {
    prefix + "accuracy": float(np.mean(rm == y)) if len(y) else 0.0,
    prefix + "false_pos": float(np.sum(rm & ~y) / max(np.sum(~y), 1)),
    prefix + "false_neg": float(np.sum(~rm & y) / max(np.sum(y), 1)),
    prefix + "malformed": causes.count("malformed") / n,
    prefix + "too_long": causes.count("too_long") / n,
    prefix + "score": float(rm.mean()) if len(rm) else 0.0,
  }


def score(
  rm: RewardModel | None,
  tok: tokenizer_lib.Tokenizer,
  gens: Sequence[rollout.Generation],
  problems: Sequence,
  verify,
) -> tuple[np.ndarray, dict[str, float]]:
  """The RL loop's 0/1 reward per generation (problems[i] is gens[i]'s).

  rm=None: the task's rule verifier (`evaluate.score_responses`) and no
  metrics. Otherwise the RM's judgement, plus `reward/<kind>/...` metrics of
  its agreement with the rule verifier (`agreement_metrics`) and
  `reward/rule_accuracy`, so reward hacking shows as the two diverging.
  """
  answers = [p.answer for p in problems]
  rule = evaluate.score_responses(tok, gens, answers, verify)
  if rm is None:
    return rule, {}
  items = [dict(question=p.question, answer=p.answer) for p in problems]
  texts = [tok.decode(g.response) for g in gens]
  finished = [g.status == sampler_lib.STOPPED for g in gens]
  results = rm(items, texts, finished)
  out = np.array([r.score for r in results], np.float32)
  metrics = agreement_metrics(results, rule, f"reward/{rm.kind}/")
  metrics["reward/rule_accuracy"] = float(rule.mean()) if len(rule) else 0.0
  return out, metrics


# ---------------------------------------------------------------------------
# Training (python -m k15.rewards.reward_model)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RMTaskConfig:
  name: str = "chains"
  min_steps: int = 2
  max_steps: int = 6
  num_train: int = 4096
  num_eval: int = 256  # held-out (question, response) pairs
  ops: str = "+-*"  # arithmetic only
  max_operand: int = 9  # arithmetic only
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class RMTrainConfig:
  kinds: tuple[str, ...] = RM_KINDS
  steps: int = 300
  batch_size: int = 32
  budget: int = 48  # CoT reasoning + verdict tokens at scoring time
  rows: int = 64  # rows per scoring call
  threshold: float = 0.5
  vocab_size: int = 64  # the RM's own tokenizer (random init)
  log_every: int = 25
  # "cot_rm": when both kinds train in one run, the scalar RM's decoder
  # starts from the CoT RM just trained (as InstructGPT's RM starts from a
  # model that already reads the task); "": from config.init like the CoT RM
  scalar_init: str = "cot_rm"

  def __post_init__(self):
    if self.scalar_init not in ("", "cot_rm"):
      raise ValueError(f"rm.scalar_init={self.scalar_init!r}: '' or 'cot_rm'")
    bad = [k for k in self.kinds if k not in RM_KINDS]
    if bad or not self.kinds:
      raise ValueError(f"rm.kinds={self.kinds!r}: choose from {RM_KINDS}")
    for name in ("steps", "batch_size", "budget", "rows", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"rm.{name} must be >= 1")


@dataclasses.dataclass(frozen=True)
class RMSettings:
  seed: int
  init: str  # "" (random) | a HF checkpoint dir | an RM directory
  task: RMTaskConfig
  rm: RMTrainConfig
  model: model_lib.ModelConfig
  optim: train.OptimConfig
  mesh: dict[str, int]


_RM_SECTIONS = {
  "task": RMTaskConfig, "rm": RMTrainConfig,
  "model": model_lib.ModelConfig, "optim": train.OptimConfig,
}  # fmt: skip


def settings(config, *, vocab_size: int | None = None) -> RMSettings:
  """Validates an RM experiment config; errors name the field."""
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  config_lib.check_keys(
    cfg, set(_RM_SECTIONS) | {"seed", "init", "mesh", "name"}, "config"
  )
  out = {}
  for name, cls in _RM_SECTIONS.items():
    section = dict(cfg.get(name) or {})
    if name == "model" and vocab_size and not section.get("vocab_size"):
      section["vocab_size"] = -(-vocab_size // 8) * 8
    out[name] = config_lib.to_dataclass(cls, section, name)
  return RMSettings(
    seed=int(cfg.get("seed", 0)),
    init=str(cfg.get("init", "") or ""),
    mesh=dict(cfg.get("mesh") or {}),
    **out,
  )


def _tokenizer(
  s: RMSettings, task, workdir: str, examples: list[Example]
) -> tuple[tokenizer_lib.Tokenizer, list[str]]:
  """(tokenizer, its files). From `init` when it brings one, else trained
  on the task's text plus RM templates and verdicts (JSON characters)."""
  if s.init:
    if os.path.exists(os.path.join(s.init, META)):
      with open(os.path.join(s.init, META)) as f:
        name = json.load(f)["tokenizer"]
      path = os.path.join(s.init, name)
      return tokenizer_lib.load(path), [path]
    path = os.path.join(s.init, "tokenizer.json")
    extra = os.path.join(s.init, "tokenizer_config.json")
    return tokenizer_lib.load(path), [path] + (
      [extra] if os.path.exists(extra) else []
    )
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    corpus = list(task.tokenizer_corpus())
    for ex in examples[:500]:
      corpus.append(
        rm_prompt(ex.question, ex.reference, ex.response)
        + cot_target(ex.reasoning, ex.label)
      )
    for label in (True, False):  # both verdicts, whatever the sample
      corpus.append(cot_target(" final a!=ref b.", label))
    tok = tokenizer_lib.train_sentencepiece(
      corpus, s.rm.vocab_size, **getattr(task, "TOKENIZER", {})
    )
    if jax.process_index() == 0:
      tok.save(path)
  return tokenizer_lib.load(path), [path]


def _init_decoder(s: RMSettings) -> Any | None:
  """The decoder params `init` brings (host arrays), or None."""
  if not s.init:
    return None
  if os.path.exists(os.path.join(s.init, META)):
    rm = load(s.init)
    if rm.model != s.model:
      raise ValueError(
        f"config: init {s.init} has model {rm.model}, the config {s.model}"
      )
    p = jax.device_get(rm.params)
    return decoder_params(p) if rm.kind == "scalar_rm" else p
  from k15 import hf  # noqa: PLC0415 - safetensors only needed with init

  return hf.import_params(s.init, model=s.model)


def _model_for(s: RMSettings, vocab_size: int) -> RMSettings:
  if s.init and not os.path.exists(os.path.join(s.init, META)):
    from k15 import hf  # noqa: PLC0415

    runtime = {k: getattr(s.model, k) for k in (
      "dtype", "param_dtype", "remat", "attention", "max_len")}  # fmt: skip
    return dataclasses.replace(s, model=hf.config_from_hf(s.init, **runtime))
  if s.model.vocab_size < vocab_size:
    raise ValueError(
      f"config: model.vocab_size ({s.model.vocab_size}) is "
      f"smaller than the RM tokenizer's {vocab_size}"
    )
  return s


def evaluate_rm(
  rm: RewardModel, examples: Sequence[Example]
) -> dict[str, float]:
  """Accuracy of `rm` against the rule verifier's labels on `examples`,
  overall and per response kind, plus malformed verdicts (count)."""
  results = rm([dict(question=e.question, answer=e.reference)
                for e in examples], [e.response for e in examples],
               [True] * len(examples))  # fmt: skip
  labels = np.array([e.label for e in examples], np.float32)
  m = agreement_metrics(results, labels, "")
  m["n"] = float(len(examples))
  m["malformed_count"] = float(sum(r.cause == "malformed" for r in results))
  m["label_mean"] = float(labels.mean())
  for kind in sorted({e.kind for e in examples}):
    idx = [i for i, e in enumerate(examples) if e.kind == kind]
    m[f"accuracy/{kind}"] = float(np.mean(
      [(results[i].score > 0) == examples[i].label for i in idx]))  # fmt: skip
  return m


def train_kind(
  s: RMSettings,
  kind: str,
  *,
  tok: tokenizer_lib.Tokenizer,
  tok_files: Sequence[str],
  train_ex: Sequence[Example],
  eval_ex: Sequence[Example],
  workdir: str,
  mesh,
  decoder: Any | None = None,
  init_note: str = "",
) -> dict[str, Any]:
  """Trains one RM for `s.rm.steps` steps and writes `workdir/<kind>/`;
  returns {"train": last metrics, "eval": `evaluate_rm` on eval_ex,
  "params": the trained params}."""
  model, r = s.model, s.rm
  tx = train.make_optimizer(s.optim)
  rng = jax.random.fold_in(jax.random.key(s.seed), RM_KINDS.index(kind))
  params = init_params(rng, kind=kind, model=model, mesh=mesh, decoder=decoder)
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params,
    opt_state=jax.jit(tx.init)(params),
  )  # fmt: skip
  if kind == "cot_rm":
    enc = [encode_cot(tok, e) for e in train_ex]
    longest = max(len(t) for _, t in enc)
    if longest > r.budget:
      raise ValueError(
        f"rm.budget={r.budget} < the longest target ({longest} tokens)"
      )
    plen = _round16(max(len(p) for p, _ in enc))
    rlen = _round16(longest)
    if plen + rlen > model.max_len or plen > model.max_len - r.budget:
      raise ValueError(
        f"model.max_len={model.max_len} cannot hold RM "
        f"prompts of {plen} + targets of {rlen} tokens"
      )
    ds = data.sft_dataset(
      enc,
      batch_size=r.batch_size,
      prompt_len=plen,
      response_len=rlen,
      pad_id=tok.pad_id,
      seed=s.seed,
    )

    def step_fn(state, batch):
      return train.sft_step(state, batch, model=model, tx=tx)
  else:
    enc = [(tok.encode(rm_prompt(e.question, e.reference, e.response)),
            e.label) for e in train_ex]  # fmt: skip
    length = _round16(max(len(p) for p, _ in enc))
    if length > model.max_len:
      raise ValueError(
        f"model.max_len={model.max_len} < RM prompts of {length} tokens"
      )
    ds = _scalar_dataset(
      enc,
      batch_size=r.batch_size,
      length=length,
      pad_id=tok.pad_id,
      seed=s.seed,
    )

    def step_fn(state, batch):
      return scalar_rm_step(state, batch, model=model, tx=tx)

  out_dir = os.path.join(workdir, kind)
  writer = metrics_lib.MetricWriter(out_dir)
  shard = functools.partial(sharding.shard_batch, mesh=mesh)
  t0, m = time.time(), {}
  for step in range(r.steps):
    state, m = step_fn(state, shard(data.process_slice(ds[step])))
    if (step + 1) % r.log_every == 0 or step + 1 == r.steps:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      m["step_time"] = (time.time() - t0) / (step + 1)
      writer.write(kind, step + 1, m)
      logging.info("%s step %d: %s", kind, step + 1, m)
  rm = RewardModel(
    kind=kind,
    model=model,
    params=state.params,
    tok=tok,
    budget=r.budget,
    rows=r.rows,
    threshold=r.threshold,
    mesh=mesh,
  )
  ev = evaluate_rm(rm, eval_ex)
  writer.write(f"{kind}/eval", r.steps, ev)
  writer.close()
  save(out_dir, kind=kind, params=state.params, model=model,
       tok_files=tok_files,
       meta=dict(budget=r.budget, rows=r.rows, threshold=r.threshold,
                 steps=r.steps, task=dataclasses.asdict(s.task),
                 init=init_note or s.init, eval=ev))  # fmt: skip
  return {"train": m, "eval": ev, "params": state.params}


def _scalar_decoder(results: dict[str, Any], s: RMSettings, decoder: Any):
  if s.rm.scalar_init == "cot_rm" and "cot_rm" in results:
    return results["cot_rm"]["params"]
  return decoder


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _round16(n: int) -> int:
  return _round_up(n, 16)


def _scalar_dataset(
  rows: list[tuple[list[int], bool]],
  *,
  batch_size: int,
  length: int,
  pad_id: int,
  seed: int,
) -> grain.MapDataset:
  """Infinite reshuffled labelled batches (`scalar_batch` layout)."""

  def collate(chunk):
    return scalar_batch(list(chunk), length=length, pad_id=pad_id)

  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
  return ds.batch(batch_size, drop_remainder=True, batch_fn=collate)


def run(config, workdir: str, *, mesh=None) -> dict[str, Any]:
  """Trains every kind in `config.rm.kinds`; prints and returns accuracies
  against the rule verifier on the held-out pairs. `mesh` (default: from
  config.mesh) is where the RMs train and are evaluated."""
  s = settings(config)
  task = tasks.get(s.task.name)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t = s.task
  splits = task.splits(
    seed=t.seed,
    num_sft=t.num_train,
    num_rl=0,
    num_eval=t.num_eval,
    min_steps=t.min_steps,
    max_steps=t.max_steps,
    ops=t.ops,
    max_operand=t.max_operand,
  )
  train_ex = make_examples(splits["sft"], task, seed=s.seed)
  eval_ex = make_examples(splits["eval"], task, seed=s.seed + 1)
  tok, tok_files = _tokenizer(s, task, workdir, train_ex)
  s = _model_for(settings(config, vocab_size=tok.vocab_size), tok.vocab_size)
  if mesh is None:
    mesh = sharding.make_mesh(s.mesh) if s.mesh else _one_device_mesh()
  decoder = _init_decoder(s)
  results: dict[str, Any] = {}
  for kind in s.rm.kinds:
    results[kind] = train_kind(
      s,
      kind,
      tok=tok,
      tok_files=tok_files,
      train_ex=train_ex,
      eval_ex=eval_ex,
      workdir=workdir,
      mesh=mesh,
      decoder=(
        _scalar_decoder(results, s, decoder) if kind == "scalar_rm" else decoder
      ),
      init_note=(
        f"the cot_rm of this run ({s.rm.steps} steps)"
        if kind == "scalar_rm"
        and s.rm.scalar_init == "cot_rm"
        and "cot_rm" in results
        else ""
      ),
    )
    ev = results[kind]["eval"]
    print(f"{kind}: accuracy vs rule verifier {ev['accuracy']:.3f} on "
          f"{int(ev['n'])} held-out pairs after {s.rm.steps} steps "
          f"(malformed {int(ev['malformed_count'])}, false pos "
          f"{ev['false_pos']:.3f}, false neg {ev['false_neg']:.3f})",
          flush=True)  # fmt: skip
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v["eval"] for k, v in results.items()}, f, indent=2)
  return results


def _main(argv) -> None:
  del argv
  from absl import flags  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  # orbax logs every save at INFO through absl; keep the console readable.
  absl_logging.set_verbosity(absl_logging.WARNING)

  try:
    run(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    raise SystemExit(f"k15.rewards.reward_model: error: {e}") from e


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config",
    None,
    "RM experiment, e.g. experiments/reward_model.py",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Output directory (one subdir per RM)")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
