"""Host side of images: check, cut into patches, expand prompts, batch.

A question holds one `MARKER` ("<image>") per image, where the image goes;
`encode_prompt` tokenizes the text around the markers and puts one
placeholder token (`ModelConfig.image_token`) per patch in each marker's
place, so the k-th placeholder of a sequence is its k-th patch (images in
prompt order, each row-major). `pack` lays the patches of a batch's rows
out as the tower reads them (`k15.vision.IMAGE_KEYS`, N =
`VisionConfig.max_patches` slots per row).

An image is a uint8 numpy array [H, W, channels] whose height and width
are multiples of the patch size: any resolution whose patch count fits
`max_patches` (and, with a position grid, at most `pos_grid` patches per
side). Pixels are scaled to [-1, 1] (SigLIP's mean 0.5, std 0.5). Anything
else is an `ImageError` that names the row (`where`; a prompt file's
"file:line") and the image.

A problem's images are its `images` (`encode_problem`): arrays held by a
generated problem (`tasks.visual`), or a prompt-file row's files
(`tasks.jsonl.Problem`), read lazily through a per-process cache
(`cached_image`); `patch_counts` checks either from shapes alone (file
headers), which is how a run checks every image before it trains.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from k15 import tokenizer as tokenizer_lib
from k15 import vision

MARKER = "<image>"


class ImageError(ValueError):
  """A bad image: wrong type, shape or dtype, too many patches, a missing
  file; the message starts with the row it belongs to."""


@dataclasses.dataclass(frozen=True, eq=False)
class Patches:
  """One sequence's images as patches, in prompt order (n patches)."""

  pixels_nxX: np.ndarray  # float32 in [-1, 1]
  pos_nx2: np.ndarray  # int32 (row, column) within its image
  img_n: np.ndarray  # int32 image index within the sequence

  @property
  def n(self) -> int:
    return len(self.img_n)


def check_image(image: Any, v: vision.VisionConfig, where: str) -> np.ndarray:
  """`image` if it is one the tower takes, else an ImageError naming it."""
  if not isinstance(image, np.ndarray):
    raise ImageError(f"{where}: is a {type(image).__name__}, not a numpy "
                     "array [H, W, C]")  # fmt: skip
  check_shape(image.shape, image.dtype, v, where)
  return image


def check_shape(shape: tuple[int, ...], dtype: Any, v: vision.VisionConfig,
                where: str) -> int:  # fmt: skip
  """The patch count of an image of this shape and dtype, if the tower
  takes it, else an ImageError naming it (`where`)."""
  if np.dtype(dtype) != np.uint8:
    raise ImageError(f"{where}: has dtype {dtype}; images are uint8 "
                     "[H, W, C] (0..255)")  # fmt: skip
  shape = tuple(shape)
  p, c = v.patch_size, v.channels
  if len(shape) != 3 or shape[2] != c:
    raise ImageError(f"{where}: has shape {shape}; expected "
                     f"[H, W, {c}] (model.vision.channels={c})")
  h, w = shape[0] // p, shape[1] // p
  if h * p != shape[0] or w * p != shape[1] or not h * w:
    raise ImageError(
      f"{where}: has shape {shape}; height and width must be "
      f"positive multiples of model.vision.patch_size={p}"
    )
  if h * w > v.max_patches:
    raise ImageError(
      f"{where}: has {h}x{w} = {h * w} patches, more than "
      f"model.vision.max_patches={v.max_patches}"
    )
  if v.pos_grid and max(h, w) > v.pos_grid:
    raise ImageError(
      f"{where}: is {h}x{w} patches; the position grid holds at most "
      f"{v.pos_grid} per side (model.vision.pos_grid)"
    )
  return h * w


