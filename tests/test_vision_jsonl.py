"""Image rows in JSONL prompt files reach every stage: a mixed file (text
rows, rows with one .npy or .png image, a row with two) through
experiments/vision.py:runlocal,prompts=DIR (`task.name="jsonl"`; sft ->
rl): the warm-up's batches (half image rows), RL's and every
evaluation's carry the image rows' patches (pass1_text / pass1_image), and
a bad image stops the run naming its file:line. (The tower and joint
stages read their rows as sft does, `sft.dataset`; sft takes 0 steps here
to keep the test short: test_hf_vision trains on image batches.)"""

import json
import os

import numpy as np
import pytest

from k15 import config_lib, pipeline, vision
from k15 import images as images_lib
from k15 import model as model_lib
from k15.stages import sft
from k15.tasks import jsonl, visual

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL = 6  # experiments/vision.py's patch


def _write(d, mix):
  """`visual.write_prompt_files` (.npy images), then every third image
  row's image as a PNG instead, and one more row with two images."""
  from PIL import Image  # noqa: PLC0415

  for path in visual.write_prompt_files(mix, str(d)).values():
    with open(path) as f:
      rows = [json.loads(line) for line in f]
    imaged = [r for r in rows if "image" in r]
    for r in imaged[::3]:
      png = r["image"].replace(".npy", ".png")
      Image.fromarray(np.load(d / r["image"])).save(d / png)
      r["image"] = png
    rows.append(dict(imaged[1], question=imaged[1]["question"] + " and "
                     "<image>", image=[imaged[0]["image"],
                                       imaged[1]["image"]]))  # fmt: skip
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


def _config(data_dir):
  c = config_lib.load(os.path.join(ROOT, "experiments/vision.py"),
                      f"runlocal,prompts={data_dir}")  # fmt: skip
  c.stages = ("sft", "rl")
  c.sft.update(steps=0, image_share=0.5)  # 4 image rows of 8
  c.rl.iterations = 1
  c.eval.update(num_samples=2, greedy=False)
  return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("prompts")
  mix = visual.splits(
    seed=0, num_sft=24, num_rl=16, num_eval=8, min_steps=2, max_steps=3,
    ops="+-", max_operand=3,
    visual=visual.VisualConfig(tasks=("arith", "rendered", "count"),
                               cell=CELL, grid=3),
  )  # fmt: skip
  _write(d, mix)
  return d


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
  """The run, with the rows holding images recorded per batch that
  `images.pack_or_none` laid out (RL's updates, the sampler's calls; the
  warm-up's image rows are checked by `sft.dataset`, which refuses
  sft.image_share > 0 without them)."""
  packed = []
  real = images_lib.pack_or_none

  def spy(rows, v):
    packed.append(sum(r is not None for r in rows))
    return real(rows, v)

  mp = pytest.MonkeyPatch()
  mp.setattr(images_lib, "pack_or_none", spy)
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  try:
    summary = pipeline.run(_config(data), workdir)
  finally:
    mp.undo()
  return summary, packed, workdir


def test_image_rows_reach_every_stage(data, run):
  summary, packed, workdir = run
  for stage in ("sft", "rl"):
    res = summary["results"][stage]
    assert {"pass1_text", "pass1_image"} <= set(res), (stage, res)
  assert max(packed) > 0  # RL's and the evaluations' image rows
  # RL's prompts: the image rows' patches, placeholders in their place
  ctx = pipeline.make_context(_config(data), workdir)
  try:
    probs = ctx.problems["rl"]
    assert {len(p.image_paths) for p in probs} == {0, 1, 2}
    for i, p in enumerate(probs):
      for _ in range(2):  # the second ask: from the id cache
        ids, patches = ctx.prompt("rl", i)
        if not p.image_paths:
          assert patches is None and ctx.s.model.image_token not in ids
          continue
        want = images_lib.patches_of(
          [np.load(f) if f.endswith(".npy") else _png(f)
           for f in p.image_paths], ctx.s.model.vision, "want")
        assert ids.count(ctx.s.model.image_token) == patches.n == want.n
        np.testing.assert_array_equal(patches.pixels_nxX, want.pixels_nxX)
        np.testing.assert_array_equal(patches.img_n, want.img_n)
    # the warm-up's batches: 4 image rows of 8, their pixels in place
    batch = sft.dataset(ctx, 0)[0]
    rows = (batch["patch_img_BxN"] >= 0).any(axis=1)
    assert rows.sum() == 4
    assert (batch["tokens_BxT"] == ctx.s.model.image_token).any(1).sum() == 4
    assert np.abs(batch["pixels_BxNxX"][rows]).sum() > 0
  finally:
    ctx.writer.close()
    ctx.rewards.close()


def _png(path):
  from PIL import Image  # noqa: PLC0415

  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


VIS = vision.VisionConfig(patch_size=2, channels=3, max_patches=12, width=8,
                          num_layers=1, num_heads=2, mlp_dim=16, pos_grid=4)
LM = model_lib.ModelConfig(vocab_size=40, num_layers=1, d_model=16,
                           num_heads=2, num_kv_heads=1, head_dim=8,
                           mlp_dim=32, max_len=64, vision=VIS)  # fmt: skip


class _Tok:
  def encode(self, s):
    return [ord(c) % 30 for c in s]


