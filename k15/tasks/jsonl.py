"""JSONL prompt files, validated row by row: one schema for math and code
prompts, for the RL set, the SFT set and the held-out set alike.

One JSON object per line:

  {"question": "What is 6 * 7?", "answer": "42", "difficulty": 2,
   "kind": "math"}
  {"prompt": "Write f(xs) ...", "kind": "code", "entry_point": "f",
   "tests": [{"args": [[1, 2]], "expected": 3}], "domain": "code"}

- `question` (or `prompt`, not both): a non-empty string;
- `answer`: a non-empty string, or a number (written back as JSON text);
  required except for kind "code", which needs `tests` instead: a
  non-empty list of code strings (run as "judge" tests with an
  `entry_point`), of {"args": [...], "expected": value} ("call") or of
  {"input": str, "output": str} ("stdio"); `entry_point` (a string) and
  `test_mode` are optional. A test mode a program could fake ("assert":
  code strings without an entry point) is a bad row: training and
  evaluation both score with the run's reward pool, which refuses it;
- `difficulty` (optional): an integer >= 0, the curriculum's label;
- `difficulty_pass_rate` (optional, written by `python -m
  k15.tools.curate`): the curated pass rate in [0, 1];
- `kind` (optional, default `JsonlConfig.default_kind`): a reward kind of
  `k15.rewards` ("exact", "math", "code");
- `domain` (optional): a name for per-domain metrics (letters, digits and
  `_`; default "code" for code rows, else "math");
- `trace` (optional): a string, the response the SFT warm-up imitates;
- `image` (optional): an image file path, or a list of them, relative to
  the JSONL file's directory, one per `<image>` marker of the question
  (`k15.images`; .npy uint8 [H, W, C] arrays, or PNG / JPEG / ... read as
  RGB with Pillow): a path that is not there, or a marker count that
  differs, is a bad row naming the line and the image. A run checks each
  image's shape against `model.vision` from the file's header when it
  starts (`pipeline.check_lengths`), and reads the pixels only when a stage
  encodes the row's prompt (`Problem.images`); either names the row's
  file:line;
- other fields pass through unchanged (ids, metadata).

`load_problems` reads several files into `Problem`s (what a run's task
splits hold), mixing them by weight and turning the curated pass rate into
the difficulty label and the prioritized sampler's prior.

A malformed row (bad JSON or UTF-8, not an object, a missing field, a wrong
type, an empty prompt, a prompt longer than `max_prompt_tokens`, a repeated
question) is reported as `file:line: reason`. `on_error="fail"` raises at
the first one; `on_error="skip"` drops such rows, counts them by reason and
logs the count and the first few; a file with no usable row always fails.
Blank lines are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from k15.rewards import code as code_reward

KINDS = ("exact", "math", "code", "cot_rm", "scalar_rm")  # = k15.rewards.KINDS
ON_ERROR = ("fail", "skip")
IMAGE_MARKER = "<image>"  # = k15.images.MARKER


@dataclasses.dataclass(frozen=True)
class JsonlConfig:
  """How to read a prompt file.

  on_error: "fail" (raise at the first bad row) or "skip" (drop bad rows,
    count and log them).
  max_prompt_tokens: 0 = no limit; else rows whose prompt is longer (as
    counted by the `count_tokens` given to `load`, e.g. the tokenizer on the
    chat-formatted prompt) are bad rows.
  default_kind: reward kind of rows without a `kind` field.
  """

  path: str = ""
  on_error: str = "fail"
  max_prompt_tokens: int = 0
  default_kind: str = "math"

  def __post_init__(self):
    if self.on_error not in ON_ERROR:
      raise ValueError(
        f"JsonlConfig.on_error={self.on_error!r}; expected one of {ON_ERROR}"
      )
    if self.max_prompt_tokens < 0:
      raise ValueError(
        f"JsonlConfig.max_prompt_tokens={self.max_prompt_tokens}; must be "
        ">= 0 (0 = no limit)"
      )
    if self.default_kind not in KINDS:
      raise ValueError(
        f"JsonlConfig.default_kind={self.default_kind!r}; expected one of "
        f"{KINDS}"
      )


class JsonlError(ValueError):
  """A bad prompt file or row; the message starts with `file:line:`."""


class _BadRow(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class LoadReport:
  """What `load` read: rows kept, rows skipped by reason, first errors."""

  path: str
  rows: int = 0
  kept: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  errors: list[str] = dataclasses.field(default_factory=list)
  lines: list[int] = dataclasses.field(default_factory=list)  # of kept rows

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


_MAX_ERRORS = 10  # first errors kept in the report


def load(
  cfg: JsonlConfig,
  count_tokens: Callable[[str], int] = len,
) -> tuple[list[dict[str, Any]], LoadReport]:
  """(rows, report) of `cfg.path`, each row a normalised dict.

  Rows carry `question`, `answer` (str; "" for code rows without one),
  `difficulty` (int, 0 when absent), `kind`, `trace` (str, "" when absent)
  and any other fields of the line. `count_tokens` measures prompts for
  `max_prompt_tokens` (default: characters).
  """
  if not cfg.path:
    raise JsonlError("JSONL prompt file: no path given")
  report = LoadReport(cfg.path)
  skipped: collections.Counter[str] = collections.Counter()
  rows: list[dict[str, Any]] = []
  seen: dict[str, int] = {}  # row key -> first line
  try:
    f = open(cfg.path, "rb")  # noqa: SIM115 - closed below
  except OSError as e:
    raise JsonlError(f"{cfg.path}: cannot open ({e.strerror})") from e
  with f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      report.rows += 1
      where = f"{cfg.path}:{lineno}"
      try:
        row = _row(raw, cfg, count_tokens)
        # an image row is its question and its images: "How many circles
        # in <image>?" may ask about many images
        key = json.dumps([row["question"], row.get("image")])
        first = seen.setdefault(key, lineno)
        if first != lineno:
          what = "question and images" if row.get("image") else "question"
          raise _BadRow("duplicate", f"repeats the {what} of line {first}")
      except _BadRow as e:
        msg = f"{where}: {e}"
        if cfg.on_error == "fail":
          raise JsonlError(msg) from None
        skipped[e.reason] += 1
        if len(report.errors) < _MAX_ERRORS:
          report.errors.append(msg)
        continue
      rows.append(row)
      report.lines.append(lineno)
  report.kept = len(rows)
  report.skipped = dict(sorted(skipped.items()))
  if report.num_skipped:
    logging.warning(
      "%s: skipped %d of %d rows (%s); first: %s",
      cfg.path,
      report.num_skipped,
      report.rows,
      ", ".join(f"{k}: {v}" for k, v in report.skipped.items()),
      "; ".join(report.errors[:3]),
    )
  if not rows:
    detail = f" ({report.num_skipped} bad rows skipped)" if skipped else ""
    raise JsonlError(f"{cfg.path}: no usable rows{detail}")
  return rows, report


def _row(
  raw: bytes, cfg: JsonlConfig, count_tokens: Callable[[str], int]
) -> dict[str, Any]:
  """One validated, normalised row; raises _BadRow naming the problem."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _BadRow("bad_json", f"not valid UTF-8 ({e.reason})") from None
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    raise _BadRow(
      "bad_json", f"not valid JSON ({e.msg}, column {e.colno})"
    ) from None
  if not isinstance(row, dict):
    raise _BadRow("not_object", f"expected a JSON object, got {_type(row)}")
  if "question" in row and "prompt" in row:
    raise _BadRow("bad_value", "has both 'question' and 'prompt'; use one")
  key = "prompt" if "prompt" in row else "question"
  question = row.pop(key, None)
  if question is None:
    raise _BadRow("missing_field", "missing field 'question' (or 'prompt')")
  if not isinstance(question, str):
    raise _BadRow(
      "wrong_type", f"field '{key}' should be a string, got {_type(question)}"
    )
  if not question.strip():
    raise _BadRow("empty_prompt", f"field '{key}' is empty")
  kind = row.get("kind", cfg.default_kind)
  if not isinstance(kind, str):
    raise _BadRow(
      "wrong_type", f"field 'kind' should be a string, got {_type(kind)}"
    )
  if kind not in KINDS:
    raise _BadRow(
      "bad_value", f"field 'kind'={kind!r}; expected one of {KINDS}"
    )
  answer = _answer(row, kind)
  difficulty = _difficulty(row.get("difficulty", 0))
  trace = row.get("trace", "")
  if not isinstance(trace, str):
    raise _BadRow(
      "wrong_type", f"field 'trace' should be a string, got {_type(trace)}"
    )
  if kind == "code":
    _code_fields(row)
  domain = row.get("domain", "code" if kind == "code" else "math")
  if (
    not isinstance(domain, str)
    or not _DOMAIN_RE.fullmatch(domain)
    or _DIFFICULTY_NAME.fullmatch(domain)
  ):
    raise _BadRow(
      "bad_value",
      f"field 'domain'={domain!r} should be a name of letters, digits and _ "
      "(not d<number>: metrics name difficulties so)",
    )
  pass_rate = row.get("difficulty_pass_rate")
  if pass_rate is not None and (
    isinstance(pass_rate, bool)
    or not isinstance(pass_rate, (int, float))
    or not 0 <= pass_rate <= 1
  ):
    raise _BadRow(
      "bad_value",
      f"field 'difficulty_pass_rate'={pass_rate!r} should be a number in "
      "[0, 1]",
    )
  _check_images(row, question, os.path.dirname(cfg.path))
  if cfg.max_prompt_tokens:
    n = count_tokens(question)
    if n > cfg.max_prompt_tokens:
      raise _BadRow(
        "oversize_prompt",
        f"prompt has {n} tokens, more than max_prompt_tokens="
        f"{cfg.max_prompt_tokens}",
      )
  row.update(
    question=question,
    answer=answer,
    difficulty=difficulty,
    kind=kind,
    trace=trace,
    domain=domain,
  )
  return row


