"""Visual tasks: a text/image prompt mix with exact answers (PAPER.md §7).

`task.name="visual"` draws problems from the tasks in `task.visual.tasks`,
the same number of each:

  arith     arithmetic chains mod 10 as text (`arithmetic`), the text twin;
  rendered  the same questions drawn as an image, one character per cell
            (the report's text-rendered data): `Q: <image>` answered with
            the text task's own chain of thought;
  count     a scene of coloured shapes: how many of one colour;
  spatial   which of two named shapes is further left (or higher up);
  chart     a bar chart: the colour of the biggest bar, or one bar's value.

Every image is drawn on a grid of `visual.cell`-pixel cells (a glyph, a
shape or a bar segment per cell; set it to the tower's patch size), with
numpy (`draw`). Scenes and charts write their chain of thought too:

  Q: <image> count r       A: b g k. answer: 3      (cells a.. row-major)
  Q: <image> left r b      A: r2 b0. answer: b      (columns; rows: above)
  Q: <image> max           A: r3 g1 b4. answer: b   (bar heights in order)
  Q: <image> val g         A: r3 g1. answer: 1

One difficulty knob, the level L in [task.min_steps, task.max_steps]
(`task.sft_max_steps` caps the warm-up's, as for the text task), sets each
task's hardness: chain steps = L (arith, rendered), shapes to count =
L - 1, distractor shapes = 2 (L - 2) (spatial), bars = L (chart, at most
6). Problems are deterministic in `task.seed`; the warm-up, RL and
evaluation sets are disjoint (by question and image), and the rendered
evaluation problems are exactly the text ones, drawn: the two accuracies
compare one set of questions in two modalities.

`visual.captions` > 0 adds perception rows to the warm-up (`caption`):
per image task that many images over every level, described rather than
asked about (`<image> read`, `<image> list`, `<image> bars`), none of
them an RL or evaluation image or question.

Rewards: arith and rendered rows are kind `arithmetic`; the others kind
`visual`, whose verifier (`verify`) takes the one answer after `answer:`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

from k15.tasks import arithmetic, draw

TASKS = ("arith", "rendered", "count", "spatial", "chart")
MARKER = "<image>"  # = k15.images.MARKER
TOKENIZER = dict(model_type="char", user_symbols=("answer",))
ANSWER_RE = re.compile(r"answer:\s*([a-z0-9]+)\b")
_NAMED = "rgby"  # colours a question may name
_ALL = "".join(draw.COLORS)


@dataclasses.dataclass(frozen=True)
class VisualConfig:
  """The `task.visual` section."""

  tasks: tuple[str, ...] = TASKS
  cell: int = 6  # pixels per cell: a glyph, a shape, a bar segment
  grid: int = 4  # scene side and chart height, in cells
  wrap: int = 0  # rendered text: characters per line (0: one line)
  # warm-up problems of each scene task (count, spatial, chart); 0: the
  # even share of task.num_sft. Scenes are cheap to draw and the tower
  # learns to see from many of them; the text and rendered warm-ups keep
  # their share (the arithmetic chains of the warm-up levels are few).
  scene_sft: int = 0
  # warm-up problems of the rendered task; 0: the even share. Reading
  # glyphs needs more rows than the text twin (which also has the
  # language-only warm-up); the extra ones are warm-up-level chains too.
  rendered_sft: int = 0
  # perception rows added to the warm-up per image task (`caption`): the
  # image described, over every level, no question answered
  captions: int = 0

  def __post_init__(self):
    bad = [t for t in self.tasks if t not in TASKS]
    if bad or not self.tasks or len(set(self.tasks)) != len(self.tasks):
      raise ValueError(
        f"task.visual.tasks={self.tasks!r}: distinct names from {TASKS}"
      )
    if self.cell < 6:
      raise ValueError(f"task.visual.cell={self.cell} must be >= 6 (glyphs)")
    if not 2 <= self.grid <= 5:
      raise ValueError(f"task.visual.grid={self.grid} must be in [2, 5]")
    if self.wrap < 0:
      raise ValueError(f"task.visual.wrap={self.wrap} must be >= 0")
    if self.scene_sft < 0:
      raise ValueError(f"task.visual.scene_sft={self.scene_sft} must be >= 0")
    if self.rendered_sft < 0:
      raise ValueError(
        f"task.visual.rendered_sft={self.rendered_sft} must be >= 0")
    if self.captions < 0:
      raise ValueError(f"task.visual.captions={self.captions} must be >= 0")


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """A problem of the mix; `images` holds one uint8 [H, W, 3] array per
  MARKER of the question."""

  question: str
  answer: str
  difficulty: int
  trace: str
  kind: str  # the reward kind: the verifier that scores it
  task: str  # the task of the mix (per-task metrics)
  images: tuple[np.ndarray, ...] = ()

  def to_item(self) -> dict:
    """The reward row (`k15.rewards.score`) of this problem."""
    return dict(question=self.question, answer=self.answer,
                difficulty=self.difficulty, kind=self.kind, task=self.task)


# ---------------------------------------------------------------------------
# One problem per task
# ---------------------------------------------------------------------------


def _cells(rng, cfg: VisualConfig, n: int) -> list[tuple[int, int]]:
  G = cfg.grid
  return [divmod(int(i), G) for i in rng.permutation(G * G)[:n]]


def make_count(rng: np.random.Generator, level: int, cfg: VisualConfig
               ) -> Problem:  # fmt: skip
  G = cfg.grid
  n = min(max(level - 1, 1), G * G - 1)
  target = _NAMED[int(rng.integers(len(_NAMED)))]
  others = [c for c in _ALL if c != target]
  n_other = min(int(rng.integers(1, 4)), G * G - n)
  cells = _cells(rng, cfg, n + n_other)
  items = [(r, c, draw.SHAPES[int(rng.integers(3))],
            target if i < n else others[int(rng.integers(len(others)))])
           for i, (r, c) in enumerate(cells)]  # fmt: skip
  found = sorted(r * G + c for r, c in cells[:n])
  trace = " " + " ".join(chr(97 + i) for i in found) + f". answer: {n}"
  return Problem(f"{MARKER} count {target}", str(n), level, trace, "visual",
                 "count", (draw.scene(items, G, G, cfg.cell),))


def make_spatial(rng: np.random.Generator, level: int, cfg: VisualConfig
                 ) -> Problem:  # fmt: skip
  G = cfg.grid
  rel = ("left", "above")[int(rng.integers(2))]
  axis = 1 if rel == "left" else 0
  a, b = (str(x) for x in rng.choice(list(_NAMED), 2, replace=False))
  while True:
    (pa, pb) = _cells(rng, cfg, 2)
    if pa[axis] != pb[axis]:
      break
  others = [c for c in _ALL if c not in (a, b)]
  n_other = min(max(2 * (level - 2), 0), G * G - 2)
  free = [rc for rc in _cells(rng, cfg, G * G) if rc not in (pa, pb)]
  items = [(*pa, draw.SHAPES[int(rng.integers(3))], a),
           (*pb, draw.SHAPES[int(rng.integers(3))], b)]
  items += [(r, c, draw.SHAPES[int(rng.integers(3))],
             others[int(rng.integers(len(others)))])
            for r, c in free[:n_other]]  # fmt: skip
  ans = a if pa[axis] < pb[axis] else b
  trace = f" {a}{pa[axis]} {b}{pb[axis]}. answer: {ans}"
  return Problem(f"{MARKER} {rel} {a} {b}", ans, level, trace, "visual",
                 "spatial", (draw.scene(items, G, G, cfg.cell),))


def make_chart(rng: np.random.Generator, level: int, cfg: VisualConfig
               ) -> Problem:  # fmt: skip
  G = cfg.grid
  k = min(max(level, 2), len(_ALL))
  colors = [str(x) for x in rng.choice(list(_ALL), k, replace=False)]
  ask_max = bool(rng.integers(2))
  while True:
    heights = [int(h) for h in rng.integers(1, G + 1, k)]
    if not ask_max or heights.count(max(heights)) == 1:
      break
  if ask_max:
    j = heights.index(max(heights))
    question, ans, upto = f"{MARKER} max", colors[j], k
  else:
    j = int(rng.integers(k))
    question, ans, upto = f"{MARKER} val {colors[j]}", str(heights[j]), j + 1
  pairs = zip(colors[:upto], heights[:upto], strict=True)
  trace = " " + " ".join(f"{c}{h}" for c, h in pairs)
  trace += f". answer: {ans}"
  return Problem(question, ans, level, trace, "visual", "chart",
                 (draw.bars(heights, colors, G, cfg.cell),))


def render(p, cfg: VisualConfig) -> Problem:
  """An arithmetic problem with its question drawn as the image."""
  img = draw.text(p.question, cfg.cell, cfg.wrap)
  return Problem(MARKER, p.answer, p.difficulty, p.trace, p.kind,
                 "rendered", (img,))


def as_text(p) -> Problem:
  return Problem(p.question, p.answer, p.difficulty, p.trace, p.kind, "arith")


def _scene_cells(img: np.ndarray, cell: int) -> list[tuple[int, int, str]]:
  """(row, col, colour letter) of every coloured cell, row-major, read
  from the pixels."""
  rgb = {v: k for k, v in draw.COLORS.items()}
  out = []
  for r in range(img.shape[0] // cell):
    for c in range(img.shape[1] // cell):
      px = img[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
      px = px.reshape(-1, 3)
      ink = px[(px != draw.WHITE).any(-1)]
      if len(ink):
        out.append((r, c, rgb[tuple(int(x) for x in ink[0])]))
  return out


def caption(p: Problem, cfg: VisualConfig, text: str = "") -> Problem:
  """The perception row of an image problem (the report's tower data is
  image-text pairs: captions, OCR): its image described, no question
  answered. `text` is what a rendered image shows.

    Q: <image> read   A: 5-3-3-1-3~~~~        (rendered: the characters)
    Q: <image> list   A: r03g12b30            (scene: colour, row, column)
    Q: <image> bars   A: r3 g1 b4             (chart: colour, height)
  """
  (img,) = p.images
  if p.task == "rendered":
    q, trace = "read", " " + text
  elif p.task == "chart":
    bars: dict[int, tuple[str, int]] = {}  # column -> (colour, height)
    for _, c, k in _scene_cells(img, cfg.cell):
      bars[c] = (k, bars.get(c, (k, 0))[1] + 1)
    q, trace = "bars", "".join(f" {k}{h}" for _, (k, h) in sorted(
      bars.items()))
  else:
    q, trace = "list", " " + "".join(
      f"{k}{r}{c}" for r, c, k in _scene_cells(img, cfg.cell))
  return Problem(f"{MARKER} {q}", trace.strip(), p.difficulty, trace,
                 "visual", "caption", p.images)


_MAKERS = dict(count=make_count, spatial=make_spatial, chart=make_chart)


# ---------------------------------------------------------------------------
# Sets
# ---------------------------------------------------------------------------


def key(p: Problem) -> str:
  """A problem's identity: its question and its images' pixels."""
  h = hashlib.sha1(p.question.encode())
  for im in p.images:
    h.update(np.ascontiguousarray(im).tobytes())
  return h.hexdigest()


def generate(task: str, n: int, *, seed: int, min_level: int,
             max_level: int, cfg: VisualConfig,
             exclude: set[str] | frozenset[str] = frozenset()
             ) -> list[Problem]:  # fmt: skip
  """n distinct problems of a scene task, levels uniform in the range."""
  rng = np.random.default_rng([seed, TASKS.index(task)])
  out, seen, tries = [], set(exclude), 0
  while len(out) < n:
    tries += 1
    if tries > 50 * n + 1000:
      raise ValueError(f"visual: cannot draw {n} distinct {task} problems "
                       f"with levels in [{min_level}, {max_level}]")
    p = _MAKERS[task](rng, int(rng.integers(min_level, max_level + 1)), cfg)
    if key(p) not in seen:
      seen.add(key(p))
      out.append(p)
  return out


def _share(n: int, i: int, k: int) -> int:
  """Task i's part of n problems split evenly over k tasks."""
  return n // k + (i < n % k)


