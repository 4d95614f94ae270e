"""Every experiment config builds and validates; bad configs name the field.

Experiment files are found by glob (experiments/*.py and any sub-directory),
so a new experiment is covered without touching this file. Each one's
docstring names the command that runs it; the settings function of that
runner (k15.pipeline for `python -m k15.main`) validates it.
"""

import ast
import glob
import importlib
import inspect
import os
import re

import ml_collections
import pytest

from k15 import config_lib, pipeline, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "tiny.py")
# device counts a config may be validated against: a laptop, the fake CPU
# devices of the tests, pod slices
DEVICE_COUNTS = (1, 8, 16, 32, 64, 128, 256, 512, 1024)


def _experiment_files():
  files = sorted(
    set(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
    | set(
      glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True)
    )
  )
  # figure scripts and helpers live there too; a config defines get_config
  return [
    f for f in files if re.search(r"^def get_config\(", open(f).read(), re.M)
  ]


FILES = _experiment_files()
IDS = [os.path.relpath(f, ROOT) for f in FILES]


def _runner(path):
  """The module of the `python -m <module> --config <this file>` command."""
  doc = _docstring(path)
  name = os.path.relpath(path, ROOT)
  m = re.search(r"python -m ([\w.]+)[\s\\]+--config\s+" + re.escape(name), doc)
  assert m, f"{name}: the docstring must give the command that runs it"
  return m.group(1)


def _docstring(path):
  return ast.get_docstring(ast.parse(open(path).read())) or ""


def _settings_fn(runner):
  if runner == "k15.main":
    return pipeline.settings
  module = importlib.import_module(runner)
  assert hasattr(module, "settings"), (
    f"{runner} should expose settings(config) to validate its configs"
  )
  return module.settings


def _vocab(cfg):
  tok = cfg.get("tokenizer") or {}
  return int(tok.get("vocab_size") or 64)


def _validate(path, cfg, num_devices):
  fn = _settings_fn(_runner(path))
  kw = dict(vocab_size=_vocab(cfg))
  if "num_devices" in inspect.signature(fn).parameters:
    kw["num_devices"] = num_devices
  return fn(cfg, **kw)


def _fitting_device_count(cfg):
  mesh = dict(cfg.get("mesh") or {})
  for n in DEVICE_COUNTS:
    try:
      sharding.mesh_shape(mesh, n)
    except ValueError:
      continue
    return n
  raise AssertionError(f"mesh {mesh} fits none of {DEVICE_COUNTS} devices")


def test_experiments_are_found():
  names = {os.path.relpath(f, ROOT) for f in FILES}
  assert {"experiments/tiny.py", "experiments/k15_long_cot.py"} <= names
  top = glob.glob(os.path.join(ROOT, "experiments", "*.py"))
  assert set(top) <= set(FILES), "every experiments/*.py is a config"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_experiment_builds_and_validates(path):
  cfg = config_lib.load(path)
  assert isinstance(cfg, ml_collections.ConfigDict)
  n = _fitting_device_count(cfg)
  _validate(path, cfg, n)
  # the same through the CLI's path:arg spelling with an empty arg
  assert config_lib.load(path + ":").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", FILES, ids=IDS)
@pytest.mark.parametrize("num_devices", [1, 8])
def test_experiment_runlocal_validates_on_1_and_8_devices(path, num_devices):
  full = config_lib.load(path)
  cfg = config_lib.load(path, "runlocal")
  assert cfg.to_dict() != full.to_dict(), "runlocal should shrink the run"
  _validate(path, cfg, num_devices)


@pytest.mark.parametrize(
  "arg",
  [
    "control",
    "loss=rest",
    "loss=grpo",
    "loss=reinforce",
    "seed=3",
    "runlocal,control",
    "runlocal,loss=grpo,seed=2",
  ],
)
def test_tiny_variants_validate(arg):
  cfg = config_lib.load(TINY, arg)
  pipeline.settings(cfg, vocab_size=_vocab(cfg), num_devices=1)
  if "control" in arg:
    assert "rl" not in cfg.stages and "control" in cfg.stages
  if "seed=" in arg:
    assert cfg.seed == int(arg.rpartition("seed=")[2])


