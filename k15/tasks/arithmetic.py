"""Arithmetic chains mod 10: a synthetic reasoning task with an exact verifier.

A problem is a start digit and a chain of `+d` / `-d` / `*d` steps, all mod
10; its difficulty is the number of steps. Prompts are padded with `~~` to
the task's longest chain, and the chain of thought writes the start digit and
then one running result per step, then the answer:

  Q: 7+5*3-8~~~~
  A: 7 2 6 8. answer: 8

Every operand sits at the same distance from the result that uses it (two
tokens per step on both sides), so a small model can learn the reading
pattern quickly; what it must know is the table of `a op d mod 10` (270
entries with every op and operand; `ops` and `max_operand` shrink it).
`sft_max_steps` caps the warm-up traces' length below the RL and evaluation
range: a model that imitated only short chains stops (or derails) after as
many results as it has seen, and RL, rewarded on prompts of every length,
has to extend its chain of thought. Warm-up traces are exact; RL sees only
prompts and answers; the evaluation problems are disjoint from both.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# one token per character, so each step is two tokens on both sides
TOKENIZER = dict(model_type="char", user_symbols=("answer",))
ANSWER_RE = re.compile(r"answer:\s*(-?\d+)")
OPS = "+-*"


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: str
  difficulty: int
  trace: str  # the gold chain of thought + answer (used for warm-up only)
  kind: str = "arithmetic"  # the reward kind: the task whose verify scores it

  def to_item(self) -> dict:
    """The reward row (`k15.rewards.score`) of this problem."""
    return dict(question=self.question, answer=self.answer,
                difficulty=self.difficulty, kind=self.kind)


def _apply(a: int, op: str, d: int) -> int:
  return {"+": a + d, "-": a - d, "*": a * d}[op] % 10


def make_problem(rng: np.random.Generator, steps: int, ops: str = OPS,
                 width: int = 0, max_operand: int = 9) -> Problem:
  """`width` pads the prompt with `~~` to that many steps (0: no padding);
  operands are drawn from 1..max_operand (the fact table has
  10 * len(ops) * max_operand entries)."""
  a = int(rng.integers(0, 10))
  question, results, cur = str(a), [a], a
  for _ in range(steps):
    op = ops[int(rng.integers(0, len(ops)))]
    d = int(rng.integers(1, max_operand + 1))
    cur = _apply(cur, op, d)
    question += f"{op}{d}"
    results.append(cur)
  question += "~~" * max(width - steps, 0)
  trace = " " + " ".join(map(str, results)) + f". answer: {cur}"
  return Problem(question, str(cur), steps, trace)


def generate(n: int, *, seed: int, min_steps: int, max_steps: int,
             exclude: set[str] | frozenset[str] = frozenset(),
             ops: str = OPS, width: int = 0, max_operand: int = 9
             ) -> list[Problem]:
  """n distinct problems, difficulty uniform in [min_steps, max_steps],
  prompts padded to `width` steps (default max_steps)."""
  rng = np.random.default_rng(seed)
  out, seen = [], set(exclude)
  tries = 0
  while len(out) < n:
    tries += 1
    if tries > 50 * n + 1000:
      raise ValueError(
          f"arithmetic: cannot draw {n} distinct problems with steps in "
          f"[{min_steps}, {max_steps}]")
    p = make_problem(rng, int(rng.integers(min_steps, max_steps + 1)), ops,
                     width=width or max_steps, max_operand=max_operand)
    if p.question not in seen:
      seen.add(p.question)
      out.append(p)
  return out


def splits(*, seed: int, num_sft: int, num_rl: int, num_eval: int,
           min_steps: int, max_steps: int, ops: str = OPS,
           sft_max_steps: int = 0, max_operand: int = 9,
           sft_noise: float = 0.0, checks: int = 0, min_checks: int = 0
           ) -> dict[str, list[Problem]]:
  """Disjoint warm-up / RL / evaluation sets (by question text).

  `sft_max_steps` (if > 0) caps the warm-up traces' difficulty below the RL
  and evaluation range: RL then has to extend the chain of thought to
  problems longer than any it imitated. `checks` > 0 gives the warm-up
  traces the long-CoT format (`with_checks`, min_checks..checks passes).
  `sft_noise` is the fraction
  of warm-up traces whose final answer is wrong (`noisy_answers`).
  """
  kw = dict(ops=ops, max_operand=max_operand)
  ev = generate(num_eval, seed=seed + 2, min_steps=min_steps,
                max_steps=max_steps, **kw)
  used = {p.question for p in ev}
  sft = generate(num_sft, seed=seed, min_steps=min_steps,
                 max_steps=sft_max_steps or max_steps, exclude=used,
                 width=max_steps, **kw)
  used |= {p.question for p in sft}
  rl = generate(num_rl, seed=seed + 1, min_steps=min_steps,
                max_steps=max_steps, exclude=used, **kw)
  sft = with_checks(sft, checks, seed=seed + 4, min_checks=min_checks)
  sft = noisy_answers(sft, sft_noise, seed=seed + 3, alphabet="0123456789")
  return dict(sft=sft, rl=rl, eval=ev)


def with_checks(problems: list[Problem], checks: int, *, seed: int,
                min_checks: int = 0) -> list[Problem]:
  """The long-CoT format: each trace restates its chain of thought in r
  verification passes before the answer, r uniform in min_checks..checks
  (drawn by `seed`), e.g. with r = 2:

    short:  7 9 6 7. answer: 7
    long:   7 9 6 7. 7 9 6 7. 7 9 6 7. answer: 7

  The passes add no information (every one is the same chain), so a model
  that drops them loses nothing but tokens: the redundancy long2short
  methods remove. Lengths vary within the long model's own samples (r is
  its choice), which is what shortest-of-n selection and the length
  penalty work on. checks = 0 is the short format. With min_checks = 0
  (the default) a quarter of the traces at checks = 3 are the short
  format; min_checks >= 1 makes every trace long."""
  if checks < 0:
    raise ValueError(f"config: task.checks={checks} must be >= 0")
  if not 0 <= min_checks <= checks:
    raise ValueError(
        f"config: task.min_checks={min_checks} must be in 0..task.checks "
        f"({checks})")
  if checks == 0:
    return problems
  rng = np.random.default_rng(seed)
  out = []
  for p in problems:
    head, mark, tail = p.trace.rpartition(". answer:")
    passes = int(rng.integers(min_checks, checks + 1))
    out.append(dataclasses.replace(
        p, trace=head + ("." + head) * passes + mark + tail))
  return out


def noisy_answers(problems: list[Problem], frac: float, *, seed: int,
                  alphabet: str) -> list[Problem]:
  """Unverified demonstrations: `frac` of the traces (drawn by `seed`) end
  in a wrong answer, uniform over the other symbols of `alphabet`; their
  chain of thought stays right. A model that imitates them learns to guess
  between its own result and a random one, which only a reward on the
  answer can undo (the smallest case of RL beating more imitation)."""
  if not 0 <= frac <= 1:
    raise ValueError(f"config: task.sft_noise={frac} must be in [0, 1]")
  if frac == 0:
    return problems
  rng = np.random.default_rng(seed)
  bad = rng.permutation(len(problems))[:round(frac * len(problems))]
  out = list(problems)
  for i in bad:
    p = out[i]
    wrong = [c for c in alphabet if c != p.answer]
    head = p.trace[:p.trace.rindex("answer:")]
    out[i] = dataclasses.replace(
        p, trace=f"{head}answer: {wrong[int(rng.integers(len(wrong)))]}")
  return out


def extract_answer(response: str) -> str | None:
  """The answer after the last `answer:`; None if there is none, or if the
  response states several different answers (a guessing hack)."""
  found = ANSWER_RE.findall(response)
  if not found or len(set(found)) > 1:
    return None
  return found[-1]


def verify(response: str, answer: str) -> bool:
  return extract_answer(response) == answer


def tokenizer_corpus(seed: int = 1234, n: int = 2000) -> list[str]:
  """Text the task's sentencepiece model is trained on (deterministic)."""
  from k15 import tokenizer  # noqa: PLC0415

  probs = generate(n, seed=seed, min_steps=1, max_steps=8, width=8)
  return [tokenizer.format_prompt(p.question) + p.trace for p in probs]