def splits(*, seed: int, num_sft: int, num_rl: int, num_eval: int,
           min_steps: int, max_steps: int, ops: str = arithmetic.OPS,
           sft_max_steps: int = 0, max_operand: int = 9,
           sft_noise: float = 0.0, visual: VisualConfig | None = None
           ) -> dict[str, list[Problem]]:  # fmt: skip
  """Disjoint warm-up / RL / evaluation sets of the mix, in task order."""
  cfg = visual or VisualConfig()
  k = len(cfg.tasks)
  sizes = {t: [_share(n, i, k) for n in (num_sft, num_rl, num_eval)]
           for i, t in enumerate(cfg.tasks)}  # fmt: skip
  if cfg.rendered_sft and "rendered" in sizes:
    sizes["rendered"][0] = cfg.rendered_sft
  out: dict[str, list[Problem]] = dict(sft=[], rl=[], eval=[])
  arith_tasks = [t for t in cfg.tasks if t in ("arith", "rendered")]
  if arith_tasks:
    most = [max(sizes[t][j] for t in arith_tasks) for j in range(3)]
    arith = arithmetic.splits(
      seed=seed, num_sft=most[0], num_rl=most[1], num_eval=most[2],
      min_steps=min_steps, max_steps=max_steps, ops=ops,
      sft_max_steps=sft_max_steps, max_operand=max_operand,
      sft_noise=sft_noise,
    )  # fmt: skip
  for t in cfg.tasks:
    if t in ("arith", "rendered"):
      make = as_text if t == "arith" else (lambda p: render(p, cfg))
      for j, split in enumerate(("sft", "rl", "eval")):
        out[split] += [make(p) for p in arith[split][: sizes[t][j]]]
      continue
    n_sft, n_rl, n_eval = sizes[t]
    n_sft = cfg.scene_sft or n_sft
    kw = dict(cfg=cfg, min_level=min_steps)
    ev = generate(t, n_eval, seed=seed + 2, max_level=max_steps, **kw)
    used = {key(p) for p in ev}
    sft = generate(t, n_sft, seed=seed, max_level=sft_max_steps or max_steps,
                   exclude=used, **kw)  # fmt: skip
    used |= {key(p) for p in sft}
    rl = generate(t, n_rl, seed=seed + 1, max_level=max_steps, exclude=used,
                  **kw)  # fmt: skip
    alphabet = "".join(sorted({p.answer for p in sft + rl + ev}))
    sft = arithmetic.noisy_answers(sft, sft_noise, seed=seed + 3,
                                   alphabet=alphabet)  # fmt: skip
    out["sft"] += sft
    out["rl"] += rl
    out["eval"] += ev
  if cfg.captions:
    asked = ({p.question for ps in arith.values() for p in ps}
             if arith_tasks else set())  # fmt: skip
    out["sft"] += _captions(out, cfg, asked, seed=seed, min_steps=min_steps,
                            max_steps=max_steps, ops=ops,
                            max_operand=max_operand)  # fmt: skip
  return out


