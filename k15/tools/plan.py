"""Pod dry run: does a config fit the pod, and how much work is one step?

  python -m k15.tools.plan --config experiments/k15_long_cot.py [--hbm_gib=95]
  python -m k15.main --config experiments/k15_long_cot.py --dry_run \
      [--dry_run.hbm_gib=95] [--dry_run.devices=64]

`programs(settings)` lists every shape the run compiles, per jitted entry
point, from the functions the run itself uses to choose them: the sampler
calls' prompt buckets and caches (`RolloutConfig.gen`, `GenConfig.shapes`),
the training rows' widths (`RolloutConfig.response_len`; with
rollout.partial the trainer scores up to max_len - prompt_len response
tokens), the RL minibatch (`stages.rl.minibatch_rows`) and the warm-up's
rows (`stages.sft.response_len`).

`plan` builds the config's mesh on fake CPU devices (re-running itself in a
child process with `--xla_force_host_platform_device_count=N` when this
process has fewer devices), makes the train state as sharded abstract
values (nothing is allocated), and lowers and compiles, for that mesh, the
largest shape of the three programs that hold the most memory on a pod:

  update_step  one RL minibatch at the widest training rows;
  prefill      gen_rows prompts at the largest bucket, into its cache
               (bucket + budget slots);
  decode       one decode call (a `lax.while_loop` over up to `budget`
               tokens) on prefill's output state.

Per device it prints parameter, optimizer, KV cache, other input/output and
XLA temp (activations, gradients, scratch) bytes, the total of each program
(the optimizer state stays resident while the sampler runs), and FLOPs.

What is measured and what is computed:
- params, optimizer state, KV cache: exact, from the shapes and the
  shardings the program really uses (the compiled program's own output
  shardings for the cache);
- temp and other inputs/outputs: measured by XLA's buffer assignment of the
  SPMD-partitioned program (`compiled.memory_analysis()`), but by the *CPU*
  compiler: it computes bf16 matmuls in f32, so f32 copies of bf16 values
  make temp an overestimate of what the TPU compiler needs. We turn off
  while-loop invariant code motion, which on CPU would hoist an f32 copy of
  the whole stack of saved layer inputs out of the backward loop;
- FLOPs: counted over the jaxpr and analytic (`k15.tools.flops`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k15 import model as model_lib
from k15 import pipeline, sampler, sharding, train
from k15.stages import rl, sft
from k15.tools import flops as flops_lib

GiB = 2**30
DEFAULT_DEVICES = 64  # chips of a v5p-128 slice; used when the mesh has a -1
# CPU-only: LICM hoists f32 copies of loop-invariant bf16 stacks (see above).
_CPU_COMPILER_OPTIONS = {
  "xla_disable_hlo_passes": "while-loop-invariant-code-motion,"
  "while-loop-expensive-invariant-code-motion"
}


@dataclasses.dataclass(frozen=True)
class Phase:
  """Per-device bytes and FLOPs of one compiled program."""

  name: str
  params: int
  optimizer: int  # resident even when not an argument (sampler phases)
  kv_cache: int
  inputs: int  # other arguments: batch, prompts, sampler state
  outputs: int  # other outputs not aliased to (donated) inputs
  temp: int  # XLA temp: activations, gradients, scratch
  flops_counted: float
  flops_analytic: float
  flops_xla: float
  compile_s: float
  flops_note: str = ""

  @property
  def total(self) -> int:
    return (
      self.params
      + self.optimizer
      + self.kv_cache
      + self.inputs
      + self.outputs
      + self.temp
    )


@dataclasses.dataclass(frozen=True)
class Plan:
  name: str
  num_devices: int
  platform: str
  mesh: dict[str, int]
  model: model_lib.ModelConfig
  shapes: dict[str, str]
  phases: tuple[Phase, ...]
  programs: dict[str, tuple[tuple[int, ...], ...]] = dataclasses.field(
    default_factory=dict
  )

  def too_big(self, hbm_gib: float) -> list[Phase]:
    return [p for p in self.phases if p.total > hbm_gib * GiB]


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def main(
  config: ml_collections.ConfigDict,
  *,
  hbm_gib: float | None = None,
  num_devices: int | None = None,
  child: bool = False,
) -> int:
  """Plans `config`, prints the table; 1 when it does not fit `hbm_gib`.

  Runs in a child process with N fake CPU devices when this process has
  fewer than the N devices the mesh needs (`child`: this is that process).
  """
  n = devices_needed(config, num_devices)
  if jax.device_count() < n:
    if child:
      raise RuntimeError(
        f"dry run: still only {jax.device_count()} devices "
        f"after re-running with {n} fake CPU devices"
      )
    return _run_child(config, hbm_gib=hbm_gib, num_devices=n)
  p = plan(config, num_devices=n)
  return report(p, hbm_gib)


def report(p: Plan, hbm_gib: float | None) -> int:
  """Prints the table; returns 1 (and says what is too big) if over HBM."""
  print(format_table(p, hbm_gib), flush=True)
  if hbm_gib is None:
    return 0
  over = p.too_big(hbm_gib)
  if not over:
    print(
      f"k15 dry run: fits {hbm_gib:g} GiB per device "
      f"(largest: {max(p.phases, key=lambda x: x.total).name})."
    )
    return 0
  for ph in over:
    parts = sorted(_rows(ph), key=lambda kv: -kv[1])[:3]
    biggest = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in parts if v)
    print(
      f"k15 dry run: does not fit: {ph.name} needs {_fmt_bytes(ph.total)} "
      f"per device > hbm_gib={hbm_gib:g} GiB (largest: {biggest}).",
      file=sys.stderr,
      flush=True,
    )
  return 1


def devices_needed(
  config: ml_collections.ConfigDict, num_devices: int | None = None
) -> int:
  """The mesh's size: its product, or `num_devices` (default 64) with -1."""
  spec = dict(config.get("mesh") or {})
  if num_devices:
    sharding.mesh_shape(spec, num_devices)  # clear error if it cannot fit
    return num_devices
  if any(int(v) == -1 for v in spec.values()):
    return DEFAULT_DEVICES
  return math.prod(int(v) for v in spec.values()) if spec else 1


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