@pytest.mark.parametrize("image, match", [
  (np.zeros((4, 4, 3), np.float32), "has dtype float32"),
  (np.zeros((4, 4), np.uint8), r"has shape \(4, 4\)"),
  (np.zeros((5, 4, 3), np.uint8), "multiples of model.vision.patch_size=2"),
  (np.zeros((2, 26, 3), np.uint8), "13 patches, more than"),
])  # fmt: skip
def test_bad_image_in_a_row_is_named_by_file_and_line(tmp_path, image,
                                                      match):  # fmt: skip
  np.save(tmp_path / "ok.npy", np.zeros((2, 2, 3), np.uint8))
  np.save(tmp_path / "bad.npy", image)
  (tmp_path / "q.jsonl").write_text(
    json.dumps(dict(question="Plain?", answer="1")) + "\n"
    + json.dumps(dict(question="A <image>?", answer="1", image="ok.npy"))
    + "\n\n"
    + json.dumps(dict(question="B <image>?", answer="2",
                      image=["bad.npy"])) + "\n")  # fmt: skip
  good, ok, bad = jsonl.load_problems([str(tmp_path / "q.jsonl")])
  assert (good.image_paths, good.images) == ((), ())
  assert ok.images[0].shape == (2, 2, 3) and bad.where.endswith("q.jsonl:4")
  want = f"q.jsonl:4: image 0: .*{match}"
  # at the run's start, from the file's header (pixels unread) ...
  with pytest.raises(images_lib.ImageError, match=want):
    images_lib.patch_counts(bad, VIS, "rl problem 2")
  # ... and wherever a stage encodes the prompt
  with pytest.raises(images_lib.ImageError, match=want):
    images_lib.encode_problem(_Tok(), bad, model=LM, where="rl problem 2")
  ids, patches = images_lib.encode_problem(_Tok(), ok, model=LM, where="")
  assert patches.n == 1 and ids.count(LM.image_token) == 1


def test_missing_or_vanished_image_file_is_named(tmp_path):
  np.save(tmp_path / "a.npy", np.zeros((2, 2, 3), np.uint8))
  row = dict(question="<image>?", answer="1", image="a.npy")
  (tmp_path / "q.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(
    dict(row, question="again <image>?", image="gone.npy")) + "\n")
  with pytest.raises(jsonl.JsonlError, match=r"q.jsonl:2: image 0: image "
                     r"file .*gone.npy does not exist"):
    jsonl.load_problems([str(tmp_path / "q.jsonl")])
  (tmp_path / "q.jsonl").write_text(json.dumps(row) + "\n")
  (p,) = jsonl.load_problems([str(tmp_path / "q.jsonl")])
  os.remove(tmp_path / "a.npy")  # after the load: read lazily
  images_lib._CACHE.clear()
  with pytest.raises(images_lib.ImageError, match=r"q.jsonl:1: image 0: "
                     r"image file .*a.npy does not exist"):
    images_lib.encode_problem(_Tok(), p, model=LM, where="eval problem 0")


def test_same_question_on_other_images_is_not_a_duplicate(tmp_path):
  for n in ("a", "b"):
    np.save(tmp_path / f"{n}.npy", np.zeros((2, 2, 3), np.uint8))
  row = dict(question="How many? <image>", answer="1", image="a.npy")
  lines = [row, dict(row, image="b.npy"), row]
  (tmp_path / "q.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in lines))
  with pytest.raises(jsonl.JsonlError, match="q.jsonl:3: repeats the "
                     "question and images of line 1"):
    jsonl.load_problems([str(tmp_path / "q.jsonl")])


def test_run_stops_at_the_start_on_a_bad_image_row(data, tmp_path):
  """A row whose image has more patches than model.vision.max_patches (18):
  the run stops before any training, naming the row; so does a vision-less
  model given image rows."""
  d = tmp_path / "data"
  d.mkdir()
  for name in ("sft", "rl"):
    (d / f"{name}.jsonl").write_text((data / f"{name}.jsonl").read_text())
  os.symlink(data / "images", d / "images")
  lines = (data / "eval.jsonl").read_text().splitlines()
  np.save(d / "big.npy", np.zeros((5 * CELL, 5 * CELL, 3), np.uint8))
  lines.insert(2, json.dumps(dict(question="Big <image>?", answer="1",
                                  image="big.npy")))  # fmt: skip
  (d / "eval.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(config_lib.ConfigError, match=r"eval.jsonl:3: image 0: "
                     r"has 5x5 = 25 patches, more than "
                     r"model.vision.max_patches=18"):
    pipeline.run(_config(d), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "ckpt")
  c = _config(data)
  c.stages = ("sft",)
  c.model.vision = None
  with pytest.raises(config_lib.ConfigError, match=r"sft.jsonl:\d+: has "
                     "images but model.vision is not set"):
    pipeline.run(c, str(tmp_path / "w2"))



def test_long2short_sampling_refuses_image_rows(data):
  """rs / dpo sample from the question's text alone: image rows stop them,
  named, rather than being sampled without their images."""
  import types  # noqa: PLC0415

  from k15.stages import rs  # noqa: PLC0415

  probs = jsonl.load_problems([str(data / "rl.jsonl")])
  first = next(p for p in probs if p.image_paths)
  ctx = types.SimpleNamespace(problems=dict(rl=probs))
  with pytest.raises(ValueError, match=f"first: {first.where}.*text prompts"):
    rs.sample_groups(ctx, None, n=2, num_prompts=0, temperature=1.0, seed=0)
