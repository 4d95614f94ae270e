"""Math word problems with `\\boxed{}` answers whose gold and predicted
forms differ, so only math-verify's equivalence can score them.

A problem is a quantity and a chain of 1-4 operations told in words; its
difficulty is the number of operations. The chain of thought lists the
operations, and the answer is the expression they build, unevaluated:

  Q: Ann has 7 liters of water. She adds 5 more liters. She splits it
     equally into 4 jugs. How many liters are in each jug?
  A: 7, +5, /4. \\boxed{(7+5)/4}

The JSONL row's `answer` holds the value in another form: an integer
("3"), a reduced fraction ("\\frac{7}{2}") or a terminating decimal
("3.5"), drawn per problem. `\\boxed{(7+5)/4}` and "3" share no string, so
the exact comparator says no and math-verify (sympy) says yes: a reward
that compared strings would give this task 0. A model has to read the
operations and translate them (copying the numbers, parenthesising),
which a small model learns on a CPU; it never has to do arithmetic.

`noisy_trace` makes unverified demonstrations: the chain of thought stays
right and one number of the boxed expression is replaced, as a careless
annotator would write it. Imitating such traces caps a model's accuracy;
only a reward on the answer lifts it (experiments/mixed.py).
"""

from __future__ import annotations

import dataclasses
import fractions

import numpy as np

NAMES = (("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dev", "He"),
         ("Eli", "He"), ("Fay", "She"))  # fmt: skip
# (unit, stuff, container)
UNITS = (("liters", "water", "jugs"), ("kg", "rice", "bags"),
         ("meters", "rope", "pieces"), ("cups", "flour", "bowls"))  # fmt: skip
OPS = "+-*/"
_PHRASES = {
  "+": ("{P} adds {b} more {u}.", "{P} gets {b} more {u}."),
  "-": ("{P} uses {b} {u}.", "{P} gives away {b} {u}."),
  "*": ("{P} makes {b} times as much.", "{P} ends up with {b} times that."),
  "/": ("{P} splits it equally into {b} {c}.",),
}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: str  # the gold value, in the row's form (int, \frac, decimal)
  difficulty: int  # number of operations
  trace: str  # the chain of thought + \boxed{expression}
  expression: str
  value: fractions.Fraction

  def to_row(self) -> dict:
    """The JSONL row (`k15.tasks.jsonl` schema)."""
    return dict(question=self.question, answer=self.answer,
                trace=self.trace, difficulty=self.difficulty, kind="math",
                domain="math")  # fmt: skip


def _wrap(expr: str, prec: int, op: str) -> str:
  """`expr` as the left operand of `op` (parenthesised when it binds
  looser; "-" and "/" also bind their right side, never ours)."""
  return f"({expr})" if prec < _PREC[op] else expr


def gold_form(value: fractions.Fraction, rng: np.random.Generator) -> str:
  """The value as an integer, or in a form drawn per problem: a reduced
  `\\frac{p}{q}` or, when it terminates, a decimal."""
  if value.denominator == 1:
    return str(value.numerator)
  q = value.denominator
  while q % 2 == 0:
    q //= 2
  while q % 5 == 0:
    q //= 5
  if q == 1 and rng.random() < 0.5:
    text = f"{float(value):.6f}".rstrip("0")
    return text
  sign = "-" if value < 0 else ""
  return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def make_problem(rng: np.random.Generator, steps: int,
                 max_operand: int = 9) -> Problem:
  """A problem of `steps` operations on numbers 2..max_operand; the value
  never goes negative, and division is the last operation only."""
  if steps < 1:
    raise ValueError(f"word_problems: steps must be >= 1, got {steps}")
  (name, pron), (u, stuff, c) = (NAMES[rng.integers(len(NAMES))],
                                 UNITS[rng.integers(len(UNITS))])
  a = int(rng.integers(2, max_operand + 1))
  value, expr, prec = fractions.Fraction(a), str(a), 3
  sentences = [f"{name} has {a} {u} of {stuff}."]
  cot = [str(a)]
  for i in range(steps):
    ops = OPS if i == steps - 1 else OPS[:3]
    b = int(rng.integers(2, max_operand + 1))
    op = ops[rng.integers(len(ops))]
    if op == "-" and value - b < 0:
      op = "+"
    phrase = _PHRASES[op][rng.integers(len(_PHRASES[op]))]
    sentences.append(phrase.format(P=pron, b=b, u=u, c=c))
    expr = f"{_wrap(expr, prec, op)}{op}{b}"
    prec = _PREC[op]
    value = {"+": value + b, "-": value - b, "*": value * b,
             "/": value / b}[op]  # fmt: skip
    cot.append(f"{op}{b}")
  if cot[-1][0] == "/":
    sentences.append(f"How many {u} are in each {c[:-1]}?")
  else:
    sentences.append(f"How many {u} does {pron.lower()} have now?")
  trace = " " + ", ".join(cot) + f". \\boxed{{{expr}}}"
  return Problem(" ".join(sentences), gold_form(value, rng), steps, trace,
                 expr, value)  # fmt: skip


def generate(n: int, *, seed: int, min_steps: int, max_steps: int,
             exclude: frozenset[str] | set[str] = frozenset(),
             max_operand: int = 9) -> list[Problem]:
  """n distinct problems (by question), difficulty uniform in
  [min_steps, max_steps]."""
  rng = np.random.default_rng(seed)
  out, seen = [], set(exclude)
  for _ in range(50 * n + 1000):
    if len(out) == n:
      return out
    p = make_problem(rng, int(rng.integers(min_steps, max_steps + 1)),
                     max_operand)
    if p.question not in seen:
      seen.add(p.question)
      out.append(p)
  raise ValueError(f"word_problems: cannot draw {n} distinct problems with "
                   f"{min_steps}-{max_steps} steps")


def noisy_trace(p: Problem, rng: np.random.Generator,
                max_operand: int = 9) -> str:
  """p's trace with one number of the boxed expression replaced by another
  (the chain of thought before it stays right)."""
  head, _, _ = p.trace.rpartition("\\boxed{")
  digits = [i for i, ch in enumerate(p.expression) if ch.isdigit()]
  i = digits[rng.integers(len(digits))]
  wrong = [str(d) for d in range(2, max_operand + 1) if str(d) !=
           p.expression[i]]  # fmt: skip
  expr = p.expression[:i] + wrong[rng.integers(len(wrong))] + \
      p.expression[i + 1:]  # fmt: skip
  return f"{head}\\boxed{{{expr}}}"
