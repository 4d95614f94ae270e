"""k15.tasks.visual: each generator is deterministic per seed, the splits
are disjoint, and every answer is exact: it is read back from the image's
pixels here (colours and bars cell by cell, glyphs against the font),
independently of the generator, and the verifier takes exactly it."""

import dataclasses

import numpy as np
import pytest

from k15 import tasks
from k15.tasks import arithmetic, draw, visual

CFG = visual.VisualConfig(cell=6, grid=4)
KW = dict(num_sft=40, num_rl=80, num_eval=40, min_steps=2, max_steps=6,
          ops="+-", max_operand=3, sft_max_steps=3, visual=CFG)  # fmt: skip
_RGB = {v: k for k, v in draw.COLORS.items()}


def _cells(img, cell):
  """{(row, col): colour letter} of the cells holding a coloured shape."""
  out = {}
  for r in range(img.shape[0] // cell):
    for c in range(img.shape[1] // cell):
      px = img[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
      found = {tuple(int(x) for x in p) for p in px.reshape(-1, 3)}
      found -= {draw.WHITE}
      assert len(found) <= 1, (r, c, found)
      if found:
        out[(r, c)] = _RGB[found.pop()]
  return out


def _read_text(img, cell):
  """The string drawn by `draw.text` (one line), glyph by glyph."""
  glyphs = {}
  for ch in sorted(draw.FONT):
    glyphs.setdefault(draw.glyph(ch, cell).tobytes(), ch)
  out = ""
  for c in range(img.shape[1] // cell):
    ink = (img[:, c * cell : (c + 1) * cell] == draw.INK).all(-1)
    out += glyphs[ink.tobytes()]
  return out


def _answer_from_pixels(p):
  """The answer, recomputed from the question and the image alone."""
  (img,) = p.images
  cells = _cells(img, CFG.cell)
  words = p.question.split()
  assert words[0] == visual.MARKER
  if p.task == "count":
    return str(sum(col == words[2] for col in cells.values()))
  if p.task == "spatial":
    rel, a, b = words[1:]
    (pa,) = [rc for rc, col in cells.items() if col == a]
    (pb,) = [rc for rc, col in cells.items() if col == b]
    axis = 1 if rel == "left" else 0
    assert pa[axis] != pb[axis]
    return a if pa[axis] < pb[axis] else b
  if p.task == "chart":
    cols = sorted({c for _, c in cells})
    colour = {c: cells[(CFG.grid - 1, c)] for c in cols}
    height = {c: sum(1 for (_, cc) in cells if cc == c) for c in cols}
    if words[1] == "max":
      top = max(height.values())
      (best,) = [c for c in cols if height[c] == top]
      return colour[best]
    (c,) = [c for c in cols if colour[c] == words[2]]
    return str(height[c])
  raise AssertionError(p.task)


def test_splits_are_deterministic_per_seed_and_disjoint():
  a = visual.splits(seed=5, **KW)
  b = visual.splits(seed=5, **KW)
  c = visual.splits(seed=6, **KW)
  for split in ("sft", "rl", "eval"):
    assert [visual.key(p) for p in a[split]] == [visual.key(p)
                                                 for p in b[split]]
    assert [p.trace for p in a[split]] == [p.trace for p in b[split]]
    for p, q in zip(a[split], b[split], strict=True):
      for x, y in zip(p.images, q.images, strict=True):
        np.testing.assert_array_equal(x, y)
  assert [visual.key(p) for p in a["eval"]] != [visual.key(p)
                                                for p in c["eval"]]
  keys = {s: {visual.key(p) for p in a[s]} for s in a}
  assert not keys["sft"] & keys["eval"] and not keys["rl"] & keys["eval"]
  assert not keys["sft"] & keys["rl"]
  for split, n in (("sft", 40), ("rl", 80), ("eval", 40)):
    got = [p.task for p in a[split]]
    assert {t: got.count(t) for t in visual.TASKS} == {
      t: n // 5 for t in visual.TASKS}
  assert max(p.difficulty for p in a["sft"]) == 3  # task.sft_max_steps
  assert {p.difficulty for p in a["rl"]} == {2, 3, 4, 5, 6}


def test_scene_sft_sets_the_scene_warm_up_size_only():
  cfg = dataclasses.replace(CFG, scene_sft=30)
  a = visual.splits(seed=5, **{**KW, "visual": cfg})
  base = visual.splits(seed=5, **KW)
  got = [p.task for p in a["sft"]]
  assert {t: got.count(t) for t in visual.TASKS} == dict(
    arith=8, rendered=8, count=30, spatial=30, chart=30)
  for split in ("rl", "eval"):  # untouched, and still disjoint
    assert [visual.key(p) for p in a[split]] == [visual.key(p)
                                                 for p in base[split]]
  keys = {s: {visual.key(p) for p in a[s]} for s in a}
  assert not keys["sft"] & keys["eval"] and not keys["sft"] & keys["rl"]
  assert max(p.difficulty for p in a["sft"]) == 3
  with pytest.raises(ValueError, match="task.visual.scene_sft=-1"):
    visual.VisualConfig(scene_sft=-1)


def test_rendered_sft_sets_the_rendered_warm_up_size_only():
  cfg = dataclasses.replace(CFG, rendered_sft=20)
  a = visual.splits(seed=5, **{**KW, "visual": cfg})
  base = visual.splits(seed=5, **KW)
  got = [p.task for p in a["sft"]]
  assert {t: got.count(t) for t in visual.TASKS} == dict(
    arith=8, rendered=20, count=8, spatial=8, chart=8)
  for split in ("rl", "eval"):  # untouched, and still disjoint
    assert [visual.key(p) for p in a[split]] == [visual.key(p)
                                                 for p in base[split]]
  text = {p.trace for p in a["sft"] if p.task == "arith"}
  drawn = [p for p in a["sft"] if p.task == "rendered"]
  assert text <= {p.trace for p in drawn}  # the text rows keep twins
  asked = {visual.key(p) for s in ("rl", "eval") for p in a[s]}
  assert not asked & {visual.key(p) for p in drawn}
  assert max(p.difficulty for p in drawn) == 3
  with pytest.raises(ValueError, match="task.visual.rendered_sft=-1"):
    visual.VisualConfig(rendered_sft=-1)


def test_captions_describe_the_image_at_every_level():
  cfg = dataclasses.replace(CFG, captions=12)
  a = visual.splits(seed=5, **{**KW, "visual": cfg})
  base = visual.splits(seed=5, **KW)
  caps = [p for p in a["sft"] if p.task == "caption"]
  assert [visual.key(p) for p in a["sft"][: -len(caps)]] == [
    visual.key(p) for p in base["sft"]]  # the warm-up itself unchanged
  assert len(caps) == 12 * 4  # every image task, none for arith
  assert {p.difficulty for p in caps} == {2, 3, 4, 5, 6}  # past sft_max
  asked = {p.question for s in a.values() for p in s if p.task == "arith"}
  keys = {visual.key(p) for s in ("rl", "eval") for p in a[s]}
  for p in caps:
    (img,) = p.images
    assert visual.key(p) not in keys
    kind = p.question.split()[1]
    assert p.trace == " " + p.answer
    if kind == "read":
      assert p.answer == _read_text(img, CFG.cell)
      assert p.answer not in asked
    elif kind == "list":
      cells = _cells(img, CFG.cell)
      want = "".join(f"{k}{r}{c}" for (r, c), k in sorted(cells.items()))
      assert p.answer == want
    else:
      assert kind == "bars"
      cells = _cells(img, CFG.cell)
      cols = sorted({c for _, c in cells})
      assert p.answer.split() == [
        cells[(CFG.grid - 1, c)] + str(sum(cc == c for _, cc in cells))
        for c in cols]
  with pytest.raises(ValueError, match="task.visual.captions=-1"):
    visual.VisualConfig(captions=-1)


@pytest.mark.parametrize("task", ["count", "spatial", "chart"])
def test_scene_answers_are_what_the_image_shows(task):
  probs = visual.generate(task, 60, seed=1, min_level=2, max_level=6,
                          cfg=CFG)  # fmt: skip
  again = visual.generate(task, 60, seed=1, min_level=2, max_level=6,
                          cfg=CFG)  # fmt: skip
  assert [visual.key(p) for p in probs] == [visual.key(p) for p in again]
  for p in probs:
    assert p.images[0].dtype == np.uint8 and p.images[0].ndim == 3
    assert _answer_from_pixels(p) == p.answer, (p.question, p.trace)
    assert visual.verify(p.trace, p.answer)


def test_rendered_questions_are_the_text_ones_drawn():
  s = visual.splits(seed=0, **KW)["eval"]
  text = [p for p in s if p.task == "arith"]
  drawn = [p for p in s if p.task == "rendered"]
  assert len(text) == len(drawn) == 8
  for t, d in zip(text, drawn, strict=True):
    assert d.question == visual.MARKER and t.question != visual.MARKER
    assert _read_text(d.images[0], CFG.cell) == t.question
    assert (d.answer, d.trace) == (t.answer, t.trace)
    assert d.kind == t.kind == "arithmetic"
    assert arithmetic.verify(t.trace, t.answer)


def test_verifier_is_exact():
  v = visual.verify
  assert v("r2 b0. answer: b", "b")
  assert v(" b g k. answer: 3", "3")
  assert not v("answer: 33", "3")  # the whole word, not a prefix
  assert not v("answer: bb", "b")
  assert not v("answer: 3 answer: 4", "3")  # two answers: a guess
  assert v("answer: 3 then answer: 3", "3")
  assert not v("r2 b0. b", "b")  # no answer
  assert not v("", "b")
  assert tasks.verifiers()["visual"] is visual.verify
  assert tasks.verifiers()["arithmetic"] is arithmetic.verify


def test_difficulty_knob_sets_each_task_hardness():
  for level in (2, 4, 6):
    (c,) = visual.generate("count", 1, seed=level, min_level=level,
                           max_level=level, cfg=CFG)  # fmt: skip
    assert int(c.answer) == level - 1
    (s,) = visual.generate("spatial", 1, seed=level, min_level=level,
                           max_level=level, cfg=CFG)  # fmt: skip
    assert len(_cells(s.images[0], CFG.cell)) == 2 + 2 * (level - 2)
    (b,) = visual.generate("chart", 1, seed=level, min_level=level,
                           max_level=level, cfg=CFG)  # fmt: skip
    assert b.images[0].shape[1] == level * CFG.cell