def programs(s: pipeline.Settings) -> dict[str, tuple[tuple[int, ...], ...]]:
  """Every shape the run compiles, per jitted entry point:

    sft_step     (batch rows, prompt_len + response width)  sft, control
    update_step  (minibatch rows, prompt_len + response width)  rl
    score        the same rows (pi_theta_i's reference log-probs)  rl
    prefill      (rows, bucket, cache, budget)  rl and every evaluation
    decode       (rows, cache, budget)

  Each from the function the runtime uses to choose it (module doc).
  """
  ro = s.rollout
  out = dict(s.rollout.gen.shapes())
  for name, shapes in s.eval.gen(ro.gen).shapes().items():  # max_response
    out[name] = tuple(sorted(set(out[name]) | set(shapes)))
  # the supervised stages (the tower warm-up and joint SFT with a tower)
  sup = [getattr(s, n) for n in ("sft", "tower", "joint")
         if n in s.stages and getattr(s, n, None) is not None]  # fmt: skip
  if "control" in s.stages:
    sup.append(s.sft)
  if sup:
    out["sft_step"] = tuple(sorted({
      (c.batch_size, ro.prompt_len + n)
      for c in sup for n in sft.response_lens(ro)
    }))  # fmt: skip
  if "rl" in s.stages:
    rows = rl.minibatch_rows(s)
    upd = tuple((rows, ro.prompt_len + n) for n in ro.response_lens())
    out.update(update_step=upd, score=upd)
  return out


