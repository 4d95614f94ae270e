"""Trains reward models (report §2.3.5, PAPER.md §5.5) on a synthetic task
whose rule verifier gives the labels.

  python -m k15.tools.train_rm --config experiments/reward_model.py \\
      --workdir DIR

trains each configured kind (`rm.kinds`: "cot_rm", "scalar_rm") into
`DIR/<kind>/` (rm.json, tokenizer, params; `k15.rm.load` reads it back)
and reports its accuracy against the rule verifier on held-out pairs.

Data (`make_examples`): one (question, reference, response) pair per
problem, the response a gold trace, a trace with a sloppy step but the
right answer, a wrong final answer, a wrong last step, a truncated trace or
one with several answers; the label is always the task's `verify`. The CoT
RM's target reasoning is what the rule did (" final X!=ref Y."), then its
JSON verdict; the scalar RM learns the label by binary cross-entropy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from k15 import config_lib, data, rewards, sharding, tasks, train
from k15 import metrics as metrics_lib
from k15 import model as model_lib
from k15 import rm as rm_lib
from k15 import tokenizer as tokenizer_lib
from k15.rewards import judge as judge_lib
from k15.rewards.judge import cot_target, rm_prompt

RM_KINDS = rm_lib.RM_KINDS

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
      f"train_rm: trace {trace!r} does not end with '{_ANSWER_SEP}{answer}'"
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
  raise ValueError(f"train_rm: unknown response kind {kind!r}")


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
    raise ValueError("train_rm: problems need >= 2 distinct answers")
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
# The scalar RM's loss
# ---------------------------------------------------------------------------


def scalar_rm_loss(
  params, batch: dict, *, model: model_lib.ModelConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean binary cross-entropy of the head's logits vs label_B."""
  logits_B = rm_lib.ScalarHead(model).apply(
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
  state, m = train.apply_if_finite(state, grads, loss, tx=tx)
  return state, {**metrics, **m}


# ---------------------------------------------------------------------------
# Training (python -m k15.tools.train_rm)
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
    if os.path.exists(os.path.join(s.init, rm_lib.META)):
      with open(os.path.join(s.init, rm_lib.META)) as f:
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
  if os.path.exists(os.path.join(s.init, rm_lib.META)):
    rm = rm_lib.load(s.init)
    if rm.model != s.model:
      raise ValueError(
        f"config: init {s.init} has model {rm.model}, the config {s.model}"
      )
    p = jax.device_get(rm.params)
    return rm_lib.decoder_params(p) if rm.kind == "scalar_rm" else p
  from k15 import hf  # noqa: PLC0415 - safetensors only needed with init

  return hf.import_params(s.init, model=s.model)


def _model_for(s: RMSettings, vocab_size: int) -> RMSettings:
  if s.init and not os.path.exists(os.path.join(s.init, rm_lib.META)):
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
  rm: rm_lib.RewardModel, examples: Sequence[Example]
) -> dict[str, float]:
  """Accuracy of `rm` against the rule verifier's labels on `examples`,
  overall and per response kind, plus malformed verdicts (count); the RM
  scores through the reward entry point, as in an RL run."""
  rows = [dict(question=e.question, answer=e.reference, kind=rm.kind)
          for e in examples]  # fmt: skip
  with rewards.RewardPool(judges=rm_lib.judges(rm)) as pool:
    results = rewards.score(
      rows, [e.response for e in examples], [True] * len(examples), pool=pool
    ).results
  labels = np.array([e.label for e in examples], np.float32)
  m = judge_lib.agreement_metrics(results, labels, "")
  m["n"] = float(len(examples))
  m["malformed_count"] = float(sum(r.cause == "malformed" for r in results))
  m["label_mean"] = float(labels.mean())
  for kind in sorted({e.kind for e in examples}):
    idx = [i for i, e in enumerate(examples) if e.kind == kind]
    m[f"accuracy/{kind}"] = float(np.mean(
      [(results[i].score > 0) == examples[i].label for i in idx]))  # fmt: skip
  return m


def _cot_step(s: RMSettings, tok, train_ex, tx):
  """(dataset, step_fn) of the CoT RM: SFT on reasoning + verdict."""
  model, r = s.model, s.rm
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

  return ds, step_fn


def _scalar_step(s: RMSettings, tok, train_ex, tx):
  """(dataset, step_fn) of the scalar RM: BCE on the rule's labels."""
  model, r = s.model, s.rm
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

  return ds, step_fn


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
  params = rm_lib.init_params(
    rng, kind=kind, model=model, mesh=mesh, decoder=decoder
  )
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params,
    opt_state=jax.jit(tx.init)(params),
  )  # fmt: skip
  make = _cot_step if kind == "cot_rm" else _scalar_step
  ds, step_fn = make(s, tok, train_ex, tx)
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
  rm = rm_lib.RewardModel(
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
  rm_lib.save(out_dir, kind=kind, params=state.params, model=model,
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
    return rm_lib.scalar_batch(list(chunk), length=length, pad_id=pad_id)

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
    mesh = sharding.make_mesh(s.mesh) if s.mesh else rm_lib.one_device_mesh()
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
    raise SystemExit(f"k15.tools.train_rm: error: {e}") from e


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
