"""Every attention implementation equals the dense reference.

Outputs and gradients (dq, dk, dv) are compared on small shapes. Tolerances:
float32 atol = rtol = 1e-5 (conftest sets matmul precision "highest");
bfloat16 atol = rtol = 2e-2 (both sides in bf16, softmax statistics in f32).
Meshes are built here over ("data", "fsdp", "tensor", "context").
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from k15 import attention

AXES = ("data", "fsdp", "tensor", "context")
F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _mesh(shape, explicit: bool = True):
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(shape, AXES, axis_types=(kind,) * 4)


def _case(name: str, rng, B=2, H=4, K=2, Dh=8):
  """(q, k, v, q_pos, q_seg, kv_pos, kv_seg) for one named mask pattern."""
  T = S = 32
  pos_BxS = np.tile(np.arange(S), (B, 1))
  seg_BxS = np.ones((B, S), np.int32)
  if name == "causal":
    H = K = 4
  elif name == "packed":  # several documents per row, positions restart
    for b, cuts in enumerate(([0, 11, 20, 32], [0, 5, 29, 32])):
      for i, (a, z) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        seg_BxS[b, a:z] = i + 1
        pos_BxS[b, a:z] = np.arange(z - a)
    seg_BxS[1, 29:] = 0  # right padding after the last document
  elif name == "left_padded":
    for b, pad in enumerate((7, 0)):
      seg_BxS[b, :pad] = 0
      pos_BxS[b] = np.arange(S) - pad
  elif name == "odd_lengths":  # not a multiple of any block size below
    T = S = 37
    pos_BxS = np.tile(np.arange(S), (B, 1))
    seg_BxS = np.ones((B, S), np.int32)
  elif name.startswith("decode"):  # T queries against a cache of S = 40
    T, S = (1, 40) if name == "decode1" else (3, 40)
    filled = np.array([13, 31])  # slots >= filled + T are unfilled (seg 0)
    pos_BxS = np.tile(np.arange(S), (B, 1))
    seg_BxS = (pos_BxS < (filled + T)[:, None]).astype(np.int32)
    q_pos = filled[:, None] + np.arange(T)
    return _arrays(
      rng, B, T, S, H, K, Dh, q_pos, np.ones((B, T)), pos_BxS, seg_BxS
    )
  else:
    raise ValueError(name)
  return _arrays(rng, B, T, S, H, K, Dh, pos_BxS, seg_BxS, pos_BxS, seg_BxS)


def _arrays(rng, B, T, S, H, K, Dh, q_pos, q_seg, kv_pos, kv_seg):
  q = rng.normal(size=(B, T, H, Dh))
  k = rng.normal(size=(B, S, K, Dh))
  v = rng.normal(size=(B, S, K, Dh))
  ids = [jnp.asarray(x, jnp.int32) for x in (q_pos, q_seg, kv_pos, kv_seg)]
  return [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + ids


@functools.partial(jax.jit, static_argnames=("impl", "kw"))
def _value_and_grads(q, k, v, q_pos, q_seg, kv_pos, kv_seg, w, *, impl, kw):
  """Output and (dq, dk, dv) of sum(out * w) for one implementation."""

  def loss(q, k, v):
    out = attention.attend(
      q,
      k,
      v,
      q_pos_BxT=q_pos,
      q_seg_BxT=q_seg,
      kv_pos_BxS=kv_pos,
      kv_seg_BxS=kv_seg,
      impl=impl,
      **dict(kw),
    )
    return (out.astype(jnp.float32) * w).sum(), out

  (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _check(args, impl, dtype=jnp.float32, perm=None, **kw):
  """Compare impl with dense; `perm` lays tokens out in zigzag order."""
  q, k, v, *ids = args
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  ref_out, ref_grads = _value_and_grads(q, k, v, *ids, w, impl="dense", kw=())
  if perm is not None:  # self-attention only: q and kv share the layout
    inv = np.argsort(perm)
    q, k, v, w, *ids = (x[:, perm] for x in (q, k, v, w, *ids))
  out, grads = _value_and_grads(
    q, k, v, *ids, w, impl=impl, kw=tuple(sorted(kw.items()))
  )
  out, grads = np.asarray(out), [np.asarray(g) for g in grads]
  if perm is not None:
    out, grads = out[:, inv], [g[:, inv] for g in grads]
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  assert out.dtype == dtype, out.dtype
  for name, a, b in zip(
    ("out", "dq", "dk", "dv"),
    (out, *grads),
    (ref_out, *ref_grads),
    strict=True,
  ):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    np.testing.assert_allclose(
      np.asarray(a, np.float32),
      np.asarray(b, np.float32),
      err_msg=name,
      **tol,
    )


CASES = ("causal", "packed", "left_padded", "odd_lengths", "decode1", "decode3")


@pytest.mark.parametrize("case", CASES)
def test_blockwise_matches_dense(case, rng):
  _check(_case(case, rng), "blockwise", block_q=8, block_kv=16)


@pytest.mark.parametrize("impl", ["blockwise", "cudnn", "splash"])
def test_bf16_and_cpu_fallbacks_match_dense(impl, rng):
  # On CPU "cudnn" and "splash" fall back to "blockwise" (logged once).
  _check(_case("packed", rng), impl, jnp.bfloat16, block_q=16, block_kv=8)


def test_splash_kernel_matches_dense_in_interpret_mode(rng):
  """The Pallas TPU kernel itself, run by the Pallas interpreter on CPU."""
  B, T, H, K, Dh = 2, 200, 4, 2, 8
  pos = np.tile(np.arange(T), (B, 1))
  seg = np.ones((B, T), np.int32)
  seg[0, 120:], pos[0, 120:] = 2, np.arange(T - 120)  # packed
  seg[1, :9], pos[1] = 0, np.arange(T) - 9  # left padded
  q, k, v, *ids = _arrays(rng, B, T, T, H, K, Dh, pos, seg, pos, seg)
  mesh = _mesh((2, 1, 2, 1), explicit=False)

  def grads(fn):
    def loss(q, k, v):
      return (fn(q, k, v) * jnp.cos(q)).sum()

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

  ref = grads(lambda q, k, v: attention.dense_attention(q, k, v, *ids))
  got = grads(
    lambda q, k, v: attention.kernels.splash_attention(
      q, k, v, *ids, block=128, mesh=mesh, interpret=True
    )
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, **F32_TOL)


RING = [
  # (mesh shape, case, zigzag, block)
  ((2, 1, 1, 4), "causal", True, 4),
  ((1, 1, 1, 8), "causal", True, 2),
  ((1, 1, 1, 8), "causal", False, 4),
  ((2, 1, 1, 4), "packed", False, 4),
  ((2, 1, 1, 4), "packed", True, 4),
  ((1, 1, 2, 4), "left_padded", True, 4),
  ((2, 1, 1, 4), "odd_lengths", False, 4),
  ((2, 1, 1, 4), "decode3", False, 8),
]


@pytest.mark.parametrize("shape,case,zigzag,block", RING)
def test_ring_matches_dense(shape, case, zigzag, block, rng):
  args = _case(case, rng)
  n = shape[-1]
  perm = attention.zigzag_permutation(32, n) if zigzag else None
  _check(
    args, "ring", perm=perm, mesh=_mesh(shape), block_q=block, block_kv=block
  )


def test_ring_bf16_and_mesh_from_context(rng):
  """Auto-axis mesh given by jax.set_mesh rather than the argument."""
  mesh = _mesh((2, 1, 1, 4), explicit=False)
  with jax.set_mesh(mesh):
    _check(_case("packed", rng), "ring", jnp.bfloat16, block_q=4, block_kv=4)


def test_sharded_inputs_under_explicit_mesh(rng):
  """Batch on "data", heads on "tensor", mesh from jax.set_mesh (Explicit
  axes): blockwise and ring give dense's gradients with the same sharding."""
  mesh = _mesh((2, 1, 2, 2))
  q, k, v, *ids = _case("packed", rng)
  names = ("q_pos_BxT", "q_seg_BxT", "kv_pos_BxS", "kv_seg_BxS")
  with jax.set_mesh(mesh):
    x_spec = NamedSharding(mesh, P("data", None, "tensor"))
    q, k, v = (jax.device_put(x, x_spec) for x in (q, k, v))
    ids = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in ids]
    kw = dict(zip(names, ids, strict=True))

    def grads(impl):
      def loss(q, k, v):
        out = attention.attend(q, k, v, impl=impl, block_q=8, block_kv=8, **kw)
        return (out * jnp.sin(q)).sum()

      return jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)

    ref = grads("dense")
    for impl in ("blockwise", "ring"):
      for a, b in zip(grads(impl), ref, strict=True):
        assert jax.typeof(a).sharding.spec == jax.typeof(b).sharding.spec
        np.testing.assert_allclose(a, b, **F32_TOL)


