"""k15.hf_vision: SigLIP vision weights from HF safetensors, with feature
parity against transformers on a tiny random tower the test builds."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from k15 import hf_vision, vision
from k15 import images as images_lib
from k15 import model as model_lib

SIGLIP = dict(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=2, num_channels=3, image_size=8,
              patch_size=2, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=1e-6)  # fmt: skip
LM = model_lib.ModelConfig(
  vocab_size=32, num_layers=1, d_model=24, num_heads=2, num_kv_heads=1,
  head_dim=12, mlp_dim=48, max_len=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  """A random SiglipVisionModel saved as safetensors (and its module)."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  ref = transformers.SiglipVisionModel(
    transformers.SiglipVisionConfig(**SIGLIP)
  ).eval()
  with torch.no_grad():  # the init leaves biases and norms trivial
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("siglip"))
  ref.save_pretrained(path)
  return ref, path


def _images(rng):
  """Full-resolution images (HF uses the whole position table)."""
  return [rng.integers(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(2)]


def test_siglip_features_match_transformers(siglip, rng):
  import torch  # noqa: PLC0415

  ref, path = siglip
  cfg = hf_vision.with_tower(LM, path, max_patches=16)
  assert cfg.vision.width == 16 and cfg.vision.pos_grid == 4
  assert cfg.vision.act == "gelu_tanh" and cfg.vision.init == path
  tower = hf_vision.import_tower(path, model=cfg)

  ims = _images(rng)
  with torch.no_grad():
    px = torch.tensor(np.stack(ims).astype(np.float32) / 127.5 - 1.0)
    want = ref(pixel_values=px.permute(0, 3, 1, 2)).last_hidden_state.numpy()
  packed = images_lib.pack(
    [images_lib.patches_of([im], cfg.vision, f"row {i}")
     for i, im in enumerate(ims)], cfg.vision,
  )  # fmt: skip
  got = vision.VisionTower(cfg).apply(
    {"params": tower}, *(packed[k] for k in vision.IMAGE_KEYS)
  )  # fmt: skip
  print(f"max |feature diff| = {np.abs(np.asarray(got) - want).max():.2e}")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)

  # the imported subtree has the init's structure and shapes, so the tower
  # warm-up can put it in place of the random one; the decoder then runs
  init = nn.unbox(model_lib.init_params(jax.random.key(0), model=cfg))
  assert jax.tree.structure(init["params"]["vision"]) == jax.tree.structure(
    tower)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
               init["params"]["vision"], tower)  # fmt: skip
  params = {"params": dict(init["params"], vision=tower)}
  feats = model_lib.Decoder(cfg).apply(
    params, packed, method=model_lib.Decoder.image_features)
  assert feats.shape == (2, 16, cfg.d_model)


