"""Prompt-set curation (report §2.1, PAPER.md §3.1): what RL may train on.

Filters run cheapest first; every dropped row keeps its reason:

1. form: multiple-choice, true/false and proof-style prompts, found by their
   metadata (`kind`, `type`, `format`, `question_type`, also inside
   `metadata`), their text ("(A) ... (B)", "True or False", "Prove that",
   "Show that", ...) or a true/false/yes/no answer. Their answers are easy
   to guess, so the verifier would reward guesses (reward hacking).
   Duplicate questions and prompts longer than the model's prompt bucket
   go here too.
2. easy to hack: the model must answer at once, without a chain of thought,
   because the prompt already ends with the task's answer marker
   (`no_cot_prefix`, " answer:" for the synthetic tasks). A prompt answered
   correctly at least `no_cot_min_correct` (1) times in `no_cot_attempts`
   (N = 8) is dropped: the report's "within N attempts". The answer gets
   `no_cot_max_tokens` (4) tokens and is judged even when cut there.
3. difficulty: `samples` (10) chain-of-thought responses at a high
   `temperature`; the pass rate (an unfinished response is wrong) is the
   difficulty proxy, written into each kept row as `difficulty_pass_rate`.
   Prompts with pass rate >= `trivial_pass_rate` are trivial and dropped
   (and those below `min_pass_rate`, off by default).

`curate` is host Python over an injectable `SampleFn` (tests use stubs);
`model_sample_fn` wraps the jitted sampler around a checkpoint's params.

  python -m k15.curate --config experiments/tiny.py --workdir DIR \\
      --input prompts.jsonl --output curated.jsonl [--ckpt sft|rl|PATH]

writes the kept rows, `curated.report.json` (counts per reason, every
dropped row with its reason and detail, pass-rate histogram) and prints a
table. The model is the workdir's latest checkpoint of `--ckpt` (default
the SFT stage, as in the report) or a checkpoint directory.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from k15 import tokenizer as tokenizer_lib

Row = dict[str, Any]
Verify = Callable[[str, str], bool]

FORMS = ("multiple_choice", "true_false", "proof")
REASONS = FORMS + (
  "duplicate",
  "too_long",
  "easy_to_hack",
  "trivial",
  "unsolved",
)


class Sample(NamedTuple):
  text: str  # the decoded response (without the prompt)
  finished: bool  # stopped by a stop token (not cut, not repeating)


class SampleFn(Protocol):
  """One `Sample` per prompt text.

  Deterministic for a seed; `max_tokens` None means the model's usual
  chain-of-thought budget.
  """

  def __call__(
    self,
    prompts: list[str],
    *,
    seed: int,
    temperature: float,
    max_tokens: int | None,
  ) -> list[Sample]: ...


@dataclasses.dataclass(frozen=True)
class CurateConfig:
  """Curation settings; the defaults are the report's where it gives one.

  samples: responses per prompt for the pass rate (report: 10); 0 = skip.
  temperature: their sampling temperature ("relatively high").
  trivial_pass_rate: drop prompts whose pass rate is >= this (1.0: solved
    in every sample).
  min_pass_rate: drop prompts whose pass rate is < this (0: keep all).
  no_cot_attempts: direct-answer attempts (report: N = 8); 0 = skip.
  no_cot_min_correct: correct direct answers that make a prompt easy to
    hack (1: "within N attempts").
  no_cot_prefix: appended to the formatted prompt to force a direct
    answer; also prepended to the response before verification.
  no_cot_temperature, no_cot_max_tokens: sampling of the direct answers.
  no_cot_score_unfinished: judge a direct answer cut by no_cot_max_tokens
    too (the cut is what forces it to be direct; a model that goes on
    after its guess still guessed). Chain-of-thought samples that do not
    finish are always wrong, as in evaluation.
  forms: which form filters are on (subset of FORMS).
  dedupe: drop repeated questions (keeps the first).
  seed: direct answers use `seed`, difficulty samples `seed + 1`.
  """

  samples: int = 10
  temperature: float = 1.0
  trivial_pass_rate: float = 1.0
  min_pass_rate: float = 0.0
  no_cot_attempts: int = 8
  no_cot_min_correct: int = 1
  no_cot_prefix: str = " answer:"
  no_cot_temperature: float = 1.0
  no_cot_max_tokens: int = 4
  no_cot_score_unfinished: bool = True
  forms: tuple[str, ...] = FORMS
  dedupe: bool = True
  seed: int = 0

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"curate.{field}={getattr(self, field)!r}: {why}")

    if self.samples < 0:
      bad("samples", "must be >= 0")
    if self.no_cot_attempts < 0:
      bad("no_cot_attempts", "must be >= 0")
    if self.no_cot_min_correct < 1:
      bad("no_cot_min_correct", "must be >= 1")
    if self.no_cot_max_tokens < 1:
      bad("no_cot_max_tokens", "must be >= 1")
    for f in ("temperature", "no_cot_temperature"):
      if getattr(self, f) < 0:
        bad(f, "must be >= 0")
    for f in ("trivial_pass_rate", "min_pass_rate"):
      if not 0.0 <= getattr(self, f) <= 1.0:
        bad(f, "must be in [0, 1]")
    object.__setattr__(self, "forms", tuple(self.forms))
    unknown = set(self.forms) - set(FORMS)
    if unknown:
      bad("forms", f"unknown {sorted(unknown)}; known {FORMS}")


@dataclasses.dataclass
class Decision:
  """What happened to one input row (`index` is 0-based)."""

  index: int
  reason: str | None = None  # None: kept
  detail: str = ""
  no_cot_correct: int | None = None
  pass_rate: float | None = None


# ---------------------------------------------------------------------------
# Form filters
# ---------------------------------------------------------------------------

_I, _S, _M = re.IGNORECASE, re.DOTALL, re.MULTILINE
FORM_PATTERNS: dict[str, tuple[tuple[str, re.Pattern], ...]] = {
  "multiple_choice": (
    ("(A) ... (B)", re.compile(r"\(\s*A\s*\).*?\(\s*B\s*\)", _S)),
    (
      "A. / B. option lines",
      re.compile(r"^\s*A\s*[.):]\s+\S.*\n\s*B\s*[.):]\s+\S", _M),
    ),
    (
      "which of the following",
      re.compile(r"\bwhich\s+of\s+the\s+following\b", _I),
    ),
    ("choices/options:", re.compile(r"\b(?:choices|options)\s*:", _I)),
  ),
  "true_false": (
    ("true or false", re.compile(r"\btrue\s+or\s+false\b", _I)),
    ("true/false", re.compile(r"\btrue\s*/\s*false\b|\bT\s*/\s*F\b", _I)),
    ("is it true that", re.compile(r"\bis\s+it\s+true\s+that\b", _I)),
  ),
  "proof": (
    ("prove that", re.compile(r"\bprove\s+that\b", _I)),
    ("show that", re.compile(r"\bshow\s+that\b", _I)),
    (
      "prove the/this",
      re.compile(r"\bprove\s+(?:the|this|that|each|every|all)\b", _I),
    ),
    ("demonstrate that", re.compile(r"\bdemonstrate\s+that\b", _I)),
    ("give a proof", re.compile(r"\b(?:give|write)\s+a\s+proof\b", _I)),
  ),
}
# Metadata values (lower case, - and spaces as _) that name a form.
FORM_TAGS = {
  "multiple_choice": {
    "multiple_choice",
    "multiple_choices",
    "mcq",
    "mc",
    "choice",
    "single_choice",
    "multi_choice",
    "multiple_answer",
  },
  "true_false": {
    "true_false",
    "truefalse",
    "tf",
    "boolean",
    "bool",
    "yes_no",
    "yesno",
    "judgement",
    "judgment",
  },
  "proof": {"proof", "proofs", "proof_based", "theorem_proving", "prove"},
}
_META_KEYS = (
  "kind",
  "type",
  "format",
  "question_type",
  "answer_type",
  "category",
)
# Not "t"/"f": single letters are ordinary answers (the chains task's nodes).
_BINARY_ANSWERS = {"true", "false", "yes", "no"}


def _tag(value: Any) -> str:
  return re.sub(r"[\s\-/]+", "_", str(value).strip().lower())


def form_reason(
  row: Mapping[str, Any], forms: Sequence[str] = FORMS
) -> tuple[str | None, str]:
  """(form, why) when the row is multiple-choice / true-false / proof."""
  meta = row.get("metadata")
  sources = [(k, row.get(k)) for k in _META_KEYS]
  if isinstance(meta, Mapping):
    sources += [(f"metadata.{k}", meta.get(k)) for k in _META_KEYS]
  for key, value in sources:
    if value is None:
      continue
    for form in forms:
      if _tag(value) in FORM_TAGS[form]:
        return form, f"{key}={value!r}"
  question = str(row.get("question", ""))
  for form in forms:
    for name, pattern in FORM_PATTERNS[form]:
      if pattern.search(question):
        return form, f"text matches {name!r}"
  answer = str(row.get("answer", "")).strip().strip(".").lower()
  if "true_false" in forms and answer in _BINARY_ANSWERS:
    return "true_false", f"answer is {answer!r}"
  if "multiple_choice" in forms and re.fullmatch(r"\(\s*[a-e]\s*\)", answer):
    return "multiple_choice", f"answer is an option label {answer!r}"
  return None, ""


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def cot_prompt(question: str) -> str:
  """The training prompt: the model writes its chain of thought next."""
  return tokenizer_lib.format_prompt(question)


def no_cot_prompt(question: str, prefix: str) -> str:
  """The training prompt plus the answer marker: the answer comes next."""
  return tokenizer_lib.format_prompt(question) + prefix


def sample_correct(
  prompts: Sequence[str],
  answers: Sequence[str],
  *,
  n: int,
  sample_fn: SampleFn,
  verify: Verify,
  seed: int,
  temperature: float,
  max_tokens: int | None = None,
  response_prefix: str = "",
  score_unfinished: bool = False,
) -> np.ndarray:
  """[P, n] bool: whether sample j of prompt p verifies.

  One `sample_fn` call over the rows [p0] * n + [p1] * n + ...; an
  unfinished response is wrong unless `score_unfinished`;
  `response_prefix + text` is what is verified (the no-CoT prefix holds
  the answer marker).
  """
  if not prompts:
    return np.zeros((0, n), bool)
  rows = [p for p in prompts for _ in range(n)]
  out = sample_fn(
    rows, seed=seed, temperature=temperature, max_tokens=max_tokens
  )
  if len(out) != len(rows):
    raise ValueError(
      f"sample_fn returned {len(out)} responses for {len(rows)} prompts"
    )
  golds = [a for a in answers for _ in range(n)]
  ok = [
    (r.finished or score_unfinished)
    and bool(verify(response_prefix + r.text, a))
    for r, a in zip(out, golds, strict=True)
  ]
  return np.array(ok, bool).reshape(len(prompts), n)


def curate(
  rows: Sequence[Row],
  *,
  cfg: CurateConfig,
  sample_fn: SampleFn,
  verify: Verify,
  fits: Callable[[str], bool] | None = None,
) -> tuple[list[Row], list[Decision]]:
  """Runs the filters; returns (kept rows with pass rates, one Decision per
  input row). `fits(prompt_text)` says whether a prompt fits the model."""
  decisions = [Decision(i) for i in range(len(rows))]
  seen: dict[str, int] = {}
  for d, row in zip(decisions, rows, strict=True):
    q = str(row["question"])
    d.reason, d.detail = form_reason(row, cfg.forms)
    if d.reason is None and cfg.dedupe:
      if q in seen:
        d.reason, d.detail = "duplicate", f"same question as row {seen[q] + 1}"
      seen.setdefault(q, d.index)
    if d.reason is None and fits is not None:
      texts = [cot_prompt(q)]
      if cfg.no_cot_attempts:
        texts.append(no_cot_prompt(q, cfg.no_cot_prefix))
      if not all(fits(t) for t in texts):
        d.reason, d.detail = "too_long", "prompt exceeds the prompt bucket"

  def live() -> list[Decision]:
    return [d for d in decisions if d.reason is None]

  if cfg.no_cot_attempts and live():
    todo = live()
    ok = sample_correct(
      [
        no_cot_prompt(str(rows[d.index]["question"]), cfg.no_cot_prefix)
        for d in todo
      ],
      [str(rows[d.index]["answer"]) for d in todo],
      n=cfg.no_cot_attempts,
      sample_fn=sample_fn,
      verify=verify,
      seed=cfg.seed,
      temperature=cfg.no_cot_temperature,
      max_tokens=cfg.no_cot_max_tokens,
      response_prefix=cfg.no_cot_prefix,
      score_unfinished=cfg.no_cot_score_unfinished,
    )
    for d, c in zip(todo, ok.sum(axis=1).tolist(), strict=True):
      d.no_cot_correct = int(c)
      if c >= cfg.no_cot_min_correct:
        d.reason = "easy_to_hack"
        d.detail = (
          f"{c}/{cfg.no_cot_attempts} direct answers correct "
          "without chain of thought"
        )

  if cfg.samples and live():
    todo = live()
    ok = sample_correct(
      [cot_prompt(str(rows[d.index]["question"])) for d in todo],
      [str(rows[d.index]["answer"]) for d in todo],
      n=cfg.samples,
      sample_fn=sample_fn,
      verify=verify,
      seed=cfg.seed + 1,
      temperature=cfg.temperature,
    )
    for d, c in zip(todo, ok.sum(axis=1).tolist(), strict=True):
      d.pass_rate = c / cfg.samples
      if d.pass_rate >= cfg.trivial_pass_rate:
        d.reason = "trivial"
        d.detail = f"pass rate {c}/{cfg.samples} >= {cfg.trivial_pass_rate}"
      elif d.pass_rate < cfg.min_pass_rate:
        d.reason = "unsolved"
        d.detail = f"pass rate {c}/{cfg.samples} < {cfg.min_pass_rate}"

  kept = []
  for d in live():
    row = dict(rows[d.index])
    if d.pass_rate is not None:
      row["difficulty_pass_rate"] = d.pass_rate
    kept.append(row)
  return kept, decisions


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def report(
  rows: Sequence[Row],
  decisions: Sequence[Decision],
  cfg: CurateConfig,
  **extra: Any,
) -> dict[str, Any]:
  """JSON-ready: counts per reason, each dropped row, pass-rate histogram.

  Rows are named by `row` (1-based position among the input's prompts)
  and `id` when they have one.
  """
  by_reason = collections.Counter(d.reason for d in decisions if d.reason)
  rates = [d.pass_rate for d in decisions if d.pass_rate is not None]
  kept_rates = [
    d.pass_rate
    for d in decisions
    if d.reason is None and d.pass_rate is not None
  ]
  hist = collections.Counter(f"{r:.2f}" for r in rates)
  dropped = []
  for d in decisions:
    if d.reason is None:
      continue
    row = rows[d.index]
    item = dict(
      row=d.index + 1,
      reason=d.reason,
      detail=d.detail,
      question=str(row["question"])[:120],
    )
    if "id" in row:
      item["id"] = row["id"]
    if d.no_cot_correct is not None:
      item["no_cot_correct"] = d.no_cot_correct
    if d.pass_rate is not None:
      item["pass_rate"] = d.pass_rate
    dropped.append(item)
  return dict(
    **extra,
    config=dataclasses.asdict(cfg),
    counts=dict(
      input=len(rows),
      kept=len(rows) - sum(by_reason.values()),
      dropped={r: by_reason[r] for r in REASONS if by_reason[r]},
    ),
    pass_rate=dict(
      estimated=len(rates),
      mean_all=float(np.mean(rates)) if rates else None,
      mean_kept=float(np.mean(kept_rates)) if kept_rates else None,
      histogram={k: hist[k] for k in sorted(hist)},
    ),
    dropped=dropped,
  )


def format_table(rep: Mapping[str, Any]) -> str:
  """A printable markdown table of the report's counts."""
  counts = rep["counts"]
  n = max(counts["input"], 1)
  lines = ["| outcome | rows | share |", "|---|---|---|"]
  for reason, c in counts["dropped"].items():
    lines.append(f"| dropped: {reason} | {c} | {c / n:.1%} |")
  lines.append(f"| kept | {counts['kept']} | {counts['kept'] / n:.1%} |")
  lines.append(f"| input | {counts['input']} | |")
  pr = rep["pass_rate"]
  if pr["estimated"]:
    hist = " ".join(f"{k}:{v}" for k, v in pr["histogram"].items())
    mean_kept = "-" if pr["mean_kept"] is None else f"{pr['mean_kept']:.3f}"
    lines.append(
      f"\npass rate over {pr['estimated']} estimated prompts "
      f"(mean {pr['mean_all']:.3f}, kept {mean_kept}): {hist}"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def read_prompts(path: str) -> list[Row]:
  """Rows of a JSONL prompt file; errors name the file and line.

  Minimal reader (fields: question, answer, optional difficulty, kind,
  metadata, id; others pass through unchanged). Numbers and booleans as
  answers become strings.
  """
  rows = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
      if not isinstance(row, dict):
        raise ValueError(
          f"{where}: expected a JSON object, got {type(row).__name__}"
        )
      q = row.get("question")
      if not isinstance(q, str) or not q.strip():
        raise ValueError(
          f"{where}: field 'question' must be a non-empty string"
        )
      a = row.get("answer")
      if isinstance(a, bool):
        a = str(a).lower()
      elif isinstance(a, (int, float)):
        a = str(a)
      if not isinstance(a, str) or not a.strip():
        raise ValueError(
          f"{where}: field 'answer' must be a non-empty string or number"
        )
      d = row.get("difficulty")
      if d is not None and (
        isinstance(d, bool) or not isinstance(d, (int, float))
      ):
        raise ValueError(f"{where}: field 'difficulty' must be a number")
      if "metadata" in row and not isinstance(row["metadata"], dict):
        raise ValueError(f"{where}: field 'metadata' must be an object")
      row["answer"] = a
      rows.append(row)
  if not rows:
    raise ValueError(f"{path}: no prompts")
  return rows


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def default_report_path(output: str) -> str:
  base = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
  return base + ".report.json"


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def model_sample_fn(
  params, *, tok, model, sampling, gen, shard_fn=None
) -> SampleFn:
  """A SampleFn over the jitted sampler (k15.rollout.generate).

  `finished` is the sampler's STOPPED status (a stop token); rows cut by
  the budget or the cache, or stopped for repeating, are unfinished.
  Chunks have `gen.rows` rows, so compiled programs are reused across calls
  with the same `max_tokens`.
  """
  import jax  # noqa: PLC0415 - the host-side filters do not need JAX

  from k15 import rollout, sampler  # noqa: PLC0415

  def fn(prompts, *, seed, temperature, max_tokens):
    g = gen
    if max_tokens is not None:
      g = dataclasses.replace(gen, budget=min(max_tokens, gen.budget))
    samp = dataclasses.replace(sampling, temperature=temperature)
    gens = rollout.generate(
      params,
      [tok.encode(p) for p in prompts],
      jax.random.key(seed),
      model=model,
      sampling=samp,
      gen=g,
      pad_id=tok.pad_id,
      shard_fn=shard_fn,
    )
    return [
      Sample(tok.decode(x.response), x.status == sampler.STOPPED) for x in gens
    ]

  return fn


def resolve_ckpt(workdir: str, ckpt: str) -> str:
  """A stage name (sft | rl | control) under workdir/ckpt, or a path."""
  from k15 import pipeline  # noqa: PLC0415

  path = (
    os.path.join(workdir, "ckpt", ckpt) if ckpt in pipeline.STAGES else ckpt
  )
  if not os.path.isdir(path) or not any(s.isdigit() for s in os.listdir(path)):
    raise FileNotFoundError(
      f"--ckpt {ckpt}: no checkpoint in {path}; run that stage first or "
      "pass a checkpoint directory (one holding numbered steps)"
    )
  return os.path.abspath(path)


def load_model(config, workdir: str, ckpt: str = "sft"):
  """(params, settings, tokenizer, step, checkpoint dir) of a workdir's run.

  The tokenizer is the run's (workdir/tokenizer.model, or the config's
  file); params come from the newest readable step of the checkpoint,
  restored into the config's mesh. Other items saved beside the train
  state (e.g. RL sampler statistics) are read and dropped.
  """
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  from k15 import checkpoint as ckpt_lib  # noqa: PLC0415
  from k15 import pipeline, sharding, train  # noqa: PLC0415

  pre = pipeline.settings(config)
  if pre.tokenizer.kind == "file":
    tok = tokenizer_lib.load(pre.tokenizer.path)
  else:
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"--workdir {workdir}: no tokenizer.model; "
        "run the sft stage there first"
      )
    tok = tokenizer_lib.load(path)
  s = pipeline.settings(
    config, vocab_size=tok.vocab_size, num_devices=jax.device_count()
  )
  directory = resolve_ckpt(workdir, ckpt)
  mesh = sharding.make_mesh(s.mesh)
  abstract = {
    "train": train.sharded_abstract_state(
      s.model, train.make_optimizer(s.optim), mesh
    )
  }
  steps = sorted(int(x) for x in os.listdir(directory) if x.isdigit())
  # orbax warns about the items it is not asked to restore; they are fine.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with ocp.StandardCheckpointer() as reader:
      meta = reader.metadata(os.path.join(directory, str(steps[-1]), "state"))
    tree = dict(getattr(meta, "item_metadata", meta))
    for key in tree:
      if key != "train":
        abstract[key] = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
          tree[key],
          is_leaf=lambda m: hasattr(m, "shape"),
        )
    ck = ckpt_lib.Checkpointer(directory)
    try:
      step, state, _ = ck.restore(abstract)
    finally:
      ck.close()
  finally:
    absl_logging.set_verbosity(verbosity)
  return state["train"].params, s, tok, step, directory