def plan(
  config: ml_collections.ConfigDict, *, num_devices: int | None = None
) -> Plan:
  """Lowers and compiles update_step, prefill and decode for the mesh, each
  at its largest shape in `programs`."""
  n = devices_needed(config, num_devices)
  vocab = None
  if not (config.get("model") or {}).get("vocab_size"):
    vocab = (config.get("tokenizer") or {}).get("vocab_size")
  s = pipeline.settings(config, vocab_size=vocab, num_devices=n)
  devices = jax.devices()[:n]
  mesh = sharding.make_mesh(s.mesh, devices)
  cpu = devices[0].platform == "cpu"
  options = _CPU_COMPILER_OPTIONS if cpu else None
  tx = train.make_optimizer(s.optim)
  progs = programs(s)
  rows = rl.minibatch_rows(s)
  T = max(s.rollout.prompt_len + n for n in s.rollout.response_lens())
  # the largest call: most cache slots in all (rows x cache)
  pre_shape = max(progs["prefill"], key=lambda x: (x[0] * x[2], x[2]))
  state = _abstract_state(s.model, tx, mesh)  # outside: unbox would
  with mesh_context(mesh):  # apply the rules to the ShapeDtypeStructs
    upd = _plan_update(state, s, tx, mesh, rows, T, options)
    pre, dec = _plan_sampler(state, s, mesh, pre_shape, options)
  B, bucket, cache, budget = pre_shape
  shapes = dict(
    update_step=f"[{rows}, {T}] = rl minibatch x (prompt_len + widest "
    "response rows)",
    prefill=f"[{B}, {bucket}] prompts, cache {cache}",
    decode=f"[{B}] rows x up to {budget} steps, cache {cache}",
  )
  return Plan(
    name=str(config.get("name", "?")),
    num_devices=n,
    platform=devices[0].platform,
    mesh=dict(mesh.shape),
    model=s.model,
    shapes=shapes,
    phases=(upd, pre, dec),
    programs=progs,
  )


mesh_context = sharding.mesh_context


def _abstract_state(model, tx, mesh) -> train.TrainState:
  # Param shapes do not depend on the attention kernel; ring attention
  # cannot trace the batch-1 init under a mesh, so init traces with dense.
  return train.sharded_abstract_state(
    dataclasses.replace(model, attention="dense"), tx, mesh
  )


def _images(model, mesh, rows: int) -> dict:
  """The tower's inputs for `rows` rows (k15.vision.IMAGE_KEYS), or {}."""
  v = model.vision
  if v is None:
    return {}
  shapes = dict(pixels_BxNxX=((rows, v.max_patches, v.patch_pixels),
                              jnp.float32),
                patch_pos_BxNx2=((rows, v.max_patches, 2), jnp.int32),
                patch_img_BxN=((rows, v.max_patches), jnp.int32))  # fmt: skip
  return {
    k: jax.ShapeDtypeStruct(
      sh, dt, sharding=sharding.batch_sharding(mesh, len(sh))
    )
    for k, (sh, dt) in shapes.items()
  }


def _plan_update(
  state, s: pipeline.Settings, tx, mesh, rows: int, T: int, options
) -> Phase:
  def arr(shape, dtype):
    return jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
    )

  BT, B = (rows, T), (rows,)
  # exactly the rows stages.rl.minibatch_updates feeds the update step
  batch = dict(
    tokens_BxT=arr(BT, jnp.int32),
    seg_BxT=arr(BT, jnp.int32),
    loss_mask_BxT=arr(BT, jnp.bool_),
    sample_weight_B=arr(B, jnp.float32),
    behaviour_logp_BxT=arr(BT, jnp.float32),
    ref_logp_BxT=arr(BT, jnp.float32),
    advantages_B=arr(B, jnp.float32),
  )
  batch.update(_images(s.model, mesh, rows))
  t0 = time.time()
  traced = train.update_step.trace(
    state, batch, model=s.model, tx=tx, loss_cfg=s.rl
  )
  compiled = traced.lower().compile(compiler_options=options)
  dt = time.time() - t0
  mem = compiled.memory_analysis()
  p_bytes = tree_bytes_per_device(state.params)
  o_bytes = tree_bytes_per_device(state.opt_state)
  in_other = mem.argument_size_in_bytes - p_bytes - o_bytes
  out_other = mem.output_size_in_bytes - mem.alias_size_in_bytes
  return Phase(
    "update_step",
    p_bytes,
    o_bytes,
    0,
    in_other,
    out_other,
    mem.temp_size_in_bytes,
    flops_lib.count_flops(traced.jaxpr, mesh.size),
    flops_lib.analytic_flops(s.model, "update", rows, T) / mesh.size,
    flops_lib.xla_flops(compiled),
    dt,
  )