def test_big_config_needs_a_pod_mesh():
  path = os.path.join(ROOT, "experiments", "k15_long_cot.py")
  cfg = config_lib.load(path)
  s = pipeline.settings(cfg, vocab_size=64, num_devices=64)
  assert s.model.num_params() > 5e9  # a 7B-class shape
  # the report's 128k-token responses, in partial-rollout segments, ring
  # attention over a context axis > 1 on the 64-chip mesh
  assert s.model.max_len == s.rollout.max_len
  assert s.rollout.max_len - s.rollout.prompt_len == 131_072
  assert s.rollout.partial and s.rollout.budget < 131_072
  assert sharding.mesh_shape(s.mesh, 64)["context"] > 1
  assert s.model.attention == "ring"
  # real data: math and code prompt files, curriculum + length penalty
  assert s.task.name == "jsonl"
  assert s.task.rl_files == ("math_rl.jsonl", "code_rl.jsonl")
  assert "humaneval.jsonl" in s.task.eval_files
  assert s.data.strategy == "curriculum+prioritized" and s.data.stages
  assert s.length_penalty.schedule == "constant" and s.length_penalty.warmup
  with pytest.raises(ValueError, match="mesh"):
    pipeline.settings(cfg, vocab_size=64, num_devices=8)


# ---------------------------------------------------------------------------
# Bad configs name the field
# ---------------------------------------------------------------------------


def _tiny(**flat):
  """tiny.py:runlocal as a plain dict (a ConfigDict would refuse ill-typed
  values on assignment, before settings() could name them)."""
  cfg = config_lib.load(TINY, "runlocal").to_dict()
  for dotted, value in flat.items():
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize(
  "flat, error, match",
  [
    ({"model.d_modl": 3}, ValueError, r"model\.d_modl"),
    ({"rl.taus": 0.1}, ValueError, r"rl\.taus"),
    ({"modle": {}}, ValueError, r"config\.modle"),
    ({"model.d_model": "big"}, TypeError, r"model\.d_model"),
    ({"rl.tau": "0.1"}, TypeError, r"rl\.tau"),
    ({"rl.reset_optimizer": 1}, TypeError, r"rl\.reset_optimizer"),
    ({"sampler.stop_tokens": 5}, TypeError, r"sampler\.stop_tokens"),
    ({"mesh.data": "2"}, TypeError, r"mesh\.data"),
    ({"seed": 1.5}, TypeError, r"seed"),
    ({"stages": ("sft", "rll")}, ValueError, r"config\.stages"),
    ({"model.num_kv_heads": 3}, ValueError, r"model\.num_heads"),
    ({"rollout.k": 0}, ValueError, r"rollout\.k"),
  ],
)
def test_bad_field_is_named(flat, error, match):
  with pytest.raises(error, match=match):
    pipeline.settings(_tiny(**flat), vocab_size=64, num_devices=1)


def test_budget_plus_prompt_exceeding_max_len_is_named():
  cfg = _tiny()
  r = cfg["rollout"]
  r["budget"] = r["max_len"] - r["prompt_len"] + 1
  with pytest.raises(ValueError, match=r"rollout\.budget.*rollout\.max_len"):
    pipeline.settings(cfg, vocab_size=64, num_devices=1)
  r["budget"] -= 1  # exactly fills the cache: fine
  pipeline.settings(cfg, vocab_size=64, num_devices=1)


def test_rollout_longer_than_the_model_is_named():
  cfg = _tiny()
  cfg["rollout"]["max_len"] = cfg["model"]["max_len"] + 8
  with pytest.raises(ValueError, match=r"model\.max_len"):
    pipeline.settings(cfg, vocab_size=64, num_devices=1)


def test_rows_not_divisible_by_minibatches_is_named():
  cfg = _tiny()
  rows = cfg["rollout"]["k"] * cfg["rollout"]["prompts_per_iter"]
  cfg["rl"]["num_minibatches"] = next(m for m in range(3, rows) if rows % m)
  with pytest.raises(ValueError, match=r"rl\.num_minibatches"):
    pipeline.settings(cfg, vocab_size=64, num_devices=1)


def test_mesh_not_dividing_the_devices_is_named():
  cfg = _tiny()
  cfg["mesh"] = dict(data=-1, fsdp=2, tensor=1, context=1)
  with pytest.raises(ValueError, match=r"mesh.*3 devices"):
    pipeline.settings(cfg, vocab_size=64, num_devices=3)
  cfg["mesh"] = dict(data=3, fsdp=1, tensor=1, context=1)
  with pytest.raises(ValueError, match=r"mesh.*needs 3 devices.*8"):
    pipeline.settings(cfg, vocab_size=64, num_devices=8)
  cfg["mesh"] = dict(dat=-1)
  with pytest.raises(ValueError, match=r"mesh.*'dat'"):
    pipeline.settings(cfg, vocab_size=64, num_devices=8)