def curate_file(
  config,
  *,
  workdir: str,
  input_path: str,
  output_path: str,
  report_path: str | None = None,
  ckpt: str = "sft",
  cfg: CurateConfig = CurateConfig(),
) -> dict[str, Any]:
  """The command: curate a JSONL file with a run's model; returns the
  report (also written to `report_path`) and prints its table."""
  from k15 import sharding, tasks  # noqa: PLC0415

  rows = read_prompts(input_path)
  params, s, tok, step, directory = load_model(config, workdir, ckpt)
  mesh = sharding.make_mesh(s.mesh)
  sampling = dataclasses.replace(
    s.sampler, stop_tokens=tuple(s.sampler.stop_tokens) or (tok.eos_id,)
  )
  fn = model_sample_fn(
    params,
    tok=tok,
    model=s.model,
    sampling=sampling,
    gen=s.rollout.gen,
    shard_fn=lambda t: sharding.shard_batch(t, mesh),
  )
  bucket = max(s.rollout.gen.prompt_buckets)
  with sharding.mesh_context(mesh):  # as the pipeline samples
    kept, decisions = curate(
      rows,
      cfg=cfg,
      sample_fn=fn,
      verify=tasks.get(s.task.name).verify,
      fits=lambda t: len(tok.encode(t)) <= bucket,
    )
  report_path = report_path or default_report_path(output_path)
  rep = report(
    rows,
    decisions,
    cfg,
    input=os.path.abspath(input_path),
    output=os.path.abspath(output_path),
    model=dict(checkpoint=directory, step=int(step), task=s.task.name),
  )
  write_jsonl(output_path, kept)
  write_json(report_path, rep)
  print(
    f"\ncuration of {input_path} with {directory} (step {step}):\n"
    f"{format_table(rep)}\nkept rows -> {output_path}\n"
    f"report -> {report_path}\n",
    flush=True,
  )
  return rep


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_HELP = {
  "samples": "responses per prompt for the pass rate (0: skip)",
  "temperature": "sampling temperature of those responses",
  "trivial_pass_rate": "drop prompts with pass rate >= this",
  "min_pass_rate": "drop prompts with pass rate < this",
  "no_cot_attempts": "direct-answer attempts, N (0: skip)",
  "no_cot_min_correct": "correct direct answers that drop a prompt",
  "no_cot_prefix": "appended to the prompt to force a direct answer",
  "no_cot_temperature": "sampling temperature of direct answers",
  "no_cot_max_tokens": "token budget of a direct answer",
  "no_cot_score_unfinished": "judge direct answers cut by the budget too",
  "forms": f"form filters to apply (of {','.join(FORMS)})",
  "dedupe": "drop repeated questions",
  "seed": "sampling seed",
}


