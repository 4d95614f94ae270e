"""List pipelines: a synthetic code-writing task with hidden tests.

A problem asks for `f(xs: list[int])` that applies a chain of simple steps
(filter, map, sort, dedup, prefix sums, ...) and possibly ends with a
reduction; its difficulty is the number of steps. The hidden tests are
random lists with the outputs of the reference pipeline, which runs here in
plain Python (it is our code, not a model's). The reward runs the model's
program in the sandbox (`k15.rewards.code`, test mode "call").

  Write a Python function `f(xs: list[int])` that, in order:
  1. keeps only the numbers divisible by 3;
  2. multiplies every number by 2;
  3. returns the sum of the numbers.
"""

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

ENTRY_POINT = "f"


@dataclasses.dataclass(frozen=True)
class _Step:
  text: str  # instruction, in the prompt
  code: str  # one line of the reference solution
  fn: Callable[[list[int]], object]


def _draw_step(rng: np.random.Generator, last: bool) -> _Step:
  """One step; `last` allows reductions (they end the pipeline)."""
  kinds = [
      "mod", "gt", "add", "mul", "sort", "sort_desc", "reverse", "dedup",
      "take", "prefix", "abs",
  ]  # fmt: skip
  if last:
    kinds += ["sum", "len", "max"]
  kind = kinds[int(rng.integers(len(kinds)))]
  a = int(rng.integers(2, 6))
  t = int(rng.integers(-5, 6))
  if kind == "mod":
    return _Step(
      f"keeps only the numbers divisible by {a}",
      f"xs = [x for x in xs if x % {a} == 0]",
      lambda xs: [x for x in xs if x % a == 0],
    )
  if kind == "gt":
    return _Step(
      f"keeps only the numbers greater than {t}",
      f"xs = [x for x in xs if x > {t}]",
      lambda xs: [x for x in xs if x > t],
    )
  if kind == "add":
    return _Step(
      f"adds {t} to every number",
      f"xs = [x + {t} for x in xs]",
      lambda xs: [x + t for x in xs],
    )
  if kind == "mul":
    return _Step(
      f"multiplies every number by {a}",
      f"xs = [x * {a} for x in xs]",
      lambda xs: [x * a for x in xs],
    )
  if kind == "sort":
    return _Step(
      "sorts the numbers in increasing order", "xs = sorted(xs)", sorted
    )
  if kind == "sort_desc":
    return _Step(
      "sorts the numbers in decreasing order",
      "xs = sorted(xs, reverse=True)",
      lambda xs: sorted(xs, reverse=True),
    )
  if kind == "reverse":
    return _Step("reverses the order of the numbers", "xs = xs[::-1]",
                 lambda xs: xs[::-1])  # fmt: skip
  if kind == "dedup":
    return _Step(
      "removes repeated numbers, keeping each first occurrence",
      "xs = list(dict.fromkeys(xs))",
      lambda xs: list(dict.fromkeys(xs)),
    )
  if kind == "take":
    return _Step(
      f"keeps only the first {a} numbers",
      f"xs = xs[:{a}]",
      lambda xs: xs[:a],
    )
  if kind == "prefix":
    return _Step(
      "replaces each number by the sum of all numbers up to and including it",
      "xs = list(itertools.accumulate(xs))",
      lambda xs: list(itertools.accumulate(xs)),
    )
  if kind == "abs":
    return _Step(
      "replaces every number by its absolute value",
      "xs = [abs(x) for x in xs]",
      lambda xs: [abs(x) for x in xs],
    )
  if kind == "sum":
    return _Step("returns the sum of the numbers", "return sum(xs)", sum)
  if kind == "len":
    return _Step("returns how many numbers are left", "return len(xs)", len)
  return _Step(
    "returns the largest number (0 if there is none)",
    "return max(xs, default=0)",
    lambda xs: max(xs, default=0),
  )


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str
  solution: str  # reference program (for warm-up traces and validation)
  tests: tuple  # ({"args": [xs], "expected": out}, ...), hidden
  difficulty: int
  inputs: tuple  # the test inputs alone (for test-case validation)

  @property
  def trace(self) -> str:
    """A gold response: the reference program in a fenced block."""
    return f"```python\n{self.solution}```"

  def to_item(self) -> dict:
    return dict(
      prompt=self.prompt,
      entry_point=ENTRY_POINT,
      tests=[dict(t) for t in self.tests],
      test_mode="call",
      difficulty=self.difficulty,
      kind="code",
    )


def make_problem(
  rng: np.random.Generator, steps: int, num_tests: int = 8
) -> Problem:
  """A pipeline of `steps` steps (>= 1) and `num_tests` hidden tests."""
  if steps < 1:
    raise ValueError(f"code_tasks: steps must be >= 1, got {steps}")
  chain = [_draw_step(rng, last=(i == steps - 1)) for i in range(steps)]
  lines = [f"{i + 1}. {s.text};" for i, s in enumerate(chain)]
  reduces = chain[-1].code.startswith("return")
  if not reduces:
    lines.append(f"{steps + 1}. returns the resulting list.")
  else:
    lines[-1] = lines[-1][:-1] + "."
  prompt = (
    f"Write a Python function `{ENTRY_POINT}(xs: list[int])` that, in "
    "order:\n" + "\n".join(lines) + "\nAnswer with the function in a "
    "```python code block."
  )
  body = [s.code for s in chain] + ([] if reduces else ["return xs"])
  solution = f"import itertools\n\n\ndef {ENTRY_POINT}(xs):\n" + "".join(
    f"  {b}\n" for b in body
  )
  inputs = [[]] + [
    [int(v) for v in rng.integers(-20, 21, size=int(rng.integers(1, 11)))]
    for _ in range(num_tests - 1)
  ]
  tests = []
  for xs in inputs:
    out: object = list(xs)
    for s in chain:
      out = s.fn(out)
    tests.append({"args": [list(xs)], "expected": out})
  return Problem(
    prompt, solution, tuple(tests), steps, tuple((x,) for x in inputs)
  )


def generate(
  n: int, *, seed: int, min_steps: int, max_steps: int, num_tests: int = 8
) -> list[Problem]:
  """n distinct problems, difficulty uniform in [min_steps, max_steps]."""
  rng = np.random.default_rng(seed)
  out, seen = [], set()
  for _ in range(50 * n + 1000):
    if len(out) == n:
      break
    steps = int(rng.integers(min_steps, max_steps + 1))
    p = make_problem(rng, steps, num_tests)
    if p.prompt not in seen:
      seen.add(p.prompt)
      out.append(p)
  else:
    raise ValueError(
      f"code_tasks: cannot draw {n} distinct problems with steps in "
      f"[{min_steps}, {max_steps}]"
    )
  return out
