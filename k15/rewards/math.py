"""Rule-based math reward: final-answer extraction, anti-hacking rules and
equivalence by `math-verify`, with an exact comparator as the fast path.

A response is read as reasoning followed by a final answer section: the text
after the last `</think>` when the response uses think tags, else the whole
response. Answers are marked `\\boxed{...}` (nested braces allowed),
`answer: X` or `#### X` (`formats` chooses which count). Rules (each scores
0, with its own cause, because each is a way to collect reward without
solving the task):

- truncated: the trajectory was cut by the length limit (`finished=False`);
- no_answer: no marked answer anywhere;
- answer_in_reasoning: marked answers only inside the reasoning (an unclosed
  `<think>`, or the last answer followed by more than `max_trailing_chars`
  of further text);
- multiple_answers: the final section marks two or more different answers
  (hedging: "\\boxed{3} or \\boxed{4}").

math-verify times out with `signal.alarm`, which only works in a main thread
(other frameworks silently score 0 there), so it runs in `WorkerPool`
processes with an outer per-item timeout; a timeout or crash scores 0 and
shows as cause "timeout" / "error". math-verify's own limit (3 s per parse
or comparison) is a timeout too: left to itself, math-verify logs it and
answers False, which would count a slow check as a wrong answer.
"""

import dataclasses
import itertools
import re
import threading
from collections.abc import Sequence
from typing import Any

from k15.rewards import workers
from k15.rewards.base import RewardResult, check_lengths

FORMATS = ("boxed", "answer", "hash")

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_RE = re.compile(r"\banswer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_MAX_BOX_CHARS = 2000  # a longer \boxed{...} is not an answer
_TOKEN_RE = re.compile(r"[^\s$.,;]+")
_SPECIAL_RE = re.compile(r"\\.|[{}]", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Extraction:
  """answer: the final answer (None when a rule fails); cause: "ok" or the
  rule that failed; answers: every answer marked in the final section."""

  answer: str | None
  cause: str
  answers: tuple[str, ...] = ()


def _brace_pairs(text: str) -> dict[int, int]:
  """Index of each "{" -> its matching "}" (escaped \\{ \\} are text), in one
  pass over the special characters only: linear even on hostile input."""
  stack, pairs = [], {}
  for m in _SPECIAL_RE.finditer(text):
    c = m.group()
    if c == "{":
      stack.append(m.start())
    elif c == "}" and stack:
      pairs[stack.pop()] = m.start()
  return pairs


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
  """(start, end, content) of each `\\boxed{...}`, braces balanced; an
  unbalanced `\\boxed{` marks nothing."""
  spans = []
  pairs = None
  for m in _BOXED_RE.finditer(text):
    i = m.end()
    while i < len(text) and text[i] in " \t":
      i += 1
    if i < len(text) and text[i] != "{":  # `\boxed 5`: one token
      tok = _TOKEN_RE.match(text, i, i + _MAX_BOX_CHARS)
      if tok:
        spans.append((m.start(), tok.end(), tok.group()))
      continue
    if pairs is None:
      pairs = _brace_pairs(text)
    j = pairs.get(i)
    if j is not None and j - i <= _MAX_BOX_CHARS:
      spans.append((m.start(), j + 1, text[i + 1 : j]))
  return spans


def _clean(value: str) -> str:
  value = value.strip()
  for _ in range(3):
    value = value.strip().strip("*").strip()
    if len(value) >= 2 and value[0] == value[-1] == "$":
      value = value[1:-1]
    value = value.rstrip(".").strip()
  return value


def _markers(text: str, formats: Sequence[str]) -> list[tuple[int, int, str]]:
  """Marked answers in `text` as (start, end, value), in order."""
  out = []
  boxed = _boxed_spans(text) if "boxed" in formats else []
  out += boxed
  line_res = []
  if "answer" in formats:
    line_res.append(_ANSWER_RE)
  if "hash" in formats:
    line_res.append(_HASH_RE)
  for pattern in line_res:
    for m in pattern.finditer(text):
      s, e = m.span(1)
      if any(s <= bs and be <= e for bs, be, _ in boxed):
        continue  # "answer: it is \boxed{4}": the box is the answer
      out.append((m.start(), e, m.group(1)))
  out.sort()
  return [(s, e, _clean(v)) for s, e, v in out if _clean(v)]


def normalize(answer: str) -> str:
  """Canonical string for the exact comparator and the distinctness rule."""
  s = _clean(answer)
  for a, b in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""),
               ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
               ("\\ ", ""), ("^\\circ", ""), ("^{\\circ}", "")):  # fmt: skip
    s = s.replace(a, b)
  s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
  s = re.sub(r"\s+", "", s)
  if re.fullmatch(r"-?[\d,]*\.?\d+", s) and "," in s:
    s = s.replace(",", "")  # 1,000 -> 1000 (only for plain numbers)
  return s