def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment file whose model/tokenizer/sampler the "
    "checkpoint was trained with, e.g. experiments/tiny.py",
    lock_config=True,
  )
  flags.DEFINE_string(
    "workdir", None, "The run's directory (tokenizer, checkpoints)."
  )
  flags.DEFINE_string("input", None, "JSONL prompt file.")
  flags.DEFINE_string("output", None, "Curated JSONL file to write.")
  flags.DEFINE_string(
    "report", None, "Report JSON (default: OUTPUT with .report.json)."
  )
  flags.DEFINE_string(
    "ckpt",
    "sft",
    "sft | rl | control (the workdir's "
    "newest checkpoint of that stage) or a checkpoint "
    "directory.",
  )
  defaults = CurateConfig()
  for f in dataclasses.fields(CurateConfig):
    value = getattr(defaults, f.name)
    define = {
      bool: flags.DEFINE_bool,
      int: flags.DEFINE_integer,
      float: flags.DEFINE_float,
      str: flags.DEFINE_string,
      tuple: flags.DEFINE_list,
    }[type(value)]
    define(
      f.name, list(value) if isinstance(value, tuple) else value, _HELP[f.name]
    )
  flags.mark_flags_as_required(["config", "workdir", "input", "output"])
  return flags.FLAGS


def main(argv):
  del argv
  import sys  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415
  from absl import logging as absl_logging  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.WARNING)
  f = flags.FLAGS
  try:
    cfg = CurateConfig(
      **{x.name: f[x.name].value for x in dataclasses.fields(CurateConfig)}
    )
    curate_file(
      f.config,
      workdir=f.workdir,
      input_path=f.input,
      output_path=f.output,
      report_path=f.report,
      ckpt=f.ckpt,
      cfg=cfg,
    )
  except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
    sys.exit(f"k15.curate: error: {e}")


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  _define_flags()
  app.run(main)
