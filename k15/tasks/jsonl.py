"""JSONL prompt files (GSM8K / MATH style), validated row by row.

One JSON object per line:

  {"question": "What is 6 * 7?", "answer": "42", "difficulty": 2,
   "kind": "math"}

- `question` (or `prompt`, not both): a non-empty string;
- `answer`: a non-empty string, or a number (written back as JSON text);
  required except for kind "code", which needs `tests` (non-empty list of
  strings) instead;
- `difficulty` (optional): an integer >= 0, the curriculum's label;
- `kind` (optional, default `JsonlConfig.default_kind`): a reward kind of
  `k15.rewards` ("exact", "math", "code");
- `trace` (optional): a string, the chain of thought for SFT warm-up;
- `image` (optional): an image file path, or a list of them, relative to
  the JSONL file's directory, one per `<image>` marker of the question
  (`k15.images`): a path that is not there, or a marker count that differs,
  is a bad row naming the line and the image. The pixels themselves are
  checked when the row's prompt is encoded (`images.encode_prompt`, whose
  errors name the row too);
- other fields pass through unchanged (ids, metadata).

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
from collections.abc import Callable
from typing import Any

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
  seen: dict[str, int] = {}
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
        first = seen.setdefault(row["question"], lineno)
        if first != lineno:
          raise _BadRow("duplicate", f"repeats the question of line {first}")
      except _BadRow as e:
        msg = f"{where}: {e}"
        if cfg.on_error == "fail":
          raise JsonlError(msg) from None
        skipped[e.reason] += 1
        if len(report.errors) < _MAX_ERRORS:
          report.errors.append(msg)
        continue
      rows.append(row)
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
    tests = row.get("tests")
    if tests is None:
      raise _BadRow("missing_field", "missing field 'tests' (kind 'code')")
    if (
      not isinstance(tests, list)
      or not tests
      or not all(isinstance(t, str) for t in tests)
    ):
      raise _BadRow(
        "wrong_type", "field 'tests' should be a non-empty list of strings"
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
  )
  return row


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
  if answer is None:
    if kind == "code":
      return ""
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