def _captions(out: dict[str, list[Problem]], cfg: VisualConfig,
              asked: set[str], *,
              seed: int, min_steps: int, max_steps: int, ops: str,
              max_operand: int) -> list[Problem]:  # fmt: skip
  """`cfg.captions` perception rows per image task, every level from
  min_steps to max_steps, their images none of the sets' (by key; rendered
  ones none of the arithmetic questions `asked`)."""
  used = {key(p) for split in out.values() for p in split}
  rows = []
  for t in cfg.tasks:
    if t == "arith":
      continue
    if t == "rendered":
      for p in arithmetic.generate(
        cfg.captions, seed=seed + 5, min_steps=min_steps,
        max_steps=max_steps, exclude=asked, ops=ops, width=max_steps,
        max_operand=max_operand,
      ):  # fmt: skip
        rows.append(caption(render(p, cfg), cfg, text=p.question))
      continue
    for p in generate(t, cfg.captions, seed=seed + 5, min_level=min_steps,
                      max_level=max_steps, cfg=cfg, exclude=used):  # fmt: skip
      rows.append(caption(p, cfg))
  return rows


def extract_answer(response: str) -> str | None:
  """The answer after `answer:`; None if absent or if several differ."""
  found = ANSWER_RE.findall(response)
  if not found or len(set(found)) > 1:
    return None
  return found[-1]


