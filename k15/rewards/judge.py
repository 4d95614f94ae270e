"""Reward models as judges, host side (report §2.3.5, PAPER.md §5.5): the
text template, the strict verdict parser and the `Judge` interface through
which the entry point asks a model.

A reward model reads (question, reference answer, response) in one
template, reference last so that its judgement is written right after it:

  Q: <question>
  S: <response>
  R: <reference>
  V:

The model itself (a CoT RM that writes short reasoning and a JSON verdict,
or a scalar-head RM) runs on the accelerator and lives in `k15.rm`; it is
injected into `RewardPool(judges=...)`, so nothing here imports the model
or the sampler.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from k15.rewards.base import RewardResult, check_lengths

RM_KINDS = ("cot_rm", "scalar_rm")
TEMPLATE = "Q: {question}\nS: {response}\nR: {reference}\nV:"


class Judge(Protocol):
  """A reward model: `judge(items, responses)` scores finished responses.

  Items carry "question" (or "prompt") and "answer" (the reference). One
  RewardResult per response: score 1 for a judged-correct response; 0 with
  cause "judged_wrong", "malformed" (a CoT verdict the parser rejects) or
  "too_long" (the template does not fit the model).
  """

  kind: str  # one of RM_KINDS

  def judge(
    self, items: Sequence[dict[str, Any]], responses: Sequence[str]
  ) -> list[RewardResult]: ...


class JudgeReward:
  """A `Judge` as a reward function: unfinished responses score 0
  ("truncated") and never reach the model."""

  def __init__(self, judge: Judge):
    self.judge = judge

  def __call__(
    self,
    items: list[dict[str, Any]],
    responses: list[str],
    finished: list[bool],
  ) -> list[RewardResult]:
    check_lengths(items, responses, finished)
    out: list[RewardResult | None] = [None] * len(items)
    todo = [i for i, done in enumerate(finished) if done]
    for i, r in zip(todo, self.judge.judge([items[i] for i in todo],
                                           [responses[i] for i in todo]),
                    strict=True):  # fmt: skip
      out[i] = r
    for i, done in enumerate(finished):
      if not done:
        out[i] = RewardResult(0.0, False, "truncated")
    return out  # type: ignore[return-value]


def rm_prompt(question: str, reference: str, response: str) -> str:
  return TEMPLATE.format(
    question=question, reference=reference, response=response
  )


def item_prompt(item: dict[str, Any], response: str) -> str:
  """The template of one reward row (question or prompt, answer)."""
  question = item.get("question", item.get("prompt"))
  return rm_prompt(str(question), str(item["answer"]), response)


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


def verdict_result(text: str, finished: bool) -> RewardResult:
  """A CoT RM's judgement text as a reward: 1 for a valid {"correct":
  true}, 0 for false ("judged_wrong") or a malformed or unfinished verdict
  ("malformed", the parser's cause in info["why"])."""
  v = parse_verdict(text) if finished else Verdict(None, "unfinished")
  info = {"judgement": text}
  if v.correct is None:
    return RewardResult(0.0, False, "malformed", {**info, "why": v.cause})
  if v.correct:
    return RewardResult(1.0, True, "ok", info)
  return RewardResult(0.0, False, "judged_wrong", info)


def probability_result(p: float, threshold: float) -> RewardResult:
  """A scalar RM's P(correct) as a reward: 1 when p > threshold."""
  ok = p > threshold
  return RewardResult(
    float(ok), bool(ok), "ok" if ok else "judged_wrong", {"p": float(p)}
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