def test_batch_not_divisible_by_the_mesh_is_named():
  cfg = _tiny()  # data=-1: 6 devices give data=6
  with pytest.raises(
    ValueError,
    match=r"(rollout\.gen_rows|sft\.batch_size|"
    r"rl minibatch).*data\*fsdp = 6",
  ):
    pipeline.settings(cfg, vocab_size=64, num_devices=6)


def test_vocab_smaller_than_the_tokenizer_is_named():
  cfg = _tiny(**{"model.vocab_size": 32})
  with pytest.raises(ValueError, match=r"model\.vocab_size"):
    pipeline.settings(cfg, vocab_size=64, num_devices=1)


def test_vocab_is_filled_from_the_tokenizer_rounded_up():
  s = pipeline.settings(_tiny(), vocab_size=61, num_devices=1)
  assert s.model.vocab_size == 64


# ---------------------------------------------------------------------------
# config_lib
# ---------------------------------------------------------------------------


def test_parse_arg_types_values_by_their_defaults():
  a = config_lib.parse_arg(
    "n=3,lr=0.5,name=x,flag,off=false,on=Yes",
    n=1,
    lr=1.0,
    name="",
    flag=False,
    off=True,
    on=False,
    keep=7,
  )
  assert a.to_dict() == dict(
    n=3, lr=0.5, name="x", flag=True, off=False, on=True, keep=7
  )
  assert type(a.n) is int and type(a.lr) is float
  assert config_lib.parse_arg("lr=1", lr=0.5).lr == 1.0
  assert type(config_lib.parse_arg("lr=1", lr=0.5).lr) is float
  assert config_lib.parse_arg(None, a=1).to_dict() == {"a": 1}
  assert config_lib.parse_arg("", a=1).to_dict() == {"a": 1}
  # without defaults: strings and bare words
  assert config_lib.parse_arg("a=3,b").to_dict() == {"a": "3", "b": True}


@pytest.mark.parametrize(
  "arg, match",
  [
    ("runlocl", "'runlocl'"),  # a typo is not silently ignored
    ("seed=x", "seed='x'"),
    ("runlocal=ture", "runlocal='ture'"),
    ("seed", "'seed' needs a value"),
  ],
)
def test_parse_arg_rejects_bad_args(arg, match):
  with pytest.raises(ValueError, match=match):
    config_lib.parse_arg(arg, runlocal=False, seed=0)


def test_experiment_rejects_unknown_variant():
  with pytest.raises(ValueError, match="runlocl"):
    config_lib.load(TINY, "runlocl")


def test_override_sets_fields_and_rejects_unknown_keys():
  cfg = config_lib.load(TINY, "runlocal")
  new = config_lib.override(cfg, **{"rl.tau": 0.05, "seed": 4})
  assert new.rl.tau == 0.05 and new.seed == 4
  assert cfg.rl.tau != 0.05, "override must not mutate its input"
  with pytest.raises(KeyError, match=r"model\.d_modl"):
    config_lib.override(cfg, **{"model.d_modl": 3})
  with pytest.raises(KeyError, match=r"modle\.d_model"):
    config_lib.override(cfg, **{"modle.d_model": 3})
  with pytest.raises(KeyError, match="sed"):
    config_lib.override(cfg, sed=3)


def test_load_names_a_missing_file(tmp_path):
  missing = str(tmp_path / "nope.py")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    config_lib.load(missing)


def test_sft_eps_gives_the_supervised_stages_their_own_adam_eps(tmp_path):
  """tiny: RL's Adam eps 3e-4 (optim.eps) damps a near-zero gradient; the
  warm-up and the control keep eps 1e-8 (sft.eps) and take a full lr step."""
  import jax.numpy as jnp  # noqa: PLC0415

  cfg = config_lib.load(TINY, "runlocal")
  assert (cfg.optim.eps, cfg.sft.eps) == (3e-4, 1e-8)
  r = pipeline.make_context(cfg, str(tmp_path / "run"))
  r.writer.close()
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.full(3, 1e-6)}

  def step(tx):
    updates, _ = tx.update(grads, tx.init(params), params)
    return float(jnp.abs(updates["w"]).max())

  assert step(r.sft_tx) == pytest.approx(cfg.sft.lr, rel=0.02)
  assert step(r.tx) == pytest.approx(cfg.optim.lr * 1e-6 / (1e-6 + 3e-4),
                                     rel=0.02)