def test_siglip_model_with_text_tower_and_head_imports(tmp_path, rng):
  """A SiglipModel checkpoint (text tower + pooling head next to the
  vision tower) imports its vision tower: the prefix is found."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(1)
  ref = transformers.SiglipModel(transformers.SiglipConfig(
    vision_config=SIGLIP,
    text_config=dict(hidden_size=16, intermediate_size=32, vocab_size=50,
                     num_hidden_layers=1, num_attention_heads=2),
  )).eval()  # fmt: skip
  ref.save_pretrained(str(tmp_path))
  cfg = hf_vision.with_tower(LM, str(tmp_path), max_patches=16)
  tower = hf_vision.import_tower(str(tmp_path), model=cfg)
  im = _images(rng)[0]
  with torch.no_grad():
    px = torch.tensor(im[None].astype(np.float32) / 127.5 - 1.0)
    want = ref.vision_model(pixel_values=px.permute(0, 3, 1, 2))
  packed = images_lib.pack([images_lib.patches_of([im], cfg.vision, "r")],
                           cfg.vision)  # fmt: skip
  got = vision.VisionTower(cfg).apply(
    {"params": tower}, *(packed[k] for k in vision.IMAGE_KEYS))
  np.testing.assert_allclose(np.asarray(got),
                             want.last_hidden_state.numpy(), atol=2e-5,
                             rtol=2e-5)  # fmt: skip


def test_mismatches_are_named(siglip, tmp_path):
  _, path = siglip
  cfg = hf_vision.with_tower(LM, path)
  bad = dataclasses.replace(
    cfg, vision=dataclasses.replace(cfg.vision, mlp_dim=32))
  with pytest.raises(ValueError, match=r"model.vision.mlp_dim=32 but .* "
                     r"intermediate_size -> 40"):
    hf_vision.import_tower(path, model=bad)
  (tmp_path / "config.json").write_text(json.dumps(
    dict(model_type="clip_vision_model")))
  with pytest.raises(ValueError, match="clip_vision_model checkpoint"):
    hf_vision.vision_config_from_hf(str(tmp_path))


def test_a_run_checks_vision_init_before_any_stage(siglip):
  """A vision section that differs from model.vision.init's config.json
  stops the run at its settings, naming the field (not when the tower
  stage starts, after the warm-up has trained)."""
  import os  # noqa: PLC0415

  from k15 import config_lib, pipeline  # noqa: PLC0415

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = config_lib.load(os.path.join(root, "experiments/vision.py"),
                      "runlocal")  # fmt: skip
  c.model.vision.init = siglip[1]
  with pytest.raises(config_lib.ConfigError, match=r"model.vision.init="
                     r".*model.vision.patch_size=6 but .*patch_size -> 2"):
    pipeline.settings(c)
  c.model.vision.init = "/nonexistent"
  with pytest.raises(config_lib.ConfigError, match=r"model.vision.init="
                     r"'/nonexistent': .*no config.json"):
    pipeline.settings(c)


# experiments/vision.py:runlocal's tower (6-pixel patches, a 16 x 16 grid)
RUNLOCAL_SIGLIP = dict(hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2,
                       num_channels=3, image_size=96, patch_size=6,
                       hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6)  # fmt: skip


def test_vision_run_starts_its_tower_from_an_imported_siglip(
  tmp_path, monkeypatch
):
  """experiments/vision.py:runlocal (sft -> tower) with model.vision.init
  at a random SiglipVisionModel of its tower's shape: the tower stage
  starts from exactly the imported weights (and sft's LM), trains, and
  leaves the LM bitwise as sft left it. (sft takes 0 steps: its
  state is the init, which is all the tower stage reads of it.)"""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  import os  # noqa: PLC0415

  from k15 import config_lib, pipeline  # noqa: PLC0415
  from k15.stages import tower  # noqa: PLC0415

  torch.manual_seed(2)
  ref = transformers.SiglipVisionModel(
    transformers.SiglipVisionConfig(**RUNLOCAL_SIGLIP))
  path = str(tmp_path / "siglip")
  ref.save_pretrained(path)
  assert os.path.exists(os.path.join(path, "model.safetensors"))

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = config_lib.load(os.path.join(root, "experiments/vision.py"),
                      "runlocal")  # fmt: skip
  c.stages = ("sft", "tower")
  c.model.vision.init = path
  c.task.update(num_sft=40, num_rl=8, num_eval=8)
  c.sft.steps, c.tower.steps = 0, 2  # sft: the LM's init, evaluated
  c.eval.update(num_samples=1, greedy=False)

  seen = {}

  def numpy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)

  def start(ctx, states):
    seen["sft"] = numpy(states["sft"].params["params"])
    carry = tower.STAGE.start(ctx, states)
    seen["start"] = numpy(carry.state.params["params"])
    seen["imported"] = hf_vision.import_tower(path, model=ctx.s.model)
    return carry

  def save(carry):
    seen["end"] = numpy(carry.state.params["params"])
    return tower.STAGE.save(carry)

  monkeypatch.setitem(pipeline.STAGES, "tower", dataclasses.replace(
    tower.STAGE, start=start, save=save))  # fmt: skip
  summary = pipeline.run(c, str(tmp_path / "run"))
  assert {"sft", "tower"} <= set(summary["results"])

  sft, start, end = seen["sft"], seen["start"], seen["end"]
  # (a) before any update: the tower is the checkpoint's, bitwise; the LM
  # and the (not imported) projector are sft's
  jax.tree.map(np.testing.assert_array_equal, start["vision"],
               seen["imported"])  # fmt: skip
  (hf_patch,) = [v.detach().numpy() for k, v in ref.state_dict().items()
                 if k.endswith("embeddings.patch_embedding.weight")]
  np.testing.assert_array_equal(  # and that is HF's patch embedding
    start["vision"]["patch_kernel"],
    hf_patch.transpose(2, 3, 1, 0).reshape(6 * 6 * 3, 32))  # fmt: skip
  assert not np.array_equal(start["vision"]["patch_kernel"],
                            sft["vision"]["patch_kernel"])  # fmt: skip
  # (b) the stage trained the tower and projector only
  assert set(tower.TRAINABLE) < set(sft)
  for name in sft:
    pairs = list(zip(jax.tree.leaves(start[name]), jax.tree.leaves(end[name]),
                     strict=True))  # fmt: skip
    if name in tower.TRAINABLE:
      assert all(not np.array_equal(a, b) for a, b in pairs), name
    else:
      assert all(a.tobytes() == b.tobytes() for a, b in pairs), name
      assert all(a.tobytes() == b.tobytes() for a, b in zip(
        jax.tree.leaves(sft[name]), jax.tree.leaves(start[name]),
        strict=True)), name  # fmt: skip
