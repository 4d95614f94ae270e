"""Short Python functions from a description and an example, checked by
hidden tests in the sandbox.

A problem asks for `f(xs)` over a list of integers, built from up to three
parts: a filter (keep the numbers above t, the even ones, ...), a map (add
a, multiply by a, square) and a reduction (the sum or the count; without
one the list is returned). Its difficulty is the number of parts. The
prompt gives the description and one example; the hidden tests are other
lists, run in the sandbox as "call" tests (`f(*args) == expected`, compared
outside the program's process, so a program cannot fake a pass):

  Q: Write f(xs): keep the numbers above 2, multiply each by 3, return
     the sum. Example: f([4,1,3]) == 21
  A: ```python
  def f(xs):
    return sum(x*3 for x in xs if x>2)
  ```

`noisy_trace` makes unverified demonstrations: one constant or comparison
of the program is wrong (experiments/mixed.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

ENTRY_POINT = "f"
# (code, words); {t} / {a}: a constant drawn per problem
FILTERS = (("x>{t}", "keep the numbers above {t}"),
           ("x<{t}", "keep the numbers below {t}"),
           ("x%2==0", "keep the even numbers"),
           ("x%2==1", "keep the odd numbers"))  # fmt: skip
MAPS = (("x+{a}", "add {a} to each"), ("x*{a}", "multiply each by {a}"),
        ("x*x", "square each"))  # fmt: skip
REDUCES = ("sum", "count")


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  solution: str  # the reference program
  tests: tuple  # ({"args": [xs], "expected": out}, ...), hidden
  difficulty: int  # parts: filter, map, reduction
  parts: tuple  # (filter code, map code, reduction), "" where absent

  @property
  def trace(self) -> str:
    return f"```python\n{self.solution}```"

  def to_row(self) -> dict:
    """The JSONL row (`k15.tasks.jsonl` schema)."""
    return dict(prompt=self.question, kind="code", domain="code",
                entry_point=ENTRY_POINT, test_mode="call",
                tests=[dict(t) for t in self.tests], trace=self.trace,
                difficulty=self.difficulty)  # fmt: skip


def program(flt: str, mp: str, red: str) -> str:
  """The reference `f` of these parts ("" where a part is absent)."""
  cond = f" if {flt}" if flt else ""
  elem = mp or "x"
  if red == "count":
    body = f"len([x for x in xs{cond}])" if cond else "len(xs)"
  elif red == "sum":
    body = f"sum({elem} for x in xs{cond})" if (cond or mp) else "sum(xs)"
  else:
    body = f"[{elem} for x in xs{cond}]"
  return f"def {ENTRY_POINT}(xs):\n  return {body}\n"


def run(parts: tuple, xs: list[int]):
  """The reference function, here in plain Python (our code, not a
  model's)."""
  scope: dict = {}
  exec(program(*parts), scope)  # noqa: S102 - our own generated source
  return scope[ENTRY_POINT](list(xs))


def _compact(x) -> str:
  return str(x).replace(" ", "")


def _describe(flt_words: str, map_words: str, red: str) -> str:
  words = [w for w in (flt_words, map_words) if w]
  if red == "sum":
    words.append("return the sum")
  elif red == "count":
    words.append("return the count")
  else:
    words.append("return the list")
  return ", ".join(words)


def make_problem(rng: np.random.Generator, parts: int,
                 num_tests: int = 6) -> Problem:
  """A function of `parts` (1-3) parts and `num_tests` hidden tests."""
  if not 1 <= parts <= 3:
    raise ValueError(f"functions: parts must be in 1..3, got {parts}")
  which = set(rng.permutation(3)[:parts].tolist())  # 0 filter 1 map 2 red
  t, a = int(rng.integers(0, 10)), int(rng.integers(2, 10))
  flt = mp = red = ""
  fw = mw = ""
  if 0 in which:
    code, fw = FILTERS[rng.integers(len(FILTERS))]
    flt, fw = code.format(t=t), fw.format(t=t)
  red = ""
  if 2 in which:  # a count ignores the map: with one, the sum
    red = "sum" if 1 in which else REDUCES[rng.integers(len(REDUCES))]
  if 1 in which:
    code, mw = MAPS[rng.integers(len(MAPS))]
    mp, mw = code.format(a=a), mw.format(a=a)
  key = (flt, mp, red)
  inputs = [[int(v) for v in rng.integers(-3, 10, size=int(rng.integers(
      2, 6)))] for _ in range(num_tests + 1)]  # fmt: skip
  example = inputs[0][:3]
  ex_out = run(key, example)
  question = (f"Write f(xs): {_describe(fw, mw, red)}. Example: "
              f"f({_compact(example)}) == {_compact(ex_out)}")  # fmt: skip
  tests = tuple({"args": [xs], "expected": run(key, xs)}
                for xs in [[]] + inputs[1:num_tests])  # fmt: skip
  difficulty = sum(1 for x in key if x)
  return Problem(question, program(*key), tests, difficulty, key)


def generate(n: int, *, seed: int, min_parts: int = 1, max_parts: int = 3,
             exclude: frozenset | set = frozenset(),
             num_tests: int = 6) -> list[Problem]:
  """n problems with distinct prompts, difficulty uniform in
  [min_parts, max_parts], none of whose functions (`parts`) is in
  `exclude` (a held-out set's functions)."""
  rng = np.random.default_rng(seed)
  out, seen = [], set()
  for _ in range(50 * n + 1000):
    if len(out) == n:
      return out
    p = make_problem(rng, int(rng.integers(min_parts, max_parts + 1)),
                     num_tests)
    if p.question not in seen and p.parts not in exclude:
      seen.add(p.question)
      out.append(p)
  raise ValueError(f"functions: cannot draw {n} distinct problems with "
                   f"{min_parts}-{max_parts} parts")


def noisy_trace(p: Problem, rng: np.random.Generator) -> str:
  """p's trace with one constant changed or its comparison flipped."""
  src = p.solution
  spots = [i for i, ch in enumerate(src) if ch.isdigit() or ch in "<>"]
  spots = [i for i in spots if not src[i - 1:i + 1] == "%2"]
  if not spots:  # e.g. `return sum(xs)`: the wrong reduction
    src = src.replace("sum(", "len(") if "sum(" in src else \
        src.replace("len(", "sum(")  # fmt: skip
    return f"```python\n{src}```"
  i = spots[rng.integers(len(spots))]
  if src[i] in "<>":
    new = "<" if src[i] == ">" else ">"
  else:
    new = str([d for d in range(10) if str(d) != src[i]][rng.integers(9)])
  return f"```python\n{src[:i]}{new}{src[i + 1:]}```"
