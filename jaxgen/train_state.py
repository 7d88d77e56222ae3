"""Train state, its sharded initialisation, and the jitted train step shared by every family."""
import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgen import sharding


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # base key; step keys are fold_in(rng, step), so resume is exact


@contextlib.contextmanager
def mesh_context(mesh, rules):
  """Mesh + logical rules, active while functions are traced and run."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _unbox_mismatched(tree):
  """Optimizer statistics inherit their parameter's logical names through tx.init; factored
  ones (Adafactor's row/column moments) have another rank, so they lose the names and
  stay replicated; so do placeholders without arrays (optax.multi_transform's MaskedNode)."""
  mismatched = lambda x: getattr(x.value, 'ndim', None) != len(x.names)
  return jax.tree.map(lambda x: x.value if sharding.is_boxed(x) and mismatched(x) else x,
                      tree, is_leaf=sharding.is_boxed)


def _create(family, tx, rng):
  init_rng, state_rng = jax.random.split(rng)
  params = family.init_params(init_rng)  # LogicallyPartitioned boxes
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=_unbox_mismatched(tx.init(params)),
                    ema_params=jax.tree.map(jnp.copy, params), rng=state_rng)


def abstract_state(family, tx, rng, mesh, rules):
  """(ShapeDtypeStructs of the unboxed state, its NamedShardings) without allocating."""
  with mesh_context(mesh, rules):
    boxed = jax.eval_shape(functools.partial(_create, family, tx), rng)
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)
  return shapes, shardings


def init_state(family, tx, rng, mesh, rules, shardings=None):
  """Initialises the state directly into its sharded layout (jit with out_shardings).

  `shardings` from an earlier `abstract_state` call saves tracing the init twice."""
  if shardings is None:
    _, shardings = abstract_state(family, tx, rng, mesh, rules)
  create = lambda r: nn.meta.unbox(_create(family, tx, r))
  with mesh_context(mesh, rules):
    state = jax.jit(create, out_shardings=shardings)(rng)
  return state, shardings


def ema_decay(cfg, step):
  """EMA decay with an optional warm-up (1+s)/(10+s): short runs need a usable EMA."""
  decay = jnp.asarray(cfg.ema_decay, jnp.float32)
  if cfg.get('ema_warmup', True):
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def train_step(family, tx, schedule, cfg, state, batch):
  """One optimizer step, with `cfg.grad_accum_steps` micro-batches accumulated by lax.scan."""
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(lambda p, b, r: family.train_loss(p, b, r, state.step),
                               has_aux=True)
  k = cfg.get('grad_accum_steps', 1)
  if k == 1:
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
  else:
    # Micro-batch i takes rows i::k, so each device keeps working on its own rows.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)

    def accumulate(carry, inputs):
      i, mb = inputs
      (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (l, m, g)), None

    (l0, m0), g0 = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, m0, g0))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    loss, metrics, grads = jax.tree.map(lambda x: x / k, total)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = family.after_update(params, batch, jax.random.fold_in(rng, 1 << 30), state.step)
  d = ema_decay(cfg.optim, state.step)
  ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params), lr=schedule(state.step), ema_decay=d)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
  return new_state, metrics


def make_train_step(family, tx, schedule, cfg, mesh, state_shardings, batch_shardings):
  """The jitted step: state sharded as initialised and donated, metrics replicated."""
  step = functools.partial(train_step, family, tx, schedule, cfg)
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
