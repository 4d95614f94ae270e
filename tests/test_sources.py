"""Starting a stage from anywhere (k15.sources, config.init) and exporting a
run's checkpoint to HF (k15.tools.export).

A "run" here is a workdir with a tokenizer and one stage's checkpoints,
written with the run's own Checkpointer (no training needed): steps 2 and
4 of `rl`, the last one final.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

from k15 import checkpoint as ckpt_lib
from k15 import config_lib, hf, pipeline, sharding, sources, tasks, train
from k15 import model as model_lib
from k15 import tokenizer as tokenizer_lib
from k15.stages import common
from k15.tools import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "tiny.py")


def _config(**flat):
  return config_lib.override(config_lib.load(TINY, "runlocal"), **flat)


def _state(s, seed: int) -> train.TrainState:
  mesh = sharding.make_mesh(s.mesh)
  return train.init_state(
    jax.random.key(seed),
    model=s.model,
    tx=train.make_optimizer(s.optim),
    mesh=mesh,
  )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A fake finished run: DIR/tokenizer.model, DIR/ckpt/rl/{2,4}."""
  d = str(tmp_path_factory.mktemp("sources") / "run")
  os.makedirs(d)
  config = _config()
  task = tasks.get("arithmetic")
  tok = tokenizer_lib.train_sentencepiece(
    task.tokenizer_corpus(), 40, **task.TOKENIZER
  )
  tok.save(os.path.join(d, "tokenizer.model"))
  s = pipeline.settings(config, vocab_size=tok.vocab_size, num_devices=8)
  os.makedirs(os.path.join(d, "ckpt"))
  ck = ckpt_lib.Checkpointer(os.path.join(d, "ckpt", "rl"))
  states = {}
  for step, seed in ((2, 1), (4, 2)):
    states[step] = _state(s, seed)
    ck.save(step, dict(train=states[step]), dict(stage="rl", done=step == 4))
  ck.close()
  return dict(dir=d, config=config, s=s, states=states, tok=tok)


def _logits(params, cfg, tokens_BxT):
  B, T = tokens_BxT.shape
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  logits, _ = model_lib.Decoder(cfg).apply(
    params, tokens_BxT, pos, np.ones_like(tokens_BxT)
  )
  return np.asarray(logits)


def test_parse_forms(tmp_path):
  assert sources.parse("") is None
  src = sources.parse("/runs/long:rl@40")
  assert (src.kind, src.path, src.stage, src.step) == (
    "run",
    "/runs/long",
    "rl",
    40,
  )
  src = sources.parse("rel/dir:sft")
  assert src.kind == "run" and src.step is None
  assert src.path == os.path.abspath("rel/dir")
  hf_dir = tmp_path / "hf:weird"  # an HF dir wins even when it looks like one
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text("{}")
  assert sources.parse(str(hf_dir)).kind == "hf"
  assert sources.parse(str(tmp_path)).kind == "hf"


def test_resolve_names_what_is_missing(run):
  d = run["dir"]
  assert sources.resolve(sources.parse(f"{d}:rl")).step == 4
  assert sources.resolve(sources.parse(f"{d}:rl@2")).step == 2
  with pytest.raises(config_lib.ConfigError, match=r"kept steps: 2, 4"):
    sources.resolve(sources.parse(f"{d}:rl@3"))
  with pytest.raises(config_lib.ConfigError, match=r"stages saved there: rl"):
    sources.resolve(sources.parse(f"{d}:dpo"))
  with pytest.raises(config_lib.ConfigError, match="no config.json"):
    sources.resolve(sources.parse(d))


def test_unfinished_stage_needs_a_step(tmp_path, run):
  d = str(tmp_path / "half")
  os.makedirs(os.path.join(d, "ckpt"))
  ck = ckpt_lib.Checkpointer(os.path.join(d, "ckpt", "rl"))
  ck.save(7, dict(train=run["states"][2]), dict(stage="rl", done=False))
  ck.close()
  with pytest.raises(config_lib.ConfigError, match=rf"{d}:rl@7"):
    sources.resolve(sources.parse(f"{d}:rl"))
  assert sources.resolve(sources.parse(f"{d}:rl@7")).step == 7