def verify(response: str, answer: str) -> bool:
  return extract_answer(response) == answer


def tokenizer_corpus(seed: int = 1234, n: int = 400) -> list[str]:
  """Text of every task (questions without their markers, traces)."""
  from k15 import tokenizer  # noqa: PLC0415

  cfg = VisualConfig(grid=5)  # every cell letter a question can use
  texts = arithmetic.tokenizer_corpus(seed, n)
  for t in _MAKERS:
    for p in generate(t, n, seed=seed, min_level=1, max_level=8, cfg=cfg):
      texts.append(tokenizer.format_prompt(p.question.replace(MARKER, ""))
                   + p.trace)  # fmt: skip
  return texts


def write_prompt_files(splits_: dict[str, list[Problem]], out_dir: str, *,
                       png: bool = False) -> dict[str, str]:  # fmt: skip
  """The mix as prompt files (`k15.tasks.jsonl`) for `task.name="jsonl"`:
  out_dir/{sft,rl,eval}.jsonl, each image a file under out_dir/images
  (.npy, or .png with Pillow when `png`) named by its row's `image` field;
  rows of kind "exact" (the answer after `answer:`), `domain` the task.
  Returns {split: path}."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415

  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  out = {}
  for split, problems in splits_.items():
    rows = []
    for i, p in enumerate(problems):
      row = dict(question=p.question, answer=p.answer, trace=p.trace,
                 difficulty=p.difficulty, kind="exact", domain=p.task)
      names = []
      for j, im in enumerate(p.images):
        name = f"images/{split}_{i}_{j}." + ("png" if png else "npy")
        if png:
          from PIL import Image  # noqa: PLC0415 - optional dependency

          Image.fromarray(im).save(os.path.join(out_dir, name))
        else:
          np.save(os.path.join(out_dir, name), im)
        names.append(name)
      if names:
        row["image"] = names[0] if len(names) == 1 else names
      rows.append(row)
    out[split] = os.path.join(out_dir, f"{split}.jsonl")
    with open(out[split], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return out
