"""Optimizer and learning-rate schedule from `config.optim`."""
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


def make_optimizer(cfg, total_steps):
  """Returns (optax transformation, schedule)."""
  schedule = make_schedule(cfg, total_steps)
  if cfg.name == 'adamw':
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.get('eps', 1e-8),
                      weight_decay=cfg.weight_decay)
  elif cfg.name == 'adafactor':
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                          weight_decay_rate=cfg.weight_decay or None)
  else:
    raise UserError(f'unknown optimizer {cfg.name!r}: use adamw or adafactor')
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.get('grad_clip') else []
  return optax.chain(*chain, opt), schedule
