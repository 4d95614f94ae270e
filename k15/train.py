"""Train state, the jitted update steps, and the optimizer reset.

`update_step(state, batch, *, model, tx, loss_cfg)` scores the batch's
tokens under the current params, applies `objective.loss` and one optimizer
step. State is donated, so params and moments are updated in place. A step
whose loss or gradient is not finite is skipped (the state is returned
unchanged and `skipped` = 1 in the metrics); the caller counts consecutive
skips and stops the run after too many.

The state is born sharded: `abstract_state` traces `init` without allocating,
`k15.sharding` maps the params' logical axes to the mesh, and `init_state`
jits the initialiser with those output shardings.

Freezing is a parameter mask on the optimizer (`make_optimizer(cfg,
trainable=...)`): the gradients and updates of every other param are zero,
so frozen params stay bitwise unchanged and the gradient clip sees only the
trained ones. Every optimizer has the same state structure whatever its
mask, so one restore target serves every stage.

A batch with images carries the tower's inputs (`vision.IMAGE_KEYS`) next
to its tokens; every step passes them to the model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from k15 import model as model_lib
from k15 import objective, sharding, vision


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-3
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0  # global norm; 0 = off
  warmup_steps: int = 0  # linear warm-up (counted from each reset)

  def overridden(self, lr: float = 0.0, eps: float = 0.0) -> OptimConfig:
    """This config with a stage section's lr / eps where they are > 0 (the
    supervised, rs and dpo sections each may set their own)."""
    return dataclasses.replace(
      self, lr=lr if lr > 0 else self.lr, eps=eps if eps > 0 else self.eps
    )


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # total optimizer steps taken (never reset)
  params: Any
  opt_state: Any


@functools.cache
def make_optimizer(cfg: OptimConfig, trainable: tuple[str, ...] = ()
                   ) -> optax.GradientTransformation:
  """AdamW (+ clip, warm-up) over the params named in `trainable` (top-level
  names, e.g. ("vision", "projector")); () trains every param. Cached: the
  same arguments give the same object (a jit static argument)."""
  lr = cfg.lr
  if cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  parts = [freeze(trainable)]
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  parts.append(freeze(trainable))
  return optax.chain(*parts)


def trainable_mask(params, trainable: tuple[str, ...]):
  """A bool per param leaf: is its top-level name (under "params") one of
  `trainable`? (All True when `trainable` is ().)"""

  def top(path) -> str:
    keys = [getattr(k, "key", None) for k in path]
    keys = [k for k in keys if k is not None]
    return keys[1] if keys and keys[0] == "params" and len(keys) > 1 else (
        keys[0] if keys else "")

  return jax.tree_util.tree_map_with_path(
      lambda path, _: not trainable or top(path) in trainable, params)


def freeze(trainable: tuple[str, ...]) -> optax.GradientTransformation:
  """Zeroes the updates of params outside `trainable` (see
  `trainable_mask`); stateless, so masks never change the state's shape."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    if not trainable:
      return updates, state
    mask = trainable_mask(updates, trainable)
    return jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u), updates,
                        mask), state

  return optax.GradientTransformation(init, update)


def _init(rng, *, model, tx):
  params = model_lib.init_params(rng, model=model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))


def abstract_state(model: model_lib.ModelConfig,
                   tx: optax.GradientTransformation) -> Any:
  """The boxed (logically annotated) abstract state; nothing is allocated."""
  return jax.eval_shape(functools.partial(_init, model=model, tx=tx),
                        jax.random.key(0))


def state_shardings(model, tx, mesh) -> TrainState:
  return sharding.param_shardings(abstract_state(model, tx), mesh)


def sharded_abstract_state(model, tx, mesh) -> TrainState:
  """Unboxed ShapeDtypeStructs carrying their shardings (restore targets)."""
  return jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      nn.unbox(abstract_state(model, tx)), state_shardings(model, tx, mesh))


def init_state(rng: jax.Array, *, model: model_lib.ModelConfig,
               tx: optax.GradientTransformation, mesh) -> TrainState:
  """A fresh state, every array created directly in its sharding."""
  shardings = state_shardings(model, tx, mesh)
  init = jax.jit(lambda r: nn.unbox(_init(r, model=model, tx=tx)),
                 out_shardings=shardings)
  return init(rng)


@functools.partial(jax.jit, static_argnames=("tx",), donate_argnames=("state",))
def reset_optimizer(state: TrainState, *, tx) -> TrainState:
  """Fresh optimizer moments (and schedule count) for a new iteration.

  The report resets the optimizer at the start of every RL iteration since
  each iteration solves a new problem (a new reference policy).
  """
  return state.replace(opt_state=tx.init(state.params))


def apply_if_finite(state, grads, loss, *, tx):
  """One optimizer step, or none where the loss or gradient is not finite
  (then the state is returned unchanged and `skipped` is 1)."""
  gnorm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                                       new, old)
  new = state.replace(step=state.step + ok.astype(jnp.int32),
                      params=keep(params, state.params),
                      opt_state=keep(opt_state, state.opt_state))
  return new, dict(grad_norm=gnorm, skipped=1.0 - ok.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("model", "tx", "loss_cfg"),
                   donate_argnames=("state",))
def update_step(state: TrainState, batch: dict, *,
                model: model_lib.ModelConfig, tx,
                loss_cfg: objective.LossConfig
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One RL gradient step on a minibatch of [prompt | response] rows."""

  def loss_fn(params):
    logp_BxT = model_lib.sequence_logprobs(
        params, batch["tokens_BxT"], batch["seg_BxT"], model=model,
        images=vision.images_of(batch))
    return objective.loss(logp_BxT, batch, cfg=loss_cfg)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state, m = apply_if_finite(state, grads, loss, tx=tx)
  return state, {**metrics, **m}


@functools.partial(jax.jit, static_argnames=("model", "tx"),
                   donate_argnames=("state",))
def sft_step(state: TrainState, batch: dict, *, model, tx
             ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One supervised step: mean NLL over the batch's loss-mask tokens."""

  def loss_fn(params):
    logp_BxT = model_lib.sequence_logprobs(
        params, batch["tokens_BxT"], batch["seg_BxT"], model=model,
        images=vision.images_of(batch))
    mask = batch["loss_mask_BxT"].astype(jnp.float32)
    nll = -jnp.sum(jnp.where(mask > 0, logp_BxT, 0.0)) / jnp.maximum(
        mask.sum(), 1.0)
    return nll, dict(loss=nll, tokens=mask.sum())

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state, m = apply_if_finite(state, grads, loss, tx=tx)
  return state, {**metrics, **m}


@functools.partial(jax.jit, static_argnames=("model", "tx", "cfg"),
                   donate_argnames=("state",))
def dpo_step(state: TrainState, batch: dict, *, model, tx,
             cfg: objective.DPOConfig
             ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One DPO step on P pairs laid out as 2P rows (`objective.dpo_loss`)."""

  def loss_fn(params):
    logp_BxT = model_lib.sequence_logprobs(
        params, batch["tokens_BxT"], batch["seg_BxT"], model=model)
    return objective.dpo_loss(logp_BxT, batch, cfg=cfg)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state, m = apply_if_finite(state, grads, loss, tx=tx)
  return state, {**metrics, **m}


@functools.partial(jax.jit, static_argnames=("model",))
def score(params, tokens_BxT, seg_BxT, *, model, images=None) -> jax.Array:
  """Per-token log-probs at temperature 1 (the iteration's reference)."""
  return model_lib.sequence_logprobs(params, tokens_BxT, seg_BxT, model=model,
                                     images=images)
