r"""Class-conditional DiT on Fashion-MNIST (or any TFDS image dataset) with rectified flow or DDPM.

  python -m jaxgen.main --config=configs/dit.py:demo --workdir=workdirs/dit_demo

Variants: `tiny` (tests, seconds), `demo` (README main job, ~10 min on 2 CPU
cores), and the paper's sizes `S/2 S/4 S/8 B/2 ... XL/8`. Append `,ddpm` to use
DDPM epsilon-prediction instead of rectified flow, e.g. `configs/dit.py:tiny,ddpm`.
Override anything on the command line, e.g. `--config.total_steps=200
--config.mesh.fsdp=4 --config.model.dtype=bfloat16`.
"""
import ml_collections

from jaxgen import config_base
from jaxgen.errors import UserError
from jaxgen.models.dit import SIZES


def objective(name):
  if name == 'rectified_flow':
    return ml_collections.ConfigDict(dict(name=name, time_scale=1.0, logit_mean=0.0,
                                          logit_std=1.0))
  return ml_collections.ConfigDict(dict(name='ddpm', num_timesteps=1000, beta_start=1e-4,
                                        beta_end=2e-2, clip_x0=True))


def sampler(objective_name, num_steps):
  method = 'euler' if objective_name == 'rectified_flow' else 'ddim'
  return ml_collections.ConfigDict(dict(method=method, num_steps=num_steps, cfg_scale=1.5,
                                        per_class=8, seed=0))


def get_config(arg='demo'):
  variant, *opts = arg.split(',')
  unknown = set(opts) - {'ddpm'}
  if unknown:
    raise UserError(f'unknown option(s) {sorted(unknown)} in configs/dit.py:{arg}; '
                    'the only option is ",ddpm"')
  obj = 'ddpm' if 'ddpm' in opts else 'rectified_flow'
  c = config_base.base_config()
  c.family = 'dit'
  c.objective = objective(obj)
  c.model = ml_collections.ConfigDict(dict(
      patch_size=2, width=384, depth=12, num_heads=6, mlp_ratio=4.0, class_dropout=0.1,
      qk_norm=False, dtype='float32'))
  c.sample = sampler(obj, 50)

  if variant == 'tiny':
    c.model.update(patch_size=8, width=32, depth=2, num_heads=2)
    c.update(total_steps=4, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False,
             eval_batches=1)
    c.sample.update(num_steps=4, per_class=1)
    c.optim.update(lr=1e-3)
  elif variant == 'demo':
    c.model.update(patch_size=4, width=128, depth=4, num_heads=4)
    c.update(total_steps=1000, batch_size=64, log_every=50, checkpoint_every=250,
             sample_every=500, eval_every=500)
    c.optim.update(lr=5e-4, warmup_steps=100, ema_decay=0.999)
    if obj == 'rectified_flow':
      c.objective.time_scale = 1000.0  # finer time features than the reference's unscaled t
    c.sample.update(num_steps=30, cfg_scale=2.0)
  else:
    try:
      size, patch = variant.split('/')
      depth, width, heads = SIZES[size]
      c.model.update(patch_size=int(patch), width=width, depth=depth, num_heads=heads)
    except (ValueError, KeyError):
      raise UserError(f'unknown DiT variant {variant!r}: use tiny, demo or S|B|L|XL/2|4|8 '
                      '(e.g. configs/dit.py:B/2)') from None
    if size == 'G' or int(patch) not in (2, 4, 8):
      raise UserError(f'unknown DiT variant {variant!r}: DiT sizes are S, B, L, XL with '
                      'patch 2, 4 or 8')
    # The paper's recipe (ImageNet: override data.name/image_size/channels for latents).
    c.update(total_steps=400_000, batch_size=256, log_every=100, checkpoint_every=5000,
             sample_every=20000)
    c.optim.update(lr=1e-4, grad_clip=0.0)
  return c
