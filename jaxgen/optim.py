"""Optimizer and learning-rate schedule from `config.optim`."""
import jax
import jax.numpy as jnp
import optax

from jaxgen.errors import UserError


def make_schedule(cfg, total_steps):
  warmup = int(cfg.get('warmup_steps', 0))
  lr = cfg.lr
  if cfg.schedule == 'constant':
    after = optax.constant_schedule(lr)
  elif cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup),
                                        alpha=cfg.get('end_lr_ratio', 0.0))
  else:
    raise UserError(f'unknown schedule {cfg.schedule!r}: use constant or cosine')
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def adamw(schedule, b1, b2, eps, weight_decay, grad_clip=None):
  """optax.chain(clip_by_global_norm(grad_clip), adamw(schedule, ...)) as ONE transformation
  that updates each parameter's moments and step in a single elementwise expression.

  Same arithmetic as the optax chain (tests/test_train.py compares them), but XLA fuses it per
  parameter instead of materialising the clipped gradients and re-reading them per moment. On
  2 CPU cores the S-width DiT-MoE step (34M parameters, batch 8) takes 409 ms instead of 444.
  State: optax.ScaleByAdamState."""
  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

  def update(grads, state, params):
    count = state.count + 1
    lr = schedule(state.count)
    bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
    norm = optax.tree.norm(grads) if grad_clip else None

    def leaf(g, m, v, p):
      if grad_clip:  # as optax.clip_by_global_norm
        g = jnp.where(norm < grad_clip, g, g / norm.astype(g.dtype) * grad_clip)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * jnp.square(g)
      return -lr * ((m / bc1) / (jnp.sqrt(v / bc2) + eps) + weight_decay * p), m, v
    out = jax.tree.map(leaf, grads, state.mu, state.nu, params)
    updates, mu, nu = jax.tree.transpose(jax.tree.structure(grads),
                                         jax.tree.structure((0, 0, 0)), out)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
  return optax.GradientTransformation(init, update)


def make_optimizer(cfg, total_steps):
  """Returns (optax transformation, schedule)."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.name == 'adamw':
    return adamw(schedule, cfg.b1, cfg.b2, cfg.get('eps', 1e-8), cfg.weight_decay,
                 cfg.get('grad_clip')), schedule
  if cfg.name == 'adafactor':
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                          weight_decay_rate=cfg.weight_decay or None)
  else:
    raise UserError(f'unknown optimizer {cfg.name!r}: use adamw or adafactor')
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.get('grad_clip') else []
  return optax.chain(*chain, opt), schedule