def test_ring_without_context_mesh_is_a_clear_error(rng):
  q, k, v, *ids = _case("causal", rng)
  names = ("q_pos_BxT", "q_seg_BxT", "kv_pos_BxS", "kv_seg_BxS")
  with pytest.raises(ValueError, match="'context' axis"):
    attention.attend(q, k, v, impl="ring", **dict(zip(names, ids, strict=True)))


def test_zigzag_balances_computed_blocks():
  """Causal, T = 64 on (data=2, context=4), blocks of 8 = T / 2n: under
  zigzag every device computes the same number of (q, kv) block pairs;
  contiguous is unbalanced. Counts come from the ring kernel's lax.cond."""
  B, T, H, Dh, n = 2, 64, 2, 4, 4
  pos = np.tile(np.arange(T), (B, 1))
  args = _arrays(
    np.random.default_rng(0),
    B,
    T,
    T,
    H,
    H,
    Dh,
    pos,
    np.ones((B, T)),
    pos,
    np.ones((B, T)),
  )
  perm = attention.zigzag_permutation(T, n)
  zig = [x[:, perm] for x in args]
  kw = dict(mesh=_mesh((2, 1, 1, n)), block_q=8, block_kv=8)
  zz = attention.ring.block_counts(*zig, **kw).reshape(-1)
  flat = attention.ring.block_counts(*args, **kw).reshape(-1)
  # Per data shard: 8 q blocks x 8 kv blocks, causal: 36 live of 64.
  assert zz.sum() == flat.sum() == 2 * 36
  np.testing.assert_array_equal(zz, np.full(2 * n, 36 // n))
  np.testing.assert_array_equal(flat, np.tile([3, 7, 11, 15], 2))


def test_zigzag_permutation_round_trip():
  perm = attention.zigzag_permutation(16, 2)
  np.testing.assert_array_equal(
    perm, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
  )
  inv = attention.inverse_zigzag_permutation(16, 2)
  np.testing.assert_array_equal(perm[inv], np.arange(16))
  with pytest.raises(ValueError, match="multiple of 2n"):
    attention.zigzag_permutation(10, 4)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_rows_without_keys_are_zero_with_finite_grads(impl, rng):
  q, k, v, q_pos, q_seg, kv_pos, kv_seg = _case("left_padded", rng)
  q_seg = q_seg.at[1, 3].set(9)  # a segment with no key at all
  out, grads = _value_and_grads(
    q,
    k,
    v,
    q_pos,
    q_seg,
    kv_pos,
    kv_seg,
    jnp.ones(q.shape),
    impl=impl,
    kw=(("block_kv", 8), ("block_q", 8)) if impl == "blockwise" else (),
  )
  assert not np.any(out[0, :7]) and not np.any(out[1, 3])
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_blockwise_never_materialises_scores():
  """No value in the fwd+bwd jaxpr is as large as T * S (block 128)."""
  B, T, H, Dh = 1, 1024, 2, 8
  pos = jnp.tile(jnp.arange(T), (B, 1))
  seg = jnp.ones((B, T), jnp.int32)
  x = jnp.zeros((B, T, H, Dh))

  def loss(q, k, v):
    return attention.attend(
      q,
      k,
      v,
      q_pos_BxT=pos,
      q_seg_BxT=seg,
      kv_pos_BxS=pos,
      kv_seg_BxS=seg,
      impl="blockwise",
      block_q=128,
      block_kv=128,
    ).sum()

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape))
    for sub in jax.extend.core.subjaxprs(jaxpr):
      yield from sizes(sub)

  closed = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(x, x, x)
  assert max(sizes(closed.jaxpr)) < T * T
  closed = jax.make_jaxpr(
    jax.grad(
      lambda q, k, v: attention.dense_attention(
        q, k, v, pos, seg, pos, seg
      ).sum(),
      (0, 1, 2),
    )
  )(x, x, x)
  assert max(sizes(closed.jaxpr)) >= T * T  # the check can see scores


def test_bad_inputs_name_the_problem(rng):
  q, k, v, *ids = _case("causal", rng)
  names = ("q_pos_BxT", "q_seg_BxT", "kv_pos_BxS", "kv_seg_BxS")
  kw = dict(zip(names, ids, strict=True))
  with pytest.raises(ValueError, match="unknown impl"):
    attention.attend(q, k, v, impl="nope", **kw)
  with pytest.raises(ValueError, match="not a multiple"):
    attention.attend(q[:, :, :3], k, v, **kw)
  with pytest.raises(ValueError, match="kv_seg_BxS"):
    attention.attend(q, k, v, **{**kw, "kv_seg_BxS": ids[3][:, :5]})