def _as_number(s: str) -> float | None:
  if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s):
    return float(s)
  return None


def exact_equal(pred: str, gold: str) -> bool:
  """The fast path: same normalized string, or the same plain number."""
  p, g = normalize(pred), normalize(gold)
  if p == g:
    return True
  pn, gn = _as_number(p), _as_number(g)
  return pn is not None and gn is not None and pn == gn


def extract(
  response: str,
  formats: Sequence[str] = FORMATS,
  max_trailing_chars: int | None = 300,
) -> Extraction:
  """Applies the answer rules (module docstring) to one finished response."""
  unknown = set(formats) - set(FORMATS)
  if unknown:
    raise ValueError(f"math: unknown answer formats {sorted(unknown)}")
  close = response.rfind(_THINK_CLOSE)
  if close >= 0:
    final = response[close + len(_THINK_CLOSE) :]
    reasoning = response[:close]
  elif _THINK_OPEN in response:
    final, reasoning = "", response  # never closed: all of it is reasoning
  else:
    final, reasoning = response, ""
  marks = _markers(final, formats)
  if not marks:
    cause = (
      "answer_in_reasoning" if _markers(reasoning, formats) else ("no_answer")
    )
    return Extraction(None, cause)
  answers = tuple(v for _, _, v in marks)
  if len({normalize(a) for a in answers}) > 1:
    return Extraction(None, "multiple_answers", answers)
  trailing = len(final) - marks[-1][1]
  if max_trailing_chars is not None and trailing > max_trailing_chars:
    return Extraction(None, "answer_in_reasoning", answers)
  return Extraction(answers[-1], "ok", answers)


def _verify_one(pair: tuple[str, str]) -> str:
  """Worker-side: math-verify's verdict on (gold, predicted): "ok",
  "wrong_answer", or "timeout" when its own alarm fired and no pair of
  parses matched. Errors count as False, as in math-verify itself; pairs
  are compared one by one so a timeout can be told from a False."""
  from math_verify import parse, verify
  from math_verify.errors import TimeoutException

  gold, pred = pair

  def wrap(s: str) -> str:
    return s if ("$" in s or "\\boxed" in s) else f"${s}$"

  def parsed(s: str) -> list:
    try:
      return parse(wrap(s), parsing_timeout=_INNER_TIMEOUT_S,
                   raise_on_error=True)  # fmt: skip
    except Exception:  # noqa: BLE001 - math-verify's own answer: nothing
      return []

  try:
    g, p = parsed(gold), parsed(pred)
  except TimeoutException:
    return "timeout"
  timed_out = False
  for a, b in itertools.product(g, p):
    try:
      if verify(a, b, timeout_seconds=_INNER_TIMEOUT_S, raise_on_error=True):
        return "ok"
    except TimeoutException:
      timed_out = True
    except Exception:  # noqa: BLE001 - as math-verify: not equal
      continue
  return "timeout" if timed_out else "wrong_answer"


_INNER_TIMEOUT_S = 3  # math-verify's own alarm, inside the outer timeout


def _gold(item: dict[str, Any]) -> str:
  if "answer" not in item:
    raise ValueError(f"math reward: item has no 'answer': {sorted(item)}")
  return str(item["answer"])


