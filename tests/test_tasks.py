"""Synthetic tasks: exact verifiers, disjoint splits, determinism."""

import pytest

from k15 import tasks, tokenizer
from k15.tasks import arithmetic, chains

# the text tasks (the visual mix, keyed by its images, has
# tests/test_visual_tasks.py)
TEXT = [t for t in tasks.TASKS if t != "visual"]


@pytest.mark.parametrize("name", TEXT)
def test_splits_are_disjoint_and_deterministic(name):
  mod = tasks.get(name)
  a = mod.splits(seed=3, num_sft=50, num_rl=200, num_eval=50, min_steps=2,
                 max_steps=5)
  b = mod.splits(seed=3, num_sft=50, num_rl=200, num_eval=50, min_steps=2,
                 max_steps=5)
  assert [p.question for p in a["rl"]] == [p.question for p in b["rl"]]
  qs = {k: {p.question for p in v} for k, v in a.items()}
  assert not qs["sft"] & qs["eval"]
  assert not qs["rl"] & qs["eval"]
  assert not qs["sft"] & qs["rl"]
  assert {p.difficulty for p in a["rl"]} == {2, 3, 4, 5}


@pytest.mark.parametrize("name", TEXT)
def test_gold_trace_verifies_and_wrong_answers_do_not(name):
  mod = tasks.get(name)
  for p in mod.splits(seed=0, num_sft=20, num_rl=20, num_eval=20,
                      min_steps=1, max_steps=6)["eval"]:
    assert mod.verify(p.trace, p.answer)
    assert not mod.verify(p.trace.rsplit("answer:", 1)[0], p.answer)
    # two different final answers: a guess, scored wrong
    other = "z" if name == "chains" else str((int(p.answer) + 1) % 10)
    assert not mod.verify(p.trace + f" answer: {other}", p.answer)


def test_sft_max_steps_caps_warmup_difficulty():
  s = chains.splits(seed=0, num_sft=100, num_rl=100, num_eval=100,
                    min_steps=2, max_steps=6, sft_max_steps=3)
  assert max(p.difficulty for p in s["sft"]) == 3
  assert max(p.difficulty for p in s["rl"]) == 6


def test_chain_answer_is_end_of_chain():
  import numpy as np

  p = chains.make_problem(np.random.default_rng(0), hops=4, num_edges=7)
  edges = dict(e.split(">") for e in p.question.split(" | ")[0].split())
  node = p.question.split(" | ")[1]
  hops = 0
  while node in edges:
    node, hops = edges[node], hops + 1
  assert (node, hops) == (p.answer, 4)


def test_arithmetic_trace_is_correct_mod_10():
  p = arithmetic.make_problem(__import__("numpy").random.default_rng(1), 4)
  val = int(p.question[0])
  for op, d in zip(p.question[1::2], p.question[2::2], strict=True):
    val = {"+": val + int(d), "-": val - int(d), "*": val * int(d)}[op] % 10
  assert str(val) == p.answer


def test_tokenizer_is_deterministic_and_round_trips():
  a = tokenizer.train_sentencepiece(chains.tokenizer_corpus(), 40,
                                    **chains.TOKENIZER)
  b = tokenizer.train_sentencepiece(chains.tokenizer_corpus(), 40,
                                    **chains.TOKENIZER)
  assert a.model_proto == b.model_proto
  text = tokenizer.format_prompt("a>b b>c | a") + " a>b, b>c. answer: c"
  assert a.decode(a.encode(text)) == text
  # ids past the tokenizer's vocabulary (padded model vocab) decode as unk
  assert isinstance(a.decode([a.vocab_size + 3]), str)


@pytest.mark.parametrize("mod", [arithmetic, chains])
def test_sft_noise_corrupts_only_that_share_of_warmup_answers(mod):
  kw = dict(seed=0, num_sft=200, num_rl=50, num_eval=50, min_steps=2,
            max_steps=3)
  clean = mod.splits(**kw)
  noisy = mod.splits(**kw, sft_noise=0.25)
  assert noisy["rl"] == clean["rl"] and noisy["eval"] == clean["eval"]
  wrong = [not mod.verify(n.trace, n.answer) for n in noisy["sft"]]
  assert sum(wrong) == 50
  for c, n, w in zip(clean["sft"], noisy["sft"], wrong, strict=True):
    assert (c.question, c.answer) == (n.question, n.answer)
    # the chain of thought is kept; only the final answer changes
    head = c.trace[:c.trace.rindex("answer:")]
    assert n.trace.startswith(head)
    assert w == (n.trace != c.trace)
  with pytest.raises(ValueError, match="task.sft_noise"):
    mod.splits(**kw, sft_noise=1.5)