_DOMAIN_RE = re.compile(r"[A-Za-z0-9_]+")
_DIFFICULTY_NAME = re.compile(r"d\d+")
_TEST_MODES = ("judge", "call", "stdio", "assert")
_MODES_OF_SHAPE = {
  "code": ("judge", "assert"),
  "call": ("call",),
  "stdio": ("stdio",),
}


def _code_fields(row: dict[str, Any]) -> None:
  """A code row's tests, entry point and test mode; a mode whose pass a
  program can fake is refused here, at load, not mid-run."""
  tests = row.get("tests")
  if tests is None:
    raise _BadRow("missing_field", "missing field 'tests' (kind 'code')")
  if not isinstance(tests, list) or not tests:
    raise _BadRow(
      "wrong_type", "field 'tests' should be a non-empty list of tests"
    )
  shapes = {_test_shape(t) for t in tests}
  if None in shapes or len(shapes) > 1:
    raise _BadRow(
      "wrong_type",
      "field 'tests' should be all code strings, all {'args': [...], "
      "'expected': ...} or all {'input': str, 'output': str}",
    )
  entry = row.get("entry_point")
  if entry is not None and (not isinstance(entry, str) or not entry):
    raise _BadRow(
      "wrong_type", "field 'entry_point' should be a non-empty string"
    )
  mode = row.get("test_mode")
  if mode is not None and mode not in _TEST_MODES:
    raise _BadRow(
      "bad_value", f"field 'test_mode'={mode!r}; expected one of {_TEST_MODES}"
    )
  mode = code_reward.test_mode(row)
  if mode not in _MODES_OF_SHAPE[shapes.pop()]:
    raise _BadRow(
      "bad_value", f"field 'test_mode'={mode!r} does not fit the tests' form"
    )
  if mode in ("judge", "call") and not entry:
    raise _BadRow(
      "missing_field", f"missing field 'entry_point' (test mode {mode!r})"
    )
  try:
    code_reward.check_mode_for_training(mode, "test_mode")
  except ValueError as e:
    raise _BadRow("fakeable_tests", str(e)) from None