def _plan_sampler(
  state, s: pipeline.Settings, mesh, shape, options
) -> tuple[Phase, Phase]:
  B, bucket, cache_len, budget = shape
  prompts = jax.ShapeDtypeStruct(
    (B, bucket), jnp.int32, sharding=sharding.batch_sharding(mesh, 2)
  )
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(
    key.shape, key.dtype, sharding=NamedSharding(mesh, P())
  )
  params = state.params
  p_bytes = tree_bytes_per_device(params)
  o_bytes = tree_bytes_per_device(state.opt_state)
  kw = dict(model=s.model, cfg=s.sampler)

  t0 = time.time()
  traced = sampler.prefill.trace(
    params, prompts, prompts, key, budget=budget, cache_len=cache_len,
    images=_images(s.model, mesh, B) or None, **kw,
  )  # fmt: skip
  compiled = traced.lower().compile(compiler_options=options)
  dt = time.time() - t0
  mem = compiled.memory_analysis()
  out = jax.tree.map(
    lambda o, sh: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh),
    traced.out_info,
    compiled.output_shardings,
  )
  c_bytes = tree_bytes_per_device(out.cache)
  pre = Phase(
    "prefill",
    p_bytes,
    o_bytes,
    c_bytes,
    mem.argument_size_in_bytes - p_bytes,
    mem.output_size_in_bytes - mem.alias_size_in_bytes - c_bytes,
    mem.temp_size_in_bytes,
    flops_lib.count_flops(traced.jaxpr, mesh.size),
    flops_lib.analytic_flops(s.model, "prefill", B, bucket) / mesh.size,
    flops_lib.xla_flops(compiled),
    dt,
  )

  t0 = time.time()
  traced = sampler.decode.trace(params, out, max_steps=budget, **kw)
  compiled = traced.lower().compile(compiler_options=options)
  dt = time.time() - t0
  mem = compiled.memory_analysis()
  dec = Phase(
    "decode",
    p_bytes,
    o_bytes,
    c_bytes,
    mem.argument_size_in_bytes - p_bytes - c_bytes,
    mem.output_size_in_bytes - mem.alias_size_in_bytes,
    mem.temp_size_in_bytes,
    flops_lib.count_flops(traced.jaxpr, mesh.size),
    flops_lib.analytic_flops(s.model, "decode", B, cache_len) / mesh.size,
    flops_lib.xla_flops(compiled),
    dt,
    flops_note="per token (one loop iteration)",
  )
  return pre, dec


def tree_bytes_per_device(tree: Any) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.shape
    if getattr(x, "sharding", None) is not None:
      shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def _rows(ph: Phase) -> list[tuple[str, int]]:
  return [
    ("params", ph.params),
    ("optimizer state", ph.optimizer),
    ("KV cache", ph.kv_cache),
    ("other inputs", ph.inputs),
    ("other outputs", ph.outputs),
    ("activations + temp", ph.temp),
  ]


def _fmt_bytes(b: float) -> str:
  return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / 2**20:.2f} MiB"


