"""The pod dry run plans small configs on the 8 fake devices, with numbers
checked against independent arithmetic, and fails loudly when over HBM."""

import dataclasses
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15 import config_lib, sharding, train
from k15.tools import flops, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "tiny.py")


def _config(mesh: dict, attention: str):
  cfg = config_lib.load(TINY, "runlocal")
  cfg.model.update(
    vocab_size=64,
    attention=attention,
    attention_block=16,
    logits_chunk=32,
    remat="full",
  )
  cfg.rollout.update(
    k=4, prompts_per_iter=4, prompt_len=16, budget=32, max_len=48, gen_rows=8
  )
  cfg.rl.update(num_minibatches=2)
  cfg.mesh = mesh
  return cfg


def _expected_bytes_per_device(model, tx, mesh) -> tuple[int, int]:
  """(params, optimizer) bytes per device from logical names and RULES,
  without NamedSharding: each dim is split by the sizes of its mesh axes."""
  rules = dict(sharding.RULES)
  # ring attention cannot trace init outside a mesh; shapes do not care
  boxed = train.abstract_state(
    dataclasses.replace(model, attention="dense"), tx
  )

  def per_device(tree):
    total = 0
    leaves = jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    for leaf in leaves:
      names = getattr(leaf, "names", None) or ()
      x = nn.unbox(leaf)
      factor = 1
      for name in names:
        axes = rules.get(name)
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        factor *= math.prod(mesh.shape[a] for a in axes)
      total += x.size * jnp.dtype(x.dtype).itemsize // factor
    return total

  return per_device(boxed.params), per_device(boxed.opt_state)


@pytest.fixture(scope="module")
def plan_tp():
  cfg = _config(dict(data=2, fsdp=2, tensor=2, context=1), "blockwise")
  return cfg, plan.plan(cfg)


@pytest.fixture(scope="module")
def plan_cp():
  cfg = _config(dict(data=2, fsdp=1, tensor=1, context=4), "ring")
  return cfg, plan.plan(cfg)


@pytest.mark.parametrize("which", ["plan_tp", "plan_cp"])
def test_param_optimizer_and_cache_bytes(which, request):
  cfg, p = request.getfixturevalue(which)
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  assert p.num_devices == 8 and p.mesh == dict(mesh.shape)
  tx = train.make_optimizer(train.OptimConfig())
  want_p, want_o = _expected_bytes_per_device(p.model, tx, mesh)
  upd, pre, dec = p.phases
  for ph in p.phases:
    assert ph.params == want_p
    assert ph.optimizer == want_o
  # Adam: two moments the size of the params, plus a few scalars.
  assert 2 * want_p <= want_o < 2 * want_p + 64
  # fsdp x tensor split the weights (data and context replicate them)
  split = mesh.shape["fsdp"] * mesh.shape["tensor"]
  total_p = p.model.num_params() * 4
  assert total_p / split <= want_p < 1.5 * total_p / split
  # KV cache: [L, B, S, K, Dh] k and v in f32 plus int32 pos/seg [B, S],
  # S = the runtime's cache of a call: prompt bucket + budget; k/v are
  # split over all 8 devices (batch x heads or batch x length); the small
  # pos/seg arrays at least over the batch axes (data=2).
  m, r = p.model, cfg.rollout
  S = r.prompt_len + r.budget
  kv = 2 * m.num_layers * r.gen_rows * S * m.num_kv_heads * m.head_dim * 4
  ids = 2 * r.gen_rows * S * 4
  assert kv / 8 + ids / 8 <= pre.kv_cache <= kv / 8 + ids / 2
  assert dec.kv_cache == pre.kv_cache
  assert upd.kv_cache == 0
  for ph in p.phases:
    assert ph.temp > 0
    assert ph.total == sum(v for _, v in plan._rows(ph))


@pytest.mark.parametrize("which", ["plan_tp", "plan_cp"])
def test_flops_are_plausible(which, request):
  _, p = request.getfixturevalue(which)
  upd, pre, dec = p.phases
  # counted adds remat's second forward and block pairs causal skipping
  # would drop; at these sizes it stays within a small factor of 6N*tokens.
  assert upd.flops_analytic <= upd.flops_counted < 4 * upd.flops_analytic
  assert pre.flops_analytic <= pre.flops_counted < 8 * pre.flops_analytic
  # ring pads decode's single query token to one per context device
  assert dec.flops_analytic <= dec.flops_counted < 3 * dec.flops_analytic


def test_over_hbm_exits_nonzero_and_names_the_program(plan_tp, capsys):
  _, p = plan_tp
  assert plan.report(p, hbm_gib=None) == 0
  assert plan.report(p, hbm_gib=100.0) == 0
  biggest = max(p.phases, key=lambda ph: ph.total)
  limit = (biggest.total - 1) / plan.GiB
  assert plan.report(p, hbm_gib=limit) == 1
  err = capsys.readouterr().err
  assert f"does not fit: {biggest.name} needs" in err
  assert "activations + temp" in err


def test_count_flops_multiplies_scans_and_takes_dearer_branch():
  def f(w_LxDxD, x_BxD):
    def body(x, w):
      y = jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x)
      return y, None

    return jax.lax.scan(body, x_BxD, w_LxDxD)[0]

  L, B, D = 5, 3, 4
  jaxpr = jax.make_jaxpr(f)(np.zeros((L, D, D)), np.zeros((B, D)))
  assert flops.count_flops(jaxpr, 1) == L * 2 * (2 * B * D * D)
  assert flops.count_flops(jaxpr, 2) == L * 2 * B * D * D


