"""Prompt-set curation (report §2.1, PAPER.md §3.1): the filters that decide
what RL may train on, and their report. `k15.tools.curate` is the command
that runs them with a checkpoint's model.

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

Responses are judged by the reward entry point (`k15.rewards.score`), by
each row's `kind`, exactly as RL would reward them. `curate` is host Python
over an injectable `SampleFn` (tests use stubs).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from k15 import rejection, rewards
from k15 import tokenizer as tokenizer_lib

Row = dict[str, Any]

FORMS = ("multiple_choice", "true_false", "proof")
REASONS = FORMS + (
  "duplicate",
  "too_long",
  "easy_to_hack",
  "trivial",
  "unsolved",
)


# the sampler interface is rejection sampling's (same prompts, same judge)
Sample = rejection.Sample
SampleFn = rejection.SampleFn


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


def prompt_of(row: Row) -> str:
  """A row's prompt text: `question`, or `prompt` (code rows)."""
  return str(row.get("question", row.get("prompt", "")))


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
  question = prompt_of(row)
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
  rows: Sequence[Row],
  prompts: Sequence[str],
  *,
  n: int,
  sample_fn: SampleFn,
  pool: rewards.RewardPool,
  seed: int,
  temperature: float,
  max_tokens: int | None = None,
  response_prefix: str = "",
  score_unfinished: bool = False,
) -> np.ndarray:
  """[P, n] bool: whether sample j of prompt p (rows[p]'s) is correct.

  One `sample_fn` call over the prompts [p0] * n + [p1] * n + ...; an
  unfinished response is wrong unless `score_unfinished`;
  `response_prefix + text` is what the reward entry point judges (the
  no-CoT prefix holds the answer marker).
  """
  if not prompts:
    return np.zeros((0, n), bool)
  repeated = [p for p in prompts for _ in range(n)]
  out = sample_fn(
    repeated, seed=seed, temperature=temperature, max_tokens=max_tokens
  )
  if len(out) != len(repeated):
    raise ValueError(
      f"sample_fn returned {len(out)} responses for {len(repeated)} prompts"
    )
  batch = rewards.score(
    [row for row in rows for _ in range(n)],
    [response_prefix + r.text for r in out],
    [r.finished or score_unfinished for r in out],
    pool=pool,
  )
  return batch.correct.reshape(len(prompts), n)


def curate(
  rows: Sequence[Row],
  *,
  cfg: CurateConfig,
  sample_fn: SampleFn,
  pool: rewards.RewardPool | None = None,
  default_kind: str = "",
  fits: Callable[[str], bool] | None = None,
) -> tuple[list[Row], list[Decision]]:
  """Runs the filters; returns (kept rows with pass rates, one Decision per
  input row). `pool` holds the reward backends for the rows' kinds (a
  temporary pool of the built-in kinds when None); rows without a `kind`
  are scored as `default_kind` (e.g. the run's task); `fits(prompt_text)`
  says whether a prompt fits the model."""
  decisions = [Decision(i) for i in range(len(rows))]
  _form_filters(rows, decisions, cfg, fits)
  if not (cfg.no_cot_attempts or cfg.samples):
    return _kept(rows, decisions), decisions
  scored = [dict(r, kind=r.get("kind") or default_kind) for r in rows]
  own = pool is None
  pool = pool or rewards.RewardPool()
  try:
    _check_kinds(scored, decisions, pool)
    _no_cot_filter(scored, decisions, cfg, sample_fn, pool)
    _pass_rate_filter(scored, decisions, cfg, sample_fn, pool)
  finally:
    if own:
      pool.close()
  return _kept(rows, decisions), decisions


def _live(decisions: Sequence[Decision]) -> list[Decision]:
  return [d for d in decisions if d.reason is None]


def _kept(rows: Sequence[Row], decisions: Sequence[Decision]) -> list[Row]:
  kept = []
  for d in _live(decisions):
    row = dict(rows[d.index])
    if d.pass_rate is not None:
      row["difficulty_pass_rate"] = d.pass_rate
    kept.append(row)
  return kept


def _form_filters(rows, decisions, cfg: CurateConfig, fits) -> None:
  """Form, duplicate and length: no model needed."""
  seen: dict[str, int] = {}
  for d, row in zip(decisions, rows, strict=True):
    q = prompt_of(row)
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


def _check_kinds(rows, decisions, pool: rewards.RewardPool) -> None:
  """Every row left has a kind the pool can score, before any sampling."""
  for d in _live(decisions):
    kind = rows[d.index].get("kind")
    if not kind:
      raise ValueError(f"row {d.index + 1}: no 'kind' to score it by")
    try:
      pool.fn(kind)
    except ValueError as e:
      raise ValueError(f"row {d.index + 1}: {e}") from None


def _no_cot_filter(rows, decisions, cfg: CurateConfig, sample_fn, pool):
  """Drops rows answered without a chain of thought (easy to hack)."""
  todo = _live(decisions)
  if not (cfg.no_cot_attempts and todo):
    return
  ok = sample_correct(
    [rows[d.index] for d in todo],
    [
      no_cot_prompt(prompt_of(rows[d.index]), cfg.no_cot_prefix)
      for d in todo
    ],
    n=cfg.no_cot_attempts,
    sample_fn=sample_fn,
    pool=pool,
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


def _pass_rate_filter(rows, decisions, cfg: CurateConfig, sample_fn, pool):
  """Pass rates of the rows left; drops the trivial (and unsolved) ones."""
  todo = _live(decisions)
  if not (cfg.samples and todo):
    return
  ok = sample_correct(
    [rows[d.index] for d in todo],
    [cot_prompt(prompt_of(rows[d.index])) for d in todo],
    n=cfg.samples,
    sample_fn=sample_fn,
    pool=pool,
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
      question=prompt_of(row)[:120],
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
