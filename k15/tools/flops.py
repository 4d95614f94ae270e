"""FLOPs of a traced program: counted over its jaxpr, and the textbook
formula, for the planner (`k15.tools.plan`).

"counted" walks the traced program (jaxpr) and sums 2*M*N*K over every
matmul, scan bodies times their length, the larger branch of every cond (so
blocks that causal masking lets attention skip are counted: an upper
bound), remat recomputation included; "analytic" is 6*N*tokens + causal
attention (2*N*tokens + attention for a forward). XLA's own
`cost_analysis()` counts each loop body once, so with layers in a scan it
undercounts by ~num_layers; it is shown for reference only.
"""

from __future__ import annotations

import math

import jax.extend as jex

from k15 import model as model_lib
from k15 import vision


def count_flops(jaxpr, num_devices: int) -> float:
  """Matmul FLOPs per device of a traced program (see the module doc).

  Outside shard_map shapes are global, so their FLOPs are divided by the
  device count (even partitioning assumed); inside, shapes are per device.
  """
  glob, local = _walk(
    jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, inside=False
  )
  return glob / num_devices + local


def _walk(jaxpr, inside: bool) -> tuple[float, float]:
  glob = local = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      f = _dot_flops(eqn)
      glob, local = (glob, local + f) if inside else (glob + f, local)
      continue
    subs = _sub_jaxprs(eqn)
    if not subs:
      continue
    inner = inside or name == "shard_map"
    costs = [_walk(j, inner) for j in subs]
    if name == "cond":  # one branch runs; count the dearer one
      g, lo = max(costs, key=sum)
    elif name == "while":  # trip count unknown: one iteration of the body
      g, lo = costs[-1]
    else:
      g, lo = sum(c[0] for c in costs), sum(c[1] for c in costs)
    times = eqn.params.get("length", 1) if name == "scan" else 1
    glob, local = glob + times * g, local + times * lo
  return glob, local


def _sub_jaxprs(eqn) -> list:
  if eqn.primitive.name == "while":
    return [_open(eqn.params["cond_jaxpr"]), _open(eqn.params["body_jaxpr"])]
  if eqn.primitive.name == "cond":
    return [_open(b) for b in eqn.params["branches"]]
  return [_open(j) for j in jex.core.jaxprs_in_params(eqn.params)]


def _open(j):
  return j.jaxpr if isinstance(j, jex.core.ClosedJaxpr) else j


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  k = math.prod(lhs[d] for d in lhs_contract)
  return 2.0 * math.prod(out) * k


def analytic_flops(
  m: model_lib.ModelConfig, kind: str, rows: int, length: int
) -> float:
  """Textbook FLOPs of the whole program (all devices).

  update: 6 * N * tokens + 6 * B * H * Dh * T^2 * L (causal attention, fwd +
  bwd); prefill: 2 * N * tokens + 2 * B * H * Dh * T^2 * L; decode: one token
  per row at the full cache length S: 2 * N * B + 4 * B * H * Dh * S * L.
  N counts matmul weights: q, k, v, o, gate, up, down and the output layer
  (not norms, biases or the embedding lookup; prefill applies the output
  layer to the last token only). With a tower, update and prefill add its
  forward (`vision.tower_flops`, x3 for update) over every patch slot.
  """
  tower = 0.0  # the vision tower + projector over every row's patch slots
  if m.vision is not None and kind in ("update", "prefill"):
    tower = vision.tower_flops(m.vision, m.d_model, rows)
    tower *= 3.0 if kind == "update" else 1.0
  return tower + _decoder_flops(m, kind, rows, length)


def _decoder_flops(
  m: model_lib.ModelConfig, kind: str, rows: int, length: int
) -> float:
  D, V, L = m.d_model, m.vocab_size, m.num_layers
  hd = m.num_heads * m.head_dim
  n_body = L * (
    2 * D * hd + 2 * D * m.num_kv_heads * m.head_dim + 3 * D * m.mlp_dim
  )
  n_mm = n_body + V * D
  if kind == "update":
    return 6.0 * n_mm * rows * length + 6.0 * rows * hd * length**2 * L
  if kind == "prefill":
    return (
      2.0 * n_body * rows * length
      + 2.0 * V * D * rows
      + 2.0 * rows * hd * length**2 * L
    )
  if kind == "decode":
    return 2.0 * n_mm * rows + 4.0 * rows * hd * length * L
  raise ValueError(f"analytic_flops: unknown kind {kind!r}")


def xla_flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return float("nan")
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))