def patchify(image: np.ndarray, v: vision.VisionConfig, where: str
             ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
  """(pixels [n, X] in [-1, 1], (row, col) [n, 2]) of one checked image,
  row-major; a patch's pixels are (y, x, channel)-ordered."""
  check_image(image, v, where)
  p = v.patch_size
  h, w = image.shape[0] // p, image.shape[1] // p
  x = image.reshape(h, p, w, p, v.channels).transpose(0, 2, 1, 3, 4)
  pixels = x.reshape(h * w, -1).astype(np.float32) / 127.5 - 1.0
  rows, cols = np.divmod(np.arange(h * w, dtype=np.int32), w)
  return pixels, np.stack([rows, cols], axis=1).astype(np.int32)


def patches_of(imgs: Sequence[np.ndarray], v: vision.VisionConfig,
               where: str) -> Patches:  # fmt: skip
  """Every image of one sequence as patches; their total must fit."""
  parts = [patchify(im, v, f"{where}: image {i}") for i, im in enumerate(imgs)]
  n = sum(len(px) for px, _ in parts)
  if n > v.max_patches:
    sizes = " + ".join(str(len(px)) for px, _ in parts)
    raise ImageError(
      f"{where}: its {len(imgs)} images have {sizes} = {n} patches, more "
      f"than model.vision.max_patches={v.max_patches} per sequence"
    )
  return Patches(
    np.concatenate([px for px, _ in parts]).astype(np.float32),
    np.concatenate([pos for _, pos in parts]).astype(np.int32),
    np.concatenate([np.full(len(px), i, np.int32)
                    for i, (px, _) in enumerate(parts)]),
  )  # fmt: skip


def encode_prompt(tok: tokenizer_lib.Tokenizer, question: str,
                  imgs: Sequence[np.ndarray], *, model,
                  where: str) -> tuple[list[int], Patches | None]:
  """(prompt token ids, its images as patches or None) under the chat
  template, each MARKER expanded to one placeholder per patch of its image.

  model: the `model.ModelConfig` (its `vision` and `image_token`).
  """
  parts = tokenizer_lib.format_prompt(question).split(MARKER)
  if len(parts) - 1 != len(imgs):
    raise ImageError(
      f"{where}: the question has {len(parts) - 1} {MARKER} markers but "
      f"the row has {len(imgs)} images"
    )
  if not imgs:
    return tok.encode(parts[0]), None
  if model.vision is None:
    raise ImageError(f"{where}: has images but model.vision is not set")
  patches = patches_of(imgs, model.vision, where)
  counts = np.bincount(patches.img_n, minlength=len(imgs))
  ids = tok.encode(parts[0])
  for n, text in zip(counts, parts[1:], strict=True):
    ids += [model.image_token] * int(n) + tok.encode(text)
  return ids, patches


def encode_problem(tok: tokenizer_lib.Tokenizer, p: Any, *, model,
                   where: str) -> tuple[list[int], Patches | None]:  # fmt: skip
  """`encode_prompt` of a problem (its `question` and `images`, if any):
  the stages' and the evaluation's one entry. Errors name the problem's
  own `where` (a prompt file's "file:line") when it has one, else
  `where`."""
  where = getattr(p, "where", "") or where
  return encode_prompt(tok, p.question, getattr(p, "images", ()),
                       model=model, where=where)  # fmt: skip


def patch_counts(p: Any, v: vision.VisionConfig | None,
                 where: str) -> list[int]:  # fmt: skip
  """The patch count of each image of a problem, every image checked
  (`check_shape`) without reading pixels where they are in files: a
  prompt-file row's (`image_paths`) from the files' headers, a generated
  problem's from its arrays. ImageError names the problem and image."""
  where = getattr(p, "where", "") or where
  paths = getattr(p, "image_paths", ())
  if paths:
    shapes = [file_shape(f, f"{where}: image {i}")
              for i, f in enumerate(paths)]  # fmt: skip
  else:
    ims = getattr(p, "images", ())
    shapes = [check_array(im, f"{where}: image {i}")
              for i, im in enumerate(ims)]  # fmt: skip
  if not shapes:
    return []
  if v is None:
    raise ImageError(f"{where}: has images but model.vision is not set")
  counts = [check_shape(shape, dtype, v, f"{where}: image {i}")
            for i, (shape, dtype) in enumerate(shapes)]  # fmt: skip
  if sum(counts) > v.max_patches:
    sizes = " + ".join(str(n) for n in counts)
    raise ImageError(
      f"{where}: its {len(counts)} images have {sizes} = {sum(counts)} "
      f"patches, more than model.vision.max_patches={v.max_patches} per "
      "sequence"
    )
  return counts


def check_array(image: Any, where: str) -> tuple[tuple[int, ...], Any]:
  """(shape, dtype) of an in-memory image, which must be a numpy array."""
  if not isinstance(image, np.ndarray):
    raise ImageError(f"{where}: is a {type(image).__name__}, not a numpy "
                     "array [H, W, C]")  # fmt: skip
  return image.shape, image.dtype


def prompt_length(tok: tokenizer_lib.Tokenizer, question: str,
                  counts: Sequence[int], where: str) -> int:  # fmt: skip
  """Tokens of `encode_prompt`'s ids for a question whose images have
  `counts` patches, without the pixels."""
  parts = tokenizer_lib.format_prompt(question).split(MARKER)
  if len(parts) - 1 != len(counts):
    raise ImageError(
      f"{where}: the question has {len(parts) - 1} {MARKER} markers but "
      f"the row has {len(counts)} images"
    )
  return sum(len(tok.encode(t)) for t in parts) + sum(counts)


def pack(rows: Sequence[Patches | None], v: vision.VisionConfig
         ) -> dict[str, np.ndarray]:  # fmt: skip
  """The tower's inputs for a batch (`vision.IMAGE_KEYS`): row b's patches
  in its first slots, the rest empty (image -1); None rows are text."""
  B, N = len(rows), v.max_patches
  pixels = np.zeros((B, N, v.patch_pixels), np.float32)
  pos = np.zeros((B, N, 2), np.int32)
  img = np.full((B, N), -1, np.int32)
  for b, r in enumerate(rows):
    if r is None or not r.n:
      continue
    if r.n > N:
      raise ImageError(f"batch row {b}: {r.n} patches > max_patches={N}")
    pixels[b, :r.n], pos[b, :r.n], img[b, :r.n] = (r.pixels_nxX, r.pos_nx2,
                                                   r.img_n)  # fmt: skip
  return dict(zip(vision.IMAGE_KEYS, (pixels, pos, img), strict=True))


def pack_or_none(rows: Sequence[Patches | None], v: vision.VisionConfig | None
                 ) -> dict[str, np.ndarray] | None:  # fmt: skip
  """`pack(rows)`, or None when no row has an image (a text-only call)."""
  if v is None or all(r is None for r in rows):
    return None
  return pack(rows, v)


def load_image(path: str, where: str) -> np.ndarray:
  """An image file as a uint8 [H, W, C] array: .npy always; .png / .jpg
  / ... with Pillow (`pip install -e ".[vision]"`)."""
  if not os.path.exists(path):
    raise ImageError(f"{where}: image file {path} does not exist")
  if path.endswith(".npy"):
    try:
      return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ImageError(f"{where}: cannot read {path} ({e})") from None
  Image = _pil(path, where)
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except OSError as e:
    raise ImageError(f"{where}: cannot read {path} ({e})") from None


def row_images(row: Mapping[str, Any], *, base_dir: str, where: str
               ) -> list[np.ndarray]:  # fmt: skip
  """A JSONL row's images: its `image` field, a path or a list of paths
  (relative to the JSONL file's directory); [] when it has none."""
  field = row.get("image")
  if field is None:
    return []
  paths = [field] if isinstance(field, str) else field
  if not isinstance(paths, list) or not all(isinstance(p, str)
                                            for p in paths):
    raise ImageError(f"{where}: field 'image' should be a path or a list "
                     "of paths")  # fmt: skip
  return [load_image(os.path.join(base_dir, p), f"{where}: image {i}")
          for i, p in enumerate(paths)]  # fmt: skip


def file_shape(path: str, where: str) -> tuple[tuple[int, ...], Any]:
  """(shape, dtype) of an image file as `load_image` would return it,
  from its header only (.npy: memory-mapped, never read; others: Pillow
  reads the size, not the pixels)."""
  if not os.path.exists(path):
    raise ImageError(f"{where}: image file {path} does not exist")
  if path.endswith(".npy"):
    try:
      a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ImageError(f"{where}: cannot read {path} ({e})") from None
    return a.shape, a.dtype
  Image = _pil(path, where)
  try:
    with Image.open(path) as im:
      return (im.height, im.width, 3), np.dtype(np.uint8)  # as RGB
  except OSError as e:
    raise ImageError(f"{where}: cannot read {path} ({e})") from None


def _pil(path: str, where: str):
  try:
    from PIL import Image  # noqa: PLC0415 - optional dependency
  except ImportError:
    raise ImageError(
      f"{where}: reading {os.path.basename(path)} needs Pillow (pip install "
      "-e '.[vision]'); .npy images need nothing"
    ) from None
  return Image


# Prompt-file images are read lazily, when a stage first encodes the row's
# prompt, not when the file is loaded: a prompt set may name far more
# pixels than fit in memory (RL draws a few hundred prompts per iteration
# from sets of many thousands), and the run's start only reads the files'
# headers (`patch_counts`). What was read stays in this per-process LRU
# cache, bounded in bytes, so evaluation (the same held-out rows at every
# eval) and RL's repeated draws do not re-decode the same files.
CACHE_BYTES = 512 << 20


class _Cache:
  def __init__(self, max_bytes: int):
    self.max_bytes, self.bytes = max_bytes, 0
    self.items: collections.OrderedDict[str, np.ndarray] = (
      collections.OrderedDict())
    self.lock = threading.Lock()

  def get(self, path: str, where: str) -> np.ndarray:
    with self.lock:
      if path in self.items:
        self.items.move_to_end(path)
        return self.items[path]
    im = load_image(path, where)
    im.setflags(write=False)  # shared: read-only
    with self.lock:
      if path not in self.items:
        self.items[path] = im
        self.bytes += im.nbytes
      while self.bytes > self.max_bytes and len(self.items) > 1:
        _, old = self.items.popitem(last=False)
        self.bytes -= old.nbytes
    return im

  def clear(self) -> None:
    with self.lock:
      self.items.clear()
      self.bytes = 0


_CACHE = _Cache(CACHE_BYTES)


def cached_image(path: str, where: str) -> np.ndarray:
  """`load_image(path)` through the per-process cache (read-only array)."""
  return _CACHE.get(path, where)
