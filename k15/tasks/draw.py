"""Numpy drawing for the visual tasks: text in a bitmap font, shapes on a
grid of cells. No Pillow needed; every image is uint8 [H, W, 3].

Everything is drawn on a grid of square cells of `cell` pixels (the visual
task sets it to the tower's patch size, so a glyph or a shape is one
patch): text one character per cell, scenes one shape per cell, bar charts
one bar per column of cells.
"""

from __future__ import annotations

import numpy as np

WHITE = (255, 255, 255)
INK = (20, 20, 20)
COLORS = {  # the scene and chart colours, by the letter questions use
  "r": (220, 40, 40),
  "g": (30, 160, 60),
  "b": (40, 70, 220),
  "y": (225, 190, 20),
  "c": (20, 190, 200),
  "m": (190, 50, 200),
}
SHAPES = ("square", "disk", "triangle")

# A 3 x 5 bitmap font: five rows of three bits per glyph (letters share
# one glyph per case).
_FONT_ROWS = {
  "0": "111 101 101 101 111", "1": "010 110 010 010 111",
  "2": "111 001 111 100 111", "3": "111 001 111 001 111",
  "4": "101 101 111 001 001", "5": "111 100 111 001 111",
  "6": "111 100 111 101 111", "7": "111 001 001 010 010",
  "8": "111 101 111 101 111", "9": "111 101 111 001 111",
  "+": "000 010 111 010 000", "-": "000 000 111 000 000",
  "*": "000 101 010 101 000", "~": "000 011 110 000 000",
  "/": "001 001 010 100 100", "=": "000 111 000 111 000",
  "(": "010 100 100 100 010", ")": "010 001 001 001 010",
  ".": "000 000 000 000 010", ",": "000 000 000 010 100",
  "?": "111 001 011 000 010", ">": "100 010 001 010 100",
  "<": "001 010 100 010 001", "|": "010 010 010 010 010",
  ":": "000 010 000 010 000", " ": "000 000 000 000 000",
  "a": "010 101 111 101 101", "b": "110 101 110 101 110",
  "c": "011 100 100 100 011", "d": "110 101 101 101 110",
  "e": "111 100 110 100 111", "f": "111 100 110 100 100",
  "g": "011 100 101 101 011", "h": "101 101 111 101 101",
  "i": "111 010 010 010 111", "j": "001 001 001 101 010",
  "k": "101 101 110 101 101", "l": "100 100 100 100 111",
  "m": "101 111 111 101 101", "n": "110 101 101 101 101",
  "o": "010 101 101 101 010", "p": "110 101 110 100 100",
  "q": "010 101 101 110 011", "r": "110 101 110 101 101",
  "s": "011 100 010 001 110", "t": "111 010 010 010 010",
  "u": "101 101 101 101 111", "v": "101 101 101 101 010",
  "w": "101 101 111 111 101", "x": "101 101 010 101 101",
  "y": "101 101 010 010 010", "z": "111 001 010 100 111",
}  # fmt: skip
FONT = {
  ch: np.array([[b == "1" for b in row] for row in rows.split()], bool)
  for ch, rows in _FONT_ROWS.items()
}


def canvas(rows: int, cols: int, cell: int) -> np.ndarray:
  """A white uint8 image of rows x cols cells."""
  return np.full((rows * cell, cols * cell, 3), WHITE, np.uint8)


def glyph(ch: str, cell: int) -> np.ndarray:
  """The bool mask [cell, cell] of one character, scaled to fill the cell
  (at least 6 pixels: a 3 x 5 glyph and a margin)."""
  g = FONT.get(ch.lower())
  if g is None:
    raise ValueError(f"draw: no glyph for {ch!r}")
  if cell < 6:
    raise ValueError(f"draw: cells of {cell} pixels are below the 6 a glyph "
                     "needs")  # fmt: skip
  s = (cell - 1) // 5
  big = np.kron(g, np.ones((s, s), bool))
  out = np.zeros((cell, cell), bool)
  top, left = (cell - 5 * s) // 2, (cell - 3 * s) // 2
  out[top : top + 5 * s, left : left + 3 * s] = big
  return out


def text(s: str, cell: int, wrap: int = 0) -> np.ndarray:
  """`s` drawn one character per cell, black on white, `wrap` characters
  per line (0: one line)."""
  wrap = wrap or max(len(s), 1)
  lines = [s[i : i + wrap] for i in range(0, max(len(s), 1), wrap)]
  img = canvas(len(lines), wrap if len(lines) > 1 else max(len(s), 1), cell)
  for r, line in enumerate(lines):
    for c, ch in enumerate(line):
      at = img[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
      at[glyph(ch, cell)] = INK
  return img


def shape_mask(shape: str, cell: int) -> np.ndarray:
  """The bool mask [cell, cell] of a shape with a one-pixel margin."""
  yy, xx = np.mgrid[0:cell, 0:cell].astype(np.float32) + 0.5
  lo, hi = 1.0, cell - 1.0
  inside = (yy >= lo) & (yy <= hi) & (xx >= lo) & (xx <= hi)
  if shape == "square":
    return inside
  c, r = cell / 2, (cell - 2) / 2
  if shape == "disk":
    return (yy - c) ** 2 + (xx - c) ** 2 <= r * r + 0.5
  if shape == "triangle":  # apex up: the half-width grows with the row
    half = (yy - lo) / (hi - lo) * r
    return inside & (np.abs(xx - c) <= half + 0.5)
  raise ValueError(f"draw: unknown shape {shape!r}")


def put(img: np.ndarray, row: int, col: int, cell: int, mask: np.ndarray,
        color: tuple[int, int, int]) -> None:  # fmt: skip
  """Paints `mask` in `color` into cell (row, col) of `img`."""
  at = img[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
  at[mask] = color


def scene(items, rows: int, cols: int, cell: int) -> np.ndarray:
  """Shapes on a grid: items are (row, col, shape, colour letter)."""
  img = canvas(rows, cols, cell)
  for r, c, shape, color in items:
    put(img, r, c, cell, shape_mask(shape, cell), COLORS[color])
  return img


def bars(heights, colors, rows: int, cell: int) -> np.ndarray:
  """A bar chart: bar j (colour colors[j]) fills heights[j] cells of
  column j from the bottom; rows cells high, one column per bar."""
  img = canvas(rows, len(heights), cell)
  full = np.ones((cell, cell), bool)
  full[:, 0] = full[:, -1] = False  # a gap between bars
  for j, (h, color) in enumerate(zip(heights, colors, strict=True)):
    for k in range(h):
      put(img, rows - 1 - k, j, cell, full, COLORS[color])
  return img