def _test_shape(t: Any) -> str | None:
  if isinstance(t, str) and t.strip():
    return "code"
  if isinstance(t, dict) and set(t) == {"args", "expected"}:
    return "call" if isinstance(t["args"], list) else None
  if isinstance(t, dict) and set(t) == {"input", "output"}:
    ok = isinstance(t["input"], str) and isinstance(t["output"], str)
    return "stdio" if ok else None
  return None


def image_paths(row: dict[str, Any], base_dir: str) -> tuple[str, ...]:
  """A checked row's image files (its `image` field under `base_dir`, the
  JSONL file's directory), in marker order; () for a text row."""
  field = row.get("image")
  paths = [] if field is None else [field] if isinstance(field, str) else field
  return tuple(os.path.join(base_dir, p) for p in paths)


def _check_images(row: dict[str, Any], question: str, base_dir: str) -> None:
  field = row.get("image")
  paths = [] if field is None else [field] if isinstance(field, str) else field
  if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
    raise _BadRow("bad_image", "field 'image' should be a path or a list of "
                  f"paths, got {_type(field)}")  # fmt: skip
  for i, p in enumerate(paths):
    full = os.path.join(base_dir, p)
    if not os.path.isfile(full):
      raise _BadRow("bad_image", f"image {i}: image file {full} does not "
                    "exist")  # fmt: skip
  markers = question.count(IMAGE_MARKER)
  if paths and markers != len(paths):
    raise _BadRow("bad_image", f"the question has {markers} {IMAGE_MARKER} "
                  f"markers but the row has {len(paths)} images")  # fmt: skip


