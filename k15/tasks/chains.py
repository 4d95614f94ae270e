"""Pointer chasing: follow a chain of edges to its end (multi-hop lookup).

The prompt lists shuffled edges `x>y` of a few disjoint chains and a start
node; the answer is the node where the start's chain ends (the first node
with no outgoing edge). The chain of thought writes one hop per step, so
each step is a single lookup, and the number of hops is the difficulty:

  Q: c>f a>c g>h f>b h>d | a
  A: a>c, c>f, f>b. answer: b

Without the chain of thought a small model cannot answer; with it, every step
is the same local operation, and errors compound with the number of hops, so
sampling at temperature 1 leaves room that RL can close. Distractor chains
make the lookup necessary (the answer is never the last node written in the
prompt by construction of the shuffle).
"""

from __future__ import annotations

import re

import numpy as np

from k15.tasks import arithmetic
from k15.tasks.arithmetic import Problem

NODES = "abcdefghijklmnop"
# one token per character, so a node is the same token in prompt and CoT
TOKENIZER = dict(model_type="char", user_symbols=("answer",))
ANSWER_RE = re.compile(r"answer:\s*([a-z])\b")


def make_problem(rng: np.random.Generator, hops: int, num_edges: int
                 ) -> Problem:
  if num_edges < hops or num_edges + 2 > len(NODES):
    raise ValueError(f"chains: cannot fit {hops} hops in {num_edges} edges "
                     f"over {len(NODES)} nodes")
  perm = [NODES[i] for i in rng.permutation(len(NODES))]
  main = perm[:hops + 1]
  edges = list(zip(main[:-1], main[1:], strict=True))
  rest = perm[hops + 1:]
  n_other = num_edges - hops
  if n_other > 0:
    other = rest[:n_other + 1]
    edges += list(zip(other[:-1], other[1:], strict=True))
  order = rng.permutation(len(edges))
  shuffled = [edges[i] for i in order]
  question = " ".join(f"{a}>{b}" for a, b in shuffled) + f" | {main[0]}"
  hops_ab = zip(main[:-1], main[1:], strict=True)
  trace = " " + ", ".join(f"{a}>{b}" for a, b in hops_ab)
  trace += f". answer: {main[-1]}"
  return Problem(question, main[-1], hops, trace, kind="chains")


def generate(n: int, *, seed: int, min_steps: int, max_steps: int,
             exclude: set[str] | frozenset[str] = frozenset(),
             num_edges: int = 0, **unused) -> list[Problem]:
  """n distinct problems; hops uniform in [min_steps, max_steps]; every
  prompt has `num_edges` edges (default max_steps + 2)."""
  del unused
  num_edges = num_edges or max_steps + 2
  rng = np.random.default_rng(seed)
  out, seen = [], set(exclude)
  tries = 0
  while len(out) < n:
    tries += 1
    if tries > 50 * n + 1000:
      raise ValueError(f"chains: cannot draw {n} distinct problems")
    p = make_problem(rng, int(rng.integers(min_steps, max_steps + 1)),
                     num_edges)
    if p.question not in seen:
      seen.add(p.question)
      out.append(p)
  return out


def splits(*, seed: int, num_sft: int, num_rl: int, num_eval: int,
           min_steps: int, max_steps: int, sft_max_steps: int = 0,
           sft_noise: float = 0.0, checks: int = 0, min_checks: int = 0,
           **unused
           ) -> dict[str, list[Problem]]:
  """Disjoint warm-up / RL / evaluation sets (by prompt text); `checks`
  and `sft_noise` as in `arithmetic.with_checks` / `noisy_answers`
  (a long trace: " a>c, c>f. a>c, c>f. answer: f")."""
  del unused
  edges = max_steps + 2
  ev = generate(num_eval, seed=seed + 2, min_steps=min_steps,
                max_steps=max_steps, num_edges=edges)
  used = {p.question for p in ev}
  sft = generate(num_sft, seed=seed, min_steps=min_steps,
                 max_steps=sft_max_steps or max_steps, exclude=used,
                 num_edges=edges)
  used |= {p.question for p in sft}
  rl = generate(num_rl, seed=seed + 1, min_steps=min_steps,
                max_steps=max_steps, exclude=used, num_edges=edges)
  sft = arithmetic.with_checks(sft, checks, seed=seed + 4,
                               min_checks=min_checks)
  sft = arithmetic.noisy_answers(sft, sft_noise, seed=seed + 3,
                                 alphabet=NODES)
  return dict(sft=sft, rl=rl, eval=ev)


def extract_answer(response: str) -> str | None:
  """The node after `answer:`; None if absent or if several differ."""
  found = ANSWER_RE.findall(response)
  if not found or len(set(found)) > 1:
    return None
  return found[-1]


def verify(response: str, answer: str) -> bool:
  return extract_answer(response) == answer


def tokenizer_corpus(seed: int = 1234, n: int = 2000) -> list[str]:
  from k15 import tokenizer  # noqa: PLC0415

  probs = generate(n, seed=seed, min_steps=1, max_steps=8)
  return [tokenizer.format_prompt(p.question) + p.trace for p in probs]