class MathReward:
  """`fn(items, responses, finished) -> list[RewardResult]` for math tasks.

  formats: answer markers that count (an item's "answer_formats" overrides);
  exact_only: skip math-verify (the 'exact' kind for synthetic tasks);
  timeout_s: outer per-item limit on verification (worker killed past it);
  num_workers: verifier processes (default: the machine's cores);
  memo: math-verify verdicts kept per (gold, answer) pair (a policy repeats
    its answers); only "ok" / "wrong_answer", never a timeout; 0 turns it
    off. Each distinct pair of a batch goes to the workers once.
  """

  def __init__(
    self,
    *,
    formats: Sequence[str] = FORMATS,
    max_trailing_chars: int | None = 300,
    exact_only: bool = False,
    timeout_s: float = 10.0,
    num_workers: int | None = None,
    memo: int = 1 << 16,
  ):
    self.memo = memo
    self._memo: dict[tuple[str, str], str] = {}
    self._lock = threading.Lock()
    self.formats = tuple(formats)
    self.max_trailing_chars = max_trailing_chars
    self.exact_only = exact_only
    self.timeout_s = timeout_s
    self.num_workers = num_workers
    self._pool: workers.WorkerPool | None = None

  @property
  def pool(self) -> workers.WorkerPool:
    if self._pool is None:
      self._pool = workers.WorkerPool(
        _verify_one, self.num_workers, preload=["math_verify"]
      )
    return self._pool

  def close(self) -> None:
    if self._pool is not None:
      self._pool.close()
      self._pool = None

  def __call__(
    self,
    items: list[dict[str, Any]],
    responses: list[str],
    finished: list[bool],
  ) -> list[RewardResult]:
    check_lengths(items, responses, finished)
    results: list[RewardResult | None] = [None] * len(items)
    slow: list[tuple[int, str, str]] = []
    for i, (item, response, done) in enumerate(
      zip(items, responses, finished, strict=True)
    ):
      gold = _gold(item)
      if not done:
        results[i] = RewardResult(0.0, False, "truncated")
        continue
      formats = item.get("answer_formats", self.formats)
      ex = extract(response, formats, self.max_trailing_chars)
      info = {"answer": ex.answer, "gold": gold}
      if ex.answer is None:
        info["answers"] = list(ex.answers)
        results[i] = RewardResult(0.0, False, ex.cause, info)
      elif exact_equal(ex.answer, gold):
        results[i] = RewardResult(1.0, True, "ok", {**info, "by": "exact"})
      elif self.exact_only:
        results[i] = RewardResult(0.0, False, "wrong_answer", info)
      else:
        slow.append((i, gold, ex.answer))
    if slow:
      self._verify(slow, results)
    return results  # type: ignore[return-value]

  def _verify(self, slow, results) -> None:
    """math-verify's verdicts on (index, gold, answer) triples, into
    results: remembered pairs from the memo, each other distinct pair once
    through the worker pool."""
    with self._lock:
      known = {(g, a): self._memo[(g, a)] for _, g, a in slow
               if (g, a) in self._memo}  # fmt: skip
    todo = list(dict.fromkeys((g, a) for _, g, a in slow
                              if (g, a) not in known))  # fmt: skip
    outcomes = dict(zip(todo, self.pool.map(todo, self.timeout_s),
                        strict=True))  # fmt: skip
    for i, gold, answer in slow:
      info = {"answer": answer, "gold": gold, "by": "math_verify"}
      if (gold, answer) in known:
        out = workers.Outcome("ok", known[(gold, answer)])
        info["cached"] = True
      else:
        out = outcomes[(gold, answer)]
      if out.ok and out.value == "ok":
        results[i] = RewardResult(1.0, True, "ok", info)
      elif out.ok:  # "wrong_answer", or "timeout" by math-verify's alarm
        if out.value == "timeout":
          info["detail"] = f"math-verify's own {_INNER_TIMEOUT_S} s limit"
        results[i] = RewardResult(0.0, False, out.value, info)
      else:
        cause = "timeout" if out.cause == "timeout" else "error"
        info["detail"] = out.detail
        results[i] = RewardResult(0.0, False, cause, info)
      if self.memo and out.ok and out.value in ("ok", "wrong_answer"):
        with self._lock:
          if len(self._memo) >= self.memo:
            self._memo.pop(next(iter(self._memo)))
          self._memo[(gold, answer)] = out.value