def test_main_dry_run_in_a_subprocess(tmp_path):
  """`k15.main --dry_run` re-runs itself with fake devices; exit 1 + message
  when over `--dry_run.hbm_gib`, 0 without a limit."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device here: the planner must re-run
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [
    sys.executable,
    "-m",
    "k15.main",
    f"--config={TINY}:runlocal",
    "--dry_run",
    "--dry_run.devices=2",
    "--dry_run_hbm_gib=0.0001",
  ]
  out = subprocess.run(
    cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 1, out.stderr[-2000:]
  assert "re-running with 2 fake CPU devices" in out.stdout
  assert "per device" in out.stdout and "update_step" in out.stdout
  assert "does not fit" in out.stderr


# ---------------------------------------------------------------------------
# The planner plans what runs
# ---------------------------------------------------------------------------


def _record_calls(monkeypatch, module, name, key) -> set:
  """Wraps module.name (a jitted entry point) to record `key(*args, **kw)`
  of every call: one compiled program per distinct key."""
  seen, fn = set(), getattr(module, name)

  def spy(*args, **kw):
    seen.add(key(*args, **kw))
    return fn(*args, **kw)

  monkeypatch.setattr(module, name, spy)
  return seen


def _cache_len(state) -> int:
  """Cache slots of a sampler.SamplingState."""
  return state.cache["pos"].shape[1]


def test_planner_lists_every_shape_the_run_compiles(tmp_path, monkeypatch):
  """tiny.py:runlocal with partial rollouts: every shape the jitted update,
  reference, warm-up, prefill and decode steps are called with is one the
  planner lists. A 16-token budget continues trajectories at a longer
  bucket, and the trainer scores rows longer than prompt_len + budget."""
  import signal

  from k15 import pipeline, sampler

  cfg = config_lib.load(TINY, "runlocal")
  cfg.rollout.update(partial=True, budget=16)
  rows = lambda state, batch, **kw: batch["tokens_BxT"].shape
  seen = dict(
    sft_step=_record_calls(monkeypatch, train, "sft_step", rows),
    update_step=_record_calls(monkeypatch, train, "update_step", rows),
    score=_record_calls(
      monkeypatch, train, "score", lambda p, tokens, seg, **kw: tokens.shape
    ),
    prefill=_record_calls(
      monkeypatch,
      sampler,
      "prefill",
      lambda p, toks, seg, rng, **kw: (
        *toks.shape,
        kw["cache_len"],
        kw["budget"],
      ),
    ),
    decode=_record_calls(
      monkeypatch,
      sampler,
      "decode",
      lambda p, state, **kw: (
        state.tokens.shape[0],
        _cache_len(state),
        kw["max_steps"],
      ),
    ),
  )
  handler = signal.getsignal(signal.SIGTERM)
  try:
    pipeline.run(cfg, str(tmp_path / "run"))
  finally:
    signal.signal(signal.SIGTERM, handler)
  s = pipeline.settings(cfg, vocab_size=cfg.tokenizer.vocab_size)
  planned = {k: set(v) for k, v in plan.programs(s).items()}
  assert planned.keys() == seen.keys()
  for name, shapes in seen.items():
    assert shapes, f"the run never called {name}"
    assert shapes <= planned[name], (name, shapes - planned[name])
  # not vacuous: continued trajectories were re-prefilled at longer
  # buckets, and the trainer scored rows longer than one segment
  r = cfg.rollout
  assert len({b for _, b, _, _ in seen["prefill"]}) > 1
  assert max(t for _, t in seen["update_step"]) > r.prompt_len + r.budget


def test_plan_covers_the_vision_tower():
  """experiments/vision.py:runlocal on (data=2, fsdp=2, tensor=2): the
  tower's params and Adam moments are in the bytes (split by the rules),
  update_step and prefill compile with images and count the tower's
  FLOPs, and the tower and joint stages' rows are listed programs."""
  cfg = config_lib.load(os.path.join(ROOT, "experiments", "vision.py"),
                        "runlocal")  # fmt: skip
  cfg.tower.update(batch_size=12)
  cfg.rollout.update(gen_rows=8)
  cfg.mesh = dict(data=2, fsdp=2, tensor=2, context=1)
  p = plan.plan(cfg)
  assert p.model.vision is not None
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  tx = train.make_optimizer(train.OptimConfig())
  want_p, want_o = _expected_bytes_per_device(p.model, tx, mesh)
  lm = dataclasses.replace(p.model, vision=None)
  lm_p, _ = _expected_bytes_per_device(lm, tx, mesh)
  assert want_p > lm_p  # the tower is counted
  upd, pre, dec = p.phases
  for ph in p.phases:
    assert (ph.params, ph.optimizer) == (want_p, want_o)
  assert upd.flops_analytic <= upd.flops_counted < 4 * upd.flops_analytic
  assert pre.flops_analytic <= pre.flops_counted < 8 * pre.flops_analytic
  tower = flops.analytic_flops(p.model, "prefill", 8, 4) - flops.analytic_flops(
    lm, "prefill", 8, 4)
  assert tower > 0
  assert {b for b, _ in p.programs["sft_step"]} == {8, 12}