def format_table(p: Plan, hbm_gib: float | None = None) -> str:
  m = p.model
  unit, scale = ("GiB", GiB)
  if max(ph.total for ph in p.phases) < GiB:
    unit, scale = ("MiB", 2**20)
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
  lines = [
    f"k15 dry run: {p.name} on {p.num_devices} {p.platform} devices, mesh "
    f"{mesh}",
    f"model: {m.num_params() / 1e9:.2f}B params ({m.param_dtype}), "
    f"{m.num_layers} layers, d={m.d_model}, heads {m.num_heads}/"
    f"{m.num_kv_heads}, activations {m.dtype}, remat={m.remat}, "
    f"attention={m.attention}",
  ]
  lines += [f"  {k:<12} {v}" for k, v in p.shapes.items()]
  lines += ["compiled shapes (every one the run compiles):"]
  lines += [
    f"  {k:<12} {', '.join(map(str, v))}" for k, v in p.programs.items()
  ]
  w = 14
  head = f"per device, {unit}".ljust(24) + "".join(
    ph.name.rjust(w) for ph in p.phases
  )
  lines += ["", head, "-" * len(head)]
  for i, (label, _) in enumerate(_rows(p.phases[0])):
    vals = "".join(f"{_rows(ph)[i][1] / scale:{w}.2f}" for ph in p.phases)
    lines.append(f"{label:<24}{vals}")
  lines.append("-" * len(head))
  lines.append(
    f"{'total':<24}" + "".join(f"{ph.total / scale:{w}.2f}" for ph in p.phases)
  )
  if hbm_gib is not None:
    lines.append(
      f"{'fits ' + format(hbm_gib, 'g') + ' GiB':<24}"
      + "".join(
        ("yes" if ph.total <= hbm_gib * GiB else "NO").rjust(w)
        for ph in p.phases
      )
    )
  lines += [
    "",
    "TFLOPs per device".ljust(24)
    + "".join(ph.name.rjust(w) for ph in p.phases),
  ]
  for label, attr in (
    ("counted (jaxpr)", "flops_counted"),
    ("analytic", "flops_analytic"),
    ("XLA cost_analysis", "flops_xla"),
  ):
    lines.append(
      f"{label:<24}"
      + "".join(f"{getattr(ph, attr) / 1e12:{w}.3g}" for ph in p.phases)
    )
  notes = [f"{ph.name}: {ph.flops_note}" for ph in p.phases if ph.flops_note]
  lines.append(
    f"{'compile s':<24}" + "".join(f"{ph.compile_s:{w}.1f}" for ph in p.phases)
  )
  lines += [
    "",
    "params / optimizer / KV cache: exact (shapes x shardings). Other "
    "inputs/outputs",
    "and temp: XLA buffer assignment of the partitioned program, from the "
    f"{p.platform.upper()}",
    "compiler (bf16 matmuls in f32 on CPU: temp overestimates TPU). Sampler "
    "totals",
    "include the resident optimizer state. XLA cost_analysis counts loop "
    "bodies once.",
  ]
  lines += [f"FLOPs {n}" for n in notes]
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Re-running with fake devices
# ---------------------------------------------------------------------------


def _run_child(
  config: ml_collections.ConfigDict, *, hbm_gib, num_devices
) -> int:
  """`python -m k15.tools.plan` with N fake CPU devices (the XLA_FLAGS of
  its environment); returns its exit code."""
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\S+",
    "",
    os.environ.get("XLA_FLAGS", ""),
  )
  root = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count={num_devices}"
  ).strip()
  env["PYTHONPATH"] = os.pathsep.join(
    filter(None, [root, os.environ.get("PYTHONPATH")])
  )
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(cfg, f)
  cmd = [
    sys.executable,
    "-m",
    "k15.tools.plan",
    f"--config_json={f.name}",
    f"--num_devices={num_devices}",
    "--child",
  ]
  if hbm_gib is not None:
    cmd.append(f"--hbm_gib={hbm_gib}")
  print(
    f"k15 dry run: re-running with {num_devices} fake CPU devices", flush=True
  )
  try:
    return subprocess.run(cmd, env=env, check=False).returncode
  finally:
    os.unlink(f.name)


def _cli(argv: list[str]) -> None:
  del argv
  cfg = _CONFIG.value
  if _CONFIG_JSON.value:
    with open(_CONFIG_JSON.value) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
  if cfg is None:
    sys.exit("k15.tools.plan: pass --config experiments/<x>.py")
  try:
    code = main(
      cfg,
      hbm_gib=_HBM.value,
      num_devices=_DEVICES.value,
      child=_CHILD.value,
    )
  except (ValueError, TypeError, KeyError) as e:
    sys.exit(f"k15 dry run: error: {e}")
  sys.exit(code)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment file, e.g. experiments/k15_long_cot.py",
    lock_config=True,
  )
  _CONFIG_JSON = flags.DEFINE_string(
    "config_json", None, "A config as JSON (how the planner re-runs itself)."
  )
  _HBM = flags.DEFINE_float(
    "hbm_gib", None, "Per-device memory; exit 1 if a program needs more."
  )
  _DEVICES = flags.DEFINE_integer(
    "num_devices",
    None,
    "Mesh size (default: the mesh's product, or "
    f"{DEFAULT_DEVICES} when an axis is -1).",
  )
  _CHILD = flags.DEFINE_bool(
    "child", False, "Set by the planner when it re-runs itself."
  )
  app.run(_cli)