def _answer(row: dict[str, Any], kind: str) -> str:
  answer = row.get("answer")
  if kind == "code" and answer in (None, ""):
    return ""  # code rows are judged by their tests
  if answer is None:
    raise _BadRow("missing_field", "missing field 'answer'")
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    raise _BadRow(
      "wrong_type",
      f"field 'answer' should be a string or number, got {_type(answer)}",
    )
  if isinstance(answer, float) and not math.isfinite(answer):
    raise _BadRow("bad_value", f"field 'answer' is {answer}")
  text = answer if isinstance(answer, str) else json.dumps(answer)
  if not text.strip():
    raise _BadRow("empty_answer", "field 'answer' is empty")
  return text


def _difficulty(d: Any) -> int:
  if isinstance(d, bool) or not isinstance(d, (int, float)):
    raise _BadRow(
      "wrong_type",
      f"field 'difficulty' should be an integer, got {_type(d)}",
    )
  if isinstance(d, float) and not d.is_integer():
    raise _BadRow(
      "wrong_type", f"field 'difficulty' should be an integer, got {d}"
    )
  if d < 0:
    raise _BadRow("bad_value", f"field 'difficulty'={d} should be >= 0")
  return int(d)


def _type(x: Any) -> str:
  return "null" if x is None else type(x).__name__


# ---------------------------------------------------------------------------
# Problems: what a run's task splits hold
# ---------------------------------------------------------------------------

DIFFICULTY = ("auto", "label", "pass_rate")
# the curated pass rate p becomes the label round((1 - p) * PASS_RATE_LEVELS)
PASS_RATE_LEVELS = 10