def test_params_of_a_step_and_a_mismatch_named(run):
  s, d = run["s"], run["dir"]
  mesh = sharding.make_mesh(s.mesh)
  abstract = train.sharded_abstract_state(
    s.model, train.make_optimizer(s.optim), mesh
  )
  for spec, step in ((f"{d}:rl@2", 2), (f"{d}:rl", 4)):
    got = sources.load_params(
      sources.parse(spec), model=s.model, abstract_params=abstract.params
    )
    jax.tree.map(np.testing.assert_array_equal, got, run["states"][step].params)
    leaf = jax.tree.leaves(got)[0]
    assert leaf.sharding == jax.tree.leaves(abstract.params)[0].sharding
  wide = dataclasses.replace(s.model, mlp_dim=s.model.mlp_dim * 2)
  other = train.sharded_abstract_state(
    wide, train.make_optimizer(s.optim), mesh
  )
  with pytest.raises(
    ckpt_lib.CheckpointError,
    match=r"params/layers/down has shape \(1, 128, 64\) in the checkpoint",
  ):
    sources.load_params(
      sources.parse(f"{d}:rl"), model=wide, abstract_params=other.params
    )


def test_a_stage_starts_from_another_runs_step(tmp_path, run):
  """config.init=DIR:rl@2 for a run of only the rl stage: its start state
  holds that step's params, a fresh optimizer, step 0, and the source's
  tokenizer is copied into the new workdir."""
  config = _config(init=f"{run['dir']}:rl@2", stages=("rl",))
  ctx = pipeline.make_context(config, str(tmp_path / "new"))
  with sharding.mesh_context(ctx.mesh):
    state, _ = common.needed_state(ctx, "sft", {}, {})
  jax.tree.map(np.testing.assert_array_equal, state.params,
               run["states"][2].params)  # fmt: skip
  assert int(state.step) == 0
  for leaf in jax.tree.leaves(state.opt_state):
    assert not np.any(np.asarray(leaf, np.float32))  # fresh moments
  with open(os.path.join(str(tmp_path / "new"), "tokenizer.model"), "rb") as f:
    assert f.read() == run["tok"].model_proto


def test_export_then_import_gives_identical_logits(tmp_path, run):
  """The export command's directory: transformers-style config.json with
  the tokenizer's ids, the tokenizer beside it; importing it (as
  config.init does) gives the run's exact params and logits."""
  out = str(tmp_path / "hf")
  done = export.export(run["config"], f"{run['dir']}:rl", out)
  assert done["step"] == 4
  cfg = hf.config_from_hf(out, max_len=run["s"].model.max_len)
  assert cfg == dataclasses.replace(run["s"].model, emb_init_scale=1.0)
  assert hf.read_config(out)["eos_token_id"] == run["tok"].eos_id
  assert tokenizer_lib.load(out).vocab_size == run["tok"].vocab_size
  params = run["states"][4].params
  back = hf.import_params(out, model=cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
  want = _logits(jax.device_get(params), cfg, tokens.astype(np.int32))
  got = _logits(back, cfg, tokens.astype(np.int32))
  np.testing.assert_array_equal(got, want)
  assert np.abs(want).max() > 0.01  # not a degenerate all-zero model

  # the same directory as config.init: the stage's start params
  config = _config(init=out, stages=("rl",))
  ctx = pipeline.make_context(config, str(tmp_path / "from_hf"))
  with sharding.mesh_context(ctx.mesh):
    state = common.source_state(ctx, out)
  got = _logits(jax.device_get(state.params), ctx.s.model,
                tokens.astype(np.int32))  # fmt: skip
  np.testing.assert_array_equal(got, want)

  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    hf_logits = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(hf_logits, want, atol=1e-4, rtol=0)


def test_export_refuses_an_hf_source(run, tmp_path):
  out = str(tmp_path / "hf")
  export.export(run["config"], f"{run['dir']}:rl", out)
  with pytest.raises(config_lib.ConfigError, match="DIR:stage"):
    export.export(run["config"], out, str(tmp_path / "again"))