@dataclasses.dataclass(frozen=True)
class Problem:
  """One JSONL row as the run uses it (the synthetic tasks' interface).

  difficulty: the curriculum's label (see `load_problems`); pass_rate: the
  curated pass rate (None when not curated), the prioritized sampler's
  prior; weight: the row's share of its file's mixing weight; where:
  "file:line", for errors found later (e.g. a prompt too long for the
  model's bucket, a bad image); image_paths: the row's image files, one
  per `<image>` marker of the question (`images`).
  """

  question: str
  answer: str
  difficulty: int
  trace: str
  kind: str
  domain: str
  row: dict[str, Any]
  pass_rate: float | None = None
  weight: float = 1.0
  where: str = ""
  image_paths: tuple[str, ...] = ()

  @property
  def images(self) -> tuple[Any, ...]:
    """The row's images, uint8 [H, W, C] arrays as the generated visual
    problems hold them (`k15.images`), read on each use through a
    per-process cache (`images.cached_image`): lazily, so a large image
    prompt set is never all in memory. A missing or unreadable file is an
    ImageError naming this row's file:line and the image."""
    if not self.image_paths:
      return ()
    from k15 import images  # noqa: PLC0415 - jax only for image rows

    return tuple(images.cached_image(f, f"{self.where}: image {i}")
                 for i, f in enumerate(self.image_paths))  # fmt: skip

  def to_item(self) -> dict[str, Any]:
    """The reward row (`k15.rewards.score`): every field of the line, the
    prompt under both names (completion items read `prompt`)."""
    return dict(self.row, prompt=self.question, difficulty=self.difficulty)


def difficulty_of(row: dict[str, Any], mode: str = "auto") -> int:
  """The label: the row's `difficulty` ("label"), or from its curated
  `difficulty_pass_rate` ("pass_rate"; "auto": when it has one)."""
  rate = row.get("difficulty_pass_rate")
  if mode == "label" or (mode == "auto" and rate is None):
    return int(row["difficulty"])
  if rate is None:
    raise ValueError("no 'difficulty_pass_rate' (task.difficulty=pass_rate)")
  return round((1.0 - float(rate)) * PASS_RATE_LEVELS)


def load_problems(
  paths: Sequence[str],
  *,
  weights: Sequence[float] = (),
  default_kind: str = "math",
  on_error: str = "fail",
  difficulty: str = "auto",
) -> list[Problem]:
  """The rows of every file, in order, as Problems.

  weights: one per file (default: each file's row count, i.e. every row
    alike): file f is drawn with probability weights[f] / sum(weights),
    spread evenly over its rows (`Problem.weight`).
  difficulty: "auto" | "label" | "pass_rate" (`difficulty_of`); with
    "auto" a curated row's pass rate sets its label (easy -> 0, unsolved
    -> PASS_RATE_LEVELS), so curriculum stages and balance follow the
    curation.
  Raises JsonlError naming file:line for a bad row (`on_error="fail"`).
  """
  if difficulty not in DIFFICULTY:
    raise ValueError(f"difficulty={difficulty!r}; expected one of {DIFFICULTY}")
  if weights and len(weights) != len(paths):
    raise ValueError(f"{len(weights)} weights for {len(paths)} files")
  out: list[Problem] = []
  for f, path in enumerate(paths):
    cfg = JsonlConfig(path=path, on_error=on_error, default_kind=default_kind)
    rows, report = load(cfg)
    w = float(weights[f]) / len(rows) if weights else 1.0
    for row, line in zip(rows, report.lines, strict=True):
      where = f"{path}:{line}"
      try:
        d = difficulty_of(row, difficulty)
      except ValueError as e:
        raise JsonlError(f"{where}: {e}") from None
      rate = row.get("difficulty_pass_rate")
      out.append(
        Problem(
          question=row["question"],
          answer=row["answer"],
          difficulty=d,
          trace=row["trace"],
          kind=row["kind"],
          domain=row["domain"],
          row=row,
          pass_rate=None if rate is None else float(rate),
          weight=w,
          where=where,
          image_paths=image_paths(row, os.path.dirname(path)),
        )
      )
  return out
